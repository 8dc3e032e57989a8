"""Start the real meshca server in-process (TLS, jwks mode) and talk to it as a proxy."""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from meshca import app
from meshca.cli.ca_cmd import load_bundle
from meshca.config import Settings

ISSUER = "https://kubernetes.test.local"
AUDIENCE = "meshca"
TRUST_DOMAIN = "example.org"


@dataclass
class TokenMinter:
    """A cluster's service-account token signer with a real EC key."""

    key: ec.EllipticCurvePrivateKey
    kid: str

    @classmethod
    def create(cls, directory: Path) -> tuple[TokenMinter, Path]:
        minter = cls(ec.generate_private_key(ec.SECP256R1()), "test-key-1")
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(minter.key.public_key()))
        jwk.update(kid=minter.kid, use="sig", alg="ES256")
        path = directory / "jwks.json"
        path.write_text(json.dumps({"keys": [jwk]}))
        return minter, path

    def mint(
        self, namespace: str = "default", service_account: str = "web", **overrides: Any
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": ISSUER,
            "aud": [AUDIENCE],
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
                "pod": {"name": f"{service_account}-pod", "uid": str(uuid.uuid4())},
                "node": {"name": "node-1", "uid": str(uuid.uuid4())},
            },
        }
        claims.update(overrides)
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": self.kid})


@dataclass
class RunningServer:
    settings: Settings
    worker: app.Worker
    minter: TokenMinter
    #: A client SVID (key PEM, chain PEM) for ``policy_channel``, when a test made one.
    client: tuple[bytes, bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.worker.port}"

    @property
    def roots_pem(self) -> bytes:
        roots = load_bundle(self.settings.data_dir, self.settings.database_url)
        return b"".join(r.public_bytes(serialization.Encoding.PEM) for r in roots)

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            self.target,
            grpc.ssl_channel_credentials(self.roots_pem),
            options=[("grpc.ssl_target_name_override", "localhost")],
        )

    def policy_channel(self) -> grpc.aio.Channel:
        """A channel to the policy port (``--policy-listen``), presenting ``client``."""
        assert self.worker.policy_port is not None and self.client is not None
        return grpc.aio.secure_channel(
            f"127.0.0.1:{self.worker.policy_port}",
            grpc.ssl_channel_credentials(self.roots_pem, *self.client),
            options=[("grpc.ssl_target_name_override", "localhost")],
        )


def serve_command(
    data_dir: Path,
    jwks_path: Path,
    *,
    workers: int,
    extra: list[str],
    listen: str = "127.0.0.1:0",
) -> list[str]:
    """``meshca serve`` on ``listen`` (a free 127.0.0.1 port), jwks mode against ``jwks_path``."""
    return [
        sys.executable,
        "-m",
        "meshca",
        "serve",
        "--listen",
        listen,
        "--data-dir",
        str(data_dir),
        "--trust-domain",
        TRUST_DOMAIN,
        "--k8s-mode",
        "jwks",
        "--k8s-issuer",
        ISSUER,
        "--k8s-audience",
        AUDIENCE,
        "--k8s-jwks-file",
        str(jwks_path),
        "--workers",
        str(workers),
        *extra,
    ]


def server_settings(data_dir: Path, jwks_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        listen="127.0.0.1:0",
        data_dir=data_dir,
        trust_domain=TRUST_DOMAIN,
        k8s_mode="jwks",
        k8s_issuer=ISSUER,
        k8s_jwks_file=jwks_path,
        k8s_audience=(AUDIENCE,),
        workers=1,
        log_level="warning",
    )
    values.update(overrides)
    return Settings(**values)


async def running_server(tmp_path: Path, **overrides: Any) -> AsyncIterator[RunningServer]:
    minter, jwks_path = TokenMinter.create(tmp_path)
    settings = server_settings(tmp_path / "data", jwks_path, **overrides)
    app.prepare(settings)
    worker = await app.start_worker(settings)
    try:
        yield RunningServer(settings, worker, minter)
    finally:
        await worker.stop(grace=1)
