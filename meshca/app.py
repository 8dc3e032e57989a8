"""The composition root: Settings -> adapters -> services -> server processes.

This is the one module that knows every concrete adapter. ``serve`` runs one worker
process per core on one port (SO_REUSEPORT): Python signs on one core per process.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import multiprocessing
import multiprocessing.connection
import signal
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from ipaddress import ip_address
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2
from sqlalchemy import Engine

from meshca.adapters.clock import SystemClock
from meshca.adapters.grpc.server import SERVICE_NAMES, ServerTls, build_server
from meshca.adapters.k8s.jwks import JwksAttestor
from meshca.adapters.k8s.key_source import JwksKeySource
from meshca.adapters.k8s.token_review import TokenReviewAttestor
from meshca.adapters.keys.file_store import FileCaStore, new_serial
from meshca.adapters.storage.audit_log import SqlAuditLog
from meshca.adapters.storage.engine import make_engine
from meshca.adapters.storage.tables import create_schema
from meshca.config import ConfigError, Settings
from meshca.core.audit import AuditRecord, Outcome
from meshca.core.authority import Authority
from meshca.core.csr import CsrRequest
from meshca.core.issuance import IssuancePolicy, issue_leaf, leaf_lifetime
from meshca.core.ports import Attestor, Clock
from meshca.core.spiffe import TrustDomain
from meshca.core.svid_rules import check_leaf_svid
from meshca.service.attestation_cache import CachingAttestor
from meshca.service.bundle import TrustBundleService
from meshca.service.ca import CertificateService, serial_hex

__all__ = ["prepare", "run_worker", "serve"]

log = logging.getLogger("meshca")

SERVING_CERT_TTL = timedelta(days=7)
API_SERVING_CERT = "meshca.serving-certificate"
#: The SPIFFE ID meshca presents to its clients.
SERVER_WORKLOAD = ("meshca", "meshca")


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )


def load_authority(settings: Settings, clock: Clock) -> Authority:
    return FileCaStore(settings.data_dir).load_or_create(
        TrustDomain.parse(settings.trust_domain),
        clock.now(),
        settings.root_ttl,
        settings.intermediate_ttl,
    )


def prepare(settings: Settings) -> None:
    """Everything that must happen once, before any worker starts: CA files, schema."""
    settings.check_attestation()
    TrustDomain.parse(settings.trust_domain)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # CA keys and the issuance record live here: only meshca's user may look inside.
    settings.data_dir.chmod(0o700)
    load_authority(settings, SystemClock())
    engine = make_engine(settings.effective_database_url)
    try:
        create_schema(engine)
    finally:
        engine.dispose()


def build_attestor(settings: Settings, clock: Clock) -> Attestor:
    audiences = list(settings.k8s_audience)
    inner: Attestor
    match settings.k8s_mode:
        case "jwks":
            assert settings.k8s_issuer is not None
            ca_file = str(settings.k8s_ca_file) if settings.k8s_ca_file else None
            refresh = settings.k8s_jwks_min_refresh
            if settings.k8s_jwks_file:
                keys = JwksKeySource.from_file(settings.k8s_jwks_file, min_refresh_interval=refresh)
            elif settings.k8s_jwks_url:
                keys = JwksKeySource.from_url(
                    settings.k8s_jwks_url, ca_file=ca_file, min_refresh_interval=refresh
                )
            else:
                keys = JwksKeySource.from_discovery(
                    settings.k8s_issuer, ca_file=ca_file, min_refresh_interval=refresh
                )
            inner = JwksAttestor(
                issuer=settings.k8s_issuer,
                audiences=audiences,
                keys=keys,
                clock=clock,
                allow_legacy_tokens=settings.k8s_allow_legacy_tokens,
            )
        case "tokenreview":
            assert settings.k8s_api_server is not None
            inner = TokenReviewAttestor(
                api_server=settings.k8s_api_server,
                audiences=audiences,
                ca_file=str(settings.k8s_ca_file) if settings.k8s_ca_file else None,
                token_file=str(settings.k8s_token_file) if settings.k8s_token_file else None,
                clock=clock,
                allow_legacy_tokens=settings.k8s_allow_legacy_tokens,
            )
        case other:
            raise ConfigError(f"unknown k8s-mode {other!r}")
    return CachingAttestor(inner, clock, max_ttl=settings.token_cache_ttl)


@dataclass
class Worker:
    """A running server in this process."""

    server: grpc.aio.Server
    port: int
    audit: SqlAuditLog
    engine: Engine
    executor: ThreadPoolExecutor

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)
        self.executor.shutdown(wait=True)
        await self.audit.aclose()
        self.engine.dispose()


async def _serving_tls(
    settings: Settings, authority: Authority, audit: SqlAuditLog, clock: Clock
) -> ServerTls:
    """meshca's own serving certificate, recorded like any other before it is used."""
    trust_domain = TrustDomain.parse(settings.trust_domain)
    spiffe_id = trust_domain.workload_id(*SERVER_WORKLOAD)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for name in settings.server_name:
        try:
            names.append(x509.IPAddress(ip_address(name)))
        except ValueError:
            names.append(x509.DNSName(name))
    names.append(x509.IPAddress(ip_address("127.0.0.1")))
    now = clock.now()
    not_before, not_after = leaf_lifetime(
        now, SERVING_CERT_TTL, IssuancePolicy(SERVING_CERT_TTL, SERVING_CERT_TTL), authority
    )
    csr = CsrRequest(public_key=key.public_key(), uri_sans=(), sha256="")
    cert = issue_leaf(csr, spiffe_id, authority, not_before, not_after, new_serial(), names)
    check_leaf_svid(cert, spiffe_id, authority)
    der = cert.public_bytes(serialization.Encoding.DER)
    await audit.append(
        AuditRecord(
            time=now,
            outcome=Outcome.ISSUED,
            api=API_SERVING_CERT,
            reason="ok",
            spiffe_id=str(spiffe_id),
            serial=serial_hex(cert.serial_number),
            fingerprint_sha256=hashlib.sha256(der).hexdigest(),
            not_before=not_before,
            not_after=not_after,
        )
    )
    chain = [cert, authority.certificate, *authority.chain]
    return ServerTls(
        private_key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        chain_pem=b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain),
    )


