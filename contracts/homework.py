"""Events published by homework."""

from __future__ import annotations
