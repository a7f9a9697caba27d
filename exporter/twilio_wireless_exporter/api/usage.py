"""Usage records normalised to bytes (placeholder until the API layer lands)."""

from __future__ import annotations

import msgspec


class Usage(msgspec.Struct, frozen=True, gc=False):
    """One usage record, in bytes."""

    start: float
    end: float
    upload: int = 0
    download: int = 0
    total: int = 0
    home: int | None = None
    national_roaming: int | None = None
    international_roaming: int | None = None
    billed: float | None = None
    billing_units: str = ""
    commands_from_sim: int = 0
    commands_to_sim: int = 0
