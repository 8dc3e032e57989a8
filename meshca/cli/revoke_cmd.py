"""``meshca revoke``: the deny-list, on the record.

    meshca revoke (--serial S | --spiffe-id ID | --spiffe-id-prefix P | --key-sha256 H)
                  --reason TEXT [--until TIME] [--by NAME] [--force]
    meshca revoke list [--all] [--format table|json]
    meshca revoke lift ID [--by NAME] [--reason TEXT]

Each add and lift is written to the database with its record in the issuance log, in one
transaction; every running server applies it within ``--journal-poll``. Input that
cannot be acted on exits 2 with one line saying why; a database that cannot be used
exits 1.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from meshca.cli.db_cmd import add_database_flags
from meshca.cli.serve_cmd import HELP
from meshca.config import ConfigError, Settings, load_settings, parse_duration
from meshca.core.denylist import DenyEntry, DenyKind, check_lift, check_request
from meshca.core.errors import InvalidRequest, MeshcaError, UnsafeChange
from meshca.core.spiffe import TrustDomain

__all__ = ["register"]

DESCRIPTION = """\
Deny issuance to an identity or a key, or revoke a serial, with who asked, when and why.

While an entry stands, a request for a denied SPIFFE ID (exactly, or under a denied
prefix on a path-segment boundary) or with a denied public key (SHA-256 of the CSR's DER
SubjectPublicKeyInfo) is refused with PERMISSION_DENIED and recorded as a refusal
(reason 'revoked', naming the entry). A --serial entry does not block issuance; it is
recorded and listed for revocation lists. Every add and lift is a record of the
verifiable issuance log ('meshca audit query --outcome revoked').

  meshca revoke --spiffe-id spiffe://cluster.local/ns/shop/sa/cart --reason "key leaked"
  meshca revoke list
  meshca revoke lift 3 --reason "key rotated"
