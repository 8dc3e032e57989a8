"""The real ``meshca`` command in subprocesses: serve with workers, dev mode, audit list."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca.adapters.grpc.client import channel_to, create_certificate
from tests.integration.server_harness import AUDIENCE, ISSUER, TokenMinter

pytestmark = pytest.mark.integration

MESHCA = [sys.executable, "-m", "meshca"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MESHCA, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def _csr_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _wait_for_line(process: subprocess.Popen[str], pattern: str, deadline: float) -> re.Match[str]:
    assert process.stdout is not None
    seen = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match
    raise AssertionError(f"never saw {pattern!r}; output:\n{''.join(seen)}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, TokenMinter]]:
    minter, jwks = TokenMinter.create(tmp_path)
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHCA_")}
    env["MESHCA_K8S_JWKS_FILE"] = str(jwks)  # settings from the environment too
    process = subprocess.Popen(
        [
            *MESHCA,
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(data_dir),
            "--trust-domain",
            "example.org",
            "--k8s-mode",
            "jwks",
            "--k8s-issuer",
            ISSUER,
            "--k8s-audience",
            AUDIENCE,
            "--workers",
            "2",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        port = _wait_for_line(
            process, r"started 2 workers on 127\.0\.0\.1:(\d+)", time.monotonic() + 30
        ).group(1)
        for _ in range(2):
            _wait_for_line(process, r"serving on", time.monotonic() + 30)
        yield f"127.0.0.1:{port}", data_dir, minter
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=20) == 0
        finally:
            if process.poll() is None:
                process.kill()
            if process.stdout:
                process.stdout.close()


def test_serve_with_two_workers_issues_and_records(
    served: tuple[str, Path, TokenMinter],
) -> None:
    target, data_dir, minter = served
    bundle = _run("ca", "bundle", "--data-dir", str(data_dir))
    assert bundle.returncode == 0 and "BEGIN CERTIFICATE" in bundle.stdout
    serials = set()
    # Several connections, so the kernel spreads them over both workers.
    for i in range(6):
        with channel_to(target, bundle.stdout.encode()) as channel:
            chain = create_certificate(channel, minter.mint("default", f"sa{i}"), _csr_pem())
        serials.add(x509.load_pem_x509_certificate(chain[0].encode()).serial_number)
    assert len(serials) == 6

    listed = _run(
        "audit", "list", "--data-dir", str(data_dir), "--format", "json", "--limit", "100"
    )
    assert listed.returncode == 0, listed.stderr
    records = json.loads(listed.stdout)
    issued = {int(r["serial"], 16) for r in records if r["api"].startswith("istio")}
    assert issued == serials
    # Each worker recorded the serving certificate it presents.
    assert sum(r["api"] == "meshca.serving-certificate" for r in records) == 2

    one = _run("audit", "list", "--data-dir", str(data_dir), "--serial", f"{min(serials):x}")
    assert one.returncode == 0 and f"{min(serials):x}" in one.stdout
    assert len(one.stdout.strip().splitlines()) == 2  # header and the one record


def test_dev_mode_shows_a_certificate_and_stops_cleanly(tmp_path: Path) -> None:
    with subprocess.Popen(
        [*MESHCA, "dev", "serve", "--demo", "--listen", "127.0.0.1:0", "--data-dir", "dev"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    ) as process:
        try:
            port = _wait_for_line(
                process, r"serving on 127\.0\.0\.1:(\d+)", time.monotonic() + 30
            ).group(1)
            _wait_for_line(
                process,
                r"SPIFFE ID\s+spiffe://cluster\.local/ns/default/sa/demo",
                time.monotonic() + 30,
            )
            _wait_for_line(process, r"Stop with Ctrl-C", time.monotonic() + 30)
            request = _run(
                "dev",
                "request",
                "--data-dir",
                "dev",
                "--server",
                f"127.0.0.1:{port}",
                "--namespace",
                "shop",
                "--service-account",
                "cart",
                "--out-dir",
                "out",
                cwd=tmp_path,
            )
            assert request.returncode == 0, request.stderr
            assert "spiffe://cluster.local/ns/shop/sa/cart" in request.stdout
            assert (tmp_path / "out" / "key.pem").stat().st_mode & 0o077 == 0
        finally:
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=20) == 0
    keys = list((tmp_path / "dev" / "ca" / "keys").glob("*.key"))
    assert len(keys) == 3  # the root's, the intermediate's and the JWT-SVID key
    assert all(k.stat().st_mode & 0o777 == 0o600 for k in keys)
    assert (tmp_path / "dev").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["serve", "--k8s-mode", "jwks", "--workers", "1"], "needs --k8s-issuer"),
        (["serve", "--svid-ttl", "forever"], "svid-ttl"),
        (["serve", "--k8s-mode", "magic"], "k8s-mode"),
        (
            [
                "serve",
                "--trust-domain",
                "Bad_Domain!",
                "--k8s-mode",
                "jwks",
                "--k8s-issuer",
                "https://x",
            ],
            "trust domain",
        ),
    ],
)
def test_bad_settings_fail_with_a_clear_message(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = _run(*args, "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_audit_and_bundle_without_data_say_what_to_do(tmp_path: Path) -> None:
    bundle = _run("ca", "bundle", "--data-dir", str(tmp_path / "none"))
    assert bundle.returncode == 1 and "meshca serve" in bundle.stderr
    listed = _run("audit", "list", "--data-dir", str(tmp_path / "none"))
    assert listed.returncode == 1 and "no issuance record" in listed.stderr


def test_help_names_every_command() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for command in ("serve", "dev", "ca", "audit"):
        assert command in result.stdout


def test_dev_mode_with_policies_serves_ext_authz_on_its_port_and_the_api_by_token(
    tmp_path: Path,
) -> None:
    policies = Path(__file__).resolve().parents[2] / "policies"
    command = [*MESHCA, "dev", "serve", "--listen", "127.0.0.1:0", "--data-dir", "dev"]
    with subprocess.Popen(
        [*command, "--policy-dir", str(policies)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
    ) as process:
        try:
            port = _wait_for_line(
                process, r"serving on 127\.0\.0\.1:(\d+)", time.monotonic() + 30
            ).group(1)
            _wait_for_line(process, r"ext_authz on .* open to anyone", time.monotonic() + 30)
            hint = _wait_for_line(process, r"meshca policy status .*", time.monotonic() + 30)
            assert "--token-file dev/policy-token" in hint.group(0)
            token = tmp_path / "dev" / "policy-token"
            assert token.stat().st_mode & 0o077 == 0 and len(token.read_text().strip()) >= 32
            roots = _run("ca", "bundle", "--data-dir", "dev", cwd=tmp_path)
            (tmp_path / "roots.pem").write_text(roots.stdout)
            status = [
                "policy",
                "status",
                "--server",
                f"127.0.0.1:{port}",
                "--ca-file",
                "roots.pem",
            ]
            refused = _run(*status, cwd=tmp_path)
            assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
            served = _run(*status, "--token-file", "dev/policy-token", cwd=tmp_path)
            assert served.returncode == 0, served.stderr
            assert "healthy         yes" in served.stdout
        finally:
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=20) == 0
