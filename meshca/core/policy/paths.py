"""HTTP path normalization: the one form of a path that policies are matched against.

``normalize_path`` either returns the normalized path or raises ``AmbiguousPath``; the
evaluator denies a request whose path it cannot normalize. The rules (docs/policy.md):

1. The query (from the first ``?``) and the fragment (from the first ``#``) are cut off.
   An empty path is ``/``; any other path must start with ``/``.
2. Refused: characters outside printable ASCII (controls, spaces, NUL, non-ASCII bytes),
   a backslash, a ``;`` (path parameters), a ``%`` not followed by two hex digits.
3. Percent-escapes are decoded once. Refused: an encoded ``/`` (``%2F``) or ``\\``
   (``%5C``), an encoded control character or NUL, decoded bytes that are not UTF-8, and
   an escape that decodes to another escape (``%2561`` -> ``%61``: double encoding).
4. Dot segments are removed as RFC 3986 section 5.2.4 says (``..`` never climbs above
   ``/``), then runs of ``/`` are merged into one. A path for which removing dot segments
   before or after merging slashes gives different results (``/a//../b``) is refused:
   servers disagree on it.
5. Case is kept: ``/Admin`` is not ``/admin`` (as in Istio). Methods are upper-cased by the
   evaluator, hosts lower-cased.
"""

from __future__ import annotations

from meshca.core.errors import AmbiguousPath

__all__ = ["MAX_PATH_BYTES", "normalize_path"]

#: Longer paths are refused (Envoy's default header limit is 60 KiB in total).
MAX_PATH_BYTES = 16 * 1024

_HEX = frozenset("0123456789abcdefABCDEF")
_FORBIDDEN_DECODED = {0x2F: "an encoded '/' (%2F)", 0x5C: "an encoded '\\' (%5C)"}


def _shown(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def normalize_path(raw: str) -> str:
    """The normalized form of the request target ``raw``; raises ``AmbiguousPath``."""
    if len(raw) > MAX_PATH_BYTES:
        raise AmbiguousPath(f"path is longer than {MAX_PATH_BYTES} bytes")
    end = len(raw)
    for stop in ("?", "#"):
        index = raw.find(stop)
        if index != -1:
            end = min(end, index)
    path = raw[:end]
    if not path:
        return "/"
    if not path.startswith("/"):
        raise AmbiguousPath(f"path {_shown(raw)} does not start with '/'")
    for char in path:
        code = ord(char)
        if code <= 0x20 or code >= 0x7F:
            raise AmbiguousPath(
                f"path {_shown(raw)} contains a control, space or non-ASCII character"
            )
        if char == "\\":
            raise AmbiguousPath(f"path {_shown(raw)} contains a backslash")
        if char == ";":
            raise AmbiguousPath(f"path {_shown(raw)} contains ';' (path parameters)")
    decoded = _percent_decode(path, raw) if "%" in path else path
    return _remove_dots_and_merge(decoded, raw)


def _percent_decode(path: str, raw: str) -> str:
    out = bytearray()
    escaped_percent_at: list[int] = []
    i = 0
    while i < len(path):
        char = path[i]
        if char != "%":
            out.append(ord(char))
            i += 1
            continue
        pair = path[i + 1 : i + 3]
        if len(pair) != 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            raise AmbiguousPath(f"path {_shown(raw)} has a '%' that is not a valid escape")
        value = int(pair, 16)
        if value in _FORBIDDEN_DECODED:
            raise AmbiguousPath(f"path {_shown(raw)} contains {_FORBIDDEN_DECODED[value]}")
        if value < 0x20 or value == 0x7F:
            raise AmbiguousPath(f"path {_shown(raw)} contains an encoded control character")
        if value == 0x25:
            escaped_percent_at.append(len(out))
        out.append(value)
        i += 3
    for at in escaped_percent_at:
        following = out[at + 1 : at + 3]
        if len(following) == 2 and chr(following[0]) in _HEX and chr(following[1]) in _HEX:
            raise AmbiguousPath(f"path {_shown(raw)} is percent-encoded twice")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise AmbiguousPath(f"path {_shown(raw)} decodes to bytes that are not UTF-8") from None


def _remove_dot_segments(segments: list[str]) -> list[str]:
    """RFC 3986 5.2.4 over the segments after the leading '/'; keeps a trailing '/'."""
    output: list[str] = []
    last = len(segments) - 1
    for index, segment in enumerate(segments):
        if segment == ".":
            if index == last:
                output.append("")
        elif segment == "..":
            if output:
                output.pop()
            if index == last:
                output.append("")
        else:
            output.append(segment)
    return output


def _merge(segments: list[str]) -> list[str]:
    """Drop empty segments except a final one (the trailing '/')."""
    merged = [s for s in segments[:-1] if s]
    if segments:
        merged.append(segments[-1])
    return merged


def _join(segments: list[str]) -> str:
    return "/" + "/".join(segments)


def _remove_dots_and_merge(path: str, raw: str) -> str:
    segments = path[1:].split("/")
    if "." not in segments and ".." not in segments:
        return _join(_merge(segments)) if "//" in path else path
    dots_then_merge = _join(_merge(_remove_dot_segments(segments)))
    if "//" in path:
        merge_then_dots = _join(_remove_dot_segments(_merge(segments)))
        if merge_then_dots != dots_then_merge:
            raise AmbiguousPath(
                f"path {_shown(raw)} mixes '//' and dot segments: servers disagree on it"
            )
    return dots_then_merge
