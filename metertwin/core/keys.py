"""The key prefix every capability's keys start with; each capability owns its own keys module."""

from __future__ import annotations

PREFIX = "mt"
