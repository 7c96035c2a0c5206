"""Integration events: small versioned records, one Pydantic model each.

The NATS subject of an event is its type (`identity.class.upserted.v1`); each
producing service has one stream holding `<service>.>`. A model changes only
additively within a version; consumers ignore fields they do not know.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field


class IntegrationEvent(BaseModel):
    """Base of every event payload (`data` in the envelope)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    TYPE: ClassVar[str]
    DESCRIPTION: ClassVar[str] = ""

    def subject_id(self) -> str:
        """The aggregate id (`subject` in the envelope); events without an `id`
        field override this."""
        aggregate_id = self.__dict__.get("id")
        if aggregate_id is None:
            raise NotImplementedError(f"{type(self).__name__} must define subject_id()")
        return str(aggregate_id)


class Envelope(BaseModel):
    """The wire format of every event (CloudEvents-like)."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(description="事件唯一编号，也是 Nats-Msg-Id（去重）")
    type: str = Field(description="事件类型，如 identity.class.upserted.v1")
    source: str = Field(description="产生事件的服务")
    time: datetime = Field(description="事件发生时间（UTC）")
    subject: str = Field(description="聚合根编号")
    data: dict[str, Any] = Field(description="事件内容")

    @classmethod
    def wrap(cls, event: IntegrationEvent, *, source: str) -> Envelope:
        return cls(
            id=str(uuid.uuid4()),
            type=event.TYPE,
            source=source,
            time=datetime.now(UTC),
            subject=event.subject_id(),
            data=event.model_dump(mode="json"),
        )

    def parse(self) -> IntegrationEvent:
        return EVENT_TYPES[self.type].model_validate(self.data)


EVENT_TYPES: dict[str, type[IntegrationEvent]] = {}

E = TypeVar("E", bound=type[IntegrationEvent])


def event(type_name: str, description: str) -> Any:
    """Class decorator registering an event model under its versioned type."""

    def register(cls: E) -> E:
        if type_name in EVENT_TYPES:
            raise ValueError(f"duplicate event type {type_name}")
        producer = type_name.split(".", 1)[0]
        if producer not in STREAMS:
            raise ValueError(f"{type_name}: unknown producer {producer}")
        cls.TYPE = type_name
        cls.DESCRIPTION = description
        EVENT_TYPES[type_name] = cls
        return cls

    return register


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    description: str


STREAMS: dict[str, StreamSpec] = {
    producer: StreamSpec(producer.upper(), (f"{producer}.>",), f"{producer} 服务的集成事件")
    for producer in ("identity", "homework", "afterschool", "institutions", "funds")
}
DEAD_LETTER_STREAM = StreamSpec("DEADLETTER", ("deadletter.>",), "处理失败的事件（死信）")


def stream_of(type_name: str) -> StreamSpec:
    return STREAMS[type_name.split(".", 1)[0]]
