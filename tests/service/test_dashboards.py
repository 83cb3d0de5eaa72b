"""The Grafana dashboards query metrics the service really exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import ExperimentMetrics, Metrics

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards").glob("*.json"))


def exposed_series() -> set[str]:
    registry = CollectorRegistry()
    metrics, experiments = Metrics(registry), ExperimentMetrics(registry)
    # touch one child of each labelled metric so its series appear in the exposition
    for collector in [*vars(metrics).values(), *vars(experiments).values()]:
        names = getattr(collector, "_labelnames", None)
        if names:
            child = collector.labels(*["x"] * len(names))
            (child.observe if hasattr(child, "observe") else child.inc if hasattr(child, "inc") else child.set)(1)
    names = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        names.update(s.name for s in family.samples)
    return names


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_uses_exposed_series(path):
    dashboard = json.loads(path.read_text())
    series = exposed_series()
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert exprs and dashboard["uid"]
    for expr in exprs:
        for name in re.findall(r"archserve_[a-z0-9_]+", expr):
            assert name in series, f"{path.name}: {name} is not exposed by the service"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_the_ab_dashboard_exists():
    assert any(p.name == "archserve-ab.json" for p in DASHBOARDS)
