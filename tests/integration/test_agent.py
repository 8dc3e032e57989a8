"""``meshca agent`` with outside clients: py-spiffe, spiffe-tls and an SDS client from the
xds-protos stubs, against a real server with second-long SVIDs."""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import socket
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2
from spiffe import SpiffeId, TrustDomain, WorkloadApiClient, X509Bundle, X509Source
from spiffe._proto import workload_pb2, workload_pb2_grpc

from meshca.cli.ca_cmd import load_bundle
from meshca.core.callers import CALLERS, Access
from tests.integration.agent_harness import (
    AgentProcess,
    launch_agent,
    short_dir,
)
from tests.integration.server_harness import TRUST_DOMAIN, RunningServer, running_server
from tests.integration.test_rotation_server import FAST, _ca

pytestmark = pytest.mark.integration

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
WEB = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/web"
API = f"spiffe://{TRUST_DOMAIN}/ns/default/sa/api"


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[RunningServer]:
    async for running in running_server(tmp_path, **FAST):
        yield running


@pytest.fixture
def sockets() -> Iterator[Path]:
    directory = short_dir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
async def agent(server: RunningServer, sockets: Path) -> AsyncIterator[AgentProcess]:
    running = await asyncio.to_thread(launch_agent, server, sockets)
    try:
        yield running
    finally:
        await asyncio.to_thread(running.stop)


def _verify(
    leaf: x509.Certificate, chain: list[x509.Certificate], roots: list[x509.Certificate]
) -> None:
    verifier = PolicyBuilder().store(Store(roots)).build_client_verifier()
    verifier.verify(leaf, chain)


def _fetch(endpoint: str) -> tuple[object, object]:
    with WorkloadApiClient(socket_path=endpoint, default_timeout=20) as client:
        return client.fetch_x509_svid(), client.fetch_x509_bundles()


async def test_py_spiffe_gets_the_svid_and_bundle_and_out_dir_has_them(
    server: RunningServer, agent: AgentProcess
) -> None:
    svid, bundles = await asyncio.to_thread(_fetch, agent.endpoint)
    assert str(svid.spiffe_id) == WEB  # type: ignore[attr-defined]
    bundle = bundles.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))  # type: ignore[attr-defined]
    roots = load_bundle(server.settings.data_dir)
    assert set(bundle.x509_authorities) == set(roots)
    chain = svid.cert_chain  # type: ignore[attr-defined]
    _verify(chain[0], chain[1:], list(roots))
    assert svid.private_key.public_key().public_numbers() == chain[0].public_key().public_numbers()  # type: ignore[attr-defined]

    assert stat.S_IMODE(os.stat(agent.socket).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(agent.socket).st_mode)
    await asyncio.to_thread(agent.wait_for_log, r"wrote key.pem, chain.pem, bundle.pem")
    key_file = agent.out_dir / "key.pem"
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    written = x509.load_pem_x509_certificates((agent.out_dir / "chain.pem").read_bytes())
    assert set(x509.load_pem_x509_certificates((agent.out_dir / "bundle.pem").read_bytes())) == set(
        roots
    )
    assert written[0].public_key() == key.public_key() or (
        written[0].public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    )
    await asyncio.to_thread(agent.wait_health, "SERVING")
    await asyncio.to_thread(agent.wait_health, "SERVING", "meshca.agent.Upstream")


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _roots_of(source: X509Source) -> set[x509.Certificate]:
    bundle = source.get_bundle_for_trust_domain(TrustDomain(TRUST_DOMAIN))
    assert bundle is not None
    return set(bundle.x509_authorities)


