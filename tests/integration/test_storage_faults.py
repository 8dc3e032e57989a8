"""Storage fault trials against a real ``meshca serve --workers 2`` under 32 proxies.

PostgreSQL stopped mid-load (cleanly, and as a crash): while it is down every call is
refused with UNAVAILABLE and readiness is off on both workers, liveness staying on;
once it is back, the same processes issue and report ready again. SQLite's disk full:
refusals name the full disk, the database passes ``PRAGMA integrity_check``, and
issuance resumes once there is space. In both, every certificate a proxy received has
its ISSUED record with its fingerprint, the log's leaves are gapless, and ``meshca
audit verify`` passes. The figures printed are measured again by
``bench/storage_faults.py``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from meshca.cli import main as meshca_main
from tests.core.builders import csr_der
from tests.fixtures_pg import PostgresServer
from tests.integration.server_harness import TokenMinter, running_server, serve_command
from tests.integration.storage_trials import (
    disk_full_trial,
    fill,
    free_port,
    integrity_check,
    postgres_trial,
    small_tmpfs,
)

pytestmark = pytest.mark.integration

CLIENTS = 32


async def test_postgresql_stopped_mid_load_then_started(
    tmp_path: Path, dedicated_postgres: PostgresServer
) -> None:
    # pg_ctl stop -m fast; bench/storage_faults.py also crashes it (-m immediate).
    trial = await postgres_trial(dedicated_postgres, tmp_path, clients=CLIENTS)
    print(f"\npostgresql stopped: {trial.figures()}")
    problems = trial.problems(reason="issuance record not committed", clients=CLIENTS)
    assert not problems, (problems, trial.log())
    # While it was down, not one certificate: every call was refused.
    down = trial.during_fault()
    assert len(down) >= CLIENTS, "the proxies made too few calls while PostgreSQL was down"
    assert all(c.code == "UNAVAILABLE" for c in down), [c for c in down if c.code != "OK"][:3]


async def test_disk_full_under_the_sqlite_data_dir(tmp_path: Path) -> None:
    trial = await disk_full_trial(tmp_path, clients=CLIENTS)
    print(f"\ndisk full: {trial.figures()}")
    # SQLite's own words for ENOSPC, passed on to the caller and the log.
    problems = trial.problems(reason="database or disk is full", clients=CLIENTS)
    assert not problems, (problems, trial.log())
    # The record writer's log line names it too.
    logged = [line for line in trial.lines if "record(s) not committed" in line]
    assert logged and all("database or disk is full" in line for line in logged), logged[:3]
    assert trial.integrity == "ok"


async def _sign(stub: ca_pb2_grpc.CertificateServiceStub, token: str) -> ca_pb2.SignResponse:
    return await stub.Sign(
        ca_pb2.SignRequest(csr=csr_der()),
        metadata=[("authorization", f"Bearer {token}")],
        timeout=10,
    )


async def test_in_process_writer_survives_a_full_disk(tmp_path: Path) -> None:
    # One process writing its own records (SqlAuditLog's writer thread, as in dev mode).
    # running_server keeps its data in tmp_path / "data": the tmpfs is mounted there.
    with small_tmpfs(tmp_path / "data", "8m") as disk:
        async for server in running_server(tmp_path):
            token = server.minter.mint()
            async with server.channel() as channel:
                stub = ca_pb2_grpc.CertificateServiceStub(channel)
                await _sign(stub, token)
                await asyncio.to_thread(fill, disk / "filler")
                # The WAL reuses the space it has until a checkpoint: sign until refused.
                for _ in range(2000):
                    try:
                        await _sign(stub, token)
                    except grpc.aio.AioRpcError as error:
                        refused = error
                        break
                else:
                    raise AssertionError("2000 certificates issued on a full disk")
                assert refused.code() == grpc.StatusCode.UNAVAILABLE
                assert "database or disk is full" in (refused.details() or "")
                assert server.worker.audit.writer_problem is None
                (disk / "filler").unlink()
                issued = await _sign(stub, token)
            records = await server.worker.audit.list(serial=issued.serial)
            assert [r.outcome for r in records] == ["issued"]
        assert integrity_check(disk / "meshca.db") == "ok"


def _serve_once(tmp_path: Path, data_dir: Path, extra: list[str]) -> int:
    """``meshca serve`` in this process: it fails in ``prepare``, before any worker starts."""
    _, jwks = TokenMinter.create(tmp_path)
    command = serve_command(data_dir, jwks, workers=2, extra=["--plaintext", *extra])
    assert command[1:3] == ["-m", "meshca"]
    return meshca_main(command[3:])


@pytest.mark.parametrize("fault", ["postgresql-down", "disk-full"])
def test_serve_that_cannot_open_its_database_says_why_and_exits(
    tmp_path: Path, fault: str, capsys: pytest.CaptureFixture[str]
) -> None:
    if fault == "postgresql-down":
        # Nothing listens there: the connection is refused at once.
        url = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
        code = _serve_once(tmp_path, tmp_path / "data", ["--database-url", url])
        why = "Connection refused"
    else:
        with small_tmpfs(tmp_path / "disk", "1m") as disk:
            fill(disk / "filler")
            code = _serve_once(tmp_path, disk / "data", [])
        why = "database or disk is full"
    # Before the fix, BackendUnavailable left main() with three chained tracebacks.
    assert code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("meshca: cannot start: cannot open database "), message
    assert why in message


_COUNTING_CHILD = """
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from meshca.adapters.metrics import count_into, meshca_metrics
from meshca.core.audit import AuditRecord, Outcome
from tests.integration.storage_trials import fill

disk = Path(sys.argv[1])
(disk / "metrics").mkdir()
count_into(disk / "metrics")
metrics = meshca_metrics()
now = datetime.now(UTC)
metrics.observe_outcome(AuditRecord(now, Outcome.ISSUED, "meshca.v1.Sign", "ok"), timedelta(0))
fill(disk / "filler")
# Refusals of kinds not seen before: each is a new series, written into the count file.
for i in range(300):
    record = AuditRecord(now, Outcome.REFUSED, "meshca.v1.Sign", f"reason-{i}")
    metrics.observe_outcome(record, timedelta(0))
print("counted", flush=True)
"""


def test_metrics_count_files_survive_a_full_disk(tmp_path: Path) -> None:
    # prometheus_client maps its count files; a page first written on a full disk used
    # to kill the process with SIGBUS (a worker gone, serve stopping all the others).
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        child = subprocess.run(
            [sys.executable, "-c", _COUNTING_CHILD, str(disk)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
            cwd=Path(__file__).resolve().parents[2],
        )
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    assert child.stdout.strip() == "counted"
