"""Events published by funds."""

from __future__ import annotations
