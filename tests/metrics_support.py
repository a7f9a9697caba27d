"""Reading samples out of a scraped exposition: the one parser every test uses.

The text is parsed by prometheus-client's own parser (the reference reader of the format), so a
test reads exactly what Prometheus would store: a sample is its name plus its full label set,
and two samples with the same name and labels are an error of the exposition, not a lookup
detail. Two ways to ask:

* ``sample_value(text, name, **labels)``: the labels given are the sample's whole label set;
* ``find_value(text, name, [sim_sid], **labels)``: the labels given are a subset, and at most one sample
  may match (so a lookup can never silently pick the first of several series).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

Labels = tuple[tuple[str, str], ...]
SampleKey = tuple[str, Labels]


def iter_samples(text: str) -> Iterator[Sample]:
    """Every sample of a text-format exposition, in order."""
    for family in text_string_to_metric_families(text):
        yield from family.samples


def parse_samples(text: str) -> dict[SampleKey, float]:
    """``{(name, sorted labels): value}``; a repeated series fails the test."""
    out: dict[SampleKey, float] = {}
    for sample in iter_samples(text):
        key = (sample.name, tuple(sorted(sample.labels.items())))
        assert key not in out, f"series exposed twice: {key}"
        out[key] = sample.value
    return out


def series_key(name: str, **labels: str) -> SampleKey:
    """The key ``parse_samples`` uses for a series."""
    return name, tuple(sorted(labels.items()))


def sample_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the series with exactly these labels, or None when it is absent."""
    return parse_samples(text).get(series_key(name, **labels))


def find_value(text: str, name: str, sim_sid: str | None = None, **labels: str) -> float | None:
    """The value of the one series of ``name`` carrying these labels (others may be present),
    or None when there is none. ``sim_sid`` may be given by position: most lookups name a SIM."""
    if sim_sid is not None:
        labels["sim_sid"] = sim_sid
    found = [
        s.value
        for s in iter_samples(text)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) <= 1, f"{len(found)} series of {name} match {labels}"
    return found[0] if found else None


def values_by_label(text: str, name: str, label: str) -> dict[str, float]:
    """``{value of label: sample value}`` over every series of ``name``."""
    out: dict[str, float] = {}
    for s in iter_samples(text):
        if s.name == name:
            assert s.labels[label] not in out, (
                f"two series of {name} with {label}={s.labels[label]}"
            )
            out[s.labels[label]] = s.value
    return out
