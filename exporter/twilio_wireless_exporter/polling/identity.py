"""Where the identity of configured SIMs comes from: one read per SIM, or the paged listing.

``GET /v1/Sims/{sid}`` costs one request per SIM; the unfiltered ``GET /v1/Sims`` listing
costs one request per page of 1,000 SIMs of the whole account, whatever number of them the
exporter watches. :class:`ListingCensus` remembers how many pages the account's listing took
the last time and decides, for each refresh, whether the listing is cheaper than reading the
SIMs one by one, and how many pages it may take at most (never as many as the reads it
replaces, so the listing can only save requests, even when the account grew meanwhile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(slots=True)
class ListingCensus:
    """What the latest listings said about the size of the account's ``/v1/Sims`` listing.

    ``pages``: pages of the latest complete unfiltered listing (``None``: none yet).
    ``at_least``: a lower bound learned since: a listing stopped at its budget, or a filtered
    listing (discovery) with more SIMs than ``pages`` can hold.
    """

    page_size: int
    pages: int | None = None
    at_least: int = 0

    def estimate(self) -> int:
        """Pages the unfiltered listing is expected to take (at least one)."""
        return max(1, self.pages or 0, self.at_least)

    def budget(self, sims: int) -> int:
        """Pages a listing may take to learn the identity of ``sims`` SIMs; 0: read each SIM.

        The listing is worth it when it is expected to take fewer requests than the reads; it
        may then take up to ``sims - 1`` pages (a larger account than expected still costs
        fewer requests than reading each SIM, the SIMs it did not reach are read alone)."""
        if self.estimate() >= sims:
            return 0
        return sims - 1

    def listed(self, pages: int, complete: bool) -> None:
        """An unfiltered listing took ``pages`` pages, to its end when ``complete``."""
        if complete:
            self.pages = pages
            self.at_least = 0
        else:
            self.at_least = max(self.at_least, pages + 1)

    def counted(self, sims: int) -> None:
        """A listing of part of the account (a status filter) held ``sims`` SIMs."""
        self.at_least = max(self.at_least, math.ceil(sims / self.page_size))
