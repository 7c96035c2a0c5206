"""The gateway's own tables: webhook subscriptions, their secrets, the
delivery log, and the tenant links learned from events."""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from chassis.db import UTCDateTime, new_metadata

metadata = new_metadata()

subscriptions = Table(
    "webhook_subscriptions",
    metadata,
    Column("id", String(36), primary_key=True),
    # The OAuth2 client that owns the subscription (token `client_id`).
    Column("owner", String(120), nullable=False, index=True),
    Column("url", String(2000), nullable=False),
    Column("description", String(500), nullable=True),
    Column("event_types", JSON, nullable=False),
    Column("tenants", JSON, nullable=False),
    Column("active", Boolean, nullable=False),
    Column("disabled_reason", String(300), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)

secrets = Table(
    "webhook_secrets",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column(
        "subscription_id",
        String(36),
        ForeignKey("webhook_subscriptions.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("secret", String(200), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    # Null while current; set when rotated out (both sign until then).
    Column("expires_at", UTCDateTime(), nullable=True),
)

deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(36), primary_key=True),
    Column(
        "subscription_id",
        String(36),
        ForeignKey("webhook_subscriptions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("event_id", String(36), nullable=False),
    Column("event_type", String(120), nullable=False),
    Column("payload", Text, nullable=False),
    # pending -> succeeded | failed (gave up after the retry window)
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", UTCDateTime(), nullable=True),
    # Retries stop after this (24 h after the event, or after a manual replay).
    Column("give_up_at", UTCDateTime(), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("last_attempt_at", UTCDateTime(), nullable=True),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("delivered_at", UTCDateTime(), nullable=True),
    Column("replays", Integer, nullable=False),
    UniqueConstraint("subscription_id", "event_id"),
)
Index("ix_webhook_deliveries_due", deliveries.c.status, deliveries.c.next_attempt_at)
Index("ix_webhook_deliveries_log", deliveries.c.subscription_id, deliveries.c.created_at)

attempts = Table(
    "webhook_attempts",
    metadata,
    Column(
        "id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    ),
    Column(
        "delivery_id",
        String(36),
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("attempted_at", UTCDateTime(), nullable=False),
    Column("duration_ms", Integer, nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("response_excerpt", Text, nullable=True),
)

# "school:<id>" -> "region:<id>", "class:<id>" -> "school:<id>", ... (see tenants.py)
tenant_links = Table(
    "webhook_tenant_links",
    metadata,
    Column("child", String(120), primary_key=True),
    Column("parent", String(120), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)
