"""``meshca audit``: read the issuance record."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from meshca.adapters.storage.audit_log import SqlAuditLog
from meshca.adapters.storage.engine import make_engine
from meshca.config import Settings
from meshca.core.audit import AuditRecord

__all__ = ["format_records", "register"]

TABLE_COLUMNS = ("time", "outcome", "api", "spiffe_id", "serial", "not_after", "pod_name", "reason")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def format_records(records: list[AuditRecord], fmt: str) -> str:
    """Render records as ``json`` (one object per record, full detail) or a ``table``."""
    if fmt == "json":
        return json.dumps(
            [
                {k: _cell(v) if v is not None else None for k, v in asdict(r).items()}
                for r in records
            ],
            indent=2,
        )
    rows = [TABLE_COLUMNS] + [tuple(_cell(getattr(r, c)) for c in TABLE_COLUMNS) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


def _list(args: argparse.Namespace) -> int:
    url = args.database_url or Settings(data_dir=Path(args.data_dir)).effective_database_url
    if not args.database_url and not (Path(args.data_dir) / "meshca.db").exists():
        print(f"meshca: no issuance record in {args.data_dir}", file=sys.stderr)
        return 1
    if args.limit < 1:
        print("meshca: --limit must be at least 1", file=sys.stderr)
        return 2
    engine = make_engine(url)
    log = SqlAuditLog(engine)
    try:
        records = asyncio.run(
            log.list(limit=args.limit, spiffe_id=args.spiffe_id, serial=args.serial)
        )
    finally:
        log.close()
        engine.dispose()
    print(format_records(list(records), args.format))
    return 0


def register(commands: Any) -> None:
    parser = commands.add_parser("audit", help="query the issuance record")
    sub = parser.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    lister = sub.add_parser(
        "list",
        help="print issuance and refusal records, newest first",
        description="Print issuance and refusal records, newest first.",
    )
    lister.add_argument("--data-dir", default="meshca-data", help="meshca's data directory")
    lister.add_argument("--database-url", help="SQLAlchemy URL (instead of --data-dir's SQLite)")
    lister.add_argument("--format", choices=("table", "json"), default="table")
    lister.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    lister.add_argument("--spiffe-id", help="only records for this exact SPIFFE ID")
    lister.add_argument("--serial", help="only the record of this serial (hex)")
    lister.set_defaults(run=_list)
