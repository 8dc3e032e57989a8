"""Errors never echo secrets or large inputs: every method of every service, hostile input.

The services come from the live server's reflection, so a service added later is swept
too. Each method is called with every string and bytes field (nested ones included)
set to secrets or to a large input, and with a secret as the bearer token; the status
detail and the trailing metadata must carry none of them and stay short.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

# Registers Envoy's and our descriptors in the default pool, as the server does.
from meshca.adapters.grpc import server as _server  # noqa: F401
from tests.integration.server_harness import RunningServer, running_server

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
AUDIT_TOKEN = "audit-secret-4b1d0e6a"
#: Longer than any detail we send: a detail this long must be echoing input.
MAX_DETAIL = 512
#: The longest excerpt of an input a detail may quote.
EXCERPT = 100
#: Marks text that must never come back; each secret below contains it.
MARK = "ZQXJK"
#: Services that are not ours to bound (gRPC's own).
FOREIGN = ("grpc.reflection.v1alpha.ServerReflection", "grpc.health.v1.Health")


def _csr_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"csr-{MARK}-subject")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    token_file = tmp_path / "audit-token"
    token_file.write_text(AUDIT_TOKEN + "\n")
    policy_dir = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policy_dir)
    async for running in running_server(
        tmp_path,
        audit_token_file=token_file,
        auditor=("spiffe://example.org/ns/audit/sa/auditor",),
        policy_dir=policy_dir,
        # The policy services on the main port: this sweep reaches them without an SVID
        # (test_error_details_by_caller covers the policy port).
        policy_insecure_main_port=True,
        policy_token_file=token_file,
        linkerd_certify=True,
    ):
        yield running


def _secrets(server: RunningServer) -> dict[str, str]:
    """Inputs that must not be echoed (beyond a short excerpt), by name."""
    real_token = server.minter.mint(service_account=f"sa{MARK.lower()}")
    return {
        # A valid token of this cluster (its payload names the mark) and a forged one.
        "token": real_token,
        "forged-token": "eyJhbGciOiJFUzI1NiJ9." + MARK + "payload.c2ln",
        "csr": _csr_pem(),
        # Past MAX_DETAIL yet under gRPC's message cap, so it reaches the parsers...
        "large": "A" * 1500 + MARK,
        # ...and far past the cap.
        "huge": ("A" * 2000 + MARK) * 25,
    }


def _fragments(secrets: dict[str, str]) -> list[str]:
    """Pieces of each secret that only an echo could put in a detail."""
    csr_body = "".join(secrets["csr"].splitlines()[1:-1])
    # A detail may quote a short excerpt of a plain field (a cursor, a SPIFFE ID), never a
    # token, a CSR, or more than EXCERPT characters of anything.
    return [
        MARK,
        secrets["token"][-30:],
        csr_body[40:80],
        AUDIT_TOKEN,
        "A" * (EXCERPT + 1),
    ]


def _fill(message: Any, text: str, depth: int = 0) -> None:
    """Set every string and bytes field of ``message`` (nested, repeated) to ``text``."""
    descriptor: Descriptor = message.DESCRIPTOR
    for field in descriptor.fields:
        is_repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_STRING:
            value: Any = text
        elif field.type == FieldDescriptor.TYPE_BYTES:
            value = text.encode()
        elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < 4:
            if field.message_type.GetOptions().map_entry:
                entry = field.message_type
                key, item = entry.fields_by_name["key"], entry.fields_by_name["value"]
                if key.type == FieldDescriptor.TYPE_STRING:
                    target = getattr(message, field.name)
                    if item.type == FieldDescriptor.TYPE_STRING:
                        target[text[:64]] = text
                    elif item.type == FieldDescriptor.TYPE_MESSAGE:
                        _fill(target[text[:64]], text, depth + 1)
                continue
            if is_repeated:
                _fill(getattr(message, field.name).add(), text, depth + 1)
            else:
                _fill(getattr(message, field.name), text, depth + 1)
            continue
        else:
            continue
        if is_repeated:
            getattr(message, field.name).append(value)
        else:
            setattr(message, field.name, value)


async def _service_names(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    response = await call.read()
    call.cancel()
    return [s.name for s in response.list_services_response.service]


def _methods(names: list[str]) -> Iterator[MethodDescriptor]:
    pool = descriptor_pool.Default()
    for name in names:
        if name in FOREIGN:
            continue
        yield from pool.FindServiceByName(name).methods


async def _call(
    channel: grpc.aio.Channel, method: MethodDescriptor, request: Any, token: str
) -> grpc.aio.AioRpcError | None:
    """Call ``method`` once; its error, or None when it answered."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    response_class = message_factory.GetMessageClass(method.output_type)
    kwargs: dict[str, Any] = dict(
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_class.FromString,
    )
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        if method.client_streaming:
            multi = (
                channel.stream_stream(path, **kwargs)
                if method.server_streaming
                else channel.stream_unary(path, **kwargs)
            )
            call = multi(iter([request]), metadata=metadata, timeout=10)
        elif method.server_streaming:
            call = channel.unary_stream(path, **kwargs)(request, metadata=metadata, timeout=10)
        else:
            await channel.unary_unary(path, **kwargs)(request, metadata=metadata, timeout=10)
            return None
        if method.server_streaming:
            await call.read()  # the first answer (or the error) is enough
            call.cancel()
        else:
            await call
        return None
    except grpc.aio.AioRpcError as error:
        return error


async def test_no_error_echoes_a_secret_or_a_large_input(server: RunningServer) -> None:
    secrets = _secrets(server)
    fragments = _fragments(secrets)
    async with server.channel() as channel:
        names = await _service_names(channel)
        methods = list(_methods(names))
        # The sweep covers what the main port serves: the CA APIs, policy and audit.
        services = {m.containing_service.full_name for m in methods}
        assert {"meshca.v1.CertificateService", "meshca.v1.PolicyService"} <= services
        assert "istio.v1.auth.IstioCertificateService" in services
        assert "io.linkerd.proxy.identity.Identity" in services
        errors = 0
        for method in methods:
            request_class = message_factory.GetMessageClass(method.input_type)
            for name, text in secrets.items():
                request = request_class()
                _fill(request, text)
                for token in (secrets["token"], secrets["forged-token"], AUDIT_TOKEN):
                    error = await _call(channel, method, request, token)
                    if error is None:
                        continue
                    errors += 1
                    where = f"{method.full_name} with {name} (token {token[:8]}...)"
                    detail = error.details() or ""
                    for fragment in fragments:
                        assert fragment not in detail, (where, fragment)
                    assert len(detail) <= MAX_DETAIL, (where, len(detail))
                    assert "-----BEGIN" not in detail, where
                    for key, value in error.trailing_metadata() or ():
                        shown = value if isinstance(value, str) else repr(value)
                        assert not any(f in shown for f in fragments), (where, key)
        # Hostile input was refused somewhere on every service, not silently accepted.
        assert errors >= len(methods)
