"""Envoy SDS (``envoy.service.secret.v3.SecretDiscoveryService``) on the agent's socket.

Two secrets, named as istio-agent names them: ``default`` (the workload's chain and key)
and ``ROOTCA`` (a validation context with the trust bundle). Other names are logged and
left out of responses (a State-of-the-World server does not send resources it does not
have); ``FetchSecrets`` for nothing but unknown names is NOT_FOUND.

The xDS handshake per stream (``SdsStream``): the first request (no nonce) subscribes,
and its answer carries a version and a fresh nonce. A request with the latest nonce is an
ACK, or a NACK when it has ``error_detail``: either way nothing is resent; a NACKed
version is logged and only a *changed* secret is pushed again, so a client that rejects
a secret never gets it back in a loop. A request with an older nonce is stale and
ignored. A changed resource list resubscribes. New pushes follow every change of the
subscribed secrets' contents (renewal changes ``default``, a bundle change ``ROOTCA``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeAlias

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from meshca.core.agent import svid_usable
from meshca.service.agent import AgentSnapshot, AgentState

__all__ = ["DEFAULT", "ROOTCA", "SECRET_TYPE", "SdsServicer", "SdsStream", "secrets_for"]

log = logging.getLogger("meshca.agent.sds")

DEFAULT = "default"
ROOTCA = "ROOTCA"
KNOWN = (DEFAULT, ROOTCA)
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"  # noqa: S105

Context: TypeAlias = Any  # grpc.aio.ServicerContext; grpcio ships no type hints


def _pem(ders: Iterable[bytes]) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in ders
    )


def _content(name: str, snapshot: AgentSnapshot) -> object | None:
    """What secret ``name`` holds in ``snapshot`` (comparable), None while unavailable."""
    if name == DEFAULT and svid_usable(snapshot.svid, datetime.now(UTC)):
        assert snapshot.svid is not None
        return (snapshot.svid.chain_der, snapshot.svid.key_der)
    if name == ROOTCA and snapshot.bundle is not None and snapshot.bundle.roots_der:
        return snapshot.bundle.roots_der
    return None


def _secret(name: str, snapshot: AgentSnapshot) -> secret_pb2.Secret:
    if name == DEFAULT:
        svid = snapshot.svid
        assert svid is not None
        key = serialization.load_der_private_key(svid.key_der, password=None)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return secret_pb2.Secret(
            name=DEFAULT,
            tls_certificate=common_pb2.TlsCertificate(
                certificate_chain=base_pb2.DataSource(inline_bytes=_pem(svid.chain_der)),
                private_key=base_pb2.DataSource(inline_bytes=key_pem),
            ),
        )
    assert snapshot.bundle is not None
    return secret_pb2.Secret(
        name=ROOTCA,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=_pem(snapshot.bundle.roots_der))
        ),
    )


def secrets_for(names: Iterable[str], snapshot: AgentSnapshot) -> list[any_pb2.Any]:
    """The available secrets among ``names``, packed for a DiscoveryResponse."""
    packed = []
    for name in names:
        if _content(name, snapshot) is not None:
            item = any_pb2.Any()
            item.Pack(_secret(name, snapshot))
            packed.append(item)
    return packed


@dataclass
class SdsStream:
    """One StreamSecrets stream's xDS state: what is subscribed, sent and acknowledged."""

    peer: str = ""
    names: tuple[str, ...] = ()
    subscribed: bool = False
    sent_nonce: str = ""
    sent_version: str = ""
    sent_contents: tuple[object, ...] | None = None
    nonces: int = 0
    nacked: list[str] = field(default_factory=list)

    def on_request(
        self, request: discovery_pb2.DiscoveryRequest, snapshot: AgentSnapshot
    ) -> discovery_pb2.DiscoveryResponse | None:
        if request.response_nonce:
            if request.response_nonce != self.sent_nonce:
                log.debug("SDS %s: stale nonce %s ignored", self.peer, request.response_nonce)
                return None
            if request.HasField("error_detail"):
                self.nacked.append(self.sent_version)
                log.warning(
                    "SDS %s NACKed version %s of %s: %s; not resending it",
                    self.peer,
                    self.sent_version,
                    ",".join(self.names),
                    request.error_detail.message,
                )
            else:
                log.debug("SDS %s ACKed version %s", self.peer, request.version_info)
            names = tuple(request.resource_names) or KNOWN
            if names == self.names:
                return None
            self._subscribe(names)
            return self.on_snapshot(snapshot)
        self._subscribe(tuple(request.resource_names) or KNOWN)
        return self.on_snapshot(snapshot)

    def _subscribe(self, names: tuple[str, ...]) -> None:
        unknown = [n for n in names if n not in KNOWN]
        if unknown:
            log.warning(
                "SDS %s asked for unknown secrets %s; this agent serves %s",
                self.peer,
                ",".join(unknown),
                " and ".join(KNOWN),
            )
        self.names = names
        self.subscribed = True
        self.sent_contents = None

    def on_snapshot(self, snapshot: AgentSnapshot) -> discovery_pb2.DiscoveryResponse | None:
        """A response when the subscribed secrets differ from what was last sent (all
        of them after a (re)subscription), None when nothing is new or available yet."""
        if not self.subscribed:
            return None
        contents = tuple(_content(n, snapshot) for n in self.names)
        if all(c is None for c in contents):
            return None
        if contents == self.sent_contents:
            return None
        self.sent_contents = contents
        self.nonces += 1
        self.sent_nonce = str(self.nonces)
        self.sent_version = str(snapshot.version)
        return discovery_pb2.DiscoveryResponse(
            version_info=self.sent_version,
            resources=secrets_for(self.names, snapshot),
            type_url=SECRET_TYPE,
            nonce=self.sent_nonce,
        )


