"""``meshca ca``: the CA's authorities, their rotation, and the trust bundle.

``status``, ``rotate`` and ``import`` work on the journal in the database and the keys
in the data directory directly, under the same lock as the server's rotator: a running
server picks the change up within ``--journal-poll``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.adapters.event_log import EVENTS_LOGGER
from meshca.adapters.keys.file_store import FileCaStore
from meshca.cli.serve_cmd import HELP
from meshca.config import ConfigError, Settings, load_settings
from meshca.core.authority import SignerKey
from meshca.core.errors import MeshcaError, UnsafeChange
from meshca.core.jwt_svid import JwtKey
from meshca.core.rotation import AuthoritySet, AuthorityState, Rotation

__all__ = ["load_bundle", "register"]

#: The settings that decide the CA's lifecycle; the other commands accept these.
CA_SETTINGS = (
    "data_dir",
    "database_url",
    "trust_domain",
    "root_ttl",
    "intermediate_ttl",
    "max_svid_ttl",
    "propagation_delay",
    "root_rotation",
    "vault_addr",
    "vault_upstream",
    "vault_transit",
    "vault_pki_mount",
    "vault_transit_mount",
    "vault_auth",
    "vault_auth_mount",
    "vault_token_file",
    "vault_role_id",
    "vault_secret_id_file",
    "vault_role",
    "vault_jwt_file",
    "vault_ca_file",
    "key_encryption_key_file",
)


def load_bundle(data_dir: Path, database_url: str | None = None) -> tuple[x509.Certificate, ...]:
    """The roots to trust, from the journal (or a pre-journal data directory's files).

    Empty when there is no CA there yet.
    """
    from meshca.adapters.storage.engine import make_engine
    from meshca.adapters.storage.journal import SqlAuthorityJournal

    url = database_url or Settings(data_dir=data_dir).effective_database_url
    if database_url or (data_dir / "meshca.db").exists():
        engine = make_engine(url)
        try:
            bundle = SqlAuthorityJournal(engine).load().bundle()
        except MeshcaError:
            bundle = ()  # a database from before the journal
        finally:
            engine.dispose()
        if bundle:
            return bundle
    legacy = FileCaStore(data_dir)
    return legacy.load_roots() if legacy.exists() else ()


def load_jwt_keys(data_dir: Path, database_url: str | None = None) -> tuple[JwtKey, ...]:
    """The JWT-SVID keys verifiers must know, from the journal (none before it had any)."""
    from meshca.adapters.storage.engine import make_engine
    from meshca.adapters.storage.journal import SqlAuthorityJournal

    if not (database_url or (data_dir / "meshca.db").exists()):
        return ()
    engine = make_engine(database_url or Settings(data_dir=data_dir).effective_database_url)
    try:
        entries = SqlAuthorityJournal(engine).load().jwt_bundle()
    except MeshcaError:
        return ()
    finally:
        engine.dispose()
    return tuple(JwtKey.from_certificate(e.id, e.certificate) for e in entries)


def _no_ca(data_dir: Path) -> int:
    print(
        f"meshca: no CA in {data_dir}: start 'meshca serve --data-dir {data_dir}' once to "
        "create it",
        file=sys.stderr,
    )
    return 1


def _bundle(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    roots = load_bundle(data_dir, args.database_url)
    if not roots:
        return _no_ca(data_dir)
    if args.format == "spiffe":
        from meshca.adapters.bundle_endpoint import spiffe_bundle_document

        refresh = (args.refresh_hint or timedelta(minutes=5)).total_seconds()
        document = spiffe_bundle_document(
            roots,
            sequence=args.sequence,
            refresh_hint=refresh,
            jwt_keys=load_jwt_keys(data_dir, args.database_url),
        )
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return 0
    for root in roots:
        sys.stdout.write(root.public_bytes(Encoding.PEM).decode())
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    flags = {name: getattr(args, name, None) for name in CA_SETTINGS}
    flags["config"] = args.config
    return load_settings(flags)


@contextmanager
def _authorities(settings: Settings) -> Iterator[Any]:
    """The authority service over the configured database, disposed of afterwards."""
    from meshca import app
    from meshca.adapters.clock import SystemClock
    from meshca.adapters.storage.engine import make_engine

    engine = make_engine(settings.effective_database_url)
    try:
        yield app.build_authorities(settings, engine, SystemClock())
    finally:
        engine.dispose()


def _failed(error: MeshcaError) -> int:
    """Say why a command could not act; an unsafe move is a refusal, not a failure."""
    prefix = "refused: " if isinstance(error, UnsafeChange) else ""
    print(f"meshca: {prefix}{error.message}", file=sys.stderr)
    return 1


def _when(at: datetime, now: datetime) -> str:
    delta = at - now
    if delta <= timedelta(0):
        return "now"
    seconds = int(delta.total_seconds())
    if seconds < 60:
        return f"in {seconds}s"
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    parts = [f"{days}d"] if days else []
    if hours or days:
        parts.append(f"{hours}h")
    if not days:
        parts.append(f"{minutes}m")
    return "in " + "".join(parts)


def _stamp(at: datetime | None) -> str:
    return "-" if at is None else at.strftime("%Y-%m-%d %H:%M:%SZ")


def format_status(
    authorities: AuthoritySet, rotation: Rotation, now: datetime, *, show_removed: bool
) -> str:
    """The lifecycle as a table, then what happens next and when."""
    columns = ("KIND", "ID", "STATE", "SOURCE", "SINCE", "NOT BEFORE", "NOT AFTER", "SHA-256")
    rows: list[tuple[str, ...]] = [columns]
    order = {"root": 0, "intermediate": 1, "jwt-key": 2}
    for entry in sorted(
        authorities.entries, key=lambda e: (order[e.kind], e.state != "active", e.prepared_at)
    ):
        if entry.state == AuthorityState.REMOVED and not show_removed:
            continue
        since = {
            AuthorityState.PREPARED: entry.prepared_at,
            AuthorityState.ACTIVE: entry.activated_at,
            AuthorityState.RETIRED: entry.retired_at,
            AuthorityState.REMOVED: entry.removed_at,
        }[entry.state]
        rows.append(
            (
                entry.kind.value,
                entry.id,
                entry.state.value + (" TAINTED" if entry.tainted_at is not None else ""),
                entry.source.value,
                _stamp(since),
                _stamp(entry.not_before),
                _stamp(entry.not_after),
                entry.fingerprint[:16] + "…",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.append("")
    lines.append(f"trust bundle: {len(authorities.bundle())} root(s)")
    plan = rotation.plan(now)
    lines.append("next:" if plan else "next: nothing scheduled")
    for step in plan:
        target = f" {step.target}" if step.target else ""
        lines.append(
            f"  {_stamp(step.at)}  ({_when(step.at, now)})  {step.step}{target}: {step.reason}"
        )
    root = authorities.active_root
    if root is not None and root.key_ref is None and root.source != "upstream":
        inter = authorities.active_intermediate
        if inter is not None:
            lines.append(
                f"  note: meshca cannot renew intermediates under root {root.id}; import a "
                f"successor before {_stamp(inter.half_life)}"
            )
    return "\n".join(lines)


def _status(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not args.database_url and not (settings.data_dir / "meshca.db").exists():
        return _no_ca(settings.data_dir)
    with _authorities(settings) as service:
        try:
            view = service.refresh()
        except MeshcaError as error:
            return _failed(error)
        if not view.authorities.entries:
            return _no_ca(settings.data_dir)
        now = _now()
        rotation = service.rotation(view.authorities)
        orphans, orphans_problem = _orphans(service) if settings.vault_transit else ((), None)
        if args.format == "json":
            document = _status_json(view.authorities, rotation, now)
            if settings.vault_transit:
                document["orphaned_keys"] = list(orphans)
                document["orphaned_keys_error"] = orphans_problem
            print(json.dumps(document, indent=2))
        else:
            print(format_status(view.authorities, rotation, now, show_removed=args.all))
            vault = _vault_health(settings)
            if vault:
                print(vault)
            if orphans_problem:
                print(f"orphaned keys: unknown ({orphans_problem})")
            elif orphans:
                print(
                    f"orphaned keys: {len(orphans)} in {settings.vault_transit_mount} that no "
                    "live authority names ('meshca ca prune-keys' deletes them):"
                )
                for key_ref in orphans:
                    print(f"  {key_ref}")
    return 0


def _orphans(service: Any) -> tuple[tuple[str, ...], str | None]:
    try:
        return service.orphaned_keys(), None
    except MeshcaError as error:
        return (), error.message


def _vault_health(settings: Settings) -> str | None:
    """One line on Vault, when it is configured: reachable, or why the CA is degraded."""
    from meshca import app

    client = app.build_vault_client(settings)
    if client is None:
        return None
    try:
        client.call(lambda c: c.sys.read_health_status(method="GET"), what="a health check")
    except MeshcaError as error:
        return (
            f"vault: DEGRADED: {error.message}; issuing continues under the current "
            "intermediate while it is valid"
        )
    return f"vault: reachable at {settings.vault_addr}"


def _status_json(authorities: AuthoritySet, rotation: Rotation, now: datetime) -> dict[str, Any]:
    return {
        "authorities": [
            {
                "id": e.id,
                "kind": e.kind.value,
                "state": e.state.value,
                "source": e.source.value,
                "parent": e.parent_id,
                "not_before": _stamp(e.not_before),
                "not_after": _stamp(e.not_after),
                "sha256": e.fingerprint,
                "prepared_at": _stamp(e.prepared_at),
                "activated_at": _stamp(e.activated_at),
                "retired_at": _stamp(e.retired_at),
                "removed_at": _stamp(e.removed_at),
                "tainted_at": None if e.tainted_at is None else _stamp(e.tainted_at),
            }
            for e in authorities.entries
        ],
        "bundle": [c.fingerprint(_sha256()).hex() for c in authorities.bundle()],
        "next": [
            {"step": s.step.value, "at": _stamp(s.at), "target": s.target, "reason": s.reason}
            for s in rotation.plan(now)
        ],
    }


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def _rotate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    with _authorities(settings) as service:
        try:
            service.refresh()
            if not service.view.authorities.entries:
                return _no_ca(settings.data_dir)
            if args.root:
                reports = service.rotate_root(now=args.now)
            else:
                reports = service.rotate_intermediate()
            for report in reports:
                print(
                    f"{report.step}: {', '.join(report.entries)} ({report.seconds * 1000:.0f} ms)"
                )
            view = service.view
            activate = service.rotation(view.authorities).root_activate_at(_now())
            if args.root and view.authorities.prepared_root is not None and activate is not None:
                print(
                    f"root {view.authorities.prepared_root.id} is in the trust bundle and takes "
                    f"over at {_stamp(activate)} ({_when(activate, _now())})"
                )
        except MeshcaError as error:
            return _failed(error)
    return 0


def _now() -> datetime:
    from meshca.adapters.clock import SystemClock

    return SystemClock().now()


def _import(args: argparse.Namespace) -> int:
    from meshca.adapters.keys.files import FileKeyManager
    from meshca.adapters.keys.sealed import SealedKeyManager
    from meshca.adapters.vault.transit_key import TransitKeyManager

    settings = _settings(args)
    try:
        certificates = x509.load_pem_x509_certificates(Path(args.cert).read_bytes())
    except (OSError, ValueError) as error:
        print(f"meshca: cannot read the certificate {args.cert}: {error}", file=sys.stderr)
        return 2
    key = _read_key(Path(args.key), args.key_passphrase_file)
    if key is None:
        return 2
    if not isinstance(key, SignerKey):
        print("meshca: refused: the key must be ECDSA, RSA or Ed25519", file=sys.stderr)
        return 1
    if settings.vault_upstream and certificates and _self_signed(certificates[0]):
        print(
            "meshca: refused: with --vault-upstream the roots come from Vault's PKI mount "
            f"{settings.vault_pki_mount!r}: import the root there ('bao write "
            f"{settings.vault_pki_mount}/issuers/import/bundle pem_bundle=@ca.pem', then "
            f"'bao write {settings.vault_pki_mount}/config/issuers default=<issuer id>'); "
            "meshca publishes it and signs under it after the propagation delay",
            file=sys.stderr,
        )
        return 1
    with _authorities(settings) as service:
        try:
            service.refresh()
            # In Vault Transit when keys are there (never on disk); sealed in the
            # database when replicas share keys; else in the data directory.
            importer = service.keys
            if not isinstance(importer, SealedKeyManager | TransitKeyManager):
                importer = FileKeyManager(settings.data_dir / "ca")
            entries = service.import_authority(certificates, key, importer)
            for entry in entries:
                where = f", key {entry.key_ref}" if entry.key_ref and settings.vault_transit else ""
                print(f"imported {entry.kind} {entry.id} ({entry.state}{where})")
            plan = service.rotation().plan(_now())
            for step in plan[:3]:
                print(
                    f"next: {_stamp(step.at)} ({_when(step.at, _now())}) {step.step}: {step.reason}"
                )
        except MeshcaError as error:
            return _failed(error)
    return 0


def _self_signed(certificate: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _read_key(path: Path, passphrase_file: str | None) -> Any:
    """The private key in ``path`` (PEM), or None after saying why it cannot be had."""
    try:
        pem = path.read_bytes()
        password = Path(passphrase_file).read_bytes().rstrip(b"\r\n") if passphrase_file else None
    except OSError as error:
        print(f"meshca: cannot read {error.filename}: {error.strerror}", file=sys.stderr)
        return None
    try:
        return serialization.load_pem_private_key(pem, password=password)
    except TypeError:
        if password is None:
            print(
                f"meshca: the key in {path} is encrypted: give its passphrase with "
                "--key-passphrase-file",
                file=sys.stderr,
            )
        else:
            print(
                f"meshca: the key in {path} is not encrypted: drop --key-passphrase-file",
                file=sys.stderr,
            )
    except (ValueError, UnsupportedAlgorithm) as error:
        reason = "wrong passphrase, or " if password is not None else ""
        print(
            f"meshca: cannot read the key in {path} ({reason}not a PEM private key): "
            f"{str(error).splitlines()[0][:200] if str(error) else type(error).__name__}",
            file=sys.stderr,
        )
    return None


def _prune_keys(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if not settings.vault_transit:
        print(
            "meshca: prune-keys is for keys in Vault Transit (--vault-transit); other key "
            "stores drop keys no authority names by themselves",
            file=sys.stderr,
        )
        return 2
    if not args.database_url and not (settings.data_dir / "meshca.db").exists():
        return _no_ca(settings.data_dir)
    dry_run = args.dry_run or not args.yes
    with _authorities(settings) as service:
        try:
            orphans = service.prune_keys(dry_run=dry_run)
        except MeshcaError as error:
            return _failed(error)
    if not orphans:
        print("no orphaned keys")
        return 0
    for key_ref in orphans:
        print(f"{'would delete' if dry_run else 'deleted'} {key_ref}")
    if dry_run:
        if not args.dry_run:
            print("meshca: nothing deleted: run again with --yes to delete these", file=sys.stderr)
            return 1
        return 0
    logging.getLogger(EVENTS_LOGGER).warning(
        "%s",
        json.dumps(
            {"event": "ca-keys-pruned", "mount": settings.vault_transit_mount, "keys": orphans}
        ),
    )
    print(f"pruned {len(orphans)} orphaned key(s) from {settings.vault_transit_mount}")
    return 0


def _reseal(args: argparse.Namespace) -> int:
    from meshca import app
    from meshca.adapters.storage.engine import make_engine

    settings = _settings(args)
    if settings.key_encryption_key_file is None:
        print("meshca: reseal-keys needs --key-encryption-key-file", file=sys.stderr)
        return 2
    engine = make_engine(settings.effective_database_url)
    try:
        keys = app.sealed_keys(settings, engine)
        moved, kept = keys.reseal()
    except MeshcaError as error:
        return _failed(error)
    finally:
        engine.dispose()
    print(f"re-sealed {moved} keys under key-encryption key {keys.sealing_id}; {kept} already were")
    return 0


def _ca_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (MESHCA_CONFIG)")
    kinds = {f.name: str(f.type) for f in fields(Settings)}
    for name in CA_SETTINGS:
        flag = "--" + name.replace("_", "-")
        if kinds[name] == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=HELP[name])
        else:
            parser.add_argument(flag, help=HELP[name])


def register(commands: Any) -> None:
    parser = commands.add_parser(
        "ca", help="the certificate authority: status, rotation, import, taint, trust bundle"
    )
    sub = parser.add_subparsers(dest="ca_command", metavar="COMMAND", required=True)
    bundle = sub.add_parser(
        "bundle",
        help="print the trust bundle (root certificates, PEM or SPIFFE JSON)",
        description="Print the roots every meshca certificate verifies against.",
    )
    bundle.add_argument(
        "--data-dir", default="meshca-data", help="meshca's data directory (default ./meshca-data)"
    )
    bundle.add_argument("--database-url", help="SQLAlchemy URL (instead of --data-dir's SQLite)")
    bundle.add_argument("--format", choices=("pem", "spiffe"), default="pem")
    bundle.add_argument("--sequence", type=int, default=1, help="spiffe_sequence (spiffe format)")
    bundle.add_argument("--refresh-hint", type=_duration, help="spiffe_refresh_hint (default 5m)")
    bundle.set_defaults(run=_bundle)

    status = sub.add_parser(
        "status",
        help="every authority with its state, validity and fingerprint, and what happens next",
    )
    _ca_flags(status)
    status.add_argument("--format", choices=("table", "json"), default="table")
    status.add_argument("--all", action="store_true", help="include removed authorities")
    status.set_defaults(run=_status)

    rotate = sub.add_parser(
        "rotate",
        help="start a rotation now (refused when it would break handshakes)",
        description="--intermediate (default): sign and activate a new intermediate now. "
        "--root: put a new root in the trust bundle now; it takes over after the "
        "propagation delay. --now: also activate an already prepared root, if its "
        "propagation delay has passed.",
    )
    which = rotate.add_mutually_exclusive_group()
    which.add_argument("--root", action="store_true", help="rotate the root")
    which.add_argument("--intermediate", action="store_true", help="rotate the intermediate")
    rotate.add_argument("--now", action="store_true", help="do not wait for the schedule")
    _ca_flags(rotate)
    rotate.set_defaults(run=_rotate)

    importer = sub.add_parser(
        "import",
        help="plug in an organisation's root, or intermediate with its chain",
        description="--cert: PEM with the CA certificate first, then its issuers up to the "
        "root. --key: its private key (PEM; --key-passphrase-file if encrypted). A new root "
        "waits out the propagation delay in the trust bundle before anything is signed "
        "under it. With --vault-transit the key is imported into Transit (ECDSA P-256/P-384; "
        "never written to disk) and checked by a signature made there; with "
        "--vault-upstream only an intermediate under a root of the PKI mount is taken.",
    )
    importer.add_argument("--cert", required=True, help="certificate (and chain), PEM")
    importer.add_argument("--key", required=True, help="private key, PEM")
    importer.add_argument(
        "--key-passphrase-file", metavar="FILE", help="passphrase of an encrypted --key"
    )
    _ca_flags(importer)
    importer.set_defaults(run=_import)

    prune = sub.add_parser(
        "prune-keys",
        help="delete Vault Transit keys that no live authority names (orphans)",
        description="With --vault-transit: list the keys in the Transit mount whose names "
        "start with meshca's prefix (meshca-<trust domain>-) and that no authority in the "
        "journal names, other than removed ones: left by a crash between making a key and "
        "recording it, or by a removal cut short. Without --yes nothing is deleted. Keys "
        "outside the prefix are never touched. Runs under the rotation lock.",
    )
    prune.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    prune.add_argument("--yes", action="store_true", help="delete them")
    _ca_flags(prune)
    prune.set_defaults(run=_prune_keys)

    reseal = sub.add_parser(
        "reseal-keys",
        help="seal every key in the database under the first key-encryption key",
        description="Replacing the key-encryption key: give every replica a file with the "
        "new key on its first line and the old one on the next, run this once, then "
        "remove the old line. Keys already sealed under the first key are left as they are.",
    )
    _ca_flags(reseal)
    reseal.set_defaults(run=_reseal)

    from meshca.cli.taint_cmd import add_taint_parser

    add_taint_parser(sub, _ca_flags, _settings)


def _duration(text: str) -> timedelta:
    from meshca.config import parse_duration

    try:
        return parse_duration(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
