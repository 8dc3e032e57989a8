"""The composition root: Settings -> adapters -> services -> server processes.

This is the one module that knows every concrete adapter. ``serve`` runs one worker
process per core on one port (``adapters.worker_pool``): Python signs on one core per
process, and the supervisor commits every worker's issuance records.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import shutil
import socket
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import timedelta
from ipaddress import ip_address
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2
from sqlalchemy import Engine, make_url

from meshca.adapters.bundle_endpoint import BundleEndpoint
from meshca.adapters.clock import SystemClock
from meshca.adapters.event_log import OutcomeLog
from meshca.adapters.grpc.audit_servicer import AuditServicer, public_key_der
from meshca.adapters.grpc.gate import CallGate
from meshca.adapters.grpc.limits import (
    DEFAULT_API_CAPS,
    ApiCaps,
    CallLimits,
    record_ca_refusals,
)
from meshca.adapters.grpc.linkerd_servicer import SERVICE_NAME as LINKERD_SERVICE_NAME
from meshca.adapters.grpc.policy_port import build_policy_server
from meshca.adapters.grpc.server import (
    POLICY_HEALTH,
    POLICY_SERVICE_NAMES,
    READY_HEALTH,
    SERVICE_NAMES,
    ConnectionLimits,
    ServerTls,
    add_audit_port,
    build_health_server,
    build_server,
)
from meshca.adapters.k8s.jwks import JwksAttestor
from meshca.adapters.k8s.key_source import JwksKeySource
from meshca.adapters.k8s.token_review import TokenReviewAttestor
from meshca.adapters.keys.file_store import FileCaStore, new_serial
from meshca.adapters.keys.files import FileKeyManager, LeaderLock, ca_lock
from meshca.adapters.keys.log_key import load_or_create_log_key, load_or_create_shared_log_key
from meshca.adapters.keys.sealed import (
    LOG_KEY_REF,
    KeyRing,
    SealedKeyManager,
    SealedKeys,
)
from meshca.adapters.log_format import configure_logging as configure_log_format
from meshca.adapters.metrics import (
    DatabaseState,
    MeshcaMetrics,
    MetricsServer,
    TimedAttestor,
    count_into,
    meshca_metrics,
    start_metrics_server,
)
from meshca.adapters.oidc_discovery import oidc_endpoint
from meshca.adapters.open_files import connection_cap, raise_open_files_limit
from meshca.adapters.policy_files import DirectoryPolicySource
from meshca.adapters.shared_rate import SharedRateLimiter, create_rate_table
from meshca.adapters.shutdown import StopSignals, exit_now, start_watchdog
from meshca.adapters.storage.audit_log import SqlAuditLog
from meshca.adapters.storage.audit_query import SqlAuditReader
from meshca.adapters.storage.decision_log import SqlDecisionLog
from meshca.adapters.storage.deny_list import SqlDenyList
from meshca.adapters.storage.engine import make_engine, ping, redacted_url
from meshca.adapters.storage.group_commit import BatchCommitter
from meshca.adapters.storage.host_writer import HostRecordWriter, RecordWriterClient
from meshca.adapters.storage.journal import SqlAuthorityJournal
from meshca.adapters.storage.migrate import SchemaUnknown, prepare_schema
from meshca.adapters.storage.pg_locks import PgLeaderLock, pg_step_lock
from meshca.adapters.storage.record_rows import insert_records
from meshca.adapters.storage.revoked_leaves import SqlRevokedLeaves
from meshca.adapters.storage.transparency import SqlTransparencyLog
from meshca.adapters.vault.client import VaultAuth, VaultClient
from meshca.adapters.vault.transit_key import TransitKeyManager
from meshca.adapters.vault.upstream import VaultUpstream
from meshca.adapters.worker_pool import WorkerPool
from meshca.config import ConfigError, Settings
from meshca.core.audit import AuditRecord, Outcome
from meshca.core.authority import Authority, trust_domain_ids
from meshca.core.csr import CsrRequest
from meshca.core.denylist import DenyList
from meshca.core.errors import BackendUnavailable, MeshcaError
from meshca.core.issuance import IssuancePolicy, issue_leaf, leaf_lifetime
from meshca.core.ports import Attestor, AuditLog, Clock, KeyManager, OutcomeObserver
from meshca.core.rate_limit import RateLimiter
from meshca.core.readiness import Readiness
from meshca.core.shutdown import DrainBudget, Shutdown
from meshca.core.spiffe import TrustDomain
from meshca.core.svid_rules import check_leaf_svid
from meshca.service.access import CallerGuard, PolicyAccess
from meshca.service.attestation_cache import CachingAttestor
from meshca.service.audit import AuditAccess, AuditService, LogMaintenance
from meshca.service.authority import AuthorityService
from meshca.service.authz import AuthorizationService, PolicyStatus
from meshca.service.bundle import TrustBundleService
from meshca.service.ca import CertificateService, LinkerdDoor, serial_hex
from meshca.service.crl import CrlPublisher
from meshca.service.deny_list import DenyListFollower
from meshca.service.jwt_svid import JwtSvidService
from meshca.service.readiness import ReadinessChecker
from meshca.service.rotator import Rotator

if TYPE_CHECKING:
    from meshca.adapters.agent.runtime import AgentConfig, RunningAgent

__all__ = ["prepare", "run_worker", "serve", "start_agent"]

log = logging.getLogger("meshca")

SERVING_CERT_TTL = timedelta(days=7)
API_SERVING_CERT = "meshca.serving-certificate"
#: Health-checking service name that turns NOT_SERVING while the CA is degraded.
AUTHORITY_HEALTH = "meshca.authority"
#: The longest pause between readiness checks (shorter with a shorter --journal-poll).
READINESS_INTERVAL = 5.0
#: The SPIFFE ID meshca presents to its clients.
SERVER_WORKLOAD = ("meshca", "meshca")


async def start_agent(config: AgentConfig) -> RunningAgent:
    """``meshca agent``: the CA server client, the token file, a fresh key per renewal and
    the system clock under the agent's loops; the socket server is ``serve_agent``'s.

    Raises ``SocketPathError`` (socket path taken) or ``OSError`` (unreadable CA file).
    """
    from meshca.adapters.agent.runtime import serve_agent, upstream_channel
    from meshca.adapters.agent.upstream import GrpcUpstream, TokenFile, new_key_and_csr
    from meshca.service.agent import AgentRunner, AgentState
    from meshca.service.agent_jwt import AgentJwt

    channel = upstream_channel(config)
    state = AgentState()
    upstream = GrpcUpstream(channel)
    runner = AgentRunner(
        state,
        upstream,
        read_token=TokenFile(config.token_file),
        key_and_csr=new_key_and_csr,
        clock=SystemClock(),
        draw=random.random,
        policy=config.policy,
    )
    jwt = AgentJwt(state, upstream, read_token=TokenFile(config.token_file), clock=SystemClock())
    try:
        return await serve_agent(config, state, runner, channel, jwt)
    except BaseException:
        await channel.close()
        raise


def configure_logging(settings: Settings) -> None:
    configure_log_format(settings.log_level, settings.log_format)


def each(observers: Sequence[OutcomeObserver]) -> OutcomeObserver:
    """One observer that tells every one of ``observers``, in order."""

    def observe(record: AuditRecord, duration: timedelta) -> None:
        for observer in observers:
            observer(record, duration)

    return observe


def build_authorities(
    settings: Settings,
    engine: Engine,
    clock: Clock,
    checkpoint: Callable[[str], None] | None = None,
) -> AuthorityService:
    """The CA's authorities: the journal in the database; keys in Vault's Transit engine,
    sealed in the database, or in ``<data-dir>/ca``; roots self-made or from Vault's PKI
    engine. Steps are serialised by a PostgreSQL advisory lock when the journal is there
    (replicas on several hosts), else by a lock file in the data directory."""
    ca_dir = settings.data_dir / "ca"
    trust_domain = TrustDomain.parse(settings.trust_domain)
    vault = build_vault_client(settings)
    keys: KeyManager
    match settings.vault_transit, vault:
        case True, VaultClient():
            keys = TransitKeyManager(
                vault, settings.vault_transit_mount, prefix=f"meshca-{trust_domain.name}"
            )
        case _ if settings.key_encryption_key_file is not None:
            keys = SealedKeyManager(sealed_keys(settings, engine), FileKeyManager(ca_dir))
        case _:
            keys = FileKeyManager(ca_dir)
    lock: Callable[[], contextlib.AbstractContextManager[object]]
    if _on_postgres(engine):
        lock = functools.partial(pg_step_lock, engine)
    else:
        lock = functools.partial(ca_lock, ca_dir)
    upstream = None
    if settings.vault_upstream and vault is not None:
        upstream = VaultUpstream(vault, settings.vault_pki_mount, trust_domain)
    return AuthorityService(
        journal=SqlAuthorityJournal(engine),
        keys=keys,
        clock=clock,
        policy=settings.rotation_policy(),
        trust_domain=trust_domain,
        new_serial=new_serial,
        lock=lock,
        checkpoint=checkpoint or (lambda _name: None),
        upstream=upstream,
    )


def _on_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def sealed_keys(settings: Settings, engine: Engine) -> SealedKeys:
    """The database's sealed keys, opened with ``--key-encryption-key-file`` if given."""
    ring = None
    if settings.key_encryption_key_file is not None:
        try:
            ring = KeyRing.from_file(settings.key_encryption_key_file)
        except ValueError as error:
            raise ConfigError(str(error)) from None
    return SealedKeys(engine, ring)


