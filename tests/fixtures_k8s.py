"""Kubernetes API stand-in fixtures (OIDC discovery, JWKS, TokenReview).

The stand-in follows the documented API contract: it publishes its signing keys at
``/openid/v1/jwks`` with an OIDC discovery document, and answers
``POST /apis/authentication.k8s.io/v1/tokenreviews`` by validating the reviewed token
itself (signature, issuer, requested audiences, validity times, claims). The caller
must present its own bearer token, as meshca's service account does in a cluster.

Fixtures:

``k8s_signing_keys``
    session-wide real keys: RSA-2048 ``rsa-1``/``rsa-2``/``rogue-rsa``, EC P-256 ``ec-1``
    and ``rogue-ec``, EC P-384 ``ec384-1``. The API publishes ``rsa-1``, ``ec-1``,
    ``ec384-1``; ``rsa-2`` is the key to rotate to; the rogues are never published.
``k8s_tls_files``
    session-wide CA and 127.0.0.1 server certificate files (``TlsFiles``).
``k8s_api`` / ``k8s_api_tls``
    a running ``K8sApiStandIn`` over HTTP / HTTPS (its CA in ``.ca_file``), one per test.
    It has ``.url`` (== ``.issuer``), ``.audiences``, ``.minter`` (a ``TokenMinter``),
    ``.clock`` (a ``FixedClock`` it judges time by), ``.caller_token_file``, counters
    (``jwks_fetches``, ``discovery_fetches``, ``reviews``, ``review_requests``,
    ``failed_requests``, ``review_arrivals``: POSTs received, counted before ``delay``),
    and the
    levers ``publish()``, ``include_alg``, ``fail_status``, ``delay``,
    ``discovery_issuer``, ``omit_audiences``, ``deleted_pods``, ``api_audiences`` and
    ``stop()``. A stopped stand-in stays stopped: to bring the API server back at the
    same URL, start another with ``port=`` the old one's port (and its ``clock``).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import socketserver
import ssl
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

__all__ = [
    "DROP",
    "HOSTILE_TOKENS",
    "FixedClock",
    "K8sApiStandIn",
    "SigningKey",
    "TokenMinter",
    "b64url",
]

LEGACY_ISSUER = "kubernetes/serviceaccount"
DEFAULT_AUDIENCE = "meshca"
START = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
PUBLISHED_KIDS = ("rsa-1", "ec-1", "ec384-1")


class _Drop:
    def __repr__(self) -> str:
        return "DROP"


#: Claim override value that removes the claim.
DROP: Any = _Drop()


def b64url(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _b64json(value: object) -> str:
    return b64url(json.dumps(value, separators=(",", ":")))


class FixedClock:
    """A ``Clock`` that moves only when told; ``monotonic`` follows it."""

    def __init__(self, now: datetime = START) -> None:
        self._now = now

    def now(self) -> datetime:
        return self._now

    def advance(self, delta: timedelta) -> None:
        self._now += delta

    def monotonic(self) -> float:
        return self._now.timestamp()


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    def jwk(self, *, include_alg: bool = True) -> dict[str, Any]:
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk: dict[str, Any] = RSAAlgorithm.to_jwk(public, as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(public, as_dict=True)
        jwk.update(kid=self.kid, use="sig")
        if include_alg:
            jwk["alg"] = self.alg
        return jwk

    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def jwks_document(keys: Sequence[SigningKey], *, include_alg: bool = True) -> dict[str, Any]:
    return {"keys": [key.jwk(include_alg=include_alg) for key in keys]}


@dataclass
class TokenMinter:
    """Makes service-account tokens, genuine and hostile.

    ``claims()`` builds a projected token's claims at ``clock.now()``; keyword overrides
    replace top-level claims (``DROP`` removes one). ``sign()`` signs with a named key.
    """

    keys: Mapping[str, SigningKey]
    issuer: str
    clock: FixedClock
    audience: str = DEFAULT_AUDIENCE

    def claims(
        self,
        *,
        namespace: str = "shop",
        service_account: str = "cart",
        ttl: timedelta = timedelta(hours=1),
        pod: bool = True,
        node: bool = True,
        **overrides: Any,
    ) -> dict[str, Any]:
        now = int(self.clock.now().timestamp())
        k8s: dict[str, Any] = {
            "namespace": namespace,
            "serviceaccount": {"name": service_account, "uid": f"uid-sa-{service_account}"},
        }
        if pod:
            k8s["pod"] = {"name": f"{service_account}-7d9f", "uid": "uid-pod-1"}
        if node:
            k8s["node"] = {"name": "node-a", "uid": "uid-node-a"}
        claims: dict[str, Any] = {
            "aud": [self.audience],
            "exp": now + int(ttl.total_seconds()),
            "iat": now,
            "nbf": now,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": k8s,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        for name, value in overrides.items():
            if value is DROP:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def legacy_claims(
        self, *, namespace: str = "shop", service_account: str = "cart"
    ) -> dict[str, Any]:
        """A secret-based token's claims: no aud, no exp."""
        prefix = "kubernetes.io/serviceaccount/"
        return {
            "iss": LEGACY_ISSUER,
            prefix + "namespace": namespace,
            prefix + "secret.name": f"{service_account}-token-x2k9q",
            prefix + "service-account.name": service_account,
            prefix + "service-account.uid": f"uid-sa-{service_account}",
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }

    def sign(
        self,
        claims: Mapping[str, Any],
        *,
        key: str = "rsa-1",
        alg: str | None = None,
        kid: str | _Drop | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """Sign with ``key``; ``kid`` overrides the header kid (DROP omits it)."""
        signing_key = self.keys[key]
        header: dict[str, Any] = {"kid": signing_key.kid if kid is None else kid}
        if header["kid"] is DROP:
            del header["kid"]
        header.update(headers or {})
        return jwt.encode(
            dict(claims), signing_key.private_key, algorithm=alg or signing_key.alg, headers=header
        )

    def token(self, *, key: str = "rsa-1", **overrides: Any) -> str:
        return self.sign(self.claims(**overrides), key=key)

    def legacy(self, *, key: str = "rsa-1") -> str:
        return self.sign(self.legacy_claims(), key=key)

    def unsigned(self, claims: Mapping[str, Any], *, alg: str = "none", kid: str = "rsa-1") -> str:
        """``alg: none`` with an empty signature, naming a published key."""
        return f"{_b64json({'alg': alg, 'typ': 'JWT', 'kid': kid})}.{_b64json(claims)}."

    def hs256_with_public_key(self, claims: Mapping[str, Any], *, key: str = "rsa-1") -> str:
        """The key-confusion attack: HMAC keyed with the verifier's public key PEM."""
        header = {"alg": "HS256", "typ": "JWT", "kid": self.keys[key].kid}
        signing_input = f"{_b64json(header)}.{_b64json(claims)}"
        mac = hmac.new(self.keys[key].public_pem(), signing_input.encode(), hashlib.sha256)
        return f"{signing_input}.{b64url(mac.digest())}"

    @staticmethod
    def tamper_signature(token: str) -> str:
        head, payload, signature = token.split(".")
        middle = len(signature) // 2
        flipped = "A" if signature[middle] != "A" else "B"
        return f"{head}.{payload}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"

    @staticmethod
    def tamper_payload(token: str, **changes: Any) -> str:
        """Rewrite claims but keep the original signature."""
        head, payload, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims.update(changes)
        return f"{head}.{_b64json(claims)}.{signature}"


def _in(minter: TokenMinter, seconds: int) -> int:
    return int(minter.clock.now().timestamp()) + seconds


def _kube_system(minter: TokenMinter) -> dict[str, Any]:
    return minter.claims(namespace="kube-system", service_account="admin")["kubernetes.io"]


#: Every hostile token both attestors must refuse, by case id.
HOSTILE_TOKENS: dict[str, Callable[[TokenMinter], str]] = {
    "wrong-audience": lambda m: m.token(aud=["someone-else"]),
    "no-audience": lambda m: m.token(aud=DROP),
    "wrong-issuer": lambda m: m.token(iss="https://evil.example"),
    "expired": lambda m: m.token(iat=_in(m, -7200), nbf=_in(m, -7200), exp=_in(m, -3600)),
    "not-yet-valid": lambda m: m.token(nbf=_in(m, 600)),
    "issued-in-future": lambda m: m.token(iat=_in(m, 600)),
    "no-expiry": lambda m: m.token(exp=DROP),
    "exp-not-a-number": lambda m: m.token(exp="tomorrow"),
    "unknown-kid": lambda m: m.token(key="rogue-rsa"),
    "no-kid-rogue-key": lambda m: m.sign(m.claims(), key="rogue-ec", kid=DROP),
    "wrong-key-for-kid": lambda m: m.sign(m.claims(), key="rogue-rsa", kid="rsa-1"),
    "alg-none": lambda m: m.unsigned(m.claims()),
    "alg-none-mixed-case": lambda m: m.unsigned(m.claims(), alg="nOnE"),
    "hs256-with-public-key": lambda m: m.hs256_with_public_key(m.claims()),
    "alg-not-matching-key": lambda m: m.sign(m.claims(), key="ec-1", kid="rsa-1"),
    "ps256-on-rs256-key": lambda m: m.sign(m.claims(), key="rsa-1", alg="PS256"),
    "tampered-signature": lambda m: m.tamper_signature(m.token()),
    "tampered-payload": lambda m: m.tamper_payload(
        m.token(),
        sub="system:serviceaccount:kube-system:admin",
        **{"kubernetes.io": _kube_system(m)},
    ),
    "missing-k8s-claims": lambda m: m.token(**{"kubernetes.io": DROP}),
    "missing-service-account": lambda m: m.token(**{"kubernetes.io": {"namespace": "shop"}}),
    "sub-disagrees": lambda m: m.token(sub="system:serviceaccount:kube-system:admin"),
    "legacy": lambda m: m.legacy(),
    "garbage": lambda m: "not-a-token",
    "empty": lambda m: "",
    "two-segments": lambda m: m.token().rsplit(".", 1)[0],
}


def _make_keys() -> dict[str, SigningKey]:
    def rsa_key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    keys = [
        SigningKey("rsa-1", "RS256", rsa_key()),
        SigningKey("rsa-2", "RS256", rsa_key()),
        SigningKey("rogue-rsa", "RS256", rsa_key()),
        SigningKey("ec-1", "ES256", ec.generate_private_key(ec.SECP256R1())),
        SigningKey("rogue-ec", "ES256", ec.generate_private_key(ec.SECP256R1())),
        SigningKey("ec384-1", "ES384", ec.generate_private_key(ec.SECP384R1())),
    ]
    return {key.kid: key for key in keys}


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """A CA and a server certificate for 127.0.0.1 signed by it, as PEM files."""
    now = datetime.now(UTC)

    def build(
        subject: str, issuer: x509.Name | None, key: ec.EllipticCurvePrivateKey, signer: Any
    ) -> tuple[x509.Certificate, x509.Name]:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        is_ca = issuer is None
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        )
        if is_ca:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        else:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            ).add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
        return builder.sign(signer, hashes.SHA256()), name

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert, ca_name = build("k8s stand-in CA", None, ca_key, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert, _ = build("kubernetes", ca_name, server_key, ca_key)
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    files.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@dataclass
class _Verdict:
    authenticated: bool
    error: str = ""
    user: dict[str, Any] = field(default_factory=dict)
    audiences: list[str] = field(default_factory=list)


class K8sApiStandIn:
    """A Kubernetes API server reduced to service-account token authentication."""

    REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"

    def __init__(
        self,
        keys: Mapping[str, SigningKey],
        *,
        tls: TlsFiles | None = None,
        caller_token: str = "meshca-caller-token",
        audiences: Sequence[str] = (DEFAULT_AUDIENCE,),
        clock: FixedClock | None = None,
        port: int = 0,
    ) -> None:
        self.keys = keys
        self.clock = clock or FixedClock()
        self.caller_token = caller_token
        self.audiences = list(audiences)
        self.published: list[str] = list(PUBLISHED_KIDS)
        self.include_alg = True
        #: When set, every request is answered with this HTTP status.
        self.fail_status: int | None = None
        #: Seconds to wait before answering (cut short by stop()).
        self.delay = 0.0
        #: Issuer named by the discovery document, if it should lie.
        self.discovery_issuer: str | None = None
        #: Answer like an audience-unaware server: no status.audiences.
        self.omit_audiences = False
        #: Pod uids whose pods are gone: their tokens no longer authenticate.
        self.deleted_pods: set[str] = set()
        self.jwks_fetches = 0
        self.discovery_fetches = 0
        self.reviews = 0
        self.failed_requests = 0
        self.review_arrivals = 0
        self.review_requests: list[dict[str, Any]] = []
        self.ca_file: str | None = str(tls.ca_file) if tls else None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.api = self
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.cert_file, tls.key_file)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        port = self._server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        #: Like kube-apiserver, the issuer is also the audience its own tokens default to.
        self.issuer = self.url
        self.api_audiences = [self.issuer]
        self.minter = TokenMinter(keys, self.issuer, self.clock)
        self.caller_token_file: Path | None = None
        # A short poll interval keeps stop() (and so every test's teardown) quick.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()

    @property
    def jwks_url(self) -> str:
        return self.url + "/openid/v1/jwks"

    def jwks(self) -> dict[str, Any]:
        return jwks_document(
            [self.keys[kid] for kid in self.published], include_alg=self.include_alg
        )

    def publish(self, *kids: str) -> None:
        """Replace the published key set."""
        self.published = list(kids)

    def stop(self) -> None:
        """Stop serving; connections are refused from now on. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # --- request handling (runs in server threads) ---

    def _count(self, counter: str) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + 1)

    def review(self, spec: Mapping[str, Any]) -> _Verdict:
        token = spec.get("token")
        requested = spec.get("audiences") or self.api_audiences
        if not isinstance(token, str):
            return _Verdict(False, "invalid bearer token")
        try:
            header = jwt.get_unverified_header(token)
            kid = header.get("kid")
            if kid not in self.published:
                return _Verdict(False, "invalid bearer token, unknown key")
            key = self.keys[kid]
            claims = jwt.decode(
                token,
                key.private_key.public_key(),
                algorithms=[key.alg],
                options={
                    "verify_aud": False,
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_iss": False,
                },
            )
        except jwt.PyJWTError as error:
            return _Verdict(False, f"invalid bearer token, {error}")
        if claims.get("iss") == LEGACY_ISSUER:
            return self._legacy_verdict(claims, requested)
        return self._projected_verdict(claims, requested)

    def _legacy_verdict(self, claims: Mapping[str, Any], requested: Sequence[str]) -> _Verdict:
        # Legacy tokens carry no audience; the API server vouches for its own audiences.
        audiences = [a for a in requested if a in self.api_audiences]
        if not audiences:
            return _Verdict(
                False,
                f"token audiences {json.dumps(self.api_audiences)} is invalid for the target "
                f"audiences {json.dumps(list(requested))}",
            )
        prefix = "kubernetes.io/serviceaccount/"
        namespace = claims.get(prefix + "namespace")
        name = claims.get(prefix + "service-account.name")
        return _Verdict(
            True,
            user=_user(namespace, name, claims.get(prefix + "service-account.uid"), {}),
            audiences=audiences,
        )

    def _projected_verdict(self, claims: Mapping[str, Any], requested: Sequence[str]) -> _Verdict:
        if claims.get("iss") != self.issuer:
            return _Verdict(False, "invalid bearer token, token issuer is not accepted")
        token_audiences = claims.get("aud")
        if isinstance(token_audiences, str):
            token_audiences = [token_audiences]
        audiences = [a for a in requested if a in (token_audiences or [])]
        if not audiences:
            return _Verdict(
                False,
                f"token audiences {json.dumps(token_audiences)} is invalid for the target "
                f"audiences {json.dumps(list(requested))}",
            )
        now = self.clock.now().timestamp()
        if not isinstance(claims.get("exp"), int) or now >= claims["exp"]:
            return _Verdict(False, "invalid bearer token, service account token has expired")
        if claims.get("nbf", 0) > now or claims.get("iat", 0) > now:
            return _Verdict(False, "invalid bearer token, service account token is not valid yet")
        k8s = claims.get("kubernetes.io")
        if not isinstance(k8s, dict) or not isinstance(k8s.get("serviceaccount"), dict):
            return _Verdict(False, "invalid bearer token, service account claims missing")
        namespace, account = k8s.get("namespace"), k8s["serviceaccount"]
        if claims.get("sub") != f"system:serviceaccount:{namespace}:{account.get('name')}":
            return _Verdict(False, "invalid bearer token, sub does not match claims")
        extra: dict[str, list[str]] = {}
        pod = k8s.get("pod")
        if isinstance(pod, dict):
            if pod.get("uid") in self.deleted_pods:
                return _Verdict(False, f"pod {pod.get('name')!r} not found")
            extra["authentication.kubernetes.io/pod-name"] = [pod["name"]]
            extra["authentication.kubernetes.io/pod-uid"] = [pod["uid"]]
        node = k8s.get("node")
        if isinstance(node, dict):
            extra["authentication.kubernetes.io/node-name"] = [node["name"]]
            extra["authentication.kubernetes.io/node-uid"] = [node["uid"]]
        if "jti" in claims:
            extra["authentication.kubernetes.io/credential-id"] = [f"JTI={claims['jti']}"]
        return _Verdict(
            True,
            user=_user(namespace, account.get("name"), account.get("uid"), extra),
            audiences=audiences,
        )


def _user(namespace: Any, name: Any, uid: Any, extra: dict[str, list[str]]) -> dict[str, Any]:
    user: dict[str, Any] = {
        "username": f"system:serviceaccount:{namespace}:{name}",
        "uid": uid,
        "groups": [
            "system:serviceaccounts",
            f"system:serviceaccounts:{namespace}",
            "system:authenticated",
        ],
    }
    if extra:
        user["extra"] = extra
    return user


class _Server(ThreadingHTTPServer):
    # Handler threads are joined on close, so no test leaves a thread or socket behind.
    daemon_threads = False
    block_on_close = True
    api: K8sApiStandIn

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall without DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout tests) is not a stand-in failure.
        if not isinstance(sys.exc_info()[1], ConnectionError | ssl.SSLError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test output clean

    def _send(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(
            code,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": message,
                "reason": reason,
                "code": code,
            },
        )

    def _interfered(self) -> bool:
        api = self.server.api
        if api.delay:
            api._stopping.wait(api.delay)
        if api.fail_status is not None:
            api._count("failed_requests")
            self._status(api.fail_status, "InternalError", "the stand-in was told to fail")
            return True
        return False

    def do_GET(self) -> None:
        api = self.server.api
        if self._interfered():
            return
        if self.path == "/.well-known/openid-configuration":
            api._count("discovery_fetches")
            self._send(
                200,
                {
                    "issuer": api.discovery_issuer or api.issuer,
                    "jwks_uri": api.jwks_url,
                    "response_types_supported": ["id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["ES256", "ES384", "RS256"],
                },
            )
        elif self.path == "/openid/v1/jwks":
            api._count("jwks_fetches")
            self._send(200, api.jwks())
        else:
            self._status(404, "NotFound", "the server could not find the requested resource")

    def do_POST(self) -> None:
        api = self.server.api
        api._count("review_arrivals")
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length)
        if self._interfered():
            return
        if self.path != api.REVIEW_PATH:
            self._status(404, "NotFound", "the server could not find the requested resource")
            return
        if self.headers.get("Authorization") != f"Bearer {api.caller_token}":
            self._status(401, "Unauthorized", "Unauthorized")
            return
        try:
            request = json.loads(raw)
        except ValueError:
            self._status(400, "BadRequest", "the request body is not JSON")
            return
        # Like kube-apiserver, a body without kind/apiVersion takes them from the URL
        # (client-go's typed clients send none); wrong ones are refused.
        if (
            not isinstance(request, dict)
            or request.get("kind", "TokenReview") != "TokenReview"
            or request.get("apiVersion", "authentication.k8s.io/v1") != "authentication.k8s.io/v1"
            or not isinstance(request.get("spec"), dict)
        ):
            self._status(400, "BadRequest", "expected an authentication.k8s.io/v1 TokenReview")
            return
        with api._lock:
            api.review_requests.append(request)
        try:
            verdict = api.review(request["spec"])
        except Exception as error:  # hostile claims of odd types; refuse like the API would
            verdict = _Verdict(False, f"invalid bearer token, {type(error).__name__}")
        api._count("reviews")
        status: dict[str, Any] = {"user": verdict.user}
        if verdict.authenticated:
            status["authenticated"] = True
            if not api.omit_audiences:
                status["audiences"] = verdict.audiences
        else:
            status["error"] = verdict.error
        # Like the real API server, echo the spec (token included) back.
        self._send(
            201,
            {
                "kind": "TokenReview",
                "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None},
                "spec": request["spec"],
                "status": status,
            },
        )


@pytest.fixture(scope="session")
def k8s_signing_keys() -> dict[str, SigningKey]:
    return _make_keys()


@pytest.fixture(scope="session")
def k8s_tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("k8s-tls"))


def _running(api: K8sApiStandIn, directory: Path) -> Iterator[K8sApiStandIn]:
    api.caller_token_file = directory / "caller-token"
    api.caller_token_file.write_text(api.caller_token + "\n")
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture
def k8s_api(k8s_signing_keys: dict[str, SigningKey], tmp_path: Path) -> Iterator[K8sApiStandIn]:
    yield from _running(K8sApiStandIn(k8s_signing_keys), tmp_path)


@pytest.fixture
def k8s_api_tls(
    k8s_signing_keys: dict[str, SigningKey], k8s_tls_files: TlsFiles, tmp_path: Path
) -> Iterator[K8sApiStandIn]:
    yield from _running(K8sApiStandIn(k8s_signing_keys, tls=k8s_tls_files), tmp_path)
