"""Readiness: whether this replica can sign and record a certificate right now.

Liveness ("the process serves") is gRPC health's empty name; readiness is narrower, and
a load balancer should send no signing request to a replica that would have to refuse
it. ``assess`` turns one round of probe results into the next ``Readiness``; the probes
themselves (a signature, a database round trip, the record writer's state) are run by
``meshca.service.readiness``.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from meshca.core.authority import Authority
from meshca.core.errors import InternalError

__all__ = ["ProbeResults", "Readiness", "assess", "probe_signature"]


@dataclass(frozen=True)
class ProbeResults:
    """One round of probes: each problem is None when that part works, else why not.

    ``write_failures`` is the record writer's running count of records it did not
    commit; only its growth since the previous round counts against readiness.
    """

    signing: str | None
    database: str | None
    writer: str | None
    write_failures: int


@dataclass(frozen=True)
class Readiness:
    """The verdict of one round: ``problem`` None means ready."""

    problem: str | None
    write_failures: int = 0

    @property
    def ready(self) -> bool:
        return self.problem is None


def assess(previous: Readiness, probes: ProbeResults) -> Readiness:
    """Ready only if every probe passed and no record failed since ``previous``.

    A failed write counts for one round only: an unready replica gets no traffic, so a
    sticky failure could never clear. A lasting outage keeps failing the probes instead.
    """
    problems = [
        f"{what}: {problem}"
        for what, problem in (
            ("cannot sign", probes.signing),
            ("database", probes.database),
            ("record writer", probes.writer),
        )
        if problem is not None
    ]
    if probes.write_failures > previous.write_failures:
        problems.append("record writer: records were not committed since the last check")
    return Readiness("; ".join(problems) or None, probes.write_failures)


def probe_signature(authority: Authority, message: bytes) -> None:
    """Sign ``message`` with the issuer's key and verify it against the issuer certificate.

    Proves that the key answers (for a remote key: that its backend does) and still
    matches the certificate. Raises what the signer raises, or ``InternalError`` when
    the signature does not verify.
    """
    signer, public = authority.signer, authority.certificate.public_key()
    digest = authority.signature_hash
    try:
        if isinstance(signer, ed25519.Ed25519PrivateKey) and isinstance(
            public, ed25519.Ed25519PublicKey
        ):
            public.verify(signer.sign(message), message)
        elif (
            isinstance(signer, ec.EllipticCurvePrivateKey)
            and isinstance(public, ec.EllipticCurvePublicKey)
            and digest is not None
        ):
            algorithm = ec.ECDSA(digest)
            public.verify(signer.sign(message, algorithm), message, algorithm)
        elif (
            isinstance(signer, rsa.RSAPrivateKey)
            and isinstance(public, rsa.RSAPublicKey)
            and digest is not None
        ):
            signature = signer.sign(message, padding.PKCS1v15(), digest)
            public.verify(signature, message, padding.PKCS1v15(), digest)
        else:
            raise InternalError("the issuer's key is not of its certificate's key type")
    except InvalidSignature:
        raise InternalError("the issuer's key does not match its certificate") from None
