"""A stand-in Kubernetes token issuer for meshca's local dev mode.

It keeps an EC P-256 signing key and the matching ``jwks.json`` in one directory, so a dev
server in jwks mode (``JwksKeySource.from_file(issuer.jwks_path)``) accepts the tokens
that ``mint`` produces, across restarts and across processes. Never for production: the
tokens it makes name whatever service account they are asked to.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import secrets
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

__all__ = ["DEFAULT_DEV_ISSUER", "DevTokenIssuer"]

DEFAULT_DEV_ISSUER = "https://meshca.dev.local"
_KEY_FILE = "signing-key.pem"
_JWKS_FILE = "jwks.json"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _public_jwk(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    numbers = key.public_numbers()
    jwk = {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }
    # RFC 7638 thumbprint: stable across restarts, changes only with the key.
    thumbprint = hashlib.sha256(json.dumps(jwk, separators=(",", ":")).encode()).digest()
    return {**jwk, "kid": _b64url(thumbprint), "use": "sig", "alg": "ES256"}


class DevTokenIssuer:
    """Mints projected-style service-account tokens signed by a key kept in ``directory``.

    The key (file mode 0600) and ``jwks.json`` are created on first use and reused after.
    File I/O is blocking; it happens once per instance, at startup or in CLI commands.
    """

    def __init__(self, directory: Path, issuer: str = DEFAULT_DEV_ISSUER) -> None:
        self._directory = Path(directory)
        self._issuer = issuer
        self._loaded: tuple[ec.EllipticCurvePrivateKey, str] | None = None

    @property
    def issuer(self) -> str:
        return self._issuer

    @property
    def jwks_path(self) -> Path:
        """The public key set; exists once ``ensure()`` or ``mint()`` has run."""
        return self._directory / _JWKS_FILE

    def ensure(self) -> None:
        """Create the signing key and ``jwks.json`` unless they exist; load the key."""
        self._signing_key()

    def _signing_key(self) -> tuple[ec.EllipticCurvePrivateKey, str]:
        if self._loaded is not None:
            return self._loaded
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = self._load_or_create_key()
        jwk = _public_jwk(key.public_key())
        document = json.dumps({"keys": [jwk]}, indent=2) + "\n"
        if not self.jwks_path.exists() or self.jwks_path.read_text() != document:
            temporary = self._directory / f".{_JWKS_FILE}.{secrets.token_hex(4)}"
            temporary.write_text(document)
            os.replace(temporary, self.jwks_path)
        self._loaded = key, jwk["kid"]
        return self._loaded

    def mint(
        self,
        namespace: str,
        service_account: str,
        audience: str,
        ttl: timedelta = timedelta(hours=1),
        pod_name: str | None = None,
        *,
        now: datetime,
    ) -> str:
        """A token for ``namespace/service_account`` bound to a made-up pod.

        The pod gets a random uid and, unless ``pod_name`` is given, a random name.
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        if ttl <= timedelta(0):
            raise ValueError("ttl must be positive")
        key, kid = self._signing_key()
        issued = int(now.timestamp())
        account_uid = uuid.uuid5(
            uuid.NAMESPACE_URL, f"{self._issuer}/{namespace}/{service_account}"
        )
        claims = {
            "iss": self._issuer,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "aud": [audience],
            "iat": issued,
            "nbf": issued,
            "exp": issued + int(ttl.total_seconds()),
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": {"name": service_account, "uid": str(account_uid)},
                "pod": {
                    "name": pod_name or f"{service_account}-{secrets.token_hex(3)}",
                    "uid": str(uuid.uuid4()),
                },
            },
        }
        return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})

    def _load_or_create_key(self) -> ec.EllipticCurvePrivateKey:
        path = self._directory / _KEY_FILE
        if not path.exists():
            self._create_key(path)
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError(f"{path} does not hold an EC P-256 private key")
        return key

    def _create_key(self, path: Path) -> None:
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        # Write aside, then link into place: another process starting at the same moment
        # either wins the link or finds a complete file, never a half-written one.
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(descriptor, "wb") as stream:
                stream.write(pem)
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            temporary.unlink()
