"""ValueErrors that name a config field and what it must be (shared by config validation and methods)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

__all__ = ["check_choice", "check_range", "check_min"]


def check_choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"field {name!r} must be in [{lo}, {hi}], got {value}")


def check_min(name: str, value: Optional[float], lo: float) -> None:
    if value is not None and value < lo:
        raise ValueError(f"field {name!r} must be >= {lo}, got {value}")
