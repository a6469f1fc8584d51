"""Reading a daemon's Prometheus exposition: every sample by name and labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict:
    """{(name, sorted label items): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(daemon, name: str, **labels) -> float:
    """The value of the sample `name` with exactly these labels in the daemon's /metrics,
    0 if it is not there (a counter nothing has counted yet)."""
    return samples(daemon.metrics()).get((name, tuple(sorted(labels.items()))), 0)


def metric_matching(daemon, name: str, **labels) -> float:
    """The value of the first sample `name` whose labels include these, 0 if there is none."""
    for (sample_name, sample_labels), value in samples(daemon.metrics()).items():
        have = dict(sample_labels)
        if sample_name == name and all(have.get(k) == v for k, v in labels.items()):
            return value
    return 0.0