async def test_x509_source_follows_renewal_and_root_rotation(
    server: RunningServer, agent: AgentProcess
) -> None:
    source = await asyncio.to_thread(X509Source, socket_path=agent.endpoint, timeout_in_seconds=20)
    # Beside X509Source: a raw FetchX509Bundles stream and an SDS stream for ROOTCA only.
    # Neither may push on a renewal; both must push the rotated bundle.
    channel = grpc.insecure_channel(f"unix:{agent.socket}")
    bundles = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509Bundles(
        workload_pb2.X509BundlesRequest(), metadata=(("workload.spiffe.io", "true"),)
    )
    sds = _SdsClient(agent.socket)
    try:
        first_bundles = await asyncio.to_thread(next, bundles)
        assert list(first_bundles.bundles) == [f"spiffe://{TRUST_DOMAIN}"]
        sds.send(resource_names=["ROOTCA"])
        first_rootca = await asyncio.to_thread(sds.receive)
        sds.send(
            resource_names=["ROOTCA"],
            version_info=first_rootca.version_info,
            response_nonce=first_rootca.nonce,
        )
        first_serial = source.get_x509_context().default_svid.leaf.serial_number
        first_roots = _roots_of(source)
        assert len(first_roots) == 1
        await asyncio.to_thread(
            _wait,
            lambda: source.get_x509_context().default_svid.leaf.serial_number != first_serial,
            15,
            "a renewal",
        )

        code, _out, err = await asyncio.to_thread(_ca, server, "rotate", "--root")
        assert code == 0, err
        await asyncio.to_thread(_wait, lambda: len(_roots_of(source)) == 2, 15, "the new root")
        (new_root,) = _roots_of(source) - first_roots

        def under_new_root() -> bool:
            chain = source.get_x509_context().default_svid.cert_chain
            try:
                _verify(chain[0], chain[1:], [new_root])
            except Exception:
                return False
            return True

        await asyncio.to_thread(_wait, under_new_root, 20, "an SVID under the new root")
        assert source.get_x509_context().default_svid.spiffe_id == SpiffeId(WEB)

        second_bundles = await asyncio.to_thread(next, bundles)
        pushed = X509Bundle.parse_raw(
            TrustDomain(TRUST_DOMAIN), second_bundles.bundles[f"spiffe://{TRUST_DOMAIN}"]
        )
        assert set(pushed.x509_authorities) == first_roots | {new_root}
        second_rootca = await asyncio.to_thread(sds.receive)
        (rootca,) = _secrets(second_rootca).values()
        assert set(
            x509.load_pem_x509_certificates(rootca.validation_context.trusted_ca.inline_bytes)
        ) == first_roots | {new_root}
    finally:
        bundles.cancel()
        channel.close()
        sds.close()
        await asyncio.to_thread(source.close)


async def test_workload_api_metadata_rule_and_unimplemented_methods(agent: AgentProcess) -> None:
    def calls() -> dict[str, grpc.StatusCode]:
        codes: dict[str, grpc.StatusCode] = {}
        with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            for label, metadata in (
                ("missing", ()),
                ("false", (("workload.spiffe.io", "false"),)),
                ("True", (("workload.spiffe.io", "True"),)),
            ):
                stream = stub.FetchX509SVID(
                    workload_pb2.X509SVIDRequest(), metadata=metadata, timeout=5
                )
                try:
                    next(stream)
                    codes[f"svid/{label}"] = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    codes[f"svid/{label}"] = exc.code()
                stream = stub.FetchX509Bundles(
                    workload_pb2.X509BundlesRequest(), metadata=metadata, timeout=5
                )
                try:
                    next(stream)
                    codes[f"bundles/{label}"] = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    codes[f"bundles/{label}"] = exc.code()
            good = (("workload.spiffe.io", "true"),)
            first = next(
                stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=good, timeout=5)
            )
            codes["svid/ok"] = (
                grpc.StatusCode.OK if first.svids[0].spiffe_id == WEB else grpc.StatusCode.UNKNOWN
            )
            for name, call in (
                (
                    "jwt-svid",
                    lambda: stub.FetchJWTSVID(
                        workload_pb2.JWTSVIDRequest(audience=["x"]), metadata=good, timeout=5
                    ),
                ),
                (
                    "jwt-validate",
                    lambda: stub.ValidateJWTSVID(
                        workload_pb2.ValidateJWTSVIDRequest(audience="x", svid="a.b.c"),
                        metadata=good,
                        timeout=5,
                    ),
                ),
                (
                    "jwt-bundles",
                    lambda: next(
                        stub.FetchJWTBundles(
                            workload_pb2.JWTBundlesRequest(), metadata=good, timeout=5
                        )
                    ),
                ),
                (
                    "wit-svid",
                    lambda: next(
                        channel.unary_stream("/SpiffeWorkloadAPI/FetchWITSVID")(
                            b"", metadata=good, timeout=5
                        )
                    ),
                ),
                (
                    "wit-bundles",
                    lambda: next(
                        channel.unary_stream("/SpiffeWorkloadAPI/FetchWITBundles")(
                            b"", metadata=good, timeout=5
                        )
                    ),
                ),
            ):
                try:
                    call()
                    codes[name] = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    codes[name] = exc.code()
        return codes

    codes = await asyncio.to_thread(calls)
    bad = grpc.StatusCode.INVALID_ARGUMENT
    assert codes == {
        "svid/missing": bad,
        "bundles/missing": bad,
        "svid/false": bad,
        "bundles/false": bad,
        "svid/True": bad,
        "bundles/True": bad,
        "svid/ok": grpc.StatusCode.OK,
        "jwt-svid": grpc.StatusCode.OK,
        "jwt-validate": bad,  # "a.b.c" is no JWT-SVID (test_agent_jwt.py has the rest)
        "jwt-bundles": grpc.StatusCode.OK,
        "wit-svid": grpc.StatusCode.UNIMPLEMENTED,
        "wit-bundles": grpc.StatusCode.UNIMPLEMENTED,
    }
    assert "reason=missing-workload-header" in agent.log(200)


