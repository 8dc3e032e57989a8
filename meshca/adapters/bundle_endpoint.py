"""The SPIFFE bundle endpoint: the trust bundle as a SPIFFE JWKS over HTTPS (or HTTP).

The document follows the SPIFFE Trust Domain and Bundle specification: one JWK per
root with ``use: x509-svid`` and the certificate in ``x5c``, one per JWT-SVID key with
``use: jwt-svid`` and its ``kid``, plus ``spiffe_sequence``
(the bundle's version, growing on every change) and ``spiffe_refresh_hint`` (seconds).
The server answers ``GET /`` with it, and ``GET /crl/<fingerprint>.der`` with the CRL of
the intermediate whose DER has that SHA-256 (64 lowercase hex digits; see
``core.crl``). It is a deliberately small HTTP/1.1 responder: one request per
connection, no request body, no other paths.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding

from meshca.core.crl import is_fingerprint
from meshca.core.jwt_svid import JwtKey
from meshca.service.bundle import BundleSnapshot

__all__ = ["BundleEndpoint", "spiffe_bundle_document"]

log = logging.getLogger(__name__)

_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_MAX_REQUEST = 8192
_CRL_PREFIX = "/crl/"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_bytes(value: int, size: int | None = None) -> bytes:
    size = size or max(1, (value.bit_length() + 7) // 8)
    return value.to_bytes(size, "big")


def _jwk(cert: x509.Certificate) -> dict[str, Any]:
    key = cert.public_key()
    jwk: dict[str, Any] = {"use": "x509-svid"}
    if isinstance(key, ec.EllipticCurvePublicKey):
        numbers = key.public_numbers()
        size = (key.curve.key_size + 7) // 8
        jwk.update(
            kty="EC",
            crv=_CURVES[key.curve.name],
            x=_b64url(_int_bytes(numbers.x, size)),
            y=_b64url(_int_bytes(numbers.y, size)),
        )
    elif isinstance(key, rsa.RSAPublicKey):
        rsa_numbers = key.public_numbers()
        jwk.update(
            kty="RSA", n=_b64url(_int_bytes(rsa_numbers.n)), e=_b64url(_int_bytes(rsa_numbers.e))
        )
    elif isinstance(key, ed25519.Ed25519PublicKey):
        from cryptography.hazmat.primitives.serialization import PublicFormat

        raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
        jwk.update(kty="OKP", crv="Ed25519", x=_b64url(raw))
    else:
        raise ValueError(f"unsupported root key type {type(key).__name__}")
    jwk["x5c"] = [base64.b64encode(cert.public_bytes(Encoding.DER)).decode()]
    return jwk


def spiffe_bundle_document(
    roots: Sequence[x509.Certificate],
    *,
    sequence: int,
    refresh_hint: float,
    jwt_keys: Sequence[JwtKey] = (),
) -> dict[str, Any]:
    """The SPIFFE bundle (JWKS) for ``roots`` and ``jwt_keys``."""
    return {
        "keys": [*(_jwk(root) for root in roots), *(key.jwk() for key in jwt_keys)],
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": max(1, int(refresh_hint)),
    }


class BundleEndpoint:
    """Serves ``current()`` as a SPIFFE bundle at ``/`` of ``host:port``.

    With ``tls`` (key PEM, chain PEM) it speaks HTTPS with meshca's own SVID (the
    "https_spiffe" profile); ``update_tls`` swaps the certificate for new connections.
    """

    def __init__(
        self,
        current: Callable[[], BundleSnapshot],
        *,
        refresh_hint: float,
        tls: tuple[bytes, bytes] | None,
        paths: dict[str, Callable[[], bytes]] | None = None,
        crl: Callable[[str], bytes | None] | None = None,
    ) -> None:
        """``paths`` replaces the one document at ``/`` with a body for each path;
        ``crl`` (fingerprint -> DER or None) serves ``/crl/<fingerprint>.der``."""
        self._current = current
        self._paths = paths if paths is not None else {"/": self.body}
        self._crl = crl
        self._refresh_hint = refresh_hint
        self._context: ssl.SSLContext | None = None
        if tls is not None:
            self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._context.minimum_version = ssl.TLSVersion.TLSv1_2
            self.update_tls(*tls)
        self._server: asyncio.Server | None = None

    def update_tls(self, key_pem: bytes, chain_pem: bytes) -> None:
        """Use this key and chain for new connections (ssl wants files: a private tempdir)."""
        assert self._context is not None
        with tempfile.TemporaryDirectory(prefix="meshca-tls-") as directory:
            key_path, chain_path = Path(directory) / "key.pem", Path(directory) / "chain.pem"
            fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(key_pem)
            chain_path.write_bytes(chain_pem)
            self._context.load_cert_chain(chain_path, key_path)

    async def start(self, host: str, port: int) -> int:
        """Listen (SO_REUSEPORT, so every worker can serve); returns the bound port."""
        self._server = await asyncio.start_server(
            self._handle, host, port, ssl=self._context, reuse_port=True
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def body(self) -> bytes:
        snapshot = self._current()
        document = spiffe_bundle_document(
            snapshot.roots,
            sequence=snapshot.sequence,
            refresh_hint=self._refresh_hint,
            jwt_keys=snapshot.jwt_keys,
        )
        return json.dumps(document).encode()

    def _crl_answer(self, name: str) -> tuple[str, bytes]:
        fingerprint = name.removesuffix(".der")
        if self._crl is None:
            return "404 Not Found", b'{"error": "this server publishes no CRLs"}'
        if not name.endswith(".der") or not is_fingerprint(fingerprint):
            return "404 Not Found", (
                b'{"error": "a CRL is at /crl/<SHA-256 of the intermediate DER, '
                b'64 lowercase hex digits>.der"}'
            )
        der = self._crl(fingerprint)
        if der is None:
            return "404 Not Found", b'{"error": "no CRL for that intermediate"}'
        return "200 OK", der

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            if len(head) > _MAX_REQUEST:
                raise ValueError("request too large")
            method, target, _version = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            path = target.split("?", 1)[0]
            page = self._paths.get(path)
            content_type = "application/json"
            if method not in ("GET", "HEAD"):
                status, body = "405 Method Not Allowed", b'{"error": "use GET"}'
            elif self._crl is not None and path.startswith(_CRL_PREFIX):
                status, body = self._crl_answer(path[len(_CRL_PREFIX) :])
                if status.startswith("200"):
                    content_type = "application/pkix-crl"
            elif page is None:
                where = " or ".join(sorted(self._paths))
                status, body = "404 Not Found", json.dumps({"error": f"see {where}"}).encode()
            else:
                status, body = "200 OK", page()
            headers = (
                f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(headers.encode() + (body if method != "HEAD" else b""))
            await writer.drain()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            TimeoutError,
            ConnectionError,
            ValueError,
            ssl.SSLError,
        ):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
