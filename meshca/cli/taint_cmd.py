"""``meshca ca taint``: mark a root or intermediate as compromised, and move off it.

    meshca ca taint FINGERPRINT --reason TEXT [--by NAME]
                    [--emergency --yes-i-understand-peers-may-fail]

FINGERPRINT is the SHA-256 'meshca ca status' shows (its ID, the first 16 hex digits,
is enough). The taint is a record of the issuance log (outcome ``revoked``, api
``taint``). Input that cannot be acted on exits 2 with one line saying why; a refusal
to act (an unsafe move) exits 2 too, prefixed ``refused:``; a database or key backend
that cannot be used exits 1.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

from meshca.core.audit import AuditQuery, Outcome
from meshca.core.errors import InvalidRequest, MeshcaError, UnsafeChange
from meshca.core.taint import IssuedLeaf, PeerPrediction

__all__ = ["add_taint_parser"]

DESCRIPTION = """\
Mark an authority as compromised, on the record, and stop using it.

Intermediate: a successor is signed under the active root and takes over at once (its
root is already trusted: no propagation delay); every server signs with it within
--journal-poll; agents and WatchTrustBundle subscribers see the taint in the bundle's
'tainted' fingerprints and renew now. The tainted intermediate is removed once the
longest leaf lifetime (--max-svid-ttl) has passed since it stopped signing.

Root: a successor root enters the trust bundle now and takes over after the
propagation delay; the tainted root is retired then, and leaves the bundle
--max-svid-ttl later. --emergency activates the successor at once; it first says which
workloads may then fail handshakes (those holding unexpired certificates under the
tainted root: they have not fetched a bundle with the successor), and needs
--yes-i-understand-peers-may-fail.

With roots in Vault's PKI (--vault-upstream), a root is replaced in Vault, not here.

  meshca ca taint 3f9a0c1be2d47a55 --reason "intermediate key found on a laptop"
"""


class _Usage(Exception):
    pass


def _requested_by(given: str | None) -> str:
    if given is not None:
        return given
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 400 else line[:397] + "..."


def _issued_since(engine: Any) -> Callable[[datetime], Iterator[IssuedLeaf]]:
    from meshca.adapters.storage.audit_query import SqlAuditReader

    reader = SqlAuditReader(engine)

    def issued(since: datetime) -> Iterator[IssuedLeaf]:
        query = AuditQuery(since=since, outcome=Outcome.ISSUED, limit=1000)
        for entry in reader.export(query):
            record = entry.record
            if record.spiffe_id is not None and record.not_after is not None:
                yield IssuedLeaf(record.spiffe_id, record.time, record.not_after)

    return issued


def _say_prediction(prediction: PeerPrediction, shown: int) -> None:
    print(f"peers that may fail: {prediction.count}")
    print(f"  {prediction.summary()}")
    for spiffe_id in prediction.spiffe_ids[:shown]:
        print(f"  may fail: {spiffe_id}")
    if prediction.count > shown:
        print(f"  ... and {prediction.count - shown} more (--show-peers N lists more)")


def _run(args: argparse.Namespace, settings_of: Callable[[argparse.Namespace], Any]) -> int:
    from meshca import app
    from meshca.adapters.clock import SystemClock
    from meshca.adapters.storage.engine import make_engine

    try:
        if args.reason is None:
            raise _Usage("--reason is required: say why")
        if args.yes_i_understand_peers_may_fail and not args.emergency:
            raise _Usage("--yes-i-understand-peers-may-fail goes with --emergency")
        settings = settings_of(args)
        if not args.database_url and not (settings.data_dir / "meshca.db").exists():
            print(
                f"meshca ca taint: no CA in {settings.data_dir}: start 'meshca serve' once",
                file=sys.stderr,
            )
            return 1
        engine = make_engine(settings.effective_database_url)
        try:
            service = app.build_authorities(settings, engine, SystemClock())
            issued = _issued_since(engine)
            if args.emergency:
                entry, prediction = service.predict_taint(args.fingerprint, issued)
                if prediction is not None:
                    _say_prediction(prediction, args.show_peers)
            outcome = service.taint(
                args.fingerprint,
                reason=args.reason,
                requested_by=_requested_by(args.by),
                emergency=args.emergency,
                peers_may_fail=args.yes_i_understand_peers_may_fail,
                issued_since=issued,
            )
        finally:
            engine.dispose()
    except (_Usage, InvalidRequest) as error:
        text = error.message if isinstance(error, MeshcaError) else str(error)
        print(f"meshca ca taint: {_one_line(text)}", file=sys.stderr)
        return 2
    except UnsafeChange as error:
        print(f"meshca ca taint: refused: {_one_line(error.message)}", file=sys.stderr)
        return 2
    except MeshcaError as error:
        print(f"meshca ca taint: {_one_line(error.message)}", file=sys.stderr)
        return 1
    entry = outcome.entry
    print(
        f"tainted {entry.kind} {entry.id} (sha256 {entry.fingerprint}); "
        f"log leaf {outcome.leaf_index}"
    )
    for report in outcome.reports:
        print(f"{report.step}: {', '.join(report.entries)} ({report.seconds * 1000:.0f} ms)")
    view = service.view
    rotation = service.rotation(view.authorities)
    now = SystemClock().now()
    for step in rotation.plan(now):
        if step.target == entry.id or step.step in ("activate-root", "prepare-root"):
            target = f" {step.target}" if step.target else ""
            print(f"next: {step.at:%Y-%m-%d %H:%M:%SZ} {step.step}{target}: {step.reason}")
    print("servers sign with the successor within --journal-poll; agents renew on the bundle")
    return 0


def add_taint_parser(
    sub: Any,
    ca_flags: Callable[[argparse.ArgumentParser], None],
    settings_of: Callable[[argparse.Namespace], Any],
) -> None:
    parser = sub.add_parser(
        "taint",
        help="mark a root or intermediate as compromised and move off it now",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "fingerprint",
        metavar="FINGERPRINT",
        help="SHA-256 of the authority, as 'meshca ca status' shows (at least 16 hex digits)",
    )
    parser.add_argument("--reason", help="why (required; one line, at most 1000 characters)")
    parser.add_argument("--by", metavar="NAME", help="who asks (default: the OS user)")
    parser.add_argument(
        "--emergency",
        action="store_true",
        help="root: activate the successor now, without the propagation delay",
    )
    parser.add_argument(
        "--yes-i-understand-peers-may-fail",
        action="store_true",
        help="required with --emergency: workloads that have not fetched the new root fail",
    )
    parser.add_argument(
        "--show-peers", type=int, default=20, metavar="N", help="list at most N peers (20)"
    )
    ca_flags(parser)
    parser.set_defaults(run=lambda args: _run(args, settings_of))