def leader_lock(settings: Settings, engine: Engine) -> LeaderLock | PgLeaderLock:
    """Who runs the rotator and signs tree heads: one process per database."""
    if _on_postgres(engine):
        return PgLeaderLock(engine)
    return LeaderLock(settings.data_dir / "ca")


def log_key(settings: Settings, engine: Engine) -> ec.EllipticCurvePrivateKey:
    """The issuance log's signing key: shared through the database when keys are sealed."""
    if settings.key_encryption_key_file is None:
        if sealed_keys(settings, engine).public_key_der(LOG_KEY_REF) is not None:
            # Signing with a key of our own would fork the log's heads.
            raise ConfigError(
                "the issuance log's key is sealed in the database: this replica needs the "
                "--key-encryption-key-file the other replicas have"
            )
        return load_or_create_log_key(settings.data_dir)
    try:
        return load_or_create_shared_log_key(sealed_keys(settings, engine), settings.data_dir)
    except BackendUnavailable as error:
        raise ConfigError(f"the issuance log's key: {error.message}") from None


def build_vault_client(settings: Settings) -> VaultClient | None:
    """The one Vault client of this process, or None when Vault is not configured."""
    if not settings.vault_addr:
        return None
    jwt_file = settings.vault_jwt_file
    if settings.vault_auth == "kubernetes" and jwt_file is None:
        jwt_file = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    auth = VaultAuth(
        method=settings.vault_auth,
        token_file=settings.vault_token_file,
        role_id=settings.vault_role_id,
        secret_id_file=settings.vault_secret_id_file,
        role=settings.vault_role,
        jwt_file=jwt_file,
        mount=settings.vault_auth_mount,
    )
    return VaultClient(settings.vault_addr, auth, ca_file=settings.vault_ca_file)