async def test_garbage_requests_are_refused_and_the_agent_keeps_serving(
    agent: AgentProcess,
) -> None:
    good = (("workload.spiffe.io", "true"),)

    def codes() -> list[grpc.StatusCode]:
        found = []
        with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
            for method in (
                "/SpiffeWorkloadAPI/FetchX509SVID",
                "/SpiffeWorkloadAPI/FetchX509Bundles",
            ):
                call = channel.unary_stream(method)
                try:
                    next(call(b"\xff\xff\xff\x0f" * 64, metadata=good, timeout=5))
                    found.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    found.append(exc.code())
            sds = channel.stream_stream(
                "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets"
            )
            try:
                next(sds(iter([b"\x0a\xff\xff\xff"]), timeout=5))
                found.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                found.append(exc.code())
        return found

    found = await asyncio.to_thread(codes)
    # grpc itself refuses what does not parse as the request message (UNKNOWN, before
    # our code runs); SDS reads its requests in our code and says INVALID_ARGUMENT.
    assert found[:2] == [grpc.StatusCode.UNKNOWN] * 2
    assert found[2] == grpc.StatusCode.INVALID_ARGUMENT
    await asyncio.to_thread(agent.wait_health, "SERVING")
    svid, _bundles = await asyncio.to_thread(_fetch, agent.endpoint)
    assert str(svid.spiffe_id) == WEB  # type: ignore[attr-defined]


async def test_reflection_lists_the_socket_services(agent: AgentProcess) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    def services() -> set[str]:
        with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        return {s.name for s in response.list_services_response.service}

    assert await asyncio.to_thread(services) >= {
        "SpiffeWorkloadAPI",
        "envoy.service.secret.v3.SecretDiscoveryService",
        "grpc.health.v1.Health",
    }


class _SdsClient:
    """A StreamSecrets client from the xds-protos stubs, driven request by request."""

    def __init__(self, socket_path: Path) -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.requests: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
        self.responses: queue.Queue[discovery_pb2.DiscoveryResponse] = queue.Queue()
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(self.channel)
        self.stream = stub.StreamSecrets(iter(self.requests.get, None))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            for response in self.stream:
                self.responses.put(response)
        except grpc.RpcError:
            pass

    def send(self, **fields: object) -> None:
        self.requests.put(discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, **fields))  # type: ignore[arg-type]

    def receive(self, timeout: float = 15) -> discovery_pb2.DiscoveryResponse:
        return self.responses.get(timeout=timeout)

    def close(self) -> None:
        self.requests.put(None)
        self.stream.cancel()
        self.channel.close()


def _secrets(response: discovery_pb2.DiscoveryResponse) -> dict[str, secret_pb2.Secret]:
    found = {}
    for item in response.resources:
        secret = secret_pb2.Secret()
        assert item.Unpack(secret)
        found[secret.name] = secret
    return found


