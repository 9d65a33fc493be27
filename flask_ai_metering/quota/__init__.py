"""Quota: periods, policies, and the atomic hold/commit statements on the counters."""

from __future__ import annotations

from .engine import LimitCheck

__all__ = ["LimitCheck"]
