"""A short-lived cache of verified access tokens for funds' hot path.

Verifying an Ed25519-signed JWT costs about a millisecond of CPU, as much as
the rest of a grouped posting request. The cache maps the exact token string
(whose signature was verified) to its Principal for at most ``TTL_SECONDS``
and never past the token's own ``exp``; a token never seen, altered or
expired goes through the full verification. Bounded; oldest entries go first.
"""

from __future__ import annotations

import base64
import json
import time
from collections import OrderedDict

from chassis.auth import Principal, TokenVerifier

TTL_SECONDS = 30.0
MAX_ENTRIES = 4096


class CachingVerifier:
    def __init__(self, inner: TokenVerifier, *, ttl: float = TTL_SECONDS) -> None:
        self.inner = inner
        self.ttl = ttl
        self._cache: OrderedDict[str, tuple[float, Principal]] = OrderedDict()

    def __getattr__(self, name: str) -> object:  # issuer, audience, keys …
        return getattr(self.inner, name)

    async def verify(self, token: str) -> Principal:
        now = time.time()
        hit = self._cache.get(token)
        if hit is not None and hit[0] > now:
            return hit[1]
        principal = await self.inner.verify(token)  # raises when invalid
        until = now + self.ttl
        exp = _exp(token)
        if exp is not None:
            until = min(until, exp)
        if until > now:
            self._cache[token] = (until, principal)
            self._cache.move_to_end(token)
            while len(self._cache) > MAX_ENTRIES:
                self._cache.popitem(last=False)
        return principal


def _exp(token: str) -> float | None:
    try:
        segment = token.split(".")[1]
        payload = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
        return float(payload["exp"])
    except (IndexError, ValueError, KeyError, TypeError):
        return None
