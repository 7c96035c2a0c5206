"""Integration events: the only thing services share besides the chassis."""

# Importing a module registers its event types.
from contracts import afterschool, funds, homework, identity, institutions  # noqa: F401
from contracts.base import EVENT_TYPES, STREAMS, Envelope, IntegrationEvent

__all__ = ["EVENT_TYPES", "STREAMS", "Envelope", "IntegrationEvent"]
