"""The simulated account's rate plans (``GET /v1/RatePlans``).

A fixed catalogue, the same for every seed except the SIDs: plans with data limits from tight to
generous, one without limits and one that allows no roaming at all, so every kind of plan the
exporter and its alerts must handle is there. Limits are megabytes per month, as the API states
them; a plan without a limit leaves the limit fields out (Twilio's description has them as
integers, KORE's as nullable ones: absence is what both accept).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["PLAN_TEMPLATES", "RatePlanView", "make_plans"]


@dataclass(frozen=True, slots=True)
class RatePlanView:
    """One RatePlan resource (times are simulated unix seconds)."""

    sid: str
    account_sid: str
    unique_name: str
    friendly_name: str
    data_enabled: bool
    data_metering: str
    #: Megabytes per month on the home network; ``None``: no limit.
    data_limit: int | None
    national_roaming_enabled: bool
    national_roaming_data_limit: int | None
    #: Services allowed abroad (``data``, ``messaging``); empty: no international roaming.
    international_roaming: tuple[str, ...]
    international_roaming_data_limit: int | None
    messaging_enabled: bool
    data_limit_strategy: str
    date_created: int
    date_updated: int

    @property
    def international_roaming_data(self) -> bool:
        return "data" in self.international_roaming

    def to_api(self, base_url: str, time_format: Callable[[int], str]) -> dict[str, Any]:
        """The JSON object of this plan, with its absolute URL under ``base_url``."""
        plan: dict[str, Any] = {
            "sid": self.sid,
            "unique_name": self.unique_name,
            "account_sid": self.account_sid,
            "friendly_name": self.friendly_name,
            "data_enabled": self.data_enabled,
            "data_metering": self.data_metering,
            "messaging_enabled": self.messaging_enabled,
            "voice_enabled": False,
            "national_roaming_enabled": self.national_roaming_enabled,
            "international_roaming": list(self.international_roaming),
            "data_limit_strategy": self.data_limit_strategy,
            "date_created": time_format(self.date_created),
            "date_updated": time_format(self.date_updated),
            "url": f"{base_url}/v1/RatePlans/{self.sid}",
        }
        limits = {
            "data_limit": self.data_limit,
            "national_roaming_data_limit": self.national_roaming_data_limit,
            "international_roaming_data_limit": self.international_roaming_data_limit,
        }
        plan.update({name: value for name, value in limits.items() if value is not None})
        return plan


#: (unique_name, friendly_name, data_limit, national roaming enabled, national roaming limit,
#: international roaming services, international roaming limit, metering, strategy), in the
#: order of the fleet's plan SIDs: the first is the one most SIMs have.
PLAN_TEMPLATES: Final = (
    ("iot-500mb", "IoT 500 MB", 500, True, 500, ("data", "messaging"), 100, "payg", "block"),
    ("home-only-20mb", "Home only 20 MB", 20, False, 0, ("messaging",), 0, "quota-1", "block"),
    ("unlimited", "Unlimited", None, True, None, ("data", "messaging"), None, "payg", "throttle"),
    ("tracker-50mb", "Tracker 50 MB", 50, True, 50, ("data", "messaging"), 20, "quota-1", "block"),
)


def make_plans(sids: Sequence[str], account_sid: str, created: int) -> list[RatePlanView]:
    """One plan per SID, from :data:`PLAN_TEMPLATES` in order (round again with a numbered
    unique name if there are more SIDs than templates), created a day apart from ``created``."""
    plans = []
    for k, sid in enumerate(sids):
        name, friendly, limit, national, national_limit, abroad, abroad_limit, metering, how = (
            PLAN_TEMPLATES[k % len(PLAN_TEMPLATES)]
        )
        plans.append(
            RatePlanView(
                sid=sid,
                account_sid=account_sid,
                unique_name=name if k < len(PLAN_TEMPLATES) else f"{name}-{k}",
                friendly_name=friendly,
                data_enabled=True,
                data_metering=metering,
                data_limit=limit,
                national_roaming_enabled=national,
                national_roaming_data_limit=national_limit,
                international_roaming=abroad,
                international_roaming_data_limit=abroad_limit,
                messaging_enabled=True,
                data_limit_strategy=how,
                date_created=created + k * 86400,
                date_updated=created + k * 86400,
            )
        )
    return plans
