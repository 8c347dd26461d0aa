"""docs/METRICS.md and streams/metrics.py name the same metrics, with the same labels."""

import re
from pathlib import Path

from prometheus_client import REGISTRY

import streams.metrics  # noqa: F401  # registers the metrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"


def _documented() -> dict[str, tuple[str, set[str]]]:
    rows = re.findall(r"^\| `(pgkd_\w+)` \|\s*(\w+)\s*\|([^|]*)\|", DOC.read_text(), flags=re.M)
    out: dict[str, tuple[str, set[str]]] = {}
    for name, kind, labels in rows:
        out.setdefault(name, (kind, set()))[1].update(re.findall(r"`(\w+)`(?: \(|=|$|,)", labels.strip()))
    return out


def _exported() -> dict[str, tuple[str, set[str]]]:
    out: dict[str, tuple[str, set[str]]] = {}
    for metric in REGISTRY.collect():
        if not metric.name.startswith("pgkd_"):
            continue
        name = metric.name + ("_total" if metric.type == "counter" else "")
        out[name] = (metric.type, set(getattr(REGISTRY._names_to_collectors[name], "_labelnames", ())))
    return out


def test_every_exported_metric_is_documented_with_its_type_and_labels():
    documented, exported = _documented(), _exported()
    assert set(documented) == set(exported)
    for name, (kind, labels) in exported.items():
        assert documented[name][0] == kind, f"{name} is a {kind}"
        assert labels <= documented[name][1], f"{name}: labels {labels} vs documented {documented[name][1]}"
