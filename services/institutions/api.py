"""institutions's HTTP routes (the domain endpoints arrive with the service's own issue)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