"""

_TARGETS = (
    ("serial", DenyKind.SERIAL, "certificate serial, hex (recorded; does not block issuance)"),
    ("spiffe_id", DenyKind.SPIFFE_ID, "deny this SPIFFE ID exactly"),
    (
        "spiffe_id_prefix",
        DenyKind.SPIFFE_ID_PREFIX,
        "deny this SPIFFE ID and every ID under it (whole path segments)",
    ),
    ("key_sha256", DenyKind.KEY_SHA256, "deny this public key: SHA-256 of its DER SPKI, hex"),
)


class _Usage(Exception):
    """The command line asks for something that cannot be done: exit 2."""


def _settings(args: argparse.Namespace) -> Settings:
    flags = {
        "config": args.config,
        "data_dir": args.data_dir,
        "database_url": args.database_url,
        "trust_domain": args.trust_domain,
    }
    return load_settings(flags)


def _now() -> datetime:
    return datetime.now(UTC)


def parse_until(text: str, now: datetime) -> datetime:
    """``--until``: an RFC 3339 time with a zone, or a duration from now (``12h``, ``7d``)."""
    value = text.strip()
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        try:
            return now + parse_duration(value)
        except (ConfigError, ValueError, OverflowError):
            raise _Usage(
                f"--until {value[:80]!r} is neither a time (2026-12-01T00:00:00Z) nor a "
                "duration (12h, 7d)"
            ) from None
    if moment.utcoffset() is None:
        raise _Usage(f"--until {value[:80]!r} needs a time zone (add Z for UTC)")
    return moment.astimezone(UTC)


def _requested_by(given: str | None) -> str:
    if given is not None:
        return given
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@contextmanager
def _store(settings: Settings) -> Iterator[Any]:
    """The deny-list in the configured database, its engine disposed of afterwards."""
    from meshca.adapters.storage.deny_list import SqlDenyList
    from meshca.adapters.storage.engine import make_engine

    if not settings.database_url and not (settings.data_dir / "meshca.db").exists():
        raise _NoDatabase(
            f"no database in {settings.data_dir}: start 'meshca serve --data-dir "
            f"{settings.data_dir}' once, or give --database-url"
        )
    engine = make_engine(settings.effective_database_url)
    try:
        yield SqlDenyList(engine)
    finally:
        engine.dispose()


class _NoDatabase(Exception):
    pass


def _protected(trust_domain: TrustDomain) -> tuple[Any, ...]:
    from meshca.app import SERVER_WORKLOAD

    return (trust_domain.workload_id(*SERVER_WORKLOAD),)


def _add(args: argparse.Namespace, settings: Settings) -> int:
    chosen = [(kind, getattr(args, name)) for name, kind, _ in _TARGETS]
    given = [(kind, value) for kind, value in chosen if value is not None]
    if len(given) != 1:
        raise _Usage(
            "give exactly one of --serial, --spiffe-id, --spiffe-id-prefix, --key-sha256 "
            "(or 'list', or 'lift ID')"
        )
    if args.reason is None:
        raise _Usage("--reason is required: say why")
    kind, value = given[0]
    now = _now()
    until = None if args.until is None else parse_until(args.until, now)
    trust_domain = TrustDomain.parse(settings.trust_domain)
    request = check_request(
        kind,
        value,
        reason=args.reason,
        requested_by=_requested_by(args.by),
        until=until,
        now=now,
        trust_domain=trust_domain,
        protected=_protected(trust_domain),
        force=args.force,
    )
    with _store(settings) as store:
        entry = store.add(request, now)
    blocks = "" if kind is not DenyKind.SERIAL else " (recorded; does not block issuance)"
    print(
        f"deny-list entry {entry.id}: {entry.kind} {entry.value}{_until_text(entry)}{blocks}; "
        f"log leaf {entry.leaf_index}; servers apply it within --journal-poll"
    )
    return 0


def _until_text(entry: DenyEntry) -> str:
    return "" if entry.until is None else f" until {_stamp(entry.until)}"


def _stamp(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%dT%H:%M:%SZ")


def _state(entry: DenyEntry, now: datetime) -> str:
    if entry.lifted_at is not None:
        return "lifted"
    return "active" if entry.active(now) else "expired"


def _list(args: argparse.Namespace, settings: Settings) -> int:
    with _store(settings) as store:
        entries = store.entries()
    now = _now()
    shown = [e for e in entries if args.all or e.active(now)]
    if args.format == "json":
        document = [
            {
                "id": e.id,
                "kind": str(e.kind),
                "value": e.value,
                "state": _state(e, now),
                "reason": e.reason,
                "by": e.requested_by,
                "created_at": _stamp(e.created_at),
                "until": None if e.until is None else _stamp(e.until),
                "lifted_at": None if e.lifted_at is None else _stamp(e.lifted_at),
                "lifted_by": e.lifted_by,
                "leaf_index": e.leaf_index,
            }
            for e in shown
        ]
        print(json.dumps(document, indent=2))
        return 0
    if not shown:
        print("the deny-list is empty" if not entries else "no entry stands (--all shows all)")
        return 0
    columns = ("ID", "KIND", "VALUE", "STATE", "BY", "SINCE", "UNTIL", "REASON")
    rows = [columns] + [
        (
            str(e.id),
            str(e.kind),
            e.value,
            _state(e, now),
            e.requested_by,
            _stamp(e.created_at),
            _stamp(e.until),
            e.reason if len(e.reason) <= 60 else e.reason[:57] + "...",
        )
        for e in shown
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _lift(args: argparse.Namespace, settings: Settings, entry_text: str) -> int:
    if any(getattr(args, name) is not None for name, _, _ in _TARGETS) or args.until:
        raise _Usage("'lift' takes an entry id, --by and --reason only")
    try:
        entry_id = int(entry_text, 10)
    except ValueError:
        raise _Usage(f"entry id {entry_text[:40]!r} is not a number") from None
    if not 0 < entry_id < 1 << 63:
        raise _Usage(f"no deny-list entry {entry_id}")
    by, reason = check_lift(_requested_by(args.by), args.reason or "")
    with _store(settings) as store:
        entry = store.lift(entry_id, by, reason, _now())
    print(f"deny-list entry {entry.id} lifted: {entry.kind} {entry.value}")
    return 0


def _run(args: argparse.Namespace) -> int:
    words: list[str] = args.words
    try:
        settings = _settings(args)
        match words:
            case []:
                return _add(args, settings)
            case ["list"]:
                if any(getattr(args, n) is not None for n, _, _ in _TARGETS):
                    raise _Usage("'list' takes --all and --format only")
                return _list(args, settings)
            case ["lift", entry_text]:
                return _lift(args, settings, entry_text)
            case ["lift"]:
                raise _Usage("'lift' needs an entry id: meshca revoke lift ID")
            case _:
                raise _Usage(f"unknown arguments {' '.join(words)[:80]!r}: use 'list' or 'lift ID'")
    except (_Usage, InvalidRequest, UnsafeChange) as error:
        text = error.message if isinstance(error, MeshcaError) else str(error)
        prefix = "refused: " if isinstance(error, UnsafeChange) else ""
        print(f"meshca revoke: {prefix}{_one_line(text)}", file=sys.stderr)
        return 2
    except _NoDatabase as error:
        print(f"meshca revoke: {error}", file=sys.stderr)
        return 1
    except MeshcaError as error:
        print(f"meshca revoke: {_one_line(error.message)}", file=sys.stderr)
        return 1


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:297] + "..."


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "revoke",
        help="deny an identity or key, revoke a serial; 'list', 'lift ID'",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "words", nargs="*", metavar="list | lift ID", help="list the entries, or lift one"
    )
    target = parser.add_argument_group("what to deny (exactly one, to add an entry)")
    for name, _, help_text in _TARGETS:
        target.add_argument("--" + name.replace("_", "-"), metavar="VALUE", help=help_text)
    parser.add_argument("--reason", help="why (required to add; one line, at most 1000 characters)")
    parser.add_argument(
        "--until",
        metavar="TIME",
        help="the entry expires then: RFC 3339 with a zone, or a duration (12h, 7d)",
    )
    parser.add_argument("--by", metavar="NAME", help="who asks (default: the OS user)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="allow an entry that denies meshca's own identity or the whole trust domain",
    )
    parser.add_argument("--all", action="store_true", help="list: lifted and expired too")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="list")
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (MESHCA_CONFIG)")
    parser.add_argument("--trust-domain", help=HELP["trust_domain"])
    add_database_flags(parser)
    parser.set_defaults(run=_run)