class SdsServicer(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    def __init__(self, state: AgentState) -> None:
        self._state = state

    async def StreamSecrets(
        self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context: Context
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        stream = SdsStream(peer=context.peer() or "client")
        events: asyncio.Queue[discovery_pb2.DiscoveryRequest | AgentSnapshot | Exception | None] = (
            asyncio.Queue()
        )

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await events.put(request)
            except Exception as exc:  # a request that does not parse ends the stream
                await events.put(exc)
                return
            await events.put(None)

        async def watch() -> None:
            version = self._state.current.version
            while True:
                snapshot = await self._state.wait_newer(version)
                version = snapshot.version
                await events.put(snapshot)

        tasks = [asyncio.create_task(read()), asyncio.create_task(watch())]
        try:
            while True:
                event = await events.get()
                if event is None:
                    return
                if isinstance(event, Exception):
                    log.warning("SDS %s: refused a malformed request: %r", stream.peer, event)
                    await context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT, "malformed DiscoveryRequest"
                    )
                    return  # abort() raises; this keeps type checkers informed
                if isinstance(event, AgentSnapshot):
                    response = stream.on_snapshot(event)
                else:
                    if event.type_url and event.type_url != SECRET_TYPE:
                        log.warning("SDS %s: refused type_url %s", stream.peer, event.type_url)
                        await context.abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"this SDS server serves {SECRET_TYPE}, not {event.type_url!r}",
                        )
                    response = stream.on_request(event, self._state.current)
                if response is not None:
                    yield response
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def FetchSecrets(
        self, request: discovery_pb2.DiscoveryRequest, context: Context
    ) -> discovery_pb2.DiscoveryResponse:
        names = tuple(request.resource_names) or KNOWN
        if not any(n in KNOWN for n in names):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"no secret named {', '.join(names)}; this agent serves {' and '.join(KNOWN)}",
            )
        snapshot = self._state.current
        resources = secrets_for(names, snapshot)
        if not resources:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "no SVID or bundle yet: the agent is still starting"
            )
        return discovery_pb2.DiscoveryResponse(
            version_info=str(snapshot.version), resources=resources, type_url=SECRET_TYPE
        )