def bootstrap_authorities(authorities: AuthorityService, settings: Settings, clock: Clock) -> None:
    """Adopt a pre-journal CA, or make the first root and intermediate; run due steps."""
    trust_domain = TrustDomain.parse(settings.trust_domain)
    legacy = FileCaStore(settings.data_dir)
    try:
        authorities.bootstrap(adopt=lambda: legacy.adopt(trust_domain, clock.now()))
    except ValueError as error:
        raise ConfigError(str(error)) from None
    except MeshcaError as error:
        raise ConfigError(f"the CA cannot start: {error.message}") from None
    active = authorities.view.authorities.active_root
    if active is not None:
        _check_root_domain(active.certificate, trust_domain)


def _check_root_domain(root: x509.Certificate, trust_domain: TrustDomain) -> None:
    # An imported organisation root need not name a trust domain; ours always do.
    named = trust_domain_ids(root)
    if named and trust_domain.id not in named:
        raise ConfigError(
            f"the CA in {trust_domain.id}'s data directory belongs to another trust domain "
            f"({', '.join(named)}); use a fresh --data-dir for {trust_domain.id}"
        )


def upgrade_command(settings: Settings) -> str:
    """The ``meshca db upgrade`` command line for this server's database."""
    if settings.database_url:
        url = redacted_url(make_url(settings.database_url))
        return f"meshca db upgrade --database-url '{url}'"
    return f"meshca db upgrade --data-dir {settings.data_dir}"


def prepare_database(settings: Settings, engine: Engine) -> None:
    """Create the schema in a new database; refuse one at another revision."""
    try:
        prepare_schema(engine, upgrade_command(settings))
    except SchemaUnknown as error:
        raise ConfigError(str(error)) from None


def build_audit(
    settings: Settings,
    engine: Engine,
    clock: Clock,
    is_leader: Callable[[], bool],
    deny_list: Callable[[], DenyList] | None = None,
) -> tuple[AuditServicer, LogMaintenance]:
    """The audit API (read-only, auditors only; an SVID on ``deny_list`` is refused) and
    the log's head signing and retention."""
    token = None
    if settings.audit_token_file is not None:
        try:
            token = settings.audit_token_file.read_text().strip()
        except OSError as error:
            raise ConfigError(
                f"cannot read audit-token-file {settings.audit_token_file}: {error.strerror}"
            ) from None
        if not token:
            raise ConfigError(f"audit-token-file {settings.audit_token_file} is empty")
    key = log_key(settings, engine)
    issuance_log = SqlTransparencyLog(engine, key)
    service = AuditService(
        access=AuditAccess(auditors=frozenset(settings.auditor), token=token),
        reader=SqlAuditReader(engine),
        log=issuance_log,
        clock=clock,
        deny_list=deny_list,
    )
    maintenance = LogMaintenance(
        log=issuance_log,
        clock=clock,
        interval=settings.tree_head_interval,
        retention=settings.audit_retention,
        is_leader=is_leader,
    )
    return AuditServicer(service, public_key_der(key.public_key())), maintenance


def prepare(settings: Settings) -> None:
    """Everything that must happen once, before any worker starts: schema, CA journal."""
    settings.check_attestation()
    settings.check_policy_exposure()
    TrustDomain.parse(settings.trust_domain)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # CA keys and the issuance record live here: only meshca's user may look inside.
    settings.data_dir.chmod(0o700)
    engine = make_engine(settings.effective_database_url)
    try:
        prepare_database(settings, engine)
        log_key(settings, engine)
        clock = SystemClock()
        bootstrap_authorities(build_authorities(settings, engine, clock), settings, clock)
    finally:
        engine.dispose()


def build_attestor(
    settings: Settings, clock: Clock, metrics: MeshcaMetrics | None = None
) -> tuple[Attestor, Attestor | None]:
    """The attestor for the k8s audiences, and one for Linkerd's (with --linkerd-certify).

    Both share one verifier (JWKS keys, or the API server client and review threads);
    each has its own cache, as a token good for one door is not good for the other.
    """
    inner = _cluster_attestor(settings, clock)
    linkerd = None
    if settings.linkerd_certify:
        linkerd = _cached(inner.with_audiences(settings.linkerd_audience), settings, clock, metrics)
    return _cached(inner, settings, clock, metrics), linkerd


def _cached(
    inner: Attestor, settings: Settings, clock: Clock, metrics: MeshcaMetrics | None
) -> Attestor:
    if metrics is not None:
        # Timed inside the cache: what is measured is the cluster's answer.
        inner = TimedAttestor(inner, metrics.attestation_seconds.labels(settings.k8s_mode).observe)
    return CachingAttestor(inner, clock, max_ttl=settings.token_cache_ttl)


def _cluster_attestor(settings: Settings, clock: Clock) -> JwksAttestor | TokenReviewAttestor:
    audiences = list(settings.k8s_audience)
    inner: JwksAttestor | TokenReviewAttestor
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
    return inner


