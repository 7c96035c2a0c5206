"""Events published by afterschool."""

from __future__ import annotations
