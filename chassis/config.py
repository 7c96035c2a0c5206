"""Settings from the environment (pydantic-settings).

Two layers: `PlatformSettings` is shared by every process (NATS, token
verification, where embedded data lives); `ServiceSettings` is per service
with its own prefix (`HOMEWORK_DATABASE_URL`, `FUNDS_PORT`, ...).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent

SERVICE_PORTS: dict[str, int] = {
    "gateway": 8000,
    "identity": 8001,
    "homework": 8002,
    "afterschool": 8003,
    "institutions": 8004,
    "funds": 8005,
}
DOMAIN_SERVICES = ("identity", "homework", "afterschool", "institutions", "funds")


class PlatformSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore")

    nats_url: str = Field(default="nats://127.0.0.1:4222", validation_alias="NATS_URL")
    var_dir: Path = Field(default=REPO_ROOT / "var", validation_alias="VAR_DIR")
    auth_jwks_url: str = Field(
        default="http://127.0.0.1:8001/.well-known/jwks.json", validation_alias="AUTH_JWKS_URL"
    )
    auth_issuer: str = Field(
        default="https://identity.shuangjian.local", validation_alias="AUTH_ISSUER"
    )
    auth_audience: str = Field(default="shuangjian", validation_alias="AUTH_AUDIENCE")
    # Key of the identity-number hash shared by identity and institutions (INST-05).
    id_hash_pepper: str = Field(
        default="dev-only-pepper-change-me", validation_alias="ID_HASH_PEPPER"
    )
    log_level: str = Field(default="INFO", validation_alias="LOG_LEVEL")
    log_json: bool = Field(default=True, validation_alias="LOG_JSON")
    # At the end of start-up, gc.collect() then gc.freeze(): the start-up heap
    # (modules, models, routes) leaves the collector's reach, so a full
    # collection under load takes ~1 ms instead of 50-60 ms of stalled
    # requests. `shuangjian serve` turns it on; off by default so a test
    # process that starts many apps does not pin each one's heap.
    gc_freeze: bool = Field(default=False, validation_alias="GC_FREEZE")

    @property
    def nats_servers(self) -> list[str]:
        return [s.strip() for s in self.nats_url.split(",") if s.strip()]


class ServiceSettings(BaseSettings):
    """One service's own settings; build with `service_settings(name)`."""

    model_config = SettingsConfigDict(extra="ignore")

    name: str
    host: str = "127.0.0.1"
    port: int = 0
    database_url: str = ""
    run_migrations: bool = True
    db_pool_size: int = 10
    relay_batch_size: int = 256
    # Seconds between runs of each periodic job, by job name (JSON in the
    # environment); a job not named keeps its default, 0 switches it off.
    job_intervals: dict[str, float] = {}
    # How long a verified access token is remembered (bounds how long a
    # withdrawn signing key still works); 0 verifies every request.
    token_cache_seconds: float = 30.0

    def resolved_database_url(self, platform: PlatformSettings) -> str:
        if self.database_url:
            return self.database_url
        path = platform.var_dir / f"{self.name}.sqlite3"
        return f"sqlite+aiosqlite:///{path}"


def service_settings(name: str, **overrides: object) -> ServiceSettings:
    """Settings of one service, read from `<NAME>_*` environment variables."""
    service_name, default_port = name, SERVICE_PORTS.get(name, 0)

    class _Settings(ServiceSettings):
        model_config = SettingsConfigDict(env_prefix=f"{service_name.upper()}_", extra="ignore")
        name: str = service_name
        port: int = default_port

    return _Settings(**overrides)  # type: ignore[arg-type]


@lru_cache
def platform_settings() -> PlatformSettings:
    return PlatformSettings()
