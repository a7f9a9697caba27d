"""The API budget of a configuration: the requests per second it will send, by endpoint.

``--check-config`` prints it per shard, so a user sees before the first request whether the
fleet fits ``poll.requests_per_second`` and the account's limits, and what usage reads add.
The projection counts one request per listing (the fewest: a listing of more than
``poll.page_size`` sessions takes more pages) and, with discovery, the configured SIMs only (the
account's size is not known before the first listing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from twilio_wireless_exporter.config.models import Config
from twilio_wireless_exporter.sharding import Shard

#: SIMs per page of a /v1/Sims listing (the API's maximum, which the exporter always asks for).
SIMS_PER_PAGE: Final = 1000


@dataclass(frozen=True, slots=True)
class Budget:
    """Projected requests per second of one shard, by endpoint."""

    shard: Shard
    sims: int
    rates: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.rates.values())

    @property
    def usage_share(self) -> float:
        """The fraction of the total that usage reads add (0 when there is no other traffic)."""
        usage = self.rates.get("usage_records", 0.0) + self.rates.get("account_usage_records", 0.0)
        rest = self.total - usage
        return usage / rest if rest > 0 else 0.0


def budget(config: Config, shard: Shard | None = None) -> Budget:
    """The budget of ``shard`` (by default the configured one: each replica's check shows its
    own share; ``--shard i/N`` shows another's)."""
    shard = config.shard.shard if shard is None else shard
    sims = sum(1 for sim in config.sims if shard.owns(sim.sid))
    refresh = config.discovery.refresh_interval
    rates: dict[str, float] = {"data_sessions": sims / config.poll.interval}
    # identity and discovery: the paged /v1/Sims listing once per refresh
    listed = sims if not config.discovery.enabled else max(sims, 1)
    statuses = max(1, len(config.discovery.status))
    rates["sims"] = statuses * math.ceil(listed / SIMS_PER_PAGE) / refresh if listed else 0.0
    usage = config.usage
    if usage.enabled:
        rates["usage_records"] = sims / usage.interval
        if shard.index == 0:  # the account and its plans are read by the first shard only
            if usage.account:
                rates["account_usage_records"] = 1 / usage.interval
            if usage.rate_plans:
                rates["rate_plans"] = 1 / refresh
    return Budget(shard, sims, rates)


def describe(config: Config) -> list[str]:
    """The lines ``--check-config`` prints: the configured shard's budget."""
    share = budget(config)
    limit = config.poll.requests_per_second
    head = "projected API requests per second"
    if share.shard.count > 1:
        head += f" of shard {share.shard.index}/{share.shard.count}"
    lines = [f"{head} ({share.sims} configured SIMs):"]
    for endpoint, rate in share.rates.items():
        lines.append(f"  {endpoint:<24}{rate:>12.4f}")
    usage = f", usage adds {share.usage_share:.1%}" if config.usage.enabled else ""
    lines.append(f"  {'total':<24}{share.total:>12.4f}{usage}")
    if share.total > limit:
        lines.append(
            f"  warning: more than poll.requests_per_second ({limit:g}): polls will fall"
            " behind their interval; raise the limit, lengthen poll.interval or add shards"
        )
    return lines