async def test_sds_client_gets_default_and_rootca_acks_and_nacks(
    server: RunningServer, agent: AgentProcess
) -> None:
    await asyncio.to_thread(agent.wait_health, "SERVING")

    def scenario() -> None:
        client = _SdsClient(agent.socket)
        try:
            client.send(resource_names=["default", "ROOTCA"])
            first = client.receive()
            assert first.type_url == SECRET_TYPE and first.nonce and first.version_info
            secrets = _secrets(first)
            assert set(secrets) == {"default", "ROOTCA"}
            chain = x509.load_pem_x509_certificates(
                secrets["default"].tls_certificate.certificate_chain.inline_bytes
            )
            key = serialization.load_pem_private_key(
                secrets["default"].tls_certificate.private_key.inline_bytes, None
            )
            assert chain[0].public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
            roots = x509.load_pem_x509_certificates(
                secrets["ROOTCA"].validation_context.trusted_ca.inline_bytes
            )
            _verify(chain[0], chain[1:], roots)
            uri = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert uri.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]

            # ACK; the next response is a push after the renewal, with a new leaf.
            client.send(
                resource_names=["default", "ROOTCA"],
                version_info=first.version_info,
                response_nonce=first.nonce,
            )
            pushed = client.receive()
            assert pushed.version_info != first.version_info and pushed.nonce != first.nonce
            renewed = x509.load_pem_x509_certificates(
                _secrets(pushed)["default"].tls_certificate.certificate_chain.inline_bytes
            )
            assert renewed[0].serial_number != chain[0].serial_number

            # NACK it: the agent does not send that version again.
            client.send(
                resource_names=["default", "ROOTCA"],
                version_info=first.version_info,
                response_nonce=pushed.nonce,
                error_detail=status_pb2.Status(code=3, message="test rejects this"),
            )
            later = [client.receive(timeout=10) for _ in range(2)]
            assert all(r.version_info != pushed.version_info for r in later)
            assert all(r.nonce not in (first.nonce, pushed.nonce) for r in later)
        finally:
            client.close()

    await asyncio.to_thread(scenario)
    log = agent.log(400)
    assert "NACKed version" in log and "test rejects this" in log


async def test_sds_unknown_names_and_fetch_secrets(agent: AgentProcess) -> None:
    await asyncio.to_thread(agent.wait_health, "SERVING")

    def scenario() -> None:
        with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
            stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.FetchSecrets(
                    discovery_pb2.DiscoveryRequest(resource_names=["file-cert:/etc/x"]), timeout=5
                )
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND
            both = stub.FetchSecrets(
                discovery_pb2.DiscoveryRequest(resource_names=["ROOTCA", "nope"]), timeout=5
            )
            assert set(_secrets(both)) == {"ROOTCA"}
        client = _SdsClient(agent.socket)
        try:
            client.send(resource_names=["default", "unknown-secret"])
            assert set(_secrets(client.receive())) == {"default"}
        finally:
            client.close()
        with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
            stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
            wrong = discovery_pb2.DiscoveryRequest(
                type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster",
                resource_names=["default"],
            )
            with pytest.raises(grpc.RpcError) as refused:
                next(stub.StreamSecrets(iter([wrong]), timeout=5))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    await asyncio.to_thread(scenario)
    assert "unknown secrets unknown-secret" in agent.log(400)


def _spiffetls_round_trip(
    server_source: X509Source, client_source: X509Source, server_id: str, client_id: str
) -> tuple[bytes, list[BaseException]]:
    """web dials api over mTLS with spiffe-tls; each side authorizes the other's ID.
    Returns api's answer (b"" when the dial failed) and what went wrong on api's side."""
    from spiffetls import ClientTlsMode, ListenOptions, ServerTlsMode, dial, listen
    from spiffetls.tlsconfig.authorize import authorize_id

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = listen(
        f"127.0.0.1:{port}",
        server_source,
        ListenOptions(tls_mode=ServerTlsMode.MTLS, authorize_fn=authorize_id(SpiffeId(client_id))),
    )
    received: list[bytes] = []
    problems: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            conn.do_handshake()
            received.append(conn.recv(1024))
            conn.sendall(b"hello web, from api")
        except Exception as exc:
            problems.append(exc)
        finally:
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    answer = b""
    try:
        conn = dial(
            f"127.0.0.1:{port}", client_source, ClientTlsMode.TLS, authorize_id(SpiffeId(server_id))
        )
        try:
            conn.sendall(b"hello api, from web")
            answer = bytes(conn.recv(1024))
        finally:
            conn.close()
    except Exception as exc:
        problems.append(exc)
    finally:
        thread.join(10)
        listener.close()
    if answer:
        assert received == [b"hello api, from web"]
    return answer, problems


