"""Value matchers used by policy rules: strings with ``*`` patterns, IP blocks and ports.

A matcher is built once when a policy is compiled and tested on every request, so each is
a small frozen value with a fast ``test``. ``test(None)`` (an attribute the request does
not have) is always False: a positive field never matches an absent value, and a ``not``
field therefore always lets it through, as in Istio.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network
from typing import Protocol

__all__ = [
    "HostMatcher",
    "IpMatcher",
    "Matcher",
    "PortMatcher",
    "StringMatcher",
    "parse_ip",
    "split_host",
]

IpAddress = IPv4Address | IPv6Address
IpNetwork = IPv4Network | IPv6Network


class Matcher(Protocol):
    """Tests one request attribute; ``written`` is what the policy said, for messages."""

    @property
    def written(self) -> tuple[str, ...]: ...

    def test(self, value: object) -> bool: ...


@dataclass(frozen=True, slots=True)
class StringMatcher:
    """Exact values, prefixes (``abc*``), suffixes (``*abc``) and presence (``*``).

    Patterns are compiled by the schema; ``prefixes`` and ``suffixes`` hold the fixed part.
    With ``fold_case`` both sides are compared lowercased (the schema lowercases the
    patterns; requests are lowercased here).
    """

    written: tuple[str, ...]
    exact: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()
    any: bool = False
    fold_case: bool = False

    @classmethod
    def of(
        cls,
        patterns: tuple[str, ...],
        *,
        written: tuple[str, ...] | None = None,
        fold_case: bool = False,
    ) -> StringMatcher:
        """Compile ``patterns`` (already validated: ``*`` only at one end, never empty)."""
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        any_value = False
        for pattern in patterns:
            text = pattern.lower() if fold_case else pattern
            if text == "*":
                any_value = True
            elif text.endswith("*"):
                prefixes.append(text[:-1])
            elif text.startswith("*"):
                suffixes.append(text[1:])
            else:
                exact.add(text)
        return cls(
            written=patterns if written is None else written,
            exact=frozenset(exact),
            prefixes=tuple(prefixes),
            suffixes=tuple(suffixes),
            any=any_value,
            fold_case=fold_case,
        )

    def test(self, value: object) -> bool:
        if not isinstance(value, str) or not value:
            return False
        if self.any:
            return True
        if self.fold_case:
            value = value.lower()
        if value in self.exact:
            return True
        # str.startswith/endswith take a tuple: one call instead of a loop per pattern.
        return (bool(self.prefixes) and value.startswith(self.prefixes)) or (
            bool(self.suffixes) and value.endswith(self.suffixes)
        )

    def covers(self, other: StringMatcher) -> bool:
        """True if every value ``other`` matches is matched here (a safe under-estimate)."""
        if self.any:
            return True
        if other.any:
            return False
        return (
            all(self.test(v) for v in other.exact)
            and all(any(p.startswith(q) for q in self.prefixes) for p in other.prefixes)
            and all(any(s.endswith(t) for t in self.suffixes) for s in other.suffixes)
        )


def split_host(host: str) -> str | None:
    """``host:port`` -> ``host`` (``[v6]:port`` -> ``[v6]``); None when there is no port."""
    if host.endswith("]") or ":" not in host:
        return None
    name, _, port = host.rpartition(":")
    if not port.isdigit() or (":" in name and not name.endswith("]")):
        return None
    return name


@dataclass(frozen=True, slots=True)
class HostMatcher:
    """Hosts, case-insensitively; ``host:port`` also matches the pattern for ``host``."""

    strings: StringMatcher

    @property
    def written(self) -> tuple[str, ...]:
        return self.strings.written

    def test(self, value: object) -> bool:
        if not isinstance(value, str):
            return False
        if self.strings.test(value):
            return True
        bare = split_host(value)
        return bare is not None and self.strings.test(bare)


@dataclass(frozen=True, slots=True)
class IpMatcher:
    """Addresses in any of the CIDR blocks (a bare address is a /32 or /128)."""

    written: tuple[str, ...]
    networks: tuple[IpNetwork, ...]

    @classmethod
    def of(cls, blocks: tuple[str, ...]) -> IpMatcher:
        """Compile validated blocks; raises ValueError for one that is not an address/CIDR."""
        return cls(blocks, tuple(ip_network(b, strict=False) for b in blocks))

    def test(self, value: object) -> bool:
        if not isinstance(value, IPv4Address | IPv6Address):
            return False
        return any(value.version == n.version and value in n for n in self.networks)


@dataclass(frozen=True, slots=True)
class PortMatcher:
    written: tuple[str, ...]
    ports: frozenset[int]

    def test(self, value: object) -> bool:
        return isinstance(value, int) and value in self.ports


def parse_ip(text: str | None) -> IpAddress | None:
    """An address from a request, or None when it is absent or not an address."""
    if not text:
        return None
    try:
        return ip_address(text)
    except ValueError:
        return None
