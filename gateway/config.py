"""Gateway settings (prefix GATEWAY_; `REDIS_URL` without prefix, as in deploy/).

Lists and maps (public routes, rate limits, per-upstream timeouts) are JSON in
the environment, e.g.

    GATEWAY_UPSTREAM_TIMEOUTS='{"funds": 30}'
    GATEWAY_RATE_LIMITS='[{"name": "default", "path": "/api/v1/**",
                           "per_client": {"per_second": 50, "burst": 200}}]'
"""

from __future__ import annotations

from pydantic import AliasChoices, BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from chassis.config import DOMAIN_SERVICES, SERVICE_PORTS, PlatformSettings

GATEWAY_SERVICE = "gateway"


class PublicRoute(BaseModel):
    """A route that passes the edge without a token (the service may still
    check one itself). `path` is relative to the service (`/oauth/token`);
    `*` matches within one path segment, `**` matches any rest."""

    service: str
    methods: list[str] = Field(default_factory=lambda: ["GET"])
    path: str


class Limit(BaseModel):
    """Token bucket: `per_second` refill rate, `burst` bucket size."""

    per_second: float = Field(gt=0)
    burst: int = Field(ge=1)


class RateLimitRule(BaseModel):
    """The first rule whose methods and path match a request applies to it.

    `path` is the full gateway path (`/api/v1/identity/oauth/token`), with the
    same `*` / `**` wildcards as public routes."""

    name: str
    methods: list[str] = Field(default_factory=lambda: ["*"])
    path: str
    per_client: Limit | None = None
    per_ip: Limit | None = None


DEFAULT_PUBLIC_ROUTES: list[PublicRoute] = [
    # OAuth2 token endpoint (password, client credentials, refresh) and discovery.
    PublicRoute(service="identity", methods=["POST"], path="/oauth/token"),
    PublicRoute(service="identity", methods=["GET"], path="/.well-known/**"),
    # Holiday arrangements are public.
    PublicRoute(service="identity", methods=["GET"], path="/calendar/holidays/**"),
    # White/black lists, compliance-code verification, public trainer data (INST-04/05).
    PublicRoute(service="institutions", methods=["GET"], path="/public/**"),
    # Anyone may report an institution, anonymously (INST-07).
    PublicRoute(service="institutions", methods=["POST"], path="/public/complaints"),
    # The school's daily list and weekly publicity (HW-01, HW-07).
    PublicRoute(service="homework", methods=["GET"], path="/public/**"),
]

DEFAULT_RATE_LIMITS: list[RateLimitRule] = [
    # Password guessing: per address, whoever the caller claims to be.
    RateLimitRule(
        name="login",
        methods=["POST"],
        path="/api/v1/identity/oauth/token",
        per_ip=Limit(per_second=20 / 60, burst=10),
    ),
    # Anonymous complaints (INST-07): a flood would bury the real ones.
    RateLimitRule(
        name="complaints",
        methods=["POST"],
        path="/api/v1/institutions/public/complaints",
        per_ip=Limit(per_second=5 / 60, burst=5),
    ),
    # Enrollment opens at one minute for thousands of parents (AS-04): a
    # script pressing the button must not crowd out people.
    RateLimitRule(
        name="enrollment",
        methods=["POST", "PUT", "PATCH", "DELETE"],
        path="/api/v1/afterschool/**enrollment**",
        per_client=Limit(per_second=1, burst=5),
        per_ip=Limit(per_second=50, burst=100),
    ),
    RateLimitRule(
        name="default",
        path="/api/v1/**",
        per_client=Limit(per_second=20, burst=100),
        per_ip=Limit(per_second=200, burst=400),
    ),
]

# Personal data of minors and staff does not leave the platform.
DEFAULT_WEBHOOK_DENIED = [
    "identity.student.*",
    "identity.guardian.*",
    "identity.teacher.*",
]
# Public information: delivered to every subscriber of the type, whatever its tenants.
DEFAULT_WEBHOOK_PUBLIC = ["identity.calendar.holidays.v1"]


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = SERVICE_PORTS["gateway"]
    upstream_identity: str = f"http://127.0.0.1:{SERVICE_PORTS['identity']}"
    upstream_homework: str = f"http://127.0.0.1:{SERVICE_PORTS['homework']}"
    upstream_afterschool: str = f"http://127.0.0.1:{SERVICE_PORTS['afterschool']}"
    upstream_institutions: str = f"http://127.0.0.1:{SERVICE_PORTS['institutions']}"
    upstream_funds: str = f"http://127.0.0.1:{SERVICE_PORTS['funds']}"
    # Whole request (headers and body); per service in `upstream_timeouts`.
    upstream_timeout_seconds: float = 15.0
    upstream_timeouts: dict[str, float] = Field(default_factory=dict)
    connect_timeout_seconds: float = 2.0
    max_body_bytes: int = 10 * 1024 * 1024
    # Peers whose X-Forwarded-For is believed (the ingress controller), as CIDRs.
    trusted_proxies: list[str] = Field(default_factory=list)
    # Who may read /metrics (direct connections only, never through a proxy).
    metrics_networks: list[str] = Field(
        default_factory=lambda: [
            "127.0.0.0/8",
            "::1/128",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "fc00::/7",
        ]
    )
    access_log: bool = True

    public_routes: list[PublicRoute] = Field(default_factory=lambda: list(DEFAULT_PUBLIC_ROUTES))
    token_cache_size: int = 10_000

    rate_limit_enabled: bool = True
    rate_limits: list[RateLimitRule] = Field(default_factory=lambda: list(DEFAULT_RATE_LIMITS))
    redis_url: str = Field(
        default="", validation_alias=AliasChoices("REDIS_URL", "GATEWAY_REDIS_URL")
    )
    redis_key_prefix: str = "gw:rl:"

    # Merged OpenAPI: re-fetched on this period, sooner while a service is missing.
    docs_refresh_seconds: float = 300.0
    docs_retry_seconds: float = 5.0
    docs_fetch_timeout_seconds: float = 5.0

    # Webhooks (GW-05): the gateway's own database and JetStream consumers.
    webhooks_enabled: bool = True
    database_url: str = ""
    run_migrations: bool = True
    db_pool_size: int = 5
    webhook_scope: str = "webhooks"
    webhook_allow_http: bool = False
    webhook_allow_private_targets: bool = False
    webhook_timeout_seconds: float = 10.0
    webhook_retry_base_seconds: float = 5.0
    webhook_retry_max_delay_seconds: float = 2 * 3600.0
    webhook_retry_window_seconds: float = 24 * 3600.0
    webhook_poll_seconds: float = 1.0
    webhook_batch: int = 50
    webhook_concurrency: int = 20
    webhook_denied_event_types: list[str] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_DENIED)
    )
    webhook_public_event_types: list[str] = Field(
        default_factory=lambda: list(DEFAULT_WEBHOOK_PUBLIC)
    )
    # An event naming a school or institution whose region the gateway has not
    # learned yet is retried for this long before region subscribers miss it.
    webhook_tenant_wait_seconds: float = 60.0
    webhook_secret_overlap_seconds: int = 24 * 3600
    webhook_log_retention_days: int = 30
    webhook_max_subscriptions: int = 20

    def upstreams(self) -> dict[str, str]:
        return {name: getattr(self, f"upstream_{name}").rstrip("/") for name in DOMAIN_SERVICES}

    def timeout_for(self, service: str) -> float:
        return self.upstream_timeouts.get(service, self.upstream_timeout_seconds)

    def resolved_database_url(self, platform: PlatformSettings) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{platform.var_dir / 'gateway.sqlite3'}"
