"""Linkerd identity names and the CSR rules of Linkerd's Certify door."""

from __future__ import annotations

from ipaddress import ip_address

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from meshca.core.csr import parse_csr
from meshca.core.errors import InvalidRequest, MalformedCsr, NotAuthorized
from meshca.core.identity import KubernetesIdentity, is_namespace, is_service_account
from meshca.core.linkerd import (
    InvalidLinkerdIdentity,
    LinkerdName,
    check_linkerd_csr,
    check_linkerd_domain,
    linkerd_name_for,
    parse_linkerd_name,
    require_der_csr,
)
from tests.core.builders import build_csr, csr_der, csr_pem

DOMAIN = "linkerd.cluster.local"
WEB = "web.emojivoto.serviceaccount.identity.linkerd.cluster.local"

label = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)
namespaces = label
service_accounts = (
    st.lists(label, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 253)
)
domains = st.lists(label, min_size=1, max_size=4).map(".".join).filter(lambda s: len(s) <= 253)


@settings(max_examples=500)
@given(sa=service_accounts, ns=namespaces, domain=domains)
def test_names_round_trip(sa: str, ns: str, domain: str) -> None:
    name = linkerd_name_for(KubernetesIdentity(namespace=ns, service_account=sa), domain)
    text = str(name)
    assert text == f"{sa}.{ns}.serviceaccount.identity.{domain}"
    assert parse_linkerd_name(text, domain) == name
    # A name for one domain is never read as a name under another.
    with pytest.raises(InvalidLinkerdIdentity):
        parse_linkerd_name(text, "x" + domain)


@settings(max_examples=1000)
@given(text=st.text(max_size=300), domain=st.sampled_from([DOMAIN, "cluster.local", "a"]))
def test_any_text_parses_to_a_valid_name_or_is_refused(text: str, domain: str) -> None:
    try:
        name = parse_linkerd_name(text, domain)
    except InvalidLinkerdIdentity as error:
        assert isinstance(error, InvalidRequest)
        assert error.reason == "linkerd-identity-malformed"
        return
    assert str(name) == text
    assert is_namespace(name.namespace) and is_service_account(name.service_account)


@settings(max_examples=300)
@given(
    sa=service_accounts,
    ns=namespaces,
    garbage=st.text(alphabet="abcXYZ.-_ /%\x00é", min_size=1, max_size=5),
    at=st.integers(min_value=0, max_value=400),
)
def test_an_inserted_character_never_yields_another_identity(
    sa: str, ns: str, garbage: str, at: int
) -> None:
    good = f"{sa}.{ns}.serviceaccount.identity.{DOMAIN}"
    mangled = good[: at % (len(good) + 1)] + garbage + good[at % (len(good) + 1) :]
    try:
        parsed = parse_linkerd_name(mangled, DOMAIN)
    except InvalidLinkerdIdentity:
        return
    # Whatever still parses is exactly the text that was sent, nothing looser.
    assert str(parsed) == mangled


def test_dotted_service_accounts_split_at_the_namespace() -> None:
    name = parse_linkerd_name(f"a.b.c.shop.serviceaccount.identity.{DOMAIN}", DOMAIN)
    assert (name.service_account, name.namespace) == ("a.b.c", "shop")
    # Even a service account that contains the marker splits one way.
    tricky = f"x.serviceaccount.identity.y.shop.serviceaccount.identity.{DOMAIN}"
    parsed = parse_linkerd_name(tricky, DOMAIN)
    assert (parsed.service_account, parsed.namespace) == ("x.serviceaccount.identity.y", "shop")


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="fail/empty"),
        pytest.param("web.emojivoto", id="fail/no-suffix"),
        pytest.param(f"serviceaccount.identity.{DOMAIN}", id="fail/suffix-only"),
        pytest.param(f".serviceaccount.identity.{DOMAIN}", id="fail/dot-suffix-only"),
        pytest.param(f"emojivoto.serviceaccount.identity.{DOMAIN}", id="fail/no-service-account"),
        pytest.param(f"Web.emojivoto.serviceaccount.identity.{DOMAIN}", id="fail/uppercase"),
        pytest.param(f"web..emojivoto.serviceaccount.identity.{DOMAIN}", id="fail/empty-label"),
        pytest.param(f"web.emoji_voto.serviceaccount.identity.{DOMAIN}", id="fail/underscore"),
        pytest.param(f"web.-emojivoto.serviceaccount.identity.{DOMAIN}", id="fail/leading-dash"),
        pytest.param(f"web.{'n' * 64}.serviceaccount.identity.{DOMAIN}", id="fail/long-namespace"),
        pytest.param(f"{'w' * 1100}.ns.serviceaccount.identity.{DOMAIN}", id="fail/too-long"),
        pytest.param("web.emojivoto.serviceaccount.identity.linkerd.other.local", id="fail/domain"),
        pytest.param(f"web.emojivoto.serviceaccount.identity.{DOMAIN}.", id="fail/trailing-dot"),
        pytest.param(f"web.emojivoto.serviceaccount.identity.{DOMAIN}\n", id="fail/newline"),
        pytest.param(f"spiffe://{DOMAIN}/ns/emojivoto/sa/web", id="fail/spiffe-id"),
    ],
)
def test_malformed_names_are_refused(text: str) -> None:
    with pytest.raises(InvalidLinkerdIdentity):
        parse_linkerd_name(text, DOMAIN)


