"""``meshca serve --log-format json``: every line is JSON with the stable keys, each request
is one event, and no token, CSR or private key reaches stdout or stderr."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2 as istio_pb2
from meshca.adapters.grpc._gen.istio.v1.auth import ca_pb2_grpc as istio_grpc
from meshca.adapters.grpc._gen.meshca.v1 import ca_pb2, ca_pb2_grpc
from meshca.adapters.log_format import STABLE_KEYS
from meshca.cli.ca_cmd import load_bundle
from tests.integration.server_harness import TRUST_DOMAIN, TokenMinter, serve_command

pytestmark = pytest.mark.integration

ISTIO = "istio.v1.auth.CreateCertificate"
MESHCA = "meshca.v1.Sign"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@dataclass
class Served:
    """``meshca serve --log-format json --log-level debug`` with both streams collected."""

    process: subprocess.Popen[str]
    port: int
    data_dir: Path
    minter: TokenMinter
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)

    def serving_workers(self) -> int:
        pattern = f"serving on 127.0.0.1:{self.port} "
        return sum(pattern in line for line in list(self.stderr))

    def stop(self) -> None:
        """SIGTERM, then wait for the exit: afterwards both streams are complete."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    # A fixed port: with port 0, each worker would bind a port of its own.
    port = _free_port()
    minter, jwks = TokenMinter.create(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    command = serve_command(
        tmp_path / "data",
        jwks,
        workers=2,
        extra=["--log-format", "json", "--log-level", "debug"],
    )
    command[command.index("127.0.0.1:0")] = f"127.0.0.1:{port}"
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    served = Served(process, port, tmp_path / "data", minter)

    def collect(stream: Any, lines: list[str]) -> None:
        # Read to the end, so the server never blocks on a full pipe.
        for line in stream:
            lines.append(line)

    readers = [
        threading.Thread(target=collect, args=(process.stdout, served.stdout), daemon=True),
        threading.Thread(target=collect, args=(process.stderr, served.stderr), daemon=True),
    ]
    for reader in readers:
        reader.start()
    try:
        deadline = time.monotonic() + 60
        while served.serving_workers() < 2 and process.poll() is None:
            assert time.monotonic() < deadline, "".join(served.stderr)
            time.sleep(0.05)
        assert process.poll() is None, "".join(served.stderr)
        yield served
    finally:
        served.stop()
        for reader in readers:
            reader.join(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def _csr(subject: str) -> tuple[bytes, bytes]:
    """A P-256 CSR with ``subject`` as its CN, as DER, and its key as PKCS#8 PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return csr.public_bytes(serialization.Encoding.DER), key_pem


def _pem(der: bytes) -> str:
    body = base64.b64encode(der).decode()
    lines = "\n".join(body[i : i + 64] for i in range(0, len(body), 64))
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{lines}\n-----END CERTIFICATE REQUEST-----\n"


def _forged(minter: TokenMinter) -> str:
    """A token with the cluster's key id and claims, signed by another key."""
    genuine = jwt.decode(minter.mint("shop", "forger"), options={"verify_signature": False})
    other = ec.generate_private_key(ec.SECP256R1())
    return jwt.encode(genuine, other, algorithm="ES256", headers={"kid": minter.kid})


def _refused(call: Any, code: grpc.StatusCode) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value.details()


def _secret_forms(value: str | bytes) -> list[str]:
    """The ways a secret could show in a log: as is, and (bytes) base64 and hex."""
    if isinstance(value, str):
        return [value]
    return [base64.b64encode(value).decode(), value.hex(), value.hex().upper()]


def test_json_lines_carry_each_request_and_no_secret(served: Served) -> None:
    marker = f"LEAKMARKER{uuid.uuid4().hex}"
    minter = served.minter
    valid = minter.mint("shop", "cart")
    marked = minter.mint("shop", "marked")
    garbage_token = minter.mint("shop", "garbage")
    forged = _forged(minter)
    too_large = minter.mint("shop", "big", padding="p" * 17_000)
    misplaced = minter.mint("shop", "misplaced")
    unschemed = minter.mint("shop", "unschemed")
    valid_der, valid_key = _csr("plain")
    marked_der, marked_key = _csr(marker)
    garbage_der = b"\x30\x82\x01\x00" + marker.encode() * 8
    garbage_pem = _pem(garbage_der)
    roots = b"".join(
        r.public_bytes(serialization.Encoding.PEM) for r in load_bundle(served.data_dir)
    )
    credentials = grpc.ssl_channel_credentials(roots)
    options = [("grpc.ssl_target_name_override", "localhost")]
    with grpc.secure_channel(f"127.0.0.1:{served.port}", credentials, options) as channel:
        istio = istio_grpc.IstioCertificateServiceStub(channel)
        meshca = ca_pb2_grpc.CertificateServiceStub(channel)

        def bearer(token: str) -> list[tuple[str, str]]:
            return [("authorization", f"Bearer {token}")]

        chain = istio.CreateCertificate(
            istio_pb2.IstioCertificateRequest(csr=_pem(valid_der)),
            metadata=bearer(valid),
            timeout=10,
        ).cert_chain
        issued_serial = f"{x509.load_pem_x509_certificate(chain[0].encode()).serial_number:x}"
        marked_serial = meshca.Sign(
            ca_pb2.SignRequest(csr=marked_der), metadata=bearer(marked), timeout=10
        ).serial
        _refused(
            lambda: meshca.Sign(
                ca_pb2.SignRequest(csr=garbage_der), metadata=bearer(garbage_token), timeout=10
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        _refused(
            lambda: istio.CreateCertificate(
                istio_pb2.IstioCertificateRequest(csr=garbage_pem),
                metadata=bearer(garbage_token),
                timeout=10,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        _refused(
            lambda: istio.CreateCertificate(
                istio_pb2.IstioCertificateRequest(csr=_pem(valid_der)),
                metadata=bearer(forged),
                timeout=10,
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        _refused(
            lambda: meshca.Sign(
                ca_pb2.SignRequest(csr=valid_der), metadata=bearer(too_large), timeout=10
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
        _refused(
            lambda: meshca.Sign(
                ca_pb2.SignRequest(csr=valid_der),
                metadata=[("x-token", f"Bearer {misplaced}")],
                timeout=10,
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
        _refused(
            lambda: meshca.Sign(
                ca_pb2.SignRequest(csr=valid_der),
                metadata=[("authorization", unschemed)],
                timeout=10,
            ),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    served.stop()

    # Every line of both streams is one JSON object with the stable keys.
    lines = [json.loads(text) for text in served.stdout + served.stderr]
    for line in lines:
        assert list(line)[: len(STABLE_KEYS)] == list(STABLE_KEYS), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]), line
    assert any(line["level"] == "debug" for line in lines), "debug lines were not logged"
    workers = {line["process"] for line in lines if line["event"] == "certificate-issued"}
    assert workers <= {"worker-0", "worker-1"} and workers

    events = [line for line in lines if line["event"] in ("certificate-issued", "request-refused")]
    issued = {line["spiffe_id"]: line for line in events if line["event"] == "certificate-issued"}
    domain = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa"
    assert set(issued) == {f"{domain}/cart", f"{domain}/marked"}
    assert issued[f"{domain}/cart"]["serial"] == issued_serial
    assert issued[f"{domain}/cart"]["api"] == ISTIO
    assert issued[f"{domain}/marked"]["serial"] == marked_serial
    assert issued[f"{domain}/marked"]["api"] == MESHCA
    for line in issued.values():
        assert line["level"] == "info" and line["reason"] == "ok"
        assert line["peer"].startswith("ipv4:127.0.0.1:")
        assert 0 < line["duration_ms"] < 10_000
    refusals = sorted(
        (line["reason"], line["api"], line["spiffe_id"])
        for line in events
        if line["event"] == "request-refused"
    )
    assert refusals == sorted(
        [
            ("malformed-csr", MESHCA, f"{domain}/garbage"),
            ("malformed-csr", ISTIO, f"{domain}/garbage"),
            ("token-bad-signature", ISTIO, None),
            ("token-too-large", MESHCA, None),
            ("token-missing", MESHCA, None),
            ("token-malformed", MESHCA, None),
        ]
    )
    assert all(line["level"] == "warning" and line["serial"] is None for line in events[2:])

    # No secret, in any encoding, anywhere in the output; nor did any need redacting.
    output = "".join(served.stdout + served.stderr)
    secrets: list[str | bytes] = [valid, marked, garbage_token, forged, too_large, misplaced]
    secrets += [unschemed, marker, valid_der, marked_der, garbage_der, garbage_pem.split("\n")[1]]
    secrets += [_pem(valid_der).split("\n")[1], _pem(marked_der).split("\n")[1]]
    secrets += [token.rsplit(".", 1)[1] for token in (valid, marked, forged, too_large)]
    secrets += [valid_key.decode().split("\n")[1], marked_key.decode().split("\n")[1]]
    for secret in secrets:
        for form in _secret_forms(secret):
            assert form not in output, f"{form[:40]}... is in the log"
    for marker_text in ("PRIVATE KEY", "CERTIFICATE REQUEST", "-----BEGIN", "[redacted"):
        assert marker_text not in output


#: A line gRPC's C core writes itself (absl format), which no Python logging setting reaches.
GRPC_CORE_LINE = re.compile(r"[EWI]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def test_a_worker_that_fails_says_so_in_json(tmp_path: Path) -> None:
    # The health port is taken: the worker's start fails after logging was set up.
    _, jwks = TokenMinter.create(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        command = serve_command(
            tmp_path / "data",
            jwks,
            workers=1,
            extra=["--log-format", "json", "--health-listen", taken],
        )
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1, done.stderr
    lines = []
    for text in (done.stdout + done.stderr).splitlines():
        if not GRPC_CORE_LINE.match(text):
            lines.append(json.loads(text))
    (failed,) = [line for line in lines if line["message"] == "worker failed"]
    assert (failed["level"], failed["process"]) == ("error", "worker-0")
    assert "Traceback" in failed["exception"]
