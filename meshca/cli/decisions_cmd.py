"""``meshca audit decisions``: read the authorization decision log."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from meshca.adapters.storage.decision_log import SqlDecisionLog, record_to_dict
from meshca.adapters.storage.engine import make_engine
from meshca.config import Settings
from meshca.core.errors import MeshcaError
from meshca.core.policy import DecisionRecord

__all__ = ["format_decisions", "register"]

COLUMNS = ("time", "decision", "source", "destination", "method", "path", "decided_by", "version")


def _row(record: DecisionRecord) -> tuple[str, ...]:
    decided_by = record.policy or record.reason
    if record.rule is not None:
        decided_by += f" rule {record.rule}"
    return (
        record.time.strftime("%Y-%m-%dT%H:%M:%SZ") if isinstance(record.time, datetime) else "",
        "ALLOW" if record.allowed else "DENY",
        record.source_principal or "-",
        record.destination_principal or "-",
        record.method or "-",
        record.path,
        decided_by,
        record.version,
    )


def format_decisions(records: list[DecisionRecord], fmt: str) -> str:
    """``json`` (every field; what ``meshca policy diff --decisions`` reads) or ``table``."""
    if fmt == "json":
        return json.dumps([record_to_dict(r) for r in records], indent=2)
    rows = [COLUMNS, *(_row(r) for r in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _decisions(args: argparse.Namespace) -> int:
    url = args.database_url or Settings(data_dir=Path(args.data_dir)).effective_database_url
    if not args.database_url and not (Path(args.data_dir) / "meshca.db").exists():
        print(f"meshca: no decision record in {args.data_dir}", file=sys.stderr)
        return 1
    if args.limit < 1:
        print("meshca: --limit must be at least 1", file=sys.stderr)
        return 2
    try:
        engine = make_engine(url)
    except (ValueError, MeshcaError) as exc:
        print(f"meshca: {exc}", file=sys.stderr)
        return 1
    store = SqlDecisionLog(engine)
    try:
        records = asyncio.run(
            store.list(
                limit=args.limit,
                denied_only=args.denied,
                policy=args.policy,
                destination=args.destination,
                source=args.source,
            )
        )
    except MeshcaError as exc:
        print(f"meshca: {exc.message}", file=sys.stderr)
        return 1
    finally:
        store.close()
        engine.dispose()
    print(format_decisions(list(records), args.format))
    return 0


def register(sub: Any) -> None:
    """Add ``decisions`` to the ``meshca audit`` subcommands."""
    parser = sub.add_parser(
        "decisions",
        help="print authorization decisions, newest first",
        description="Print recorded authorization decisions (every deny; allows as sampled), "
        "newest first, with the policy and policy-set version that decided.",
    )
    parser.add_argument("--data-dir", default="meshca-data", help="meshca's data directory")
    parser.add_argument("--database-url", help="SQLAlchemy URL (instead of --data-dir's SQLite)")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    parser.add_argument("--denied", action="store_true", help="only denied requests")
    parser.add_argument("--policy", help="only decisions by this policy (namespace/name)")
    parser.add_argument("--destination", help="only requests to this SPIFFE ID")
    parser.add_argument("--source", help="only requests from this SPIFFE ID")
    parser.set_defaults(run=_decisions)
