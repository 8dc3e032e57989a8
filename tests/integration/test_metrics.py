"""``--metrics-listen``: the Prometheus endpoint, in-process and summed over the worker
processes of a real ``meshca serve``, scraped over HTTP and parsed as Prometheus does."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2
from prometheus_client.parser import text_string_to_metric_families

from meshca.adapters import metrics
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.core.rotation import AuthorityKind, AuthorityState
from tests.core.builders import csr_pem
from tests.integration.server_harness import (
    RunningServer,
    TokenMinter,
    running_server,
    serve_command,
)
from tests.integration.test_ext_authz import BACKEND, FRONTEND, check_request

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
OPERATIONS = REPO / "docs" / "operations.md"
ISTIO_API = "istio.v1.auth.CreateCertificate"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample at ``/metrics``, keyed by name and labels, parsed as Prometheus does."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


async def _create(target: str, token: str, roots_pem: bytes | None = None) -> None:
    """One Istio CreateCertificate on a fresh connection (TLS when ``roots_pem``)."""
    if roots_pem is None:
        channel = grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
    else:
        channel = grpc.aio.secure_channel(
            target,
            grpc.ssl_channel_credentials(roots_pem),
            options=[("grpc.ssl_target_name_override", "localhost")],
        )
    async with channel:
        await istio_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
            istio_pb2.IstioCertificateRequest(csr=csr_pem().decode(), validity_duration=600),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=10,
        )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    policy_dir = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policy_dir)
    async for running in running_server(
        tmp_path,
        metrics_listen="127.0.0.1:0",
        policy_dir=policy_dir,
        # Decisions are counted wherever they are served; the main port keeps this short.
        policy_insecure_main_port=True,
        tree_head_interval=timedelta(seconds=0.2),
    ):
        yield running


async def test_one_process_counts_what_it_does(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read the database at every scrape, not once a second, so "after" sees our records.
    monkeypatch.setattr(metrics, "STATE_MAX_AGE", 0.0)
    assert server.worker.metrics_server is not None
    port = server.worker.metrics_server.port
    before = scrape(port)

    for _ in range(2):
        await _create(server.target, server.minter.mint(), server.roots_pem)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _create(server.target, server.minter.mint() + "x", server.roots_pem)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with server.channel() as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        allowed = await stub.Check(check_request(FRONTEND, BACKEND, "GET", "/api/products/1"))
        denied = await stub.Check(check_request(FRONTEND, BACKEND, "GET", "/admin"))
    assert (allowed.status.code, denied.status.code) == (code_pb2.OK, code_pb2.PERMISSION_DENIED)
    # A head is signed every 0.2 s while the log grows: wait for one covering our records.
    await asyncio.sleep(0.6)
    after = scrape(port)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("meshca_certificates_issued_total", api=ISTIO_API) == 2
    assert grew("meshca_requests_refused_total", api=ISTIO_API, reason="token-bad-signature") == 1
    assert grew("meshca_issuance_duration_seconds_count") == 2
    assert 0 < grew("meshca_issuance_duration_seconds_sum") < 20
    # Three tokens went to the cluster's keys (none was cached): two good, one forged.
    assert grew("meshca_attestation_duration_seconds_count", mode="jwks") == 3
    assert grew("meshca_policy_decisions_total", result="allow") == 1
    assert grew("meshca_policy_decisions_total", result="deny") == 1
    # Three records (two certificates, one refusal), in one or more transactions.
    assert grew("meshca_record_batch_size_sum") == 3
    assert 1 <= grew("meshca_record_batch_size_count") <= 3
    assert value(after, "meshca_record_write_failures_total") == 0
    assert value(after, "meshca_policy_set_valid") == 1
    assert value(after, "meshca_degraded") == 0
    assert value(after, "meshca_database_readable") == 1

    view = server.worker.authorities.view
    assert value(after, "meshca_trust_bundle_sequence") == view.bundle_sequence
    expected = {
        frozenset({"role": e.kind.value, "state": e.state.value, "id": e.id}.items()): (
            e.not_after.timestamp()
        )
        for e in view.authorities.entries
        if e.state is not AuthorityState.REMOVED
    }
    assert series(after, "meshca_authority_not_after_timestamp_seconds") == expected
    kinds = {(e.kind, e.state) for e in view.authorities.entries}
    assert {(AuthorityKind.ROOT, AuthorityState.ACTIVE)} <= kinds
    assert {(AuthorityKind.INTERMEDIATE, AuthorityState.ACTIVE)} <= kinds

    # The serving certificate's record, then ours: the log holds every one.
    assert value(after, "meshca_log_tree_size") == value(before, "meshca_log_tree_size") + 3
    assert 0 <= value(after, "meshca_log_signed_head_age_seconds") < 30

    # Every series docs/operations.md lists is served, and nothing else of ours is.
    documented = re.findall(r"^\| `(meshca_\w+)` \| (\w+) \|", OPERATIONS.read_text(), re.M)
    assert len(documented) >= 13
    served = {name for name, _ in after if name.startswith("meshca_")}
    for name, kind in documented:
        assert (f"{name}_count" if kind == "histogram" else name) in served, name
    histogram_parts = ("_bucket", "_count", "_sum")
    assert {n.removesuffix(p) for n in served for p in histogram_parts if n.endswith(p)} | {
        n for n in served if not n.endswith(histogram_parts)
    } == {name for name, _ in documented}


# -- the real multi-process server -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class Served:
    """``meshca serve --workers 2 --plaintext --metrics-listen ...`` in a subprocess."""

    def __init__(self, metrics_port: int, minter: TokenMinter) -> None:
        self.metrics_port = metrics_port
        self.minter = minter
        self.output: list[str] = []
        self.port: int | None = None

    def started(self) -> bool:
        text = "".join(self.output)
        workers = re.search(r"started 2 workers on 127\.0\.0\.1:(\d+)", text)
        if workers:
            self.port = int(workers.group(1))
        serving = set(re.findall(r"(worker-\d)\S* \S+: serving on", text))
        return bool(workers) and len(serving) == 2 and "metrics on http://127.0.0.1" in text


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    minter, jwks = TokenMinter.create(tmp_path)
    served = Served(_free_port(), minter)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    command = serve_command(
        tmp_path / "data",
        jwks,
        workers=2,
        extra=["--plaintext", "--metrics-listen", f"127.0.0.1:{served.metrics_port}"],
    )
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    up = threading.Event()

    def collect() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            served.output.append(line)
            if served.started():
                up.set()
        up.set()

    reader = threading.Thread(target=collect, name="serve-output", daemon=True)
    reader.start()
    try:
        assert up.wait(60) and process.poll() is None, "".join(served.output)
        yield served
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=30) == 0, "".join(served.output[-50:])
            # The workers' count files go with the server.
            assert not (tmp_path / "data" / "metrics").exists()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join(10)
            if process.stdout:
                process.stdout.close()


async def test_serve_sums_every_worker_process(served: Served) -> None:
    target = f"127.0.0.1:{served.port}"
    before = scrape(served.metrics_port)
    # One connection each: the kernel spreads them over both workers.
    requests = 16
    await asyncio.gather(*(_create(target, served.minter.mint()) for _ in range(requests)))
    # The database is read at most once a second: let the first scrape's reading age.
    await asyncio.sleep(metrics.STATE_MAX_AGE + 0.1)
    # The supervisor serves no requests: every count below was made in a worker.
    after = scrape(served.metrics_port)
    issued = value(after, "meshca_certificates_issued_total", api=ISTIO_API)
    assert issued - value(before, "meshca_certificates_issued_total", api=ISTIO_API) == requests
    assert value(after, "meshca_issuance_duration_seconds_count") == issued
    assert value(after, "meshca_attestation_duration_seconds_count", mode="jwks") == issued
    # The records were committed by the supervisor's writer, in batches of any size.
    assert value(after, "meshca_record_batch_size_sum") == issued
    assert value(after, "meshca_record_write_failures_total") == 0
    assert value(after, "meshca_degraded") == 0
    assert value(after, "meshca_log_tree_size") == issued
    not_after = series(after, "meshca_authority_not_after_timestamp_seconds")
    active = {dict(labels)["role"] for labels in not_after if dict(labels)["state"] == "active"}
    assert active == {"root", "intermediate", "jwt-key"}
    now = datetime.now(UTC).timestamp()
    assert all(v > now for v in not_after.values())
    # A scrape is quick whatever the workers are doing (it reads files, not workers).
    started = time.monotonic()
    scrape(served.metrics_port)
    assert time.monotonic() - started < 5
