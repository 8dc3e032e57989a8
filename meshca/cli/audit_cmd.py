"""``meshca audit``: query the issuance record and prove it is complete and untouched.

Every command reads the database directly (``--data-dir`` or ``--database-url``) or a
running server's audit API (``--server``, with ``--token-file`` or a client SVID).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import csv
import io
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.adapters.storage.audit_log import SqlAuditLog
from meshca.adapters.storage.engine import make_engine
from meshca.cli import decisions_cmd
from meshca.cli.audit_backend import AuditBackend, NoRecord, open_backend
from meshca.config import ConfigError, Settings, parse_duration
from meshca.core.audit import (
    MAX_PAGE_SIZE,
    AuditQuery,
    AuditRecord,
    LogEntry,
    Outcome,
    entry_leaf_data,
)
from meshca.core.errors import MeshcaError
from meshca.core.log import SignedTreeHead, TreeHead, key_id_of, verify_tree_head
from meshca.core.merkle import leaf_hash, verify_consistency, verify_inclusion

__all__ = ["format_entries", "format_records", "head_from_json", "head_to_json", "register"]

TABLE_COLUMNS = ("time", "outcome", "api", "spiffe_id", "serial", "not_after", "pod_name", "reason")
CSV_COLUMNS = ("leaf_index", *(f for f in AuditRecord.__dataclass_fields__))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def _iso(value: object) -> object:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
    return value


def _table_cell(record: AuditRecord, column: str) -> str:
    # A deny-list change says what it was in its detail ("deny-list entry 3: ...").
    if column == "reason" and record.outcome in (Outcome.REVOKED, Outcome.LIFTED):
        detail = record.detail
        return detail if len(detail) <= 120 else detail[:117] + "..."
    return _cell(getattr(record, column))


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
    rows = [TABLE_COLUMNS] + [tuple(_table_cell(r, c) for c in TABLE_COLUMNS) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


def _entry_dict(entry: LogEntry) -> dict[str, Any]:
    return {"leaf_index": entry.leaf_index, **{k: _iso(v) for k, v in asdict(entry.record).items()}}


def format_entries(entries: Iterable[LogEntry], fmt: str, out: io.TextIOBase | Any) -> int:
    """Write entries as a table, JSON (full detail, exact times) or CSV; returns the count."""
    count = 0
    if fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for entry in entries:
            writer.writerow({k: "" if v is None else v for k, v in _entry_dict(entry).items()})
            count += 1
    elif fmt == "json":
        items = [_entry_dict(e) for e in entries]
        out.write(json.dumps(items, indent=2) + "\n")
        count = len(items)
    else:
        records = [e.record for e in entries]
        out.write(format_records(records, "table") + "\n")
        count = len(records)
    return count


# -- tree heads the auditor keeps -------------------------------------------------------------


def head_to_json(signed: SignedTreeHead) -> dict[str, Any]:
    return {
        "tree_size": signed.head.size,
        "root_hash": signed.head.root_hash.hex(),
        "timestamp": _iso(signed.head.timestamp),
        "timestamp_ms": signed.head.timestamp_ms,
        "key_id": signed.key_id.hex(),
        "signature": base64.b64encode(signed.signature).decode(),
    }


def head_from_json(data: dict[str, Any]) -> SignedTreeHead:
    return SignedTreeHead(
        head=TreeHead(
            size=int(data["tree_size"]),
            root_hash=bytes.fromhex(data["root_hash"]),
            timestamp=TreeHead.time_from_ms(int(data["timestamp_ms"])),
        ),
        key_id=bytes.fromhex(data["key_id"]),
        signature=base64.b64decode(data["signature"]),
    )


def _load_head(path: str) -> SignedTreeHead:
    try:
        return head_from_json(json.loads(Path(path).read_text()))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{path} is not a tree head saved by 'meshca audit head': {error}"
        ) from None


# -- commands -----------------------------------------------------------------------------------


def _time(text: str | None, flag: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not an RFC 3339 time") from None
    if value.utcoffset() is None:
        raise ConfigError(f"{flag}: {text!r} needs a time zone (Z or +hh:mm)")
    return value


def _query(args: argparse.Namespace, limit: int) -> AuditQuery:
    return AuditQuery(
        spiffe_id=args.spiffe_id,
        spiffe_id_prefix=args.spiffe_id_prefix,
        namespace=args.namespace,
        service_account=args.service_account,
        pod=args.pod,
        serial=args.serial,
        fingerprint=args.fingerprint,
        since=_time(args.since, "--since"),
        until=_time(args.until, "--until"),
        outcome=Outcome(args.outcome) if args.outcome else None,
        api=args.api,
        limit=limit,
    )


def _with_backend(run: Callable[[argparse.Namespace, AuditBackend], int]) -> Callable[..., int]:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            backend = open_backend(args)
        except NoRecord as error:
            print(f"meshca: {error}", file=sys.stderr)
            return 1
        try:
            return run(args, backend)
        except MeshcaError as error:
            print(f"meshca: {error.message}", file=sys.stderr)
            return 1
        except grpc.RpcError as error:
            print(f"meshca: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
        finally:
            backend.close()

    return wrapped


def _query_cmd(args: argparse.Namespace, backend: AuditBackend) -> int:
    if args.limit < 0:
        raise ConfigError("--limit must not be negative")
    everything = args.limit == 0 or args.limit > MAX_PAGE_SIZE
    query = _query(args, MAX_PAGE_SIZE if everything else args.limit)
    entries: Iterable[LogEntry]
    if everything:
        exported = backend.export(query)
        entries = (
            exported
            if args.limit == 0
            else (e for _, e in zip(range(args.limit), exported, strict=False))
        )
    else:
        entries = backend.query(query).entries
    format_entries(entries, args.format, sys.stdout)
    return 0


def _show(args: argparse.Namespace, backend: AuditBackend) -> int:
    entry = backend.get(serial=args.serial_hex)
    data = _entry_dict(entry)
    data["leaf_hash"] = leaf_hash(entry_leaf_data(entry)).hex()
    if args.format == "json":
        print(json.dumps(data, indent=2))
    else:
        width = max(len(k) for k in data)
        for key, value in data.items():
            print(f"{key.ljust(width)}  {'-' if value is None else value}")
    return 0


def _head(args: argparse.Namespace, backend: AuditBackend) -> int:
    signed = backend.head(fresh=args.fresh)
    if signed is None:
        print("meshca: no tree head has been signed yet (use --fresh)", file=sys.stderr)
        return 1
    text = json.dumps(head_to_json(signed), indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"tree head of size {signed.head.size} saved to {args.out}")
    else:
        print(text)
    return 0


def _log_key(args: argparse.Namespace, backend: AuditBackend) -> ec.EllipticCurvePublicKey:
    if args.log_key:
        pinned = serialization.load_pem_public_key(Path(args.log_key).read_bytes())
        if not isinstance(pinned, ec.EllipticCurvePublicKey):
            raise ConfigError(f"{args.log_key} is not an EC public key")
        return pinned
    key = backend.public_key()
    if key is None:
        raise ConfigError("no log key: give --log-key (the log's public key, PEM)")
    if args.server:
        print(
            f"note: using the server's log key {key_id_of(key).hex()[:16]}; pin it with --log-key",
            file=sys.stderr,
        )
    return key


def _check(ok: bool, what: str, failures: list[str]) -> None:
    print(f"{'ok  ' if ok else 'FAIL'}  {what}")
    if not ok:
        failures.append(what)


def _verify(args: argparse.Namespace, backend: AuditBackend) -> int:
    key = _log_key(args, backend)
    kept = [_load_head(p) for p in args.head or []]
    failures: list[str] = []
    for signed in kept:
        _check(
            verify_tree_head(key, signed),
            f"kept tree head of size {signed.head.size} is signed by the log key",
            failures,
        )
    if args.serial or args.leaf_index is not None:
        entry = backend.get(serial=args.serial, leaf_index=args.leaf_index)
        heads = kept or [h for h in [backend.head()] if h is not None]
        if not heads or all(h.head.size <= entry.leaf_index for h in heads):
            fresh = backend.head(fresh=True)
            assert fresh is not None
            heads.append(fresh)
        leaf = leaf_hash(entry_leaf_data(entry))
        for signed in heads:
            if signed.head.size <= entry.leaf_index:
                continue
            if not kept:
                _check(
                    verify_tree_head(key, signed),
                    f"tree head of size {signed.head.size} is signed by the log key",
                    failures,
                )
            proof = backend.inclusion_proof(entry.leaf_index, signed.head.size)
            _check(
                verify_inclusion(
                    leaf, entry.leaf_index, signed.head.size, proof.path, signed.head.root_hash
                ),
                f"leaf {entry.leaf_index} (serial {entry.record.serial}, "
                f"{entry.record.spiffe_id}) is in the tree head of size {signed.head.size}",
                failures,
            )
    elif args.consistency:
        old, new = sorted(kept, key=lambda h: h.head.size)[:2] if len(kept) >= 2 else (None, None)
        if old is None or new is None:
            raise ConfigError("--consistency needs two --head files")
        consistency = backend.consistency_proof(old.head.size, new.head.size)
        _check(
            verify_consistency(
                old.head.size,
                new.head.size,
                old.head.root_hash,
                new.head.root_hash,
                consistency.path,
            ),
            f"the tree head of size {old.head.size} is a prefix of the one of size {new.head.size}",
            failures,
        )
    else:
        report = backend.verify_all(key, kept)
        for finding in report.findings:
            print(f"FAIL  {finding.message}")
            failures.append(finding.message)
        if report.ok:
            print(
                f"ok    recomputed {report.leaves_checked} leaves (tree size {report.tree_size}, "
                f"root {report.root_hash.hex()}); {report.heads_checked} signed tree heads "
                f"match"
                + (f", {report.heads_skipped} older than retention" if report.heads_skipped else "")
            )
    return 0 if not failures else 1


def _prune(args: argparse.Namespace, backend: AuditBackend) -> int:
    from meshca.cli.audit_backend import LocalBackend

    if not isinstance(backend, LocalBackend):
        raise ConfigError("prune works on the database (--data-dir or --database-url)")
    before = datetime.now(UTC) - parse_duration(args.older_than)
    mark = backend.prune(before)
    print(f"records below leaf {mark} are pruned (older than {_iso(before)})")
    return 0


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


def _source_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="meshca-data", help="meshca's data directory")
    parser.add_argument("--database-url", help="SQLAlchemy URL (instead of --data-dir's SQLite)")
    remote = parser.add_argument_group("a running server instead of the database")
    remote.add_argument("--server", metavar="HOST:PORT", help="the server's audit API")
    remote.add_argument("--token-file", help="file holding the audit bearer token")
    remote.add_argument("--cert", help="client SVID, PEM (use the server's --audit-listen port)")
    remote.add_argument("--key", help="the client SVID's private key, PEM")
    remote.add_argument("--ca-file", help="roots to verify the server with (meshca ca bundle)")
    remote.add_argument("--server-name", default="localhost", help="name in the server's cert")
    remote.add_argument("--plaintext", action="store_true", help="the server runs --plaintext")


def _filter_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spiffe-id", help="exactly this SPIFFE ID")
    parser.add_argument("--spiffe-id-prefix", help="SPIFFE IDs starting with this text")
    parser.add_argument("--namespace", help="the workload's namespace")
    parser.add_argument("--service-account", help="the workload's service account")
    parser.add_argument("--pod", help="the pod's name or UID")
    parser.add_argument("--serial", help="certificate serial or JWT-SVID jti (lowercase hex)")
    parser.add_argument("--fingerprint", help="certificate SHA-256 fingerprint (hex)")
    parser.add_argument("--since", metavar="RFC3339", help="at or after this time")
    parser.add_argument("--until", metavar="RFC3339", help="before this time")
    parser.add_argument("--outcome", choices=tuple(o.value for o in Outcome))
    parser.add_argument("--api", help="the API used (e.g. istio.v1.auth.CreateCertificate)")


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "audit",
        help="query the issuance record and verify its log",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    lister.add_argument("--serial", help="only the record of this serial or jti (hex)")
    lister.set_defaults(run=_list)

    query = sub.add_parser(
        "query",
        help="records matching filters, newest first (table, JSON or CSV)",
        description="Records matching every filter given, newest first.",
    )
    _source_flags(query)
    _filter_flags(query)
    query.add_argument("--format", choices=("table", "json", "csv"), default="table")
    query.add_argument(
        "--limit", type=int, default=50, help="at most this many; 0 for all (default 50)"
    )
    query.set_defaults(run=_with_backend(_query_cmd))

    show = sub.add_parser("show", help="one record in full, by certificate serial or JWT jti")
    _source_flags(show)
    show.add_argument("serial_hex", metavar="SERIAL", help="certificate serial (lowercase hex)")
    show.add_argument("--format", choices=("text", "json"), default="text")
    show.set_defaults(run=_with_backend(_show))

    head = sub.add_parser(
        "head",
        help="print or save the latest signed tree head (keep it to check consistency later)",
    )
    _source_flags(head)
    head.add_argument("--fresh", action="store_true", help="have a head signed now")
    head.add_argument("--out", metavar="FILE", help="save it as JSON here")
    head.set_defaults(run=_with_backend(_head))

    verify = sub.add_parser(
        "verify",
        help="prove the log is complete and untouched (exit 0 only if everything holds)",
        description="Without --serial/--leaf-index/--consistency: recompute the whole log from "
        "its records, check every signed tree head, and name the first leaf whose row was "
        "edited, deleted or reordered. --serial: prove that certificate is in the signed "
        "tree head (or each --head). --consistency --head OLD --head NEW: prove NEW extends OLD.",
    )
    _source_flags(verify)
    which = verify.add_mutually_exclusive_group()
    which.add_argument("--serial", help="prove this certificate is in the log")
    which.add_argument("--leaf-index", type=int, help="prove this leaf is in the log")
    which.add_argument("--consistency", action="store_true", help="between two --head files")
    verify.add_argument(
        "--head", action="append", metavar="FILE", help="a tree head saved by 'audit head'"
    )
    verify.add_argument("--log-key", metavar="PEM", help="the log's public key, pinned")
    verify.set_defaults(run=_with_backend(_verify))

    prune = sub.add_parser(
        "prune",
        help="remove old records, keeping the hashes that prove the rest",
        description="Remove records older than --older-than from the start of the log, in "
        "blocks of 16 leaves; inclusion of the rest and consistency of later heads still "
        "verify. (meshca serve --audit-retention does this on its own.)",
    )
    _source_flags(prune)
    prune.add_argument("--older-than", required=True, metavar="DURATION", help="e.g. 90d")
    prune.set_defaults(run=_with_backend(_prune))

    # Authorization decisions (meshca serve --policy-dir) live in their own table.
    decisions_cmd.register(sub)