@dataclass
class Worker:
    """A running server in this process."""

    server: grpc.aio.Server
    port: int
    audit: SqlAuditLog | RecordWriterClient
    engine: Engine
    executor: ThreadPoolExecutor
    authorities: AuthorityService
    bundle: TrustBundleService
    rotator: Rotator
    leader: LeaderLock | PgLeaderLock
    stopping: asyncio.Event
    tasks: list[asyncio.Task[None]]
    serving: ServingCertificate | None = None
    bundle_endpoint: BundleEndpoint | None = None
    bundle_port: int | None = None
    oidc_endpoint: BundleEndpoint | None = None
    oidc_port: int | None = None
    authz: AuthorizationService | None = None
    decisions: SqlDecisionLog | None = None
    audit_port: int | None = None
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    metrics_server: MetricsServer | None = None
    health: grpc_health.aio.HealthServicer | None = None
    gate: CallGate = field(default_factory=CallGate)
    policy_server: grpc.aio.Server | None = None
    policy_port: int | None = None
    crls: CrlPublisher | None = None

    async def stop(self, grace: float = 5.0) -> None:
        """Drain within ``grace`` seconds: health first, then calls, then the rest.

        Every health name turns NOT_SERVING (load balancers stop sending) and the call
        gate closes: new calls get UNAVAILABLE, streams end, and the calls in flight
        have ``DrainBudget.calls`` seconds to finish, their records committed. Then the
        server stops, aborting any call still running (clients see UNAVAILABLE).
        Background tasks and the record writer's connection get the rest of the grace.
        """
        budget = DrainBudget(grace)
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        self.gate.close()
        log.info("no new calls taken; %d call(s) in flight", self.gate.in_flight)
        if self.bundle_endpoint is not None:
            await self.bundle_endpoint.stop()
        if self.oidc_endpoint is not None:
            await self.oidc_endpoint.stop()
        if not await self.gate.idle(budget.calls):
            log.warning(
                "%d call(s) still running after %.3gs: aborting them",
                self.gate.in_flight,
                budget.calls,
            )
        await self.server.stop(0)
        if self.policy_server is not None:
            await self.policy_server.stop(0)
        loop = asyncio.get_running_loop()
        cleanup_until = loop.time() + budget.cleanup
        self.stopping.set()
        if self.health_server is not None:
            await self.health_server.stop(0)
        late: set[asyncio.Task[None]] = set()
        if self.tasks:
            _, late = await asyncio.wait(self.tasks, timeout=cleanup_until - loop.time())
        for task in late:
            log.warning("a background task did not stop within the grace: %s", task.get_name())
            task.cancel()
        self.leader.release()
        # A thread stuck in a backend call must not hold the drain; nothing is queued
        # for it once the calls have ended.
        self.executor.shutdown(wait=False, cancel_futures=True)
        try:
            await asyncio.wait_for(self._close_records(), max(0.0, cleanup_until - loop.time()))
        except TimeoutError:
            log.error("the record writer did not confirm within the grace; closing anyway")
        if self.metrics_server is not None:
            # Scraped until here: the drain is worth watching.
            await asyncio.to_thread(self.metrics_server.stop)
        self.engine.dispose()

    async def _close_records(self) -> None:
        await self.audit.aclose()
        if self.decisions is not None:
            await self.decisions.aclose()

    async def cut_short(self) -> None:
        """Abort the calls still in flight now (a repeated stop signal)."""
        await self.server.stop(None)
        if self.policy_server is not None:
            await self.policy_server.stop(None)


class ServingCertificate:
    """meshca's own TLS certificate: issued at start, renewed once half its life is gone.

    Renewal matters once CA lifetimes are short: the certificate cannot outlive the
    intermediate that signed it. New handshakes pick up the renewed one.
    """

    def __init__(
        self,
        settings: Settings,
        authorities: AuthorityService,
        audit: AuditLog,
        clock: Clock,
    ) -> None:
        self._settings = settings
        self._authorities = authorities
        self._audit = audit
        self._clock = clock
        self._pending: ServerTls | None = None
        self.tls: ServerTls | None = None
        self.renew_at = clock.now()
        self._listeners: list[Callable[[ServerTls], None]] = []

    async def issue(self) -> ServerTls:
        tls = await _serving_tls(
            self._settings, self._authorities.current(), self._audit, self._clock
        )
        leaf = x509.load_pem_x509_certificates(tls.chain_pem)[0]
        start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
        self.renew_at = start + (end - start) / 2
        self.tls = self._pending = tls
        for listener in self._listeners:
            listener(tls)
        return tls

    def on_renewal(self, listener: Callable[[ServerTls], None]) -> None:
        self._listeners.append(listener)

    def take_update(self) -> ServerTls | None:
        """A renewed certificate not yet handed to the gRPC server, once."""
        pending, self._pending = self._pending, None
        return pending

    async def run(self, stop: asyncio.Event, interval: float) -> None:
        while not stop.is_set():
            if self._clock.now() >= self.renew_at:
                try:
                    await self.issue()
                    log.info("renewed meshca's serving certificate")
                except Exception:
                    log.exception("could not renew meshca's serving certificate; retrying")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


