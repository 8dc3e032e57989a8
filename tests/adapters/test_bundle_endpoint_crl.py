"""The bundle endpoint's CRL paths: a parser over hostile input (hypothesis) and the
raw HTTP answers, without a server process."""

from __future__ import annotations

import asyncio
import hashlib

from hypothesis import given
from hypothesis import strategies as st

from meshca.adapters.bundle_endpoint import BundleEndpoint
from meshca.core.spiffe import TrustDomain
from meshca.service.bundle import BundleSnapshot

KNOWN = hashlib.sha256(b"an intermediate").hexdigest()
CRL = b"0\x03\x02\x01\x01"  # the bytes are served as stored


def _endpoint(crl: object = None) -> BundleEndpoint:
    snapshot = BundleSnapshot(TrustDomain("example.org"), (), 1)
    lookup = (lambda fp: CRL if fp == KNOWN else None) if crl is None else crl
    return BundleEndpoint(lambda: snapshot, refresh_hint=60, tls=None, crl=lookup)  # type: ignore[arg-type]


@given(st.text(max_size=300))
def test_any_name_is_404_unless_it_is_a_known_fingerprint(name: str) -> None:
    status, body = _endpoint()._crl_answer(name)
    if name == f"{KNOWN}.der":
        assert (status, body) == ("200 OK", CRL)
    else:
        assert status == "404 Not Found" and body.startswith(b'{"error"')


@given(st.binary(min_size=32, max_size=32))
def test_every_well_formed_unknown_fingerprint_is_looked_up_and_404(digest: bytes) -> None:
    asked: list[str] = []

    def lookup(fingerprint: str) -> bytes | None:
        asked.append(fingerprint)
        return None

    status, _ = _endpoint(lookup)._crl_answer(digest.hex() + ".der")
    assert asked == [digest.hex()] and status == "404 Not Found"


def test_malformed_names_never_reach_the_lookup() -> None:
    asked: list[str] = []

    def lookup(fingerprint: str) -> bytes | None:
        asked.append(fingerprint)
        return CRL

    endpoint = _endpoint(lookup)
    for name in (KNOWN.upper() + ".der", KNOWN, KNOWN[:-1] + ".der", "../" + KNOWN + ".der"):
        assert endpoint._crl_answer(name)[0] == "404 Not Found"
    assert asked == []


def test_without_crls_the_path_is_404() -> None:
    snapshot = BundleSnapshot(TrustDomain("example.org"), (), 1)
    endpoint = BundleEndpoint(lambda: snapshot, refresh_hint=60, tls=None)
    assert endpoint._crl_answer(KNOWN + ".der")[0] == "404 Not Found"


async def test_http_answers() -> None:
    endpoint = _endpoint()
    port = await endpoint.start("127.0.0.1", 0)
    try:

        async def get(request: bytes) -> bytes:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            return answer

        found = await get(f"GET /crl/{KNOWN}.der HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert found.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"Content-Type: application/pkix-crl\r\n" in found and found.endswith(CRL)
        head = await get(f"HEAD /crl/{KNOWN}.der HTTP/1.1\r\n\r\n".encode())
        assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
        assert (await get(b"POST /crl/x.der HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        query = await get(f"GET /crl/{KNOWN}.der?x=1 HTTP/1.1\r\n\r\n".encode())
        assert query.startswith(b"HTTP/1.1 200 OK")
        for bad in (b"GET /crl/\xff\xfe.der HTTP/1.1\r\n\r\n", b"GET /crl/%2e%2e HTTP/1.1\r\n\r\n"):
            assert (await get(bad)).startswith(b"HTTP/1.1 404")
        assert (await get(b"GET / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
    finally:
        await endpoint.stop()
