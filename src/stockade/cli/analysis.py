"""`stockade coverage|diff|lint`: analyses over policy sets (being built)."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    del sub
