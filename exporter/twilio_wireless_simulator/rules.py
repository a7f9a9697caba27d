"""The value types that the simulator's settings are checked against (pydantic ``Annotated``
types), shared by :mod:`.config` and :mod:`.faults` so one rule reads the same everywhere."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

__all__ = ["NonNegative", "Positive", "Rate"]

#: Seconds (or another amount) above zero.
Positive = Annotated[float, Field(gt=0)]
#: Seconds (or another amount) of zero or more.
NonNegative = Annotated[float, Field(ge=0)]
#: A probability per request.
Rate = Annotated[float, Field(ge=0, le=1)]