async def start_worker(settings: Settings, listen: str | None = None) -> Worker:
    """Build every part from ``settings`` and start serving; returns once listening."""
    clock = SystemClock()
    trust_domain = TrustDomain.parse(settings.trust_domain)
    authority = load_authority(settings, clock)
    engine = make_engine(settings.effective_database_url)
    audit = SqlAuditLog(engine)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshca-sign")
    loop = asyncio.get_running_loop()

    def offload(fn: Callable[[], Any]) -> Any:
        return loop.run_in_executor(executor, fn)

    bundle = TrustBundleService(trust_domain, authority.roots)
    ca = CertificateService(
        trust_domain=trust_domain,
        attestor=build_attestor(settings, clock),
        audit_log=audit,
        authority=lambda: authority,
        clock=clock,
        policy=IssuancePolicy(
            default_ttl=min(settings.svid_ttl, settings.max_svid_ttl),
            max_ttl=settings.max_svid_ttl,
        ),
        new_serial=new_serial,
        offload=offload,
    )
    tls = None if settings.plaintext else await _serving_tls(settings, authority, audit, clock)
    server, port, health = build_server(
        ca=ca, bundle=bundle, listen=listen or settings.listen, tls=tls
    )
    await server.start()
    for name in ("", *SERVICE_NAMES):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return Worker(server=server, port=port, audit=audit, engine=engine, executor=executor)


async def run_worker(settings: Settings, listen: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then drain in-flight requests."""
    worker = await start_worker(settings, listen)
    host = (listen or settings.listen).rpartition(":")[0]
    mode = "plaintext" if settings.plaintext else "TLS"
    log.info("serving on %s:%d (%s)", host, worker.port, mode)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await worker.stop()


def _worker_main(settings: Settings, listen: str) -> None:
    configure_logging(settings)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_worker(settings, listen))


def serve(settings: Settings) -> int:
    """Run ``settings.workers`` server processes sharing one port; returns an exit code."""
    configure_logging(settings)
    prepare(settings)
    if settings.workers == 1:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_worker(settings))
        return 0
    host, _, port_text = settings.listen.rpartition(":")
    placeholder = None
    if int(port_text) == 0:
        # Reserve one port for every worker: a bound socket that never listens gets
        # no connections, but keeps the port ours while the workers bind it too.
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        placeholder = socket.socket(family, socket.SOCK_STREAM)
        placeholder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        placeholder.bind((host.strip("[]"), 0))
        port_text = str(placeholder.getsockname()[1])
    listen = f"{host}:{port_text}"
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(target=_worker_main, args=(settings, listen), name=f"worker-{i}")
        for i in range(settings.workers)
    ]
    for process in workers:
        process.start()
    log.info("started %d workers on %s", len(workers), listen)

    def stop_all(*_: object) -> None:
        for process in workers:
            if process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    exit_code = 0
    try:
        # If one worker dies, stop the rest: a supervisor restarts us whole.
        multiprocessing.connection.wait([p.sentinel for p in workers])
        stop_all()
        for process in workers:
            process.join()
            if process.exitcode not in (0, -signal.SIGTERM):
                exit_code = 1
    finally:
        if placeholder is not None:
            placeholder.close()
    return exit_code
