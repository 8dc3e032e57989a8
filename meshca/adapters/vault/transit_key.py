"""CA keys held by Vault's Transit engine: a KeyManager and a cryptography private key.

``TransitSigningKey`` subclasses ``ec.EllipticCurvePrivateKey``, which is what
``CertificateBuilder.sign`` and ``CertificateSigningRequestBuilder.sign`` check for:
they then call its ``sign(data, ECDSA(hash))`` and put the DER signature it returns in
the certificate. Every abstract method is implemented; those that would reveal the key
(``private_numbers``, ``private_bytes``) or need it locally (``exchange``) refuse.
Signatures are made by ``transit/sign/<key>`` with ``marshaling_algorithm=asn1``.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
from collections.abc import Sequence
from typing import Any

from cryptography import utils
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding
from hvac import exceptions as hvac_errors

from meshca.adapters.vault.client import VaultClient
from meshca.core.authority import SignerKey
from meshca.core.errors import BackendUnavailable, UnsafeChange

__all__ = ["TransitKeyManager", "TransitSigningKey"]

_PREFIX = "transit:"
_HASHES = {"sha256": "sha2-256", "sha384": "sha2-384", "sha512": "sha2-512"}
_KEY_TYPES = {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}


class TransitSigningKey(ec.EllipticCurvePrivateKey):
    """An ECDSA key that never leaves Vault; signing is a ``transit/sign`` call."""

    def __init__(
        self,
        client: VaultClient,
        mount: str,
        name: str,
        version: int,
        public: ec.EllipticCurvePublicKey,
    ) -> None:
        self._client = client
        self._mount = mount
        self.name = name
        self.version = version
        self._public = public

    def sign(
        self, data: utils.Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithm("Vault transit keys sign ECDSA only")
        algorithm = signature_algorithm.algorithm
        prehashed = isinstance(algorithm, Prehashed)
        digest = algorithm._algorithm if isinstance(algorithm, Prehashed) else algorithm
        assert isinstance(digest, hashes.HashAlgorithm)
        hash_name = _HASHES.get(digest.name)
        if hash_name is None:
            raise UnsupportedAlgorithm(f"Vault transit cannot sign with {digest.name}")
        payload: dict[str, Any] = {
            "input": base64.b64encode(bytes(data)).decode(),
            "hash_algorithm": hash_name,
            "marshaling_algorithm": "asn1",
            "key_version": self.version,
            "prehashed": prehashed,
        }
        answer = self._client.call(
            lambda _c: self._client.post(f"{self._mount}/sign/{self.name}", payload),
            what=f"signing with transit key {self.name}",
        )
        signature = str(answer["data"]["signature"])
        return base64.b64decode(signature.rsplit(":", 1)[-1])

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise UnsupportedAlgorithm("a Vault transit signing key cannot do key exchange")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise UnsupportedAlgorithm("a Vault transit key never leaves Vault")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        raise UnsupportedAlgorithm("a Vault transit key never leaves Vault")

    def __copy__(self) -> TransitSigningKey:
        return self  # holds no key material: a reference is a copy

    def __deepcopy__(self, memo: dict[Any, Any]) -> TransitSigningKey:
        return self

    def __repr__(self) -> str:
        return f"<TransitSigningKey {self._mount}/{self.name} v{self.version}>"


class TransitKeyManager:
    """``KeyManager`` over a Transit mount; references are ``transit:<name>``.

    Keys are created non-exportable, one per authority, named ``<prefix>-<label>-<hex>``.
    It is deliberately not a ``KeyInventory``: other meshca deployments may keep keys
    with the same prefix in the same mount, so keys are deleted only when the journal
    removes the authority that names them. A key created just before a crash stays in
    Vault, unused: ``listed()`` shows it, and ``meshca ca prune-keys`` removes it when
    the operator says so.

    It is also a ``KeyImporter`` (``store``): an existing ECDSA key is imported into
    Transit through the mount's wrapping key, never written anywhere on the way.
    """

    def __init__(self, client: VaultClient, mount: str, prefix: str) -> None:
        self._client = client
        self._mount = mount
        self._prefix = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:60]

    def create(self, label: str) -> tuple[str, SignerKey]:
        name = f"{self._prefix}-{label}-{secrets.token_hex(6)}"
        self._client.call(
            lambda _c: self._client.post(
                f"{self._mount}/keys/{name}", {"type": "ecdsa-p256", "exportable": False}
            ),
            what=f"creating transit key {name}",
        )
        key_ref = _PREFIX + name
        return key_ref, self.load(key_ref)

    def store(self, label: str, key: SignerKey) -> str:
        """Import ``key`` into Transit (non-exportable) and return its reference.

        The key travels only wrapped: PKCS#8 DER under a fresh AES-256 key (AES-KWP,
        RFC 5649), that AES key under the mount's RSA wrapping key (OAEP, SHA-256).
        Before this returns, Transit has signed a challenge that verifies under
        ``key``'s public key; if not, the imported key is deleted again. Only ECDSA
        P-256 and P-384 keys: Transit signs with those for meshca. Raises
        ``UnsafeChange`` for another key type, ``BackendUnavailable`` when Vault fails.
        """
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in _KEY_TYPES:
            raise UnsafeChange(
                f"a {_describe(key)} key cannot be imported into Vault Transit for meshca, which "
                "signs with ECDSA P-256 or P-384 keys there: issue the CA with such a key, or "
                "import without --vault-transit (add --key-encryption-key-file to keep the "
                "key sealed in the database rather than in the data directory)"
            )
        key_type = _KEY_TYPES[key.curve.name]
        name = f"{self._prefix}-{label}-{secrets.token_hex(6)}"

        def wrap_and_import(_c: Any) -> None:
            answer = self._client.get(f"{self._mount}/wrapping_key")
            wrapping = serialization.load_pem_public_key(str(answer["data"]["public_key"]).encode())
            if not isinstance(wrapping, rsa.RSAPublicKey):
                raise BackendUnavailable(f"the wrapping key of {self._mount} is not RSA")
            ephemeral = bytearray(os.urandom(32))
            try:
                wrapped = wrapping.encrypt(
                    bytes(ephemeral),
                    padding.OAEP(
                        mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None
                    ),
                ) + aes_key_wrap_with_padding(
                    bytes(ephemeral),
                    key.private_bytes(
                        serialization.Encoding.DER,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    ),
                )
            finally:
                ephemeral[:] = bytes(len(ephemeral))
            self._client.post(
                f"{self._mount}/keys/{name}/import",
                {
                    "ciphertext": base64.b64encode(wrapped).decode(),
                    "hash_function": "SHA256",
                    "type": key_type,
                    "exportable": False,
                    "allow_plaintext_backup": False,
                    "allow_rotation": False,
                },
            )

        self._client.call(wrap_and_import, what=f"importing transit key {name}")
        key_ref = _PREFIX + name
        try:
            imported = self.load(key_ref)
            assert isinstance(imported, TransitSigningKey)
            challenge = secrets.token_bytes(32)
            algorithm = ec.ECDSA(hashes.SHA384() if key_type == "ecdsa-p384" else hashes.SHA256())
            key.public_key().verify(imported.sign(challenge, algorithm), challenge, algorithm)
        except (BackendUnavailable, InvalidSignature) as error:
            self.delete(key_ref)
            raise BackendUnavailable(
                f"transit key {name} did not sign as the imported key; it was deleted again"
            ) from error
        return key_ref

    def load(self, key_ref: str) -> SignerKey:
        name = self._name(key_ref)
        answer = self._client.call(
            lambda _c: self._client.get(f"{self._mount}/keys/{name}"),
            what=f"reading transit key {name}",
        )
        data = answer["data"]
        version = int(data["latest_version"])
        pem = data["keys"][str(version)]["public_key"]
        public = serialization.load_pem_public_key(pem.encode())
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise BackendUnavailable(f"transit key {name} is not an ECDSA key")
        return TransitSigningKey(self._client, self._mount, name, version, public)

    def delete(self, key_ref: str) -> None:
        name = self._name(key_ref)

        def destroy(_c: Any) -> None:
            try:
                self._client.post(f"{self._mount}/keys/{name}/config", {"deletion_allowed": True})
            except hvac_errors.InvalidPath:
                return  # already gone
            self._client.delete(f"{self._mount}/keys/{name}")

        self._client.call(destroy, what=f"deleting transit key {name}")

    def listed(self) -> Sequence[str]:
        """Every key reference in the mount named as this manager names its keys:
        ``<prefix>-<label>-<12 hex>``, the label one word, or ``imported-`` and one word."""

        def names(_c: Any) -> list[str]:
            try:
                listed = self._client.list(f"{self._mount}/keys") or {}
            except hvac_errors.InvalidPath:
                return []  # no keys at all yet
            return list((listed.get("data") or {}).get("keys") or [])

        found = self._client.call(names, what="listing transit keys")
        # Only names of the shape this manager makes: the prefix of trust domain
        # example.org is also the start of example.org.staging's keys.
        shape = re.compile(re.escape(self._prefix) + r"-(?:imported-)?[a-z0-9]+-[0-9a-f]{12}")
        return sorted(_PREFIX + n for n in found if shape.fullmatch(n))

    @property
    def prefix(self) -> str:
        """The start of every key reference this manager makes: ``transit:<prefix>-``."""
        return f"{_PREFIX}{self._prefix}-"

    @staticmethod
    def _name(key_ref: str) -> str:
        if not key_ref.startswith(_PREFIX):
            raise BackendUnavailable(f"key {key_ref!r} is not a Vault transit key")
        return key_ref[len(_PREFIX) :]


def _describe(key: object) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ECDSA {key.curve.name}"
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA-{key.key_size}"
    return type(key).__name__.removeprefix("_").replace("PrivateKey", "")
