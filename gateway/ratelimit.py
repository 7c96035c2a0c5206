"""Token-bucket rate limits per client and per address (GW-04).

A request is checked against the first rule that matches it; the rule can
hold a bucket per client (the token's `client_id`, else its `sub`) and a
bucket per address. A request passes only if every bucket it touches has a
token, and then takes one from each.

One replica keeps the buckets in memory. With `REDIS_URL` every replica
shares them through one atomic Lua script (one round trip per request);
if Redis is unreachable the gateway falls back to its own memory for a
few seconds rather than refuse every request.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import structlog

from gateway.config import Limit, RateLimitRule
from gateway.edge import compile_pattern, method_set

log = structlog.get_logger("gateway.ratelimit")

# (key, refill per second, burst)
Bucket = tuple[str, float, int]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after: float = 0.0
    rule: str = ""
    scope: str = ""  # "client" | "ip": the bucket that ran dry


ALLOWED = Decision(True)


@lru_cache(maxsize=256)
def _allowed(rule: str) -> Decision:
    return Decision(True, rule=rule)


class BucketStore(Protocol):
    async def take(self, buckets: Sequence[Bucket]) -> tuple[float, int]:
        """(0, -1) when allowed, else (seconds to wait, index of the dry bucket)."""
        ...

    async def close(self) -> None: ...


class MemoryBuckets:
    def __init__(self, max_keys: int = 200_000) -> None:
        self._state: dict[str, list[float]] = {}  # key -> [tokens, at, rate, burst]
        self.max_keys = max_keys
        self._last_sweep = time.monotonic()

    async def take(self, buckets: Sequence[Bucket]) -> tuple[float, int]:
        return self.take_now(buckets, time.monotonic())

    def take_now(self, buckets: Sequence[Bucket], now: float) -> tuple[float, int]:
        state = self._state
        wait, dry = 0.0, -1
        touched = []
        for i, (key, rate, burst) in enumerate(buckets):
            st = state.get(key)
            if st is None:
                # A new bucket is full (as a bucket that refilled completely).
                tokens = float(burst)
                st = state[key] = [tokens, now, rate, burst]
            else:
                tokens = st[0] + (now - st[1]) * rate
                if tokens > burst:
                    tokens = float(burst)
                st[0], st[1], st[2], st[3] = tokens, now, rate, burst  # in place
            if tokens < 1.0:
                need = (1.0 - tokens) / rate
                if need > wait:
                    wait, dry = need, i
            touched.append(st)
        if dry < 0:  # every bucket has a token: take one from each
            for st in touched:
                st[0] -= 1.0
        if now - self._last_sweep > 60 or len(state) > self.max_keys:
            self._sweep(now)
        return wait, dry

    def _sweep(self, now: float) -> None:
        # A bucket that has refilled completely is the same as no bucket.
        self._last_sweep = now
        full = [
            k for k, (t, at, rate, burst) in self._state.items() if t + (now - at) * rate >= burst
        ]
        for k in full:
            del self._state[k]

    async def close(self) -> None:
        return None


# Buckets as hashes {t: tokens, ts: ms}; the clock is Redis's, so replicas
# with skewed clocks agree. Returns the wait in microseconds (0 = allowed)
# and the 1-based index of the bucket that ran dry.
LUA_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local levels = {}
local wait = 0
local dry = 0
for i = 1, n do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local v = redis.call('HMGET', KEYS[i], 't', 'ts')
  local tokens = tonumber(v[1])
  local ts = tonumber(v[2])
  if tokens == nil or ts == nil then
    tokens = burst
  else
    tokens = math.min(burst, tokens + math.max(0, now - ts) * rate)
  end
  if tokens < 1 then
    local need = (1 - tokens) / rate
    if need > wait then
      wait = need
      dry = i
    end
  end
  levels[i] = tokens
end
for i = 1, n do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tokens = levels[i]
  if dry == 0 then tokens = tokens - 1 end
  redis.call('HSET', KEYS[i], 't', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], math.ceil(burst / rate) + 1000)
end
return {math.ceil(wait * 1000), dry}
"""


