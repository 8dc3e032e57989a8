"""The agent's pure-ish adapter pieces: socket claiming, the Workload API header rule and
the SDS stream's ACK/NACK state machine."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from hypothesis import given
from hypothesis import strategies as st

from meshca.adapters.agent.sds import SECRET_TYPE, SdsStream
from meshca.adapters.agent.socket_path import SocketPathError, claim_socket_path
from meshca.adapters.agent.upstream import new_key_and_csr
from meshca.adapters.agent.workload_api import has_workload_header
from meshca.core.agent import AgentSvid, TrustBundleView
from meshca.service.agent import AgentSnapshot


@pytest.mark.parametrize(
    ("metadata", "ok"),
    [
        pytest.param((("workload.spiffe.io", "true"),), True, id="ok/true"),
        pytest.param((("x", "y"), ("workload.spiffe.io", "true")), True, id="ok/among-others"),
        pytest.param((), False, id="fail/missing"),
        pytest.param(None, False, id="fail/none"),
        pytest.param((("workload.spiffe.io", "false"),), False, id="fail/false"),
        pytest.param((("workload.spiffe.io", "TRUE"),), False, id="fail/upper"),
        pytest.param((("workload.spiffe.io", "true "),), False, id="fail/space"),
        pytest.param(
            (("workload.spiffe.io", "true"), ("workload.spiffe.io", "false")),
            False,
            id="fail/twice-disagreeing",
        ),
    ],
)
def test_workload_header(metadata: object, ok: bool) -> None:
    assert has_workload_header(metadata) is ok


@given(st.lists(st.tuples(st.text(max_size=30), st.text(max_size=30)), max_size=5))
def test_workload_header_never_raises(metadata: list[tuple[str, str]]) -> None:
    expected = [v for k, v in metadata if k == "workload.spiffe.io"] == ["true"]
    assert has_workload_header(metadata) is expected


def test_claim_missing_path(tmp_path: Path) -> None:
    claim_socket_path(tmp_path / "a.sock")  # nothing there: fine


def test_claim_refuses_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "a.sock"
    path.write_text("data")
    with pytest.raises(SocketPathError, match="not a socket"):
        claim_socket_path(path)
    assert path.read_text() == "data"


def test_claim_refuses_a_directory_and_a_missing_parent(tmp_path: Path) -> None:
    with pytest.raises(SocketPathError, match="not a socket"):
        claim_socket_path(tmp_path)
    with pytest.raises(SocketPathError, match="does not exist"):
        claim_socket_path(tmp_path / "no" / "a.sock")


def test_claim_refuses_an_over_long_path(tmp_path: Path) -> None:
    with pytest.raises(SocketPathError, match="at most 107"):
        claim_socket_path(tmp_path / ("x" * 120))


def test_claim_live_and_stale_sockets(tmp_path: Path) -> None:
    path = tmp_path / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(1)
        with pytest.raises(SocketPathError, match="another process is listening"):
            claim_socket_path(path)
    assert path.is_socket()  # closed, but its file is still there: stale
    claim_socket_path(path)
    assert not path.exists()


def _snapshot(version: int, serial: int) -> AgentSnapshot:
    from cryptography.hazmat.primitives.asymmetric import ec

    from meshca.core.authority import build_root
    from meshca.core.spiffe import TrustDomain

    now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    root = build_root(key, TrustDomain("td"), now - timedelta(minutes=1), timedelta(hours=1), 7)
    der = root.public_bytes(serialization.Encoding.DER)
    key_der, _csr = new_key_and_csr()
    svid = AgentSvid(
        "spiffe://td/ns/a/sa/b",
        (der,),  # any certificate will do for the state machine
        key_der,
        now - timedelta(minutes=1),
        now + timedelta(hours=1),
        str(serial),
    )
    return AgentSnapshot(svid, TrustBundleView("td", (der,), 1), version, None)


def _request(**fields: object) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(type_url=SECRET_TYPE, **fields)  # type: ignore[arg-type]


def test_sds_stream_ack_nack_and_push() -> None:
    stream = SdsStream(peer="test")
    one = _snapshot(1, 1)
    first = stream.on_request(_request(resource_names=["default", "ROOTCA"]), one)
    assert first is not None and first.version_info == "1" and first.nonce == "1"
    names = []
    for item in first.resources:
        secret = secret_pb2.Secret()
        item.Unpack(secret)
        names.append(secret.name)
    assert names == ["default", "ROOTCA"]
    x509.load_pem_x509_certificates(
        secret.validation_context.trusted_ca.inline_bytes
    )  # ROOTCA is PEM

    ack = _request(resource_names=["default", "ROOTCA"], version_info="1", response_nonce="1")
    assert stream.on_request(ack, one) is None, "an ACK is not answered"
    assert stream.on_snapshot(one) is None, "nothing changed"

    two = _snapshot(2, 2)
    pushed = stream.on_snapshot(two)
    assert pushed is not None and pushed.version_info == "2" and pushed.nonce == "2"

    nack = _request(
        resource_names=["default", "ROOTCA"],
        version_info="1",
        response_nonce="2",
        error_detail=status_pb2.Status(code=3, message="bad"),
    )
    assert stream.on_request(nack, two) is None, "a NACK is not answered with a resend"
    assert stream.nacked == ["2"]
    assert stream.on_snapshot(two) is None, "nor is the NACKed version pushed again"
    stale = _request(resource_names=["ROOTCA"], response_nonce="1")
    assert stream.on_request(stale, two) is None, "a stale nonce is ignored"

    # Changing the subscription answers with the secrets now named.
    only_root = stream.on_request(_request(resource_names=["ROOTCA"], response_nonce="2"), two)
    assert only_root is not None and len(only_root.resources) == 1


def test_sds_stream_unknown_and_unavailable() -> None:
    stream = SdsStream(peer="test")
    empty = AgentSnapshot(None, None, 0)
    assert stream.on_request(_request(resource_names=["default"]), empty) is None
    assert (
        stream.on_request(_request(resource_names=["nope"], response_nonce=""), _snapshot(1, 1))
        is None
    )
    later = stream.on_request(_request(resource_names=["nope", "ROOTCA"]), _snapshot(1, 1))
    assert later is not None and len(later.resources) == 1


_names = st.lists(st.sampled_from(["default", "ROOTCA", "", "x", "spiffe://td"]), max_size=3)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["request", "snapshot"]),
            _names,
            st.sampled_from(["", "1", "2", "3", "junk"]),
            st.booleans(),
        ),
        max_size=12,
    )
)
def test_sds_stream_never_raises_nor_pushes_unchanged(
    steps: list[tuple[str, list[str], str, bool]],
) -> None:
    stream = SdsStream(peer="prop")
    snapshots = [AgentSnapshot(None, None, 0), _SNAP_1, _SNAP_2]
    current = snapshots[0]
    sent: list[tuple[tuple[str, ...], str]] = []
    nonces: list[str] = []
    for kind, names, nonce, nack in steps:
        if kind == "snapshot":
            current = snapshots[min(snapshots.index(current) + 1, 2)]
            response = stream.on_snapshot(current)
        else:
            detail = status_pb2.Status(code=3, message="no") if nack else None
            response = stream.on_request(
                _request(resource_names=names, response_nonce=nonce, error_detail=detail), current
            )
        if response is None:
            continue
        assert response.type_url == SECRET_TYPE and response.resources
        assert response.nonce not in nonces, "every response has a fresh nonce"
        nonces.append(response.nonce)
        key = (stream.names, response.version_info)
        if kind == "snapshot":
            # A push happens only for contents not yet sent on this subscription, so an
            # ACKed or NACKed version is never pushed again.
            assert key not in sent, "an unchanged secret was pushed again"
        sent.append(key)


_SNAP_1 = _snapshot(1, 1)
_SNAP_2 = _snapshot(2, 2)