def test_the_upstream_example_parses() -> None:
    assert parse_linkerd_name(WEB, DOMAIN) == LinkerdName("web", "emojivoto", DOMAIN)


@pytest.mark.parametrize(
    "domain", ["linkerd.cluster.local", "cluster.local", "a", "linkerd-2.prod.example.com"]
)
def test_valid_domains(domain: str) -> None:
    assert check_linkerd_domain(domain) == domain


@pytest.mark.parametrize(
    "domain", ["", "Linkerd.cluster.local", ".cluster.local", "cluster.local.", "a..b", "a_b"]
)
def test_invalid_domains(domain: str) -> None:
    with pytest.raises(ValueError, match="lowercase DNS name"):
        check_linkerd_domain(domain)


NAME = LinkerdName("web", "emojivoto", DOMAIN)


@pytest.mark.parametrize(
    ("options", "error", "reason"),
    [
        pytest.param(dict(dns=()), InvalidRequest, "csr-dns-names", id="fail/no-dns-name"),
        pytest.param(
            dict(dns=(WEB, "other.example.com")), InvalidRequest, "csr-dns-names", id="fail/two"
        ),
        pytest.param(
            dict(dns=(WEB,), uris=("spiffe://cluster.local/ns/emojivoto/sa/web",)),
            InvalidRequest,
            "csr-unexpected-san",
            id="fail/uri-san",
        ),
        pytest.param(
            dict(dns=(WEB.replace("web.", "admin."),)),
            NotAuthorized,
            "linkerd-identity-mismatch",
            id="fail/other-identity",
        ),
    ],
)
def test_csr_rules(options: dict[str, object], error: type[Exception], reason: str) -> None:
    csr = parse_csr(csr_der(**options))  # type: ignore[arg-type]
    with pytest.raises(error) as caught:
        check_linkerd_csr(csr, NAME)
    assert caught.value.reason == reason  # type: ignore[attr-defined]


def test_csr_with_an_ip_name_is_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(WEB), x509.IPAddress(ip_address("10.0.0.1"))]
            ),
            False,
        )
        .sign(key, hashes.SHA256())
    )
    parsed = parse_csr(csr.public_bytes(Encoding.DER))
    assert parsed.other_sans == ("ip",) and parsed.dns_sans == (WEB,)
    with pytest.raises(InvalidRequest) as caught:
        check_linkerd_csr(parsed, NAME)
    assert caught.value.reason == "csr-unexpected-san"


def test_the_proxy_csr_passes() -> None:
    csr = parse_csr(csr_der(dns=(WEB,), subject=None))
    assert csr.dns_sans == (WEB,) and csr.uri_sans == () and csr.other_sans == ()
    check_linkerd_csr(csr, NAME)


def test_pem_is_refused_der_is_not() -> None:
    with pytest.raises(MalformedCsr) as caught:
        require_der_csr(csr_pem(dns=(WEB,)))
    assert caught.value.reason == "csr-not-der"
    require_der_csr(build_csr(dns=(WEB,)).public_bytes(Encoding.DER))
