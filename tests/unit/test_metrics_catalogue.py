"""docs/METRICS.md and the workers' metric modules name the same metrics, with the same labels.

The "Curator and trainer" table is the contract of the distillation loop's
workers: a name listed there may not be exported yet; once it is (defined in
streams/metrics.py), its type and labels are checked like the others."""

import re
from pathlib import Path

from prometheus_client import REGISTRY

import streams.drift_metrics  # noqa: F401
import streams.metrics  # noqa: F401  # registers the metrics

DOC = Path(__file__).resolve().parents[2] / "docs" / "METRICS.md"


def _documented(text: str | None = None) -> dict[str, tuple[str, set[str]]]:
    rows = re.findall(r"^\| `(pgkd_\w+)` \|\s*(\w+)\s*\|([^|]*)\|", text or DOC.read_text(), flags=re.M)
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


def _contract() -> set[str]:
    """Names of the "Curator and trainer" section."""
    section = DOC.read_text().split("## Curator and trainer", 1)[1].split("\n## ", 1)[0]
    return set(_documented(section))


def test_every_exported_metric_is_documented_with_its_type_and_labels():
    documented, exported = _documented(), _exported()
    assert set(exported) <= set(documented), f"not in docs/METRICS.md: {sorted(set(exported) - set(documented))}"
    missing = set(documented) - set(exported) - _contract()
    assert not missing, f"documented but exported by no worker: {sorted(missing)}"
    for name, (kind, labels) in exported.items():
        assert documented[name][0] == kind, f"{name} is a {kind}"
        assert labels <= documented[name][1], f"{name}: labels {labels} vs documented {documented[name][1]}"


def test_garbage_collections_are_timed_once_the_metrics_server_runs():
    import gc

    from streams import metrics

    def count() -> float:
        return REGISTRY.get_sample_value("pgkd_gc_pause_seconds_count", {"generation": "2"}) or 0.0

    before = count()
    port = metrics.start_metrics_server("127.0.0.1", 0)
    metrics.start_metrics_server("127.0.0.1", 0)  # a second server does not time every collection twice
    gc.collect()
    assert port > 0 and count() == before + 1
    assert REGISTRY.get_sample_value("pgkd_gc_pause_seconds_sum", {"generation": "2"}) > 0
