"""Events published by institutions."""

from __future__ import annotations
