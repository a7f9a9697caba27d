"""The cardinality options of ``metrics``: which families are exposed, checked against the
families the exporter knows (``metrics_names``), so that a typo is an error at start instead of
a filter that silently matches nothing.

The rules across sections (a ``sim_labels`` or ``aggregate_by`` entry must name a label some
configured SIM has) are checked by :func:`label_problems`, called from the ``Config`` model.
"""

import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Final, Literal, TypeAlias

from pydantic import AfterValidator, StrictStr
from pydantic_core import InitErrorDetails
from pydantic_core import PydanticCustomError as Problem

from twilio_wireless_exporter import metrics_names as names
from twilio_wireless_exporter.config.errors import problem, shaped

PerSimMode: TypeAlias = Literal["full", "essential", "none"]

#: The labels of a SIM's data, besides its configured labels, that ``aggregate_by`` may group
#: by: they come from the SIM's latest session (radio link, operator) and from ``/v1/Sims``.
SIM_ATTRIBUTE_LABELS: Final = (
    "radio_link",
    "operator_name",
    "operator_country",
    "status",
    "rate_plan_sid",
)

_KNOWN: Final = {family.name: family for family in names.ALL} | {
    series: family for family in names.ALL for series in family.series
}


def families_matching(pattern: str) -> frozenset[str]:
    """The names of the families ``pattern`` names: a family name or one of its series names
    exactly, else every family whose name or a series name the regular expression matches
    whole (``fullmatch``). Raises ``re.error`` for a pattern that is not a regular expression."""
    family = _KNOWN.get(pattern)
    if family is not None:
        return frozenset({family.name})
    regex = re.compile(pattern)
    return frozenset(
        family.name
        for family in names.ALL
        if any(regex.fullmatch(name) for name in (family.name, *family.series))
    )


def _family_pattern(pattern: str) -> str:
    try:
        matched = families_matching(pattern)
    except re.error as exc:
        raise Problem(
            "family_pattern",
            "is neither a metric family of the exporter nor a regular expression ({why})",
            {"why": str(exc)},
        ) from None
    except RecursionError:
        raise Problem("family_pattern", "is too deeply nested a regular expression") from None
    if not matched:
        raise Problem(
            "family_pattern",
            "matches no metric family of the exporter (see docs/metrics.md for their names)",
        )
    return pattern


FamilyPattern = Annotated[StrictStr, AfterValidator(_family_pattern)]
"""A family name (``twilio_wireless_sim_up``), a series name (``…_total``) or a regular
expression matched against the whole name, that names at least one family."""


GroupLabel = Annotated[
    StrictStr,
    shaped(
        r"^[a-zA-Z_][a-zA-Z0-9_]*$",
        "invalid label name: use letters, digits and _, not starting with a digit",
    ),
]
"""An ``aggregate_by`` entry: a configured SIM label or one of :data:`SIM_ATTRIBUTE_LABELS`
(checked against the SIMs by :func:`label_problems`)."""


def distinct_labels(labels: tuple[str, ...]) -> tuple[str, ...]:
    seen = set()
    for label in labels:
        if label in seen:
            raise Problem("labels", "names {label} twice", {"label": label})
        seen.add(label)
    return labels


def selected_families(
    include: Sequence[str], exclude: Sequence[str], per_sim: PerSimMode
) -> frozenset[str]:
    """The names of the families to expose: those ``include`` names (every family when it is
    empty), less those ``exclude`` names, less the per-SIM families ``per_sim`` leaves out."""
    if include:
        kept = frozenset().union(*(families_matching(p) for p in include))
    else:
        kept = frozenset(family.name for family in names.ALL)
    if exclude:
        kept -= frozenset().union(*(families_matching(p) for p in exclude))
    if per_sim == "essential":
        kept -= {f.name for f in names.PER_SIM if f not in names.ESSENTIAL}
    elif per_sim == "none":
        kept -= {f.name for f in names.PER_SIM}
    return kept


def label_problems(
    configured: Iterable[str], sim_labels: Sequence[str] | None, aggregate_by: Sequence[str]
) -> list[InitErrorDetails]:
    """``sim_labels`` and ``aggregate_by`` entries that name no label of a configured SIM (nor,
    for ``aggregate_by``, one of :data:`SIM_ATTRIBUTE_LABELS`), located under ``metrics``."""
    known = set(configured)
    problems: list[InitErrorDetails] = []
    for index, label in enumerate(sim_labels or ()):
        if label not in known:
            wrong = "is not a label of any SIM under sims (labels: {known})"
            problems.append(problem(wrong, ("metrics", "sim_labels", index), known=_listed(known)))
    for index, label in enumerate(aggregate_by):
        if label not in known and label not in SIM_ATTRIBUTE_LABELS:
            wrong = "is neither a label of a SIM under sims ({known}) nor one of {attributes}"
            problems.append(
                problem(
                    wrong,
                    ("metrics", "aggregate_by", index),
                    known=_listed(known),
                    attributes=", ".join(SIM_ATTRIBUTE_LABELS),
                )
            )
    return problems


def _listed(labels: Iterable[str]) -> str:
    return ", ".join(sorted(labels)) or "none"
