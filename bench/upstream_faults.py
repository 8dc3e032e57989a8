"""Upstream fault trials: the Kubernetes API server down (tokenreview), OpenBao killed.

    python bench/upstream_faults.py [--runs 5] [--proxies 8] [--trials api,vault]

Everything runs on 127.0.0.1, in this process: the real meshca server (``running_server``
from the tests), the Kubernetes API stand-in, and a real OpenBao with raft storage.

``api`` (per run): meshca in tokenreview mode with ``--token-cache-ttl`` 5 s. ``--proxies``
proxies, each with its own token, get a certificate; then the API server stops
(connections refused). For 8 s every proxy asks again every 0.2 s, and one new token is
tried each round. The API server then comes back at the same address; the time until a
new token gets a certificate is measured.

``vault`` (per run): meshca in Vault upstream mode (plaintext; journal poll 1 s; Vault's
mount caps the intermediate at 40 s, so it is due 5 s after signing). OpenBao is killed
(-9); ``--proxies`` proxies ask every 0.2 s until 2 s past the renewal's due time; then
OpenBao restarts on the same storage and the time until meshca has renewed its
intermediate and reports ``meshca.authority`` SERVING again is measured, while the
proxies keep asking.

Both check at the end that every certificate a proxy received has its issuance record.
Prints one Markdown table per trial (medians over the runs, and the totals).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(1, str(REPO))

from tests.fixtures_k8s import K8sApiStandIn, TokenMinter, _make_keys  # noqa: E402
from tests.fixtures_vault import OpenBao, vault_overrides  # noqa: E402
from tests.integration.server_harness import RunningServer, running_server  # noqa: E402

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2  # noqa: E402
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc  # noqa: E402
from meshca.adapters.storage.audit_log import SqlAuditLog  # noqa: E402
from meshca.adapters.storage.engine import make_engine  # noqa: E402
from meshca.app import AUTHORITY_HEALTH  # noqa: E402
from meshca.core.audit import Outcome  # noqa: E402
from meshca.service.ca import serial_hex  # noqa: E402

CACHE_TTL = 5.0
OUTAGE = 8.0
PERIOD = 0.2


def _csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@dataclass
class Calls:
    codes: Counter[str] = field(default_factory=Counter)
    received: list[x509.Certificate] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)


async def _call(channel: grpc.aio.Channel, token: str, calls: Calls) -> list[x509.Certificate]:
    stub = istio_grpc.IstioCertificateServiceStub(channel)
    started = time.monotonic()
    try:
        response = await stub.CreateCertificate(
            istio_pb2.IstioCertificateRequest(csr=_csr()),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=10,
        )
    except grpc.aio.AioRpcError as error:
        calls.codes[error.code().name] += 1
        calls.seconds.append(time.monotonic() - started)
        return []
    calls.codes["OK"] += 1
    calls.seconds.append(time.monotonic() - started)
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in response.cert_chain]
    calls.received.append(chain[0])
    return chain


def _past(deadline: float) -> bool:
    return time.monotonic() >= deadline


async def _ask_every(
    channel: grpc.aio.Channel, token: Callable[[], str], calls: Calls, done: Callable[[], bool]
) -> list[float]:
    """One proxy: ask every PERIOD until ``done()``; returns when each success came back."""
    succeeded = []
    while not done():
        if await _call(channel, token(), calls):
            succeeded.append(time.monotonic())
        await asyncio.sleep(PERIOD)
    return succeeded


async def _unrecorded(server: RunningServer, received: list[x509.Certificate]) -> int:
    engine = make_engine(server.settings.effective_database_url)
    log = SqlAuditLog(engine)
    try:
        records = await log.list(limit=1_000_000)
    finally:
        await log.aclose()
        engine.dispose()
    issued = {r.serial for r in records if r.outcome == Outcome.ISSUED}
    return sum(1 for c in received if serial_hex(c.serial_number) not in issued)


async def _refusal_reasons(server: RunningServer) -> Counter[str]:
    engine = make_engine(server.settings.effective_database_url)
    log = SqlAuditLog(engine)
    try:
        records = await log.list(limit=1_000_000)
    finally:
        await log.aclose()
        engine.dispose()
    return Counter(r.reason for r in records if r.outcome == Outcome.REFUSED)


# -- the Kubernetes API server down ------------------------------------------------------


def _new_token(minter: TokenMinter, numbers: Iterator[int]) -> str:
    """A token of a service account never seen before."""
    return minter.token(service_account=f"new-{next(numbers)}")


async def api_trial(proxies: int) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="meshca-uf-api-"))
    keys = _make_keys()
    api = K8sApiStandIn(keys)
    api.caller_token_file = base / "caller-token"
    api.caller_token_file.write_text(api.caller_token)
    api.clock._now = datetime.now(UTC).replace(microsecond=0)
    port = int(api.url.rsplit(":", 1)[1])
    tokens = [api.minter.token(service_account=f"sa-{i}") for i in range(proxies)]
    back: K8sApiStandIn | None = None
    settings = {
        "k8s_mode": "tokenreview",
        "k8s_issuer": None,
        "k8s_jwks_file": None,
        "k8s_api_server": api.url,
        "k8s_token_file": api.caller_token_file,
        "token_cache_ttl": timedelta(seconds=CACHE_TTL),
        "plaintext": True,
    }
    try:
        async for server in running_server(base, **settings):
            async with grpc.aio.insecure_channel(server.target) as channel:
                before = Calls()
                await asyncio.gather(*(_call(channel, t, before) for t in tokens))
                assert before.codes == Counter(OK=proxies), before.codes
                api.stop()
                down = time.monotonic()
                known, new = Calls(), Calls()
                over = functools.partial(_past, down + OUTAGE)
                newcomers = itertools.count()
                successes = await asyncio.gather(
                    *(_ask_every(channel, functools.partial(str, t), known, over) for t in tokens),
                    _ask_every(
                        channel,
                        functools.partial(_new_token, api.minter, newcomers),
                        new,
                        over,
                    ),
                )
                last_ok = [oks[-1] - down for oks in successes[:-1] if oks]
                back = K8sApiStandIn(keys, clock=api.clock, port=port)
                back.caller_token_file = api.caller_token_file
                returned = time.monotonic()
                recovered = Calls()
                while True:
                    if await _call(channel, api.minter.token(service_account="late"), recovered):
                        break
                    await asyncio.sleep(0.05)
                recovery = time.monotonic() - returned
            received = before.received + known.received + new.received + recovered.received
            unrecorded = await _unrecorded(server, received)
            reasons = await _refusal_reasons(server)
    finally:
        api.stop()
        if back is not None:
            back.stop()
        shutil.rmtree(base, ignore_errors=True)
    return {
        "issued_during_outage": known.codes["OK"] + new.codes["OK"],
        "known_refused": sum(v for k, v in known.codes.items() if k != "OK"),
        "known_codes": dict(known.codes),
        "new_codes": dict(new.codes),
        "kept_working_s": statistics.median(last_ok) if last_ok else 0.0,
        "new_refusal_p50_ms": statistics.median(new.seconds) * 1000,
        "new_refusal_max_ms": max(new.seconds) * 1000,
        "recovery_s": recovery,
        "reasons": dict(reasons),
        "received": len(received),
        "unrecorded": unrecorded,
    }


# -- OpenBao killed ------------------------------------------------------------------------


async def _health(channel: grpc.aio.Channel) -> int:
    answer = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=AUTHORITY_HEALTH)
    )
    return int(answer.status)


async def _recovered(
    server: RunningServer, channel: grpc.aio.Channel, old: x509.Certificate
) -> bool:
    """Renewed (the issuer is no longer ``old``) and reporting SERVING again."""
    if server.worker.authorities.current().certificate == old:
        return False
    return await _health(channel) == health_pb2.HealthCheckResponse.SERVING


async def vault_trial(proxies: int) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="meshca-uf-bao-"))
    bao = OpenBao(base / "bao", persistent=True)
    serving = health_pb2.HealthCheckResponse.SERVING
    try:
        bao.start()
        overrides = vault_overrides(bao, base, transit=False)
        mount = overrides["vault_pki_mount"]
        bao.call("POST", f"sys/mounts/{mount}/tune", {"max_lease_ttl": "40s"})
        settings = {
            "plaintext": True,
            "journal_poll": timedelta(seconds=1),
            "max_svid_ttl": timedelta(seconds=4),
            "svid_ttl": timedelta(seconds=4),
            "propagation_delay": timedelta(seconds=2),
            "intermediate_ttl": timedelta(seconds=40),
            **overrides,
        }
        async for server in running_server(base, **settings):
            async with grpc.aio.insecure_channel(server.target) as channel:
                first = Calls()
                chain = await _call(channel, server.minter.mint(), first)
                intermediate = chain[1]
                start = intermediate.not_valid_before_utc
                due = start + (intermediate.not_valid_after_utc - start) / 2
                bao.kill()
                killed = time.monotonic()
                outage, after = Calls(), Calls()
                degraded_after: list[float] = []
                restarted, recovered = asyncio.Event(), asyncio.Event()
                load = [
                    asyncio.ensure_future(
                        _ask_every(channel, server.minter.mint, outage, restarted.is_set)
                    )
                    for _ in range(proxies)
                ]
                while datetime.now(UTC) < due + timedelta(seconds=2):
                    if not degraded_after and await _health(channel) != serving:
                        degraded_after.append(time.monotonic() - killed)
                    await asyncio.sleep(0.05)
                overdue = server.worker.authorities.rotation().should_prepare_intermediate(
                    datetime.now(UTC)
                )
                degraded_when_due = await _health(channel) != serving
                bao.start()
                returned = time.monotonic()
                restarted.set()
                await asyncio.gather(*load)
                load = [
                    asyncio.ensure_future(
                        _ask_every(channel, server.minter.mint, after, recovered.is_set)
                    )
                    for _ in range(proxies)
                ]
                while not await _recovered(server, channel, intermediate):
                    if time.monotonic() - returned > 120:
                        raise RuntimeError("meshca did not recover within 120 s")
                    await asyncio.sleep(0.05)
                recovery = time.monotonic() - returned
                outage_s = returned - killed
                recovered.set()
                await asyncio.gather(*load)
                renewed_chain = await _call(channel, server.minter.mint(), after)
                assert renewed_chain and renewed_chain[1] != intermediate
            received = first.received + outage.received + after.received
            unrecorded = await _unrecorded(server, received)
    finally:
        bao.stop()
        shutil.rmtree(base, ignore_errors=True)
    return {
        "issued_during_outage": outage.codes["OK"],
        "failed_during_outage": sum(v for k, v in outage.codes.items() if k != "OK"),
        "outage_codes": dict(outage.codes),
        "outage_s": outage_s,
        "degraded_after_s": degraded_after[0] if degraded_after else None,
        "renewal_overdue": overdue,
        "degraded_when_due": degraded_when_due,
        "recovery_s": recovery,
        "failed_after_return": sum(v for k, v in after.codes.items() if k != "OK"),
        "received": len(received),
        "unrecorded": unrecorded,
    }


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--proxies", type=int, default=8)
    parser.add_argument("--trials", default="api,vault")
    args = parser.parse_args()
    trials = args.trials.split(",")
    failed = False
    if "api" in trials:
        runs = []
        for n in range(args.runs):
            runs.append(asyncio.run(api_trial(args.proxies)))
            print(f"api run {n + 1}: {runs[-1]}", flush=True)
        print(f"\n### API server down (tokenreview): {args.runs} runs, {args.proxies} proxies\n")
        print("| figure | median | total |\n|---|---:|---:|")
        for key, label in (
            ("issued_during_outage", "certificates issued during the 8 s outage"),
            ("known_refused", "refusals of verified proxies (cache expired)"),
            ("kept_working_s", "a verified token kept working after the outage began, s"),
            ("new_refusal_p50_ms", "new token refused (UNAVAILABLE) in, p50 ms"),
            ("new_refusal_max_ms", "new token refused in, max ms"),
            ("recovery_s", "API server back to a new token's certificate, s"),
            ("received", "certificates received (checked)"),
            ("unrecorded", "certificates without a record"),
        ):
            total = sum(float(r[key]) for r in runs)
            print(f"| {label} | {_median(runs, key):.2f} | {total:.0f} |")
        codes: Counter[str] = Counter()
        for r in runs:
            codes.update(r["new_codes"])
            codes.update({f"known {k}": v for k, v in r["known_codes"].items()})
        reasons: Counter[str] = Counter()
        for r in runs:
            reasons.update(r["reasons"])
        print(f"\nstatus codes: {dict(codes)}; refusal reasons: {dict(reasons)}")
        failed |= any(r["unrecorded"] for r in runs)
    if "vault" in trials:
        runs = []
        for n in range(args.runs):
            runs.append(asyncio.run(vault_trial(args.proxies)))
            print(f"vault run {n + 1}: {runs[-1]}", flush=True)
        print(f"\n### OpenBao killed (upstream mode): {args.runs} runs, {args.proxies} proxies\n")
        print("| figure | median | total |\n|---|---:|---:|")
        for key, label in (
            ("outage_s", "OpenBao down for, s"),
            ("issued_during_outage", "certificates issued while OpenBao was down"),
            ("failed_during_outage", "failed requests while OpenBao was down"),
            ("degraded_after_s", "meshca.authority NOT_SERVING after the kill, s"),
            ("recovery_s", "OpenBao back to renewed intermediate + SERVING, s"),
            ("failed_after_return", "failed requests during the recovery"),
            ("received", "certificates received (checked)"),
            ("unrecorded", "certificates without a record"),
        ):
            total = sum(float(r[key]) for r in runs)
            print(f"| {label} | {_median(runs, key):.2f} | {total:.0f} |")
        overdue = sum(1 for r in runs if r["renewal_overdue"] and r["degraded_when_due"])
        print(f"\nruns where the renewal was overdue and the CA reported degraded: {overdue}")
        failed |= any(r["unrecorded"] or r["failed_during_outage"] for r in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
