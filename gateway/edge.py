"""What the edge decides before a request goes anywhere: is the route public,
who is calling (token verified once, result cached), from which address."""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable
from functools import lru_cache

from chassis.auth import Principal, TokenVerifier
from gateway.config import PublicRoute

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """`*` matches inside one path segment, `**` matches anything (also `/`)."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def method_set(methods: Iterable[str]) -> frozenset[str] | None:
    """None means every method."""
    upper = frozenset(m.upper() for m in methods)
    return None if "*" in upper else upper


class PublicRoutes:
    def __init__(self, routes: Iterable[PublicRoute]) -> None:
        self._by_service: dict[str, list[tuple[frozenset[str] | None, re.Pattern[str]]]] = {}
        for r in routes:
            self._by_service.setdefault(r.service, []).append(
                (method_set(r.methods), compile_pattern(r.path))
            )

    def matches(self, service: str, method: str, path: str) -> bool:
        for methods, pattern in self._by_service.get(service, ()):
            if (methods is None or method in methods) and pattern.match(path):
                return True
        return False


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def in_networks(address: str, networks: tuple[IPNetwork, ...]) -> bool:
    if not networks or not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in n for n in networks)


def client_address(peer: str, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]) -> str:
    """The caller's address: the peer, unless the peer is a trusted proxy, in
    which case the right-most X-Forwarded-For entry that is not one."""
    if not forwarded_for or not trusted or not in_networks(peer, trusted):
        return peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",")]):
        if hop and not in_networks(hop, trusted):
            return hop
    return peer


class CachedVerifier:
    """Signature checks are the edge's main cost; a token verified once is
    remembered until it expires (at most `max_age` seconds). A token is
    immutable, so the answer cannot change except by key removal, which the
    short `max_age` bounds."""

    def __init__(
        self, verifier: TokenVerifier, *, size: int = 10_000, max_age: float = 300.0
    ) -> None:
        self.verifier = verifier
        self.size = size
        self.max_age = max_age
        self._cache: dict[str, tuple[Principal, float]] = {}

    def cached(self, token: str) -> Principal | None:
        """The principal of a token verified before and not yet expired."""
        hit = self._cache.get(token)
        if hit is not None and hit[1] > time.time():
            return hit[0]
        return None

    async def verify(self, token: str) -> Principal:
        hit = self._cache.get(token)
        now = time.time()
        if hit is not None:
            if hit[1] > now:
                return hit[0]
            del self._cache[token]
        principal = await self.verifier.verify(token)
        exp = principal.claims.get("exp")
        until = now + self.max_age
        if isinstance(exp, int | float):
            until = min(until, float(exp))
        if self.size > 0:
            if len(self._cache) >= self.size:
                # Drop the oldest eighth (dicts keep insertion order).
                for key in list(self._cache)[: max(1, self.size // 8)]:
                    self._cache.pop(key, None)
            self._cache[token] = (principal, until)
        return principal
