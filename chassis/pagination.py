"""Cursor pagination: `?limit=&cursor=` in, `next_cursor` out."""

from __future__ import annotations

import base64
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel
from sqlalchemy import Select
from sqlalchemy.ext.asyncio import AsyncSession

from chassis.errors import FieldError, Problem

T = TypeVar("T", bound=BaseModel)


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_cursor: str | None = None


class PageParams:
    def __init__(
        self,
        limit: Annotated[int, Query(ge=1, le=500, description="每页条数")] = 50,
        cursor: Annotated[str | None, Query(description="上一页返回的 next_cursor")] = None,
    ) -> None:
        self.limit = limit
        self.cursor = cursor


async def page_params(
    limit: Annotated[int, Query(ge=1, le=500, description="每页条数")] = 50,
    cursor: Annotated[str | None, Query(description="上一页返回的 next_cursor")] = None,
) -> PageParams:
    # An async function, not the class itself: FastAPI would run a class
    # dependency in its thread pool.
    return PageParams(limit=limit, cursor=cursor)


PageQuery = Annotated[PageParams, Depends(page_params)]


def encode_cursor(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        raise Problem(
            422, "分页游标无效。", errors=[FieldError(field="query.cursor", message="游标无效")]
        ) from None


async def paginate(
    session: AsyncSession, query: Select[Any], key: Any, page: PageParams, model: type[T]
) -> Page[T]:
    """Keyset pagination on a unique, ordered string `key` column."""
    if page.cursor:
        query = query.where(key > decode_cursor(page.cursor))
    rows = list((await session.scalars(query.order_by(key).limit(page.limit + 1))).all())
    more = len(rows) > page.limit
    rows = rows[: page.limit]
    items = [model.model_validate(r, from_attributes=True) for r in rows]
    next_cursor = encode_cursor(str(getattr(rows[-1], key.key))) if more and rows else None
    return Page[model](items=items, next_cursor=next_cursor)  # type: ignore[valid-type]