# spiffe-tls 0.4 still reads X509Source.svid, which py-spiffe has deprecated, and hands
# pyOpenSSL objects to pyOpenSSL, which deprecates that too: their warnings, not ours.
@pytest.mark.filterwarnings("ignore:X509Source.* is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:Passing pyOpenSSL:DeprecationWarning")
async def test_spiffe_tls_mtls_between_two_agents_survives_root_rotation(
    server: RunningServer, sockets: Path
) -> None:
    web = await asyncio.to_thread(launch_agent, server, sockets, name="web")
    api = await asyncio.to_thread(launch_agent, server, sockets, name="api")
    sources: list[X509Source] = []
    try:
        for agent in (web, api):
            sources.append(
                await asyncio.to_thread(
                    X509Source, socket_path=agent.endpoint, timeout_in_seconds=20
                )
            )
        web_source, api_source = sources
        answer, problems = await asyncio.to_thread(
            _spiffetls_round_trip, api_source, web_source, API, WEB
        )
        assert answer == b"hello web, from api" and not problems, problems
        first_roots = _roots_of(web_source)
        code, _out, err = await asyncio.to_thread(_ca, server, "rotate", "--root")
        assert code == 0, err

        def both_under_new_root() -> bool:
            for source in sources:
                roots = _roots_of(source)
                if len(roots) != 2:
                    return False
                (new_root,) = roots - first_roots
                chain = source.get_x509_context().default_svid.cert_chain
                try:
                    _verify(chain[0], chain[1:], [new_root])
                except Exception:
                    return False
            return True

        await asyncio.to_thread(_wait, both_under_new_root, 25, "both SVIDs under the new root")
        answer, problems = await asyncio.to_thread(
            _spiffetls_round_trip, api_source, web_source, API, WEB
        )
        assert answer == b"hello web, from api" and not problems, problems
        # Authorization by SPIFFE ID bites: api's side, expecting a client "api", refuses web.
        answer, problems = await asyncio.to_thread(
            _spiffetls_round_trip, api_source, web_source, API, API
        )
        assert answer == b"" and problems
    finally:
        for source in sources:
            await asyncio.to_thread(source.close)
        for agent in (web, api):
            await asyncio.to_thread(agent.stop)


async def test_the_socket_rows_of_the_callers_table_hold(agent: AgentProcess) -> None:
    """The agent's rows in ``core.callers``: the socket's file mode is the credential,
    and a Workload API call without ``workload.spiffe.io: true`` is refused while one
    with it (and an SDS call, which takes no header) is served."""
    rows = {row.api: row for row in CALLERS if row.access is Access.LOCAL_SOCKET}
    assert set(rows) == {"agent Workload API", "agent SDS"}
    assert stat.S_IMODE(agent.socket.stat().st_mode) == 0o600

    def codes() -> tuple[grpc.StatusCode, grpc.StatusCode, str]:
        with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            try:
                next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), timeout=5))
                refused = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                refused = exc.code()
            good = (("workload.spiffe.io", "true"),)
            bundles = next(
                stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=good, timeout=5)
            )
            served = grpc.StatusCode.OK if bundles.bundles else grpc.StatusCode.UNKNOWN
            sds = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
            secrets = sds.FetchSecrets(
                discovery_pb2.DiscoveryRequest(resource_names=["ROOTCA"], type_url=SECRET_TYPE),
                timeout=5,
            )
            return refused, served, secrets.resources[0].type_url

    refused, served, secret_type = await asyncio.to_thread(codes)
    assert refused == grpc.StatusCode.INVALID_ARGUMENT
    assert served == grpc.StatusCode.OK
    assert secret_type == SECRET_TYPE