async def _serving_tls(
    settings: Settings, authority: Authority, audit: AuditLog, clock: Clock
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


class _ReadyHealth:
    """Reports each readiness change as the health of ``READY_HEALTH``."""

    def __init__(self, servicer: grpc_health.aio.HealthServicer) -> None:
        self._health = servicer

    async def __call__(self, readiness: Readiness) -> None:
        serving = health_pb2.HealthCheckResponse
        await self._health.set(
            READY_HEALTH, serving.SERVING if readiness.ready else serving.NOT_SERVING
        )


class _PolicyHealth:
    """Reports the policy set's state as the health of ``POLICY_HEALTH`` once serving."""

    def __init__(self, metrics: MeshcaMetrics | None) -> None:
        self.health: Any = None
        self._metrics = metrics

    async def __call__(self, status: PolicyStatus) -> None:
        if self._metrics is not None:
            self._metrics.observe_policy_set(status.healthy)
        if self.health is not None:
            serving = health_pb2.HealthCheckResponse
            await self.health.set(
                POLICY_HEALTH, serving.SERVING if status.healthy else serving.NOT_SERVING
            )


async def build_authz(
    settings: Settings,
    engine: Engine,
    clock: Clock,
    on_status: _PolicyHealth,
    metrics: MeshcaMetrics | None = None,
) -> tuple[AuthorizationService | None, SqlDecisionLog | None]:
    """With ``--policy-dir``: the authorization service, its first load done, and its log.

    Invalid files at start-up do not stop the server (certificates are still issued):
    every request is denied until a valid set loads, and the problems are logged.
    """
    if settings.policy_dir is None:
        return None, None
    decisions = SqlDecisionLog(engine)
    authz = AuthorizationService(
        source=DirectoryPolicySource(settings.policy_dir),
        clock=clock,
        default_allow=settings.policy_default == "allow",
        decision_log=decisions,
        sample_rate=settings.decision_sample_rate,
        random=random.random,
        on_status=on_status,
        on_decision=None if metrics is None else metrics.observe_decision,
    )
    await authz.reload()
    return authz, decisions


def policy_access(settings: Settings) -> PolicyAccess:
    """Who may call ext_authz (on the policy port) and PolicyService, from ``settings``."""
    token = None
    if settings.policy_token_file is not None:
        try:
            token = settings.policy_token_file.read_text().strip()
        except OSError as error:
            raise ConfigError(
                f"cannot read policy-token-file {settings.policy_token_file}: {error.strerror}"
            ) from None
        if not token:
            raise ConfigError(f"policy-token-file {settings.policy_token_file} is empty")
    return PolicyAccess(
        callers=settings.policy_callers(), admins=frozenset(settings.policy_admin), token=token
    )


def issuance_limiter(
    settings: Settings, rate_table: Path | None = None
) -> RateLimiter | SharedRateLimiter | None:
    """``--issuance-rate``: counted in ``rate_table`` with the host's other workers (a
    worker of ``serve``), else in this process (see docs/operations.md)."""
    rate = settings.issuance_rate_limit()
    if rate is None:
        return None
    return RateLimiter(rate) if rate_table is None else SharedRateLimiter(rate_table, rate)


async def start_worker(
    settings: Settings,
    listen: str | None = None,
    record_writer: socket.socket | None = None,
    api_caps: ApiCaps = DEFAULT_API_CAPS,
    rate_table: Path | None = None,
) -> Worker:
    """Build every part from ``settings`` and start serving; returns once listening.

    With ``record_writer`` (a worker of ``serve``), issuance records go to the host's
    writer over that socket; without, this process writes them itself. ``api_caps``
    are the per-API caps (``limits.ApiCaps``: fixed figures; tests tighten them).
    ``rate_table``: the host's shared ``--issuance-rate`` table (``serve`` makes it).
    """
    clock = SystemClock()
    trust_domain = TrustDomain.parse(settings.trust_domain)
    engine = make_engine(settings.effective_database_url)
    authorities = build_authorities(settings, engine, clock)
    await asyncio.to_thread(authorities.refresh)
    metrics = None if settings.metrics_listen is None else meshca_metrics()
    audit: SqlAuditLog | RecordWriterClient
    if record_writer is None:
        audit = SqlAuditLog(engine, on_commit=None if metrics is None else metrics.observe_commit)
    else:
        audit = RecordWriterClient(record_writer)
        await audit.start()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshca-sign")
    loop = asyncio.get_running_loop()
    limits = ConnectionLimits(
        idle_seconds=settings.connection_idle_timeout.total_seconds(),
        max_connections=connection_cap(raise_open_files_limit()),
    )

    def offload(fn: Callable[[], Any]) -> Any:
        return loop.run_in_executor(executor, fn)

    view = authorities.view
    bundle = TrustBundleService(
        trust_domain, view.bundle, view.bundle_sequence, view.jwt_keys, view.tainted
    )
    deny_list = DenyListFollower(SqlDenyList(engine))
    await asyncio.to_thread(deny_list.refresh)
    crls = await asyncio.to_thread(
        build_crl_publisher, settings, engine, clock, authorities, deny_list
    )
    # The CRLs also ride on GetTrustBundle/WatchTrustBundle (agents serve them on).
    bundle.publish_crls(crls.current().ders())
    crls.on_change = lambda published: bundle.publish_crls(published.ders())
    observers: list[OutcomeObserver] = [OutcomeLog()]
    if metrics is not None:
        observers.append(metrics.observe_outcome)
    attestor, linkerd_attestor = build_attestor(settings, clock, metrics)
    ca = CertificateService(
        trust_domain=trust_domain,
        attestor=attestor,
        audit_log=audit,
        authority=authorities.current,
        clock=clock,
        policy=IssuancePolicy(
            default_ttl=min(settings.svid_ttl, settings.max_svid_ttl),
            max_ttl=settings.max_svid_ttl,
        ),
        new_serial=new_serial,
        # Transit signs over the network: keep that off the event loop. Local keys sign
        # in microseconds, and a worker process owns its core anyway.
        offload=offload if settings.vault_transit else None,
        on_outcome=each(observers),
        linkerd=None
        if linkerd_attestor is None
        else LinkerdDoor(linkerd_attestor, settings.linkerd_identity_domain),
        rate_limiter=issuance_limiter(settings, rate_table),
        deny_list=deny_list.current,
    )
    jwt = JwtSvidService(
        trust_domain=trust_domain,
        attestor=attestor,
        audit_log=audit,
        signer=authorities.jwt_signer,
        clock=clock,
        max_ttl=settings.max_jwt_svid_ttl,
        new_jti=lambda: serial_hex(new_serial()),
        issuer=settings.jwt_issuer,
        offload=offload if settings.vault_transit else None,
        on_outcome=each(
            [OutcomeLog(jwt_svids=True), *([] if metrics is None else [metrics.observe_outcome])]
        ),
        deny_list=deny_list.current,
    )
    serving = (
        None if settings.plaintext else ServingCertificate(settings, authorities, audit, clock)
    )
    tls = None if serving is None else await serving.issue()
    policy_health = _PolicyHealth(metrics)
    authz, decisions = await build_authz(settings, engine, clock, policy_health, metrics)

    def record_counters() -> tuple[int, int]:
        counters = decisions.counters if decisions is not None else None
        return (counters.failed, counters.dropped) if counters is not None else (0, 0)

    leader = leader_lock(settings, engine)
    gate = CallGate(limits=CallLimits(api_caps, on_refusal=record_ca_refusals(ca, jwt)))
    audit_servicer, maintenance = build_audit(
        settings, engine, clock, leader.held, deny_list.current
    )
    access = None if authz is None else policy_access(settings)
    main_guard = None
    if access is not None and settings.policy_insecure_main_port:
        # The main port asks for no client certificate: ext_authz there is open (the
        # flag says so); PolicyService still needs an admin's SVID (audit port) or token.
        main_guard = CallerGuard(
            replace(access, callers=None),
            audit_log=audit,
            clock=clock,
            on_outcome=each(observers),
            deny_list=deny_list.current,
        )
    server, port, health = build_server(
        ca=ca,
        bundle=bundle,
        listen=listen or settings.listen,
        tls=tls,
        tls_updates=None if serving is None else serving.take_update,
        authz=authz if main_guard is not None else None,
        record_counters=record_counters,
        audit=audit_servicer,
        gate=gate,
        limits=limits,
        policy_guard=main_guard,
        reflection_on=not settings.no_reflection,
        linkerd=settings.linkerd_certify,
        jwt=jwt,
    )
    audit_port = None
    if settings.audit_listen and serving is not None and tls is not None:
        # Read at each handshake: the certificate as renewed, the roots as rotated.
        audit_port = add_audit_port(
            server,
            settings.audit_listen,
            lambda: serving.tls or tls,
            lambda: bundle.current().roots_pems,
        )
    policy_server, policy_port = None, None
    if (
        authz is not None
        and access is not None
        and settings.policy_listen
        and serving is not None
        and tls is not None
    ):
        policy_server, policy_port = build_policy_server(
            authz=authz,
            guard=CallerGuard(
                access,
                audit_log=audit,
                clock=clock,
                on_outcome=each(observers),
                deny_list=deny_list.current,
            ),
            listen=settings.policy_listen,
            # Read at each handshake: the certificate as renewed, the roots as rotated.
            tls=lambda: serving.tls or tls,
            client_roots=lambda: bundle.current().roots_pems,
            health_servicer=health,
            record_counters=record_counters,
            gate=gate,
            limits=limits,
            reflection_on=not settings.no_reflection,
        )
    await server.start()
    if policy_server is not None:
        await policy_server.start()
    if authz is not None:
        for name in POLICY_SERVICE_NAMES:
            await health.set(name, health_pb2.HealthCheckResponse.SERVING)
        policy_health.health = health
        await policy_health(authz.status())
    linkerd_names = (LINKERD_SERVICE_NAME,) if settings.linkerd_certify else ()
    for name in ("", *SERVICE_NAMES, *linkerd_names, AUTHORITY_HEALTH):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    await health.set(READY_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING)
    readiness = ReadinessChecker(
        authority=authorities.current,
        ping_database=functools.partial(ping, engine),
        writer=audit,
        on_change=_ReadyHealth(health),
        interval=min(settings.journal_poll.total_seconds(), READINESS_INTERVAL),
        offload=offload if settings.vault_transit else None,
    )
    # Known before the probes' port opens.
    await readiness.check()
    health_server, health_port = None, None
    if settings.health_listen is not None:
        health_server, health_port = build_health_server(health, settings.health_listen, limits)
        await health_server.start()

    def report_health(problem: str | None) -> None:
        if metrics is not None:
            metrics.observe_degraded(problem)
        # Still SERVING overall: issuance goes on under the current intermediate.
        status = health_pb2.HealthCheckResponse
        task = asyncio.ensure_future(
            health.set(AUTHORITY_HEALTH, status.NOT_SERVING if problem else status.SERVING)
        )
        tasks.append(task)

    rotator = Rotator(
        authorities=authorities,
        bundle=bundle,
        is_leader=leader.held,
        interval=settings.journal_poll.total_seconds(),
        on_health=report_health,
    )
    endpoint, bundle_port = None, None
    if settings.bundle_endpoint is not None:
        endpoint = BundleEndpoint(
            bundle.current,
            # Relying parties re-fetch well within the propagation delay.
            refresh_hint=min(
                300.0, settings.rotation_policy().propagation_delay.total_seconds() / 4
            ),
            tls=None if tls is None else (tls.private_key_pem, tls.chain_pem),
            crl=lambda fingerprint: crls.current().der(fingerprint),
        )
        if serving is not None:
            serving.on_renewal(
                lambda renewed: (
                    endpoint.update_tls(renewed.private_key_pem, renewed.chain_pem)
                    if endpoint
                    else None
                )
            )
        bundle_host, _, bundle_port_text = settings.bundle_endpoint.rpartition(":")
        bundle_port = await endpoint.start(bundle_host.strip("[]"), int(bundle_port_text))
    oidc, oidc_port = None, None
    if settings.oidc_discovery is not None and settings.jwt_issuer is not None:
        oidc = oidc_endpoint(bundle.current, settings.jwt_issuer)
        oidc_host, _, oidc_port_text = settings.oidc_discovery.rpartition(":")
        oidc_port = await oidc.start(oidc_host.strip("[]"), int(oidc_port_text))
    metrics_server = None
    if settings.metrics_listen is not None and record_writer is None:
        # A worker of ``serve`` leaves this to the supervisor, which sums every worker.
        metrics_server = start_metrics_server(
            settings.metrics_listen, functools.partial(read_database_state, engine), clock.now
        )
    stopping = asyncio.Event()
    tasks: list[asyncio.Task[None]] = [asyncio.create_task(rotator.run(stopping))]
    tasks.append(asyncio.create_task(maintenance.run(stopping)))
    tasks.append(asyncio.create_task(readiness.run(stopping)))
    tasks.append(
        asyncio.create_task(deny_list.run(stopping, settings.journal_poll.total_seconds()))
    )
    tasks.append(asyncio.create_task(crls.run(stopping, settings.journal_poll.total_seconds())))
    if authz is not None:
        interval = settings.policy_poll_interval.total_seconds()
        tasks.append(asyncio.create_task(authz.run(stopping, interval)))
    if serving is not None:
        tasks.append(
            asyncio.create_task(serving.run(stopping, settings.journal_poll.total_seconds()))
        )
    return Worker(
        server=server,
        port=port,
        audit=audit,
        engine=engine,
        executor=executor,
        authorities=authorities,
        bundle=bundle,
        rotator=rotator,
        leader=leader,
        stopping=stopping,
        tasks=tasks,
        serving=serving,
        bundle_endpoint=endpoint,
        bundle_port=bundle_port,
        oidc_endpoint=oidc,
        oidc_port=oidc_port,
        authz=authz,
        decisions=decisions,
        audit_port=audit_port,
        health_server=health_server,
        health_port=health_port,
        metrics_server=metrics_server,
        health=health,
        gate=gate,
        policy_server=policy_server,
        policy_port=policy_port,
        crls=crls,
    )


def build_crl_publisher(
    settings: Settings,
    engine: Engine,
    clock: SystemClock,
    authorities: AuthorityService,
    deny_list: DenyListFollower,
) -> CrlPublisher:
    """Each intermediate's CRL, re-signed on deny-list changes and at half its validity
    (see service/crl.py); the first set is made before serving."""
    poll = settings.journal_poll
    crls = CrlPublisher(
        source=SqlRevokedLeaves(engine),
        deny_list=deny_list.current,
        authorities=lambda: authorities.view.authorities,
        load_key=authorities.keys.load,
        clock=clock,
        validity=settings.crl_validity,
        # A replica follows an activation within a poll or two of the journal.
        slack=max(poll * 3, timedelta(seconds=10)),
        # Within one poll of a revoke: the deny-list is re-read right before.
        before_refresh=deny_list.refresh,
    )
    try:
        crls.refresh()
    except MeshcaError as error:
        log.warning("CRLs not made at start: %s (retried every --journal-poll)", error.message)
    return crls


def read_database_state(engine: Engine) -> DatabaseState:
    """The CA's state as the metrics show it: journal, bundle sequence, log size and head."""
    authorities = SqlAuthorityJournal(engine).load()
    issuance_log = SqlTransparencyLog(engine)
    head = issuance_log.latest_head()
    return DatabaseState(
        authorities=authorities,
        bundle_sequence=authorities.bundle_sequence(),
        tree_size=issuance_log.state().tree_size,
        head_time=None if head is None else head.head.timestamp,
    )


async def run_worker(
    settings: Settings,
    listen: str | None = None,
    record_writer: socket.socket | None = None,
    rate_table: Path | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, or until the record writer (``serve``'s supervisor)
    is gone, then drain within ``--shutdown-grace``.

    A worker of ``serve`` ignores repeated signals: its supervisor forwards each stop
    and bounds the drain, killing a worker still alive at the grace's end.
    """
    worker = await start_worker(settings, listen, record_writer, rate_table=rate_table)
    host = (listen or settings.listen).rpartition(":")[0]
    mode = "plaintext" if settings.plaintext else "TLS"
    log.info("serving on %s:%d (%s)", host, worker.port, mode)
    if worker.policy_port is not None:
        policy_host = (settings.policy_listen or "").rpartition(":")[0]
        log.info("ext_authz and the policy API on %s:%d (mTLS)", policy_host, worker.policy_port)
    if worker.authz is not None and not (settings.policy_admin or settings.policy_token_file):
        log.warning(
            "the policy API refuses every caller: give --policy-admin or --policy-token-file"
        )
    if worker.authz is not None and settings.policy_insecure_main_port:
        log.warning(
            "ext_authz is served on the main port %s:%d to anyone who can reach it "
            "(--policy-insecure-main-port); use --policy-listen to require client SVIDs",
            host,
            worker.port,
        )
    if settings.health_listen is not None:
        health_host = settings.health_listen.rpartition(":")[0]
        log.info("health on %s:%d (plaintext, health only)", health_host, worker.health_port)
    if worker.metrics_server is not None:
        metrics_host = (settings.metrics_listen or "").rpartition(":")[0]
        log.info("metrics on http://%s:%d/metrics", metrics_host, worker.metrics_server.port)
    writer_gone = None
    if isinstance(worker.audit, RecordWriterClient):
        # The writer runs in the supervisor: if it is gone (the supervisor was killed),
        # this worker can issue nothing, and must not keep the port from a new one.
        writer_gone = worker.audit.writer_gone()
    await serve_until_stopped(
        worker, settings.shutdown_grace, supervised=True, writer_gone=writer_gone
    )


async def serve_until_stopped(
    worker: Worker,
    grace: timedelta,
    *,
    supervised: bool,
    writer_gone: Awaitable[str] | None = None,
) -> None:
    """Wait for SIGTERM or SIGINT (or ``writer_gone``), then drain ``worker`` within ``grace``.

    Unsupervised (``dev serve``), a watchdog ends the process if it is still alive when
    the grace is over; a second signal aborts the calls in flight and leaves only the
    cleanup's share of the grace.
    """
    seconds = grace.total_seconds()
    signals = StopSignals(Shutdown(seconds, repeat_cuts_short=not supervised))
    signalled = asyncio.ensure_future(signals.draining.wait())
    waits: list[asyncio.Future[Any]] = [signalled]
    if writer_gone is not None:
        waits.append(asyncio.ensure_future(writer_gone))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    if not signalled.done():
        log.error("%s; this worker stops", waits[1].result())
    for waiting in waits:
        waiting.cancel()
    started = asyncio.get_running_loop().time()
    if not supervised:
        start_watchdog(seconds, "the stop signal")
    draining = asyncio.create_task(worker.stop(seconds))
    hurry = asyncio.create_task(signals.cut_short.wait())
    await asyncio.wait((draining, hurry), return_when=asyncio.FIRST_COMPLETED)
    if not draining.done():
        start_watchdog(DrainBudget(seconds).cleanup, "the drain was cut short")
        await worker.cut_short()
    hurry.cancel()
    await draining
    log.info("drained in %.2fs", asyncio.get_running_loop().time() - started)


def _worker_main(
    settings: Settings, rate_table: Path | None, listen: str, record_writer: socket.socket
) -> None:
    configure_logging(settings)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_worker(settings, listen, record_writer, rate_table))
    except Exception:
        # Logged, not left to multiprocessing: its traceback would bypass --log-format.
        log.exception("worker failed")
        exit_now(1)
    exit_now(0)


def _host_writer(settings: Settings, connections: Sequence[socket.socket]) -> HostRecordWriter:
    engine = make_engine(settings.effective_database_url)
    metrics = None if settings.metrics_listen is None else meshca_metrics()
    committer = BatchCommitter(
        engine,
        insert_records,
        what="issuance record",
        on_commit=None if metrics is None else metrics.observe_commit,
    )
    return HostRecordWriter(committer, connections)


def serve(settings: Settings) -> int:
    """Run ``settings.workers`` server processes sharing one port; returns an exit code."""
    configure_logging(settings)
    prepare(settings)
    with contextlib.ExitStack() as cleanup:
        if settings.metrics_listen is not None:
            cleanup.enter_context(_served_metrics(settings))
        rate_table = None
        rate = settings.issuance_rate_limit()
        if rate is not None:
            # One count per host: every worker admits under the same table.
            rate_table = create_rate_table(settings.data_dir, rate)
            cleanup.callback(rate_table.unlink, missing_ok=True)
        pool = WorkerPool(
            settings.workers,
            settings.listen,
            target=functools.partial(_worker_main, settings, rate_table),
            writer=functools.partial(_host_writer, settings),
            grace=settings.shutdown_grace.total_seconds(),
        )
        return pool.run()


@contextlib.contextmanager
def _served_metrics(settings: Settings) -> Iterator[None]:
    """Every process of ``serve`` counts into files of one directory; we serve their sum.

    The directory is in the data dir (writable in any deployment, unlike a read-only
    root's /tmp) and starts empty: counts left by a killed run are not ours.
    """
    assert settings.metrics_listen is not None
    directory = settings.data_dir / "metrics"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o700)
    count_into(directory)
    engine = make_engine(settings.effective_database_url)
    try:
        server = start_metrics_server(
            settings.metrics_listen,
            functools.partial(read_database_state, engine),
            SystemClock().now,
        )
    except OSError as error:
        shutil.rmtree(directory, ignore_errors=True)
        raise ConfigError(f"metrics-listen {settings.metrics_listen}: {error.strerror}") from None
    host = settings.metrics_listen.rpartition(":")[0]
    log.info("metrics on http://%s:%d/metrics (all workers)", host, server.port)
    try:
        yield
    finally:
        server.stop()
        engine.dispose()
        shutil.rmtree(directory, ignore_errors=True)
