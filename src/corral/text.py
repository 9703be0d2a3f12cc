"""Cutting text for people to read (tables, alerts, traces, the dashboard): the cut is always visible.
Nothing an agent wrote (a command, an argv, a reason) is ever shortened silently."""

from __future__ import annotations


def clip(text: str, limit: int) -> str:
    """At most `limit` characters, the last of them "…" where any were cut."""
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def clip_counted(text: str, limit: int, marker: str = "… (+{n} characters)") -> str:
    """The first `limit` characters, then `marker` saying how many more there were."""
    return text if len(text) <= limit else text[:limit] + marker.format(n=len(text) - limit)
