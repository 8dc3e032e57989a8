"""``meshca revoke`` refuses an entry that would put more certificates on the CRLs than
one CRL may list (hostile input: "a CRL larger than a stated bound")."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path

from meshca.adapters.storage import make_engine, sqlite_url_for
from meshca.adapters.storage.deny_list import SqlDenyList
from meshca.adapters.storage.record_rows import insert_records, stored_record
from meshca.cli import main as meshca_main
from meshca.core.audit import AuditRecord, Outcome
from meshca.core.crl import MAX_CRL_ENTRIES

TRUST_DOMAIN = "example.org"
WEB = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/web"
OTHER = f"spiffe://{TRUST_DOMAIN}/ns/pay/sa/db"
NS = f"spiffe://{TRUST_DOMAIN}/ns"


def _meshca(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = meshca_main(list(args))
    return code, out.getvalue(), err.getvalue()


def _issued(n: int, spiffe_id: str, now: datetime) -> AuditRecord:
    return AuditRecord(
        time=now - timedelta(minutes=1),
        outcome=Outcome.ISSUED,
        api="meshca.v1.Sign",
        reason="ok",
        spiffe_id=spiffe_id,
        serial=f"{0x10000 + n:x}",
        not_before=now - timedelta(minutes=2),
        not_after=now + timedelta(hours=1),
    )


def test_a_revoke_that_would_overflow_the_crl_is_refused(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    assert _meshca("db", "upgrade", "--data-dir", data)[0] == 0
    now = datetime.now(UTC)
    engine = make_engine(sqlite_url_for(Path(data)))
    try:
        with engine.begin() as connection:
            records = [_issued(n, f"{WEB}/{n}", now) for n in range(MAX_CRL_ENTRIES)]
            records.append(_issued(MAX_CRL_ENTRIES, OTHER, now))
            insert_records(connection, [stored_record(r) for r in records])
        common = ("--data-dir", data, "--trust-domain", TRUST_DOMAIN, "--reason", "leak")

        # Everything at once: one more than a CRL may list.
        code, out, err = _meshca("revoke", "--spiffe-id-prefix", NS, *common, "--force")
        assert code == 2 and out == "", (code, out, err)
        assert f"a CRL lists at most {MAX_CRL_ENTRIES}" in err
        assert f"put {MAX_CRL_ENTRIES + 1} unexpired certificates" in err
        assert SqlDenyList(engine).entries() == ()

        # Exactly the bound fits; then one more certificate does not.
        code, out, err = _meshca("revoke", "--spiffe-id-prefix", WEB, *common)
        assert code == 0, err
        code, out, err = _meshca("revoke", "--spiffe-id", OTHER, *common)
        assert code == 2 and f"({MAX_CRL_ENTRIES} now, 1 more)" in err, err
        assert len(SqlDenyList(engine).entries()) == 1

        # Entries that add nothing to the CRLs are still taken.
        code, _, err = _meshca("revoke", "--serial", f"{0x10000:x}", *common)
        assert code == 0, err  # covered already
        code, _, err = _meshca("revoke", "--serial", "abcdef", *common)
        assert code == 0, err  # names no issued certificate
        # A key entry blocks issuance only: never refused for the CRL's sake.
        code, _, err = _meshca("revoke", "--key-sha256", "ab" * 32, *common)
        assert code == 0, err
        assert len(SqlDenyList(engine).entries()) == 4
    finally:
        engine.dispose()
