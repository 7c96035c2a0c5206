"""Integration events: the only thing services share besides the chassis."""

from contracts import identity  # noqa: F401  (registers event types)
from contracts.base import EVENT_TYPES, STREAMS, Envelope, IntegrationEvent

__all__ = ["EVENT_TYPES", "STREAMS", "Envelope", "IntegrationEvent"]