class RedisBuckets:
    def __init__(
        self, url: str, *, prefix: str = "gw:rl:", fallback_seconds: float = 5.0, client: Any = None
    ) -> None:
        import redis.asyncio as aioredis

        self.prefix = prefix
        self.client = client or aioredis.from_url(
            url, socket_timeout=0.5, socket_connect_timeout=0.5, health_check_interval=30
        )
        self._script = self.client.register_script(LUA_TAKE)
        self._fallback = MemoryBuckets()
        self._fallback_until = 0.0
        self.fallback_seconds = fallback_seconds

    async def take(self, buckets: Sequence[Bucket]) -> tuple[float, int]:
        now = time.monotonic()
        if now < self._fallback_until:
            return self._fallback.take_now(buckets, now)
        keys = [self.prefix + b[0] for b in buckets]
        args: list[Any] = []
        for _, rate, burst in buckets:
            args += [rate / 1000.0, burst]  # tokens per millisecond
        try:
            wait_us, dry = await self._script(keys=keys, args=args)
        except Exception as exc:  # redis down, timeout, script error
            log.warning("rate_limit_redis_unavailable", error=repr(exc))
            self._fallback_until = now + self.fallback_seconds
            return self._fallback.take_now(buckets, now)
        return int(wait_us) / 1_000_000, int(dry) - 1

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except Exception:
            return False

    async def close(self) -> None:
        await self.client.aclose()


@dataclass(frozen=True)
class _CompiledRule:
    name: str
    methods: frozenset[str] | None
    pattern: re.Pattern[str]
    per_client: Limit | None
    per_ip: Limit | None

    @property
    def allowed(self) -> Decision:
        return _allowed(self.name)


class RateLimiter:
    def __init__(self, rules: Iterable[RateLimitRule], store: BucketStore) -> None:
        self.rules = [
            _CompiledRule(
                r.name, method_set(r.methods), compile_pattern(r.path), r.per_client, r.per_ip
            )
            for r in rules
        ]
        self.store = store
        self._memory = store if isinstance(store, MemoryBuckets) else None
        # (rule, client, address) -> its buckets and their scopes: the keys
        # are built once per caller, not per request (cleared when large).
        self._keyed: dict[tuple[int, str | None, str], tuple[list[Bucket], list[str]]] = {}

    def rule_for(self, method: str, path: str) -> _CompiledRule | None:
        for rule in self.rules:
            if (rule.methods is None or method in rule.methods) and rule.pattern.match(path):
                return rule
        return None

    def _buckets(
        self, rule: _CompiledRule, client: str | None, ip: str
    ) -> tuple[list[Bucket], list[str]]:
        buckets: list[Bucket] = []
        scopes: list[str] = []
        if rule.per_client is not None and client:
            buckets.append(
                (f"{rule.name}:c:{client}", rule.per_client.per_second, rule.per_client.burst)
            )
            scopes.append("client")
        if rule.per_ip is not None and ip:
            buckets.append((f"{rule.name}:ip:{ip}", rule.per_ip.per_second, rule.per_ip.burst))
            scopes.append("ip")
        return buckets, scopes

    def check_now(self, method: str, path: str, client: str | None, ip: str) -> Decision | None:
        """The decision without awaiting, when the buckets are in memory;
        None when they are in Redis (then `await check(...)`)."""
        if self._memory is None:
            return None
        rule = self.rule_for(method, path)
        if rule is None:
            return ALLOWED
        keyed = self._keyed
        found = keyed.get((id(rule), client, ip))  # rules live as long as self
        if found is None:
            if len(keyed) >= 10_000:
                keyed.clear()
            found = keyed[id(rule), client, ip] = self._buckets(rule, client, ip)
        buckets, scopes = found
        if not buckets:
            return rule.allowed
        wait, dry = self._memory.take_now(buckets, time.monotonic())
        if dry < 0:
            return rule.allowed
        return Decision(False, retry_after=wait, rule=rule.name, scope=scopes[dry])

    async def check(self, method: str, path: str, client: str | None, ip: str) -> Decision:
        rule = self.rule_for(method, path)
        if rule is None:
            return ALLOWED
        buckets, scopes = self._buckets(rule, client, ip)
        if not buckets:
            return rule.allowed
        wait, dry = await self.store.take(buckets)
        if dry < 0:
            return rule.allowed
        return Decision(False, retry_after=wait, rule=rule.name, scope=scopes[dry])

    async def close(self) -> None:
        await self.store.close()


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
