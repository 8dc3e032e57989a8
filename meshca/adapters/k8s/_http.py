"""A small blocking HTTP client over urllib for the Kubernetes adapters.

Call it through ``asyncio.to_thread``. It never follows redirects (a redirect would carry
our bearer credential to wherever the server points), reads at most ``max_bytes`` of a
body, and turns every transport failure into ``BackendUnavailable``. Non-2xx answers are
returned, not raised, so callers decide what a status means.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any

from meshca.core.errors import BackendUnavailable

__all__ = ["DEFAULT_MAX_BYTES", "HttpClient", "HttpResponse", "check_http_url"]

DEFAULT_MAX_BYTES = 1024 * 1024


def check_http_url(url: str, what: str) -> str:
    """Return ``url`` without a trailing slash, or raise ValueError unless it is http(s)."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"{what} must be an http:// or https:// URL, got {url!r}")
    return url.rstrip("/")


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        # Returning None makes urllib surface the 3xx as an HTTPError.
        return None


class HttpClient:
    """Issues requests with one TLS configuration.

    ``ca_file`` replaces the system trust store for https URLs; it is loaded here, so a
    missing or unreadable file is a configuration error raised by the constructor.
    """

    def __init__(self, *, ca_file: str | None = None, timeout: float = 5.0) -> None:
        context = ssl.create_default_context(cafile=ca_file)
        self._timeout = timeout
        self._opener = urllib.request.build_opener(
            _NoRedirects(), urllib.request.HTTPSHandler(context=context)
        )

    def request(
        self,
        url: str,
        *,
        what: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> HttpResponse:
        """Send one request; ``what`` names the peer in error messages."""
        request = urllib.request.Request(  # noqa: S310 - callers pass checked http(s) URLs
            url, data=body, method=method, headers=dict(headers or {})
        )
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                return HttpResponse(response.status, _read_limited(response, max_bytes, what))
        except urllib.error.HTTPError as error:
            if error.fp is None:
                return HttpResponse(error.code, b"")
            with error:
                return HttpResponse(error.code, _read_limited(error, max_bytes, what))
        except urllib.error.URLError as error:
            raise BackendUnavailable(f"{what} at {url} is unreachable: {error.reason}") from None
        except TimeoutError:
            raise BackendUnavailable(
                f"{what} at {url} did not answer within {self._timeout:g} s"
            ) from None
        except (OSError, http.client.HTTPException, ValueError) as error:
            raise BackendUnavailable(
                f"{what} at {url} failed: {type(error).__name__}: {error}"
            ) from None


def _read_limited(stream: IO[bytes], max_bytes: int, what: str) -> bytes:
    try:
        data = stream.read(max_bytes + 1)
    except (OSError, http.client.HTTPException) as error:
        raise BackendUnavailable(f"reading the answer of {what} failed: {error}") from None
    if len(data) > max_bytes:
        raise BackendUnavailable(f"{what} answered with more than {max_bytes} bytes")
    return data
