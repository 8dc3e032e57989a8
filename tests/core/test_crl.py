"""core.crl: which serials a CRL lists, its times and number, the signed CRL, its bounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from hypothesis import given
from hypothesis import strategies as st

from meshca.core.authority import build_intermediate, build_root
from meshca.core.crl import (
    MAX_CRL_ENTRIES,
    CrlIssuer,
    CrlTooLarge,
    RevokedLeaf,
    build_crl,
    check_crl_room,
    crl_content,
    crl_number,
    crl_times,
    fingerprint,
    is_fingerprint,
)
from meshca.core.denylist import DenyKind
from meshca.core.spiffe import TrustDomain

TD = TrustDomain("example.org")
NOW = datetime(2030, 1, 1, 12, 0, 7, tzinfo=UTC)
HOUR = timedelta(hours=1)
SLACK = timedelta(seconds=10)


def _pki() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = build_root(root_key, TD, NOW - 10 * HOUR, timedelta(days=365), 1)
    key = ec.generate_private_key(ec.SECP256R1())
    intermediate = build_intermediate(
        key.public_key(), root, root_key, TD, NOW - 10 * HOUR, timedelta(days=30), 2
    )
    return intermediate, key


def _leaf(serial: str, issued: datetime, **kw: object) -> RevokedLeaf:
    fields: dict[str, object] = {
        "serial": serial,
        "issued_at": issued,
        "not_after": issued + 24 * HOUR,
        "revoked_at": NOW - HOUR,
        "entry_id": 1,
        "entry_kind": DenyKind.SERIAL,
    }
    fields.update(kw)
    return RevokedLeaf(**fields)  # type: ignore[arg-type]


# -- times and numbers ---------------------------------------------------------------------


@given(
    st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    st.integers(min_value=2, max_value=7 * 86400),
)
def test_this_update_is_the_start_of_the_half_period(now: datetime, seconds: int) -> None:
    validity = timedelta(seconds=seconds)
    this_update, next_update = crl_times(now, validity)
    assert this_update <= now < this_update + timedelta(seconds=seconds // 2)
    assert next_update - this_update == validity
    assert this_update.microsecond == 0
    # Every process in the same half-period computes the same thisUpdate.
    assert crl_times(this_update, validity)[0] == this_update


def test_validity_outside_its_bounds_is_refused() -> None:
    with pytest.raises(ValueError, match="outside"):
        crl_times(NOW, timedelta(seconds=1))
    with pytest.raises(ValueError, match="outside"):
        crl_times(NOW, timedelta(days=8))


_times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
).map(lambda t: t.replace(microsecond=0))
_revisions = st.integers(min_value=-1, max_value=(1 << 63) - 1)


@given(_times, _revisions, _times, _revisions)
def test_crl_numbers_grow_with_time_then_revision(
    t1: datetime, r1: int, t2: datetime, r2: int
) -> None:
    n1, n2 = crl_number(t1, r1), crl_number(t2, r2)
    assert (n1 < n2) == ((t1, r1) < (t2, r2))
    assert (n1 == n2) == ((t1, r1) == (t2, r2))
    assert 0 <= n1 < 1 << 159  # fits RFC 5280's 20 octets as a positive INTEGER


def test_revision_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError):
        crl_number(NOW, -2)
    with pytest.raises(ValueError):
        crl_number(NOW, 1 << 63)


def test_fingerprint_is_sha256_of_der() -> None:
    intermediate, _ = _pki()
    text = fingerprint(intermediate)
    assert is_fingerprint(text)
    assert text == intermediate.fingerprint(hashes.SHA256()).hex()


@pytest.mark.parametrize(
    "text", ["", "ab" * 31, "ab" * 33, "AB" * 32, "zz" * 32, "../" * 21 + "a", "ab" * 31 + "g0"]
)
def test_non_fingerprints(text: str) -> None:
    assert not is_fingerprint(text)


# -- which serials -------------------------------------------------------------------------


def test_each_intermediate_lists_what_it_may_have_issued() -> None:
    old_cert, _ = _pki()
    new_cert, _ = _pki()
    handoff = NOW - 5 * HOUR
    old = CrlIssuer(old_cert, activated_at=NOW - 9 * HOUR, retired_at=handoff)
    new = CrlIssuer(new_cert, activated_at=handoff)
    before = _leaf("a1", handoff - HOUR)
    during = _leaf("b2", handoff + timedelta(seconds=3))
    after = _leaf("c3", handoff + HOUR)
    expired = _leaf("d4", NOW - 30 * HOUR)
    leaves = [after, during, before, expired]
    listed_old = crl_content(old, leaves, revision=7, now=NOW, validity=HOUR, slack=SLACK)
    listed_new = crl_content(new, leaves, revision=7, now=NOW, validity=HOUR, slack=SLACK)
    assert [e.serial for e in listed_old.entries] == ["a1", "b2"]
    assert [e.serial for e in listed_new.entries] == ["b2", "c3"]
    assert listed_old.number == listed_new.number == crl_number(listed_old.this_update, 7)


def test_a_leaf_outliving_the_intermediate_is_not_its_own() -> None:
    cert, _ = _pki()
    issuer = CrlIssuer(cert, activated_at=NOW - 9 * HOUR)
    far = _leaf("a1", NOW - HOUR, not_after=cert.not_valid_after_utc + HOUR)
    assert crl_content(issuer, [far], revision=0, now=NOW, validity=HOUR, slack=SLACK).entries == ()
    never_active = CrlIssuer(cert, activated_at=None)
    leaf = _leaf("a1", NOW - HOUR)
    content = crl_content(never_active, [leaf], revision=0, now=NOW, validity=HOUR, slack=SLACK)
    assert content.entries == ()


def test_one_entry_per_serial_with_the_earliest_revocation() -> None:
    cert, _ = _pki()
    issuer = CrlIssuer(cert, activated_at=NOW - 9 * HOUR)
    by_id = _leaf("a1", NOW - HOUR, revoked_at=NOW - HOUR, entry_id=5)
    by_serial = _leaf("a1", NOW - HOUR, revoked_at=NOW - 2 * HOUR, entry_id=9)
    content = crl_content(
        issuer, [by_id, by_serial], revision=9, now=NOW, validity=HOUR, slack=SLACK
    )
    assert content.entries == (by_serial,)


# -- the signed CRL ------------------------------------------------------------------------


class _RemoteKey(ec.EllipticCurvePrivateKey):
    """A key that signs only through ``sign`` (as a Vault Transit key does)."""

    def __init__(self, inner: ec.EllipticCurvePrivateKey) -> None:
        self._inner = inner
        self.calls = 0

    def sign(self, data: bytes, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:  # type: ignore[override]
        self.calls += 1
        assert not isinstance(signature_algorithm.algorithm, Prehashed)
        return self._inner.sign(data, signature_algorithm)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._inner.public_key()

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._inner.curve

    @property
    def key_size(self) -> int:
        return self._inner.key_size

    def exchange(self, *args: object) -> bytes:
        raise NotImplementedError

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        raise NotImplementedError

    def private_bytes(self, *args: object) -> bytes:
        raise NotImplementedError

    def __copy__(self) -> _RemoteKey:
        return self

    def __deepcopy__(self, memo: object) -> _RemoteKey:
        return self


@pytest.mark.parametrize("remote", [False, True])
def test_signed_crl_verifies_under_the_intermediate(remote: bool) -> None:
    cert, key = _pki()
    signer = _RemoteKey(key) if remote else key
    issuer = CrlIssuer(cert, activated_at=NOW - 9 * HOUR)
    leaves = [_leaf("1f", NOW - HOUR), _leaf("abcdef0123", NOW - 2 * HOUR)]
    content = crl_content(issuer, leaves, revision=41, now=NOW, validity=HOUR, slack=SLACK)
    crl = x509.load_der_x509_crl(build_crl(content, cert, signer))
    assert crl.is_signature_valid(cert.public_key())
    assert crl.issuer == cert.subject
    assert {r.serial_number for r in crl} == {0x1F, 0xABCDEF0123}
    assert crl.last_update_utc == content.this_update
    assert crl.next_update_utc == content.next_update
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert number == content.number
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    for revoked in crl:
        assert revoked.revocation_date_utc <= content.this_update
    if remote:
        assert isinstance(signer, _RemoteKey) and signer.calls == 1
    # Another intermediate's key does not verify it.
    other, _ = _pki()
    assert not crl.is_signature_valid(other.public_key())


def test_an_empty_crl_is_still_a_crl() -> None:
    cert, key = _pki()
    issuer = CrlIssuer(cert, activated_at=NOW - 9 * HOUR)
    content = crl_content(issuer, [], revision=-1, now=NOW, validity=HOUR, slack=SLACK)
    crl = x509.load_der_x509_crl(build_crl(content, cert, key))
    assert len(crl) == 0 and crl.is_signature_valid(cert.public_key())


# -- bounds (hostile input: a CRL larger than the stated bound) ----------------------------


def test_a_crl_over_the_entry_bound_is_refused() -> None:
    cert, _ = _pki()
    issuer = CrlIssuer(cert, activated_at=NOW - 9 * HOUR)
    leaves = [_leaf(f"{i + 1:x}", NOW - HOUR) for i in range(MAX_CRL_ENTRIES + 1)]
    with pytest.raises(CrlTooLarge, match=f"bound is {MAX_CRL_ENTRIES}") as caught:
        crl_content(issuer, leaves, revision=1, now=NOW, validity=HOUR, slack=SLACK)
    assert caught.value.reason == "crl-too-large"
    # Exactly at the bound is fine.
    content = crl_content(
        issuer, leaves[:MAX_CRL_ENTRIES], revision=1, now=NOW, validity=HOUR, slack=SLACK
    )
    assert len(content.entries) == MAX_CRL_ENTRIES


def test_a_full_crl_stays_under_the_byte_bound() -> None:
    """The entry bound is the one that bites: a full CRL of 20-octet serials fits."""
    from meshca.core.crl import MAX_CRL_BYTES

    cert, key = _pki()
    issuer = CrlIssuer(cert, activated_at=NOW - 9 * HOUR)
    leaves = [_leaf(f"{(1 << 158) + i:x}", NOW - HOUR) for i in range(MAX_CRL_ENTRIES)]
    content = crl_content(issuer, leaves, revision=1, now=NOW, validity=HOUR, slack=SLACK)
    der = build_crl(content, cert, key)
    assert len(der) <= MAX_CRL_BYTES
    assert len(x509.load_der_x509_crl(der)) == MAX_CRL_ENTRIES


def test_a_serial_no_crl_can_hold_is_left_out() -> None:
    """20 octets with the top bit set is a negative INTEGER: no meshca serial is one."""
    cert, _ = _pki()
    issuer = CrlIssuer(cert, activated_at=NOW - 9 * HOUR)
    huge = _leaf("f" * 40, NOW - HOUR)
    ok = _leaf("7" + "f" * 39, NOW - HOUR)
    content = crl_content(issuer, [huge, ok], revision=1, now=NOW, validity=HOUR, slack=SLACK)
    assert [e.serial for e in content.entries] == [ok.serial]


def test_room_check() -> None:
    check_crl_room(MAX_CRL_ENTRIES - 1, 1)
    check_crl_room(MAX_CRL_ENTRIES + 5, 0)  # adds nothing: never refused
    with pytest.raises(CrlTooLarge, match="at most"):
        check_crl_room(MAX_CRL_ENTRIES, 1)
    with pytest.raises(CrlTooLarge):
        check_crl_room(0, MAX_CRL_ENTRIES + 1)
