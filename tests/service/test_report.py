"""The experiment report (figures from hand-built data) and its HTML page."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from html.parser import HTMLParser
from pathlib import Path

import markupsafe
import numpy as np
import pytest

from service.experiments.report import LATENCY_EDGES_S, build_report
from service.experiments.report_html import render_report_html
from service.experiments.stats import difference_interval, two_proportion_test, verdict, wilson_interval
from service.store.records import ExperimentData, LabelledPrediction, PredictionRecord, ShadowPair

import scipy.stats as scipy_stats  # noqa: E402  (a test dependency)

EXPERIMENT = "resnet50-vs-se"
XSS = "<script>alert(1)</script>"


def rec(request_id, top5, *, variant, image=0, score=0.5, latency=0.01, t=1000.0, model="m",
        version=1, role="primary"):
    scores = (score,) + tuple(round((1 - score) / 8, 6) for _ in top5[1:])
    return PredictionRecord(request_id=request_id, image_index=image, experiment=EXPERIMENT,
                            variant=variant, role=role, model=model, version=version,
                            top5=tuple(top5), top5_scores=scores, latency_s=latency, created_at=t)


def lp(record, label=None):
    return LabelledPrediction(record, label, None if label is None else record.created_at + 5)


def hand_data() -> ExperimentData:
    a = dict(variant="A", model="resnet50")
    b = dict(variant="B", model="se_resnet50", version=2)
    a10 = rec("a1", top5=(1, 2, 3, 4, 5), image=0, score=0.9, latency=0.010, t=1000, **a)
    a11 = rec("a1", top5=(2, 1, 3, 4, 5), image=1, score=0.7, latency=0.010, t=1000, **a)
    a2 = rec("a2", top5=(1, 2, 3, 4, 5), score=0.6, latency=0.020, t=1010, **a)
    a3 = rec("a3", top5=(7, 1, 2, 3, 4), score=0.5, latency=0.030, t=1020, **a)
    a4 = rec("a4", top5=(1, 7, 2, 3, 4), score=0.3, latency=0.050, t=1100, **a)
    b1 = rec("b1", top5=(4, 5, 6, 7, 8), score=0.8, latency=0.040, t=1050, **b)
    b2 = rec("b2", top5=(4, 5, 6, 7, 8), score=0.8, latency=0.060, t=1060, **b)
    b3 = rec("b3", top5=(6, 5, 4, 7, 8), score=0.8, latency=0.080, t=1200, **b)
    z1 = rec("z1", top5=(1, 2, 3, 4, 5), variant="Z")  # a variant not asked for
    s = dict(variant="S", model="inception_v3", role="shadow")
    pairs = [
        ShadowPair(a10, rec("a1", top5=(1, 2, 3, 9, 10), image=0, latency=0.004, **s)),  # agree, 3/5
        ShadowPair(a11, rec("a1", top5=(1, 2, 3, 4, 5), image=1, latency=0.006, **s)),  # differ, 5/5
        ShadowPair(a2, rec("a2", top5=(1, 11, 12, 13, 14), latency=0.030, **s)),  # agree, 1/5
        ShadowPair(b1, rec("b1", top5=(4, 5, 6, 7, 8), variant="X", model="x", role="shadow")),
    ]
    primaries = [
        lp(a10, 1),  # top-1 right
        lp(a11, 3),  # top-5 only
        lp(a2, 9),  # wrong
        lp(a3, 7),  # top-1 right
        lp(a4),  # no feedback
        lp(b1, 4), lp(b2, 5), lp(b3, 6),
        lp(z1, 1),
    ]
    return ExperimentData(EXPERIMENT, primaries, pairs, {"S": 4, "X": 9})


NAMES = [f"class {i}" for i in range(20)]
NAMES[7] = XSS


@pytest.fixture
def report():
    return build_report(hand_data(), variants=["A", "B", "C"], shadows=["S"],
                        labels={"A": NAMES}, now=5000.0)


def by_name(items, key, value):
    return next(x for x in items if x[key] == value)


def test_report_is_strict_json(report):
    again = json.loads(json.dumps(report, allow_nan=False))
    assert again == report


def test_top_level(report):
    assert report["experiment"] == EXPERIMENT
    assert report["generated_at"] == 5000.0
    assert report["control"] == "A"
    assert [v["name"] for v in report["variants"]] == ["A", "B", "C"]
    assert report["shadow_shed"] == {"S": 4}
    assert report["unlisted"] == {"primaries": 1, "shadow_pairs": 1}


def test_variant_figures(report):
    a = report["variants"][0]
    assert a["n_images"] == 5
    assert a["n_requests"] == 4
    assert a["models"] == [{"model": "resnet50", "version": 1, "n_images": 5}]
    lat = a["latency_s"]
    per_request = [0.010, 0.020, 0.030, 0.050]
    assert lat["n"] == 4
    assert [lat["p50"], lat["p90"], lat["p99"]] == pytest.approx(np.percentile(per_request, [50, 90, 99]).tolist(),
                                                                 rel=1e-12)
    assert [lat["p50"], lat["p90"], lat["p99"]] == pytest.approx([0.025, 0.044, 0.0494], rel=1e-12)
    assert lat["mean"] == pytest.approx(0.0275, rel=1e-12)
    assert a["mean_confidence"] == pytest.approx((0.9 + 0.7 + 0.6 + 0.5 + 0.3) / 5, rel=1e-12)
    assert a["top1_distribution"] == [
        {"class": 1, "name": "class 1", "count": 3, "share": 0.6},
        {"class": 2, "name": "class 2", "count": 1, "share": 0.2},
        {"class": 7, "name": XSS, "count": 1, "share": 0.2},
    ]
    assert a["distinct_top1_classes"] == 3
    assert a["labelled_n"] == 4
    lo, hi = wilson_interval(2, 4)
    assert a["top1_accuracy"] == {"correct": 2, "n": 4, "rate": 0.5, "low": lo, "high": hi}
    lo, hi = wilson_interval(3, 4)
    assert a["top5_accuracy"] == {"correct": 3, "n": 4, "rate": 0.75, "low": lo, "high": hi}
    hist = a["latency_histogram"]
    assert hist["edges"] == list(LATENCY_EDGES_S)
    assert sum(hist["counts"]) == 4
    assert {i: c for i, c in enumerate(hist["counts"]) if c} == {
        hist["edges"].index(0.01): 1, hist["edges"].index(0.02): 1,
        hist["edges"].index(0.03): 1, hist["edges"].index(0.05): 1}

    b = report["variants"][1]
    assert (b["n_images"], b["n_requests"], b["labelled_n"]) == (3, 3, 3)
    assert b["models"] == [{"model": "se_resnet50", "version": 2, "n_images": 3}]
    assert b["top1_accuracy"]["correct"] == 2 and b["top5_accuracy"]["correct"] == 3
    assert b["top1_distribution"][0] == {"class": 4, "name": None, "count": 2, "share": pytest.approx(2 / 3)}
    assert b["latency_s"]["p50"] == pytest.approx(0.06)


def test_empty_variant_has_zeros_and_nulls(report):
    c = report["variants"][2]
    assert (c["n_images"], c["n_requests"], c["labelled_n"]) == (0, 0, 0)
    assert c["latency_s"] == {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None}
    assert c["mean_confidence"] is None
    assert c["top1_distribution"] == [] and c["models"] == []
    assert c["top1_accuracy"] == {"correct": 0, "n": 0, "rate": None, "low": None, "high": None}
    assert sum(c["latency_histogram"]["counts"]) == 0


def test_comparisons_against_control(report):
    comps = report["comparisons"]
    assert [(c["control"], c["variant"]) for c in comps] == [("A", "B"), ("A", "C")]
    ab = comps[0]
    assert ab["difference"] == pytest.approx(2 / 3 - 2 / 4)
    assert (ab["low"], ab["high"]) == difference_interval(2, 3, 2, 4)
    z, p = two_proportion_test(2, 3, 2, 4)
    assert (ab["z"], ab["p_value"]) == (z, p)
    assert ab["p_value"] == pytest.approx(
        scipy_stats.chi2_contingency([[2, 1], [2, 2]], correction=False)[1], rel=1e-9)
    assert ab["alpha"] == 0.025  # Bonferroni over two comparisons
    assert ab["verdict"] == "not enough data yet: need ~27 more labelled requests per variant"
    assert ab["needed_per_variant"] == 27
    ac = comps[1]
    assert ac["variant_n"] == 0
    assert all(ac[k] is None for k in ("difference", "low", "high", "z", "p_value"))
    assert ac["verdict_kind"] == "insufficient_data" and ac["needed_per_variant"] == 30
    assert report["verdict"] == (
        "B vs A: not enough data yet: need ~27 more labelled requests per variant; "
        "C vs A: not enough data yet: need ~30 more labelled requests per variant")
    assert report["verdict_kind"] == "insufficient_data"


def test_shadow_comparisons(report):
    assert [(s["primary"], s["shadow"]) for s in report["shadow_comparisons"]] == [
        ("A", "S"), ("B", "S"), ("C", "S")]
    a = report["shadow_comparisons"][0]
    assert a["n_pairs"] == 3
    lo, hi = wilson_interval(2, 3)
    assert a["top1_agreement"] == {"agree": 2, "n": 3, "rate": 2 / 3, "low": lo, "high": hi}
    assert a["mean_top5_overlap"] == pytest.approx((3 / 5 + 5 / 5 + 1 / 5) / 3, rel=1e-12)
    diffs = [0.004 - 0.010, 0.006 - 0.010, 0.030 - 0.020]
    assert a["latency_diff_s"]["median"] == pytest.approx(float(np.median(diffs)), rel=1e-12)
    assert a["latency_diff_s"]["median"] == pytest.approx(-0.004, rel=1e-9)
    assert a["latency_diff_s"]["mean"] == pytest.approx(float(np.mean(diffs)), abs=1e-15)
    b = report["shadow_comparisons"][1]  # B's only pair went to the unlisted shadow X
    assert b["n_pairs"] == 0
    assert b["top1_agreement"]["rate"] is None
    assert b["mean_top5_overlap"] is None
    assert b["latency_diff_s"] == {"median": None, "mean": None}


def test_timeseries(report):
    ts = report["timeseries"]
    assert ts["edges"] == pytest.approx([1000 + 10 * i for i in range(21)])
    a, b, c = (ts["variants"][k] for k in "ABC")
    assert len(a) == len(b) == len(c) == 20
    assert [p["t"] for p in a] == ts["edges"][1:]
    assert (a[0]["n"], a[0]["correct"]) == (3, 1)  # up to t=1010
    assert (a[1]["n"], a[1]["correct"]) == (4, 2)  # up to t=1020
    assert (a[-1]["n"], a[-1]["correct"], a[-1]["rate"]) == (4, 2, 0.5)
    assert (a[-1]["low"], a[-1]["high"]) == wilson_interval(2, 4)
    assert [p["n"] for p in b] == [0] * 4 + [1] + [2] * 14 + [3]  # labelled at 1050, 1060, 1200
    assert b[3]["rate"] is None and b[4]["rate"] == 1.0 and b[-1]["correct"] == 2
    assert all(p["n"] == 0 and p["rate"] is None for p in c)
    # Cumulative counts never decrease.
    for series in (a, b):
        assert all(x["n"] <= y["n"] and x["correct"] <= y["correct"] for x, y in zip(series, series[1:]))


def test_request_latency_is_per_request_not_per_image():
    recs = [rec("r1", (1,), variant="A", image=i, latency=0.1 + 0.01 * i) for i in range(3)]
    recs.append(rec("r2", (1,), variant="A", latency=0.2))
    rep = build_report(ExperimentData("e", [lp(r) for r in recs]), variants=["A"], shadows=[])
    v = rep["variants"][0]
    assert (v["n_images"], v["n_requests"]) == (4, 2)
    assert v["latency_s"]["p50"] == pytest.approx((0.12 + 0.2) / 2)
    assert rep["verdict_kind"] == "no_comparison"
    assert rep["comparisons"] == []


def test_significant_two_variant_report_matches_scipy():
    primaries = []
    for variant, correct, n in (("A", 24, 40), ("B", 34, 40)):
        for i in range(n):
            r = rec(f"{variant}{i}", (1, 2, 3, 4, 5) if i < correct else (2, 3, 4, 5, 6),
                    variant=variant, t=1000.0 + i)
            primaries.append(lp(r, 1))
    rep = build_report(ExperimentData("e", primaries), variants=["A", "B"], shadows=[])
    comp = rep["comparisons"][0]
    _, p_chi, _, _ = scipy_stats.chi2_contingency([[34, 6], [24, 16]], correction=False)
    assert comp["p_value"] == pytest.approx(p_chi, rel=1e-9)
    assert comp["difference"] == pytest.approx(0.25)
    assert comp["z"] > 0 and comp["alpha"] == 0.05
    assert p_chi < 0.05
    assert rep["verdict"] == verdict(24, 40, 34, 40, name_a="A", name_b="B")
    assert rep["verdict"].startswith("variant B more accurate, p=0.0")
    assert rep["verdict_kind"] == "significant"
    assert rep["variants"][1]["top5_accuracy"]["rate"] == 0.85  # wrong answers miss the label entirely
    # All data at distinct times: 20 buckets, the last point is the whole sample.
    assert rep["timeseries"]["variants"]["B"][-1]["n"] == 40


@pytest.mark.parametrize("variants", [[], ["A"], ["A", "B"]])
def test_no_data_at_all(variants):
    rep = build_report(ExperimentData("empty"), variants=variants, shadows=["S"], now=1.0)
    json.dumps(rep, allow_nan=False)
    assert all(v["n_images"] == 0 for v in rep["variants"])
    assert rep["timeseries"] == {"edges": [], "variants": {v: [] for v in variants}}
    assert rep["shadow_shed"] == {"S": 0}
    assert len(rep["shadow_comparisons"]) == len(variants)
    page = render_report_html(rep)
    assert "<svg" not in page  # nothing to chart
    assert escaped(rep["verdict"]) in page


def test_single_timestamp_gives_one_bucket():
    r = rec("r", (1,), variant="A", t=42.0)
    rep = build_report(ExperimentData("e", [lp(r, 1)]), variants=["A"], shadows=[])
    assert rep["timeseries"]["edges"] == [42.0, 42.0]
    assert rep["timeseries"]["variants"]["A"] == [
        {"t": 42.0, "correct": 1, "n": 1, "rate": 1.0, "low": wilson_interval(1, 1)[0], "high": 1.0}]


# ---------------------------------------------------------------- HTML


class _Balance(HTMLParser):
    VOID = {"meta", "br", "img", "input", "link", "hr", "area", "base", "col", "source", "wbr"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.add(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def _page(report_dict):
    return render_report_html(json.loads(json.dumps(report_dict)))


def escaped(text: str) -> str:
    """``text`` as the page's autoescaping writes it (MarkupSafe: ``"`` is ``&#34;``, where ``html.escape``
    writes ``&quot;``; the same text to a browser)."""
    return str(markupsafe.escape(text))


def test_html_content_and_escaping():
    data = hand_data()
    data.experiment = 'exp <b>"bold"</b> & co'
    rep = build_report(data, variants=["A", "B", "C"], shadows=["S"], labels={"A": NAMES}, now=5000.0)
    page = _page(rep)
    assert page.startswith("<!doctype html>")
    assert escaped(data.experiment) in page
    assert data.experiment not in page
    assert escaped(rep["verdict"]) in page
    assert "<svg" in page and "<polyline" in page and "<rect" in page
    assert XSS not in page
    assert escaped(XSS) in page
    assert "<script" not in page.lower()
    checker = _Balance()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert {"table", "svg", "h1", "style"} <= checker.tags


def test_html_has_no_external_resources(report):
    page = _page(report)
    assert not re.search(r"""(?:src|href|xlink:href|action)\s*=\s*["']?\s*(?:https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"@import|url\(|<link|<script|<iframe|<img", page, re.I)


def test_html_escapes_variant_and_shadow_names():
    bad = '"><img src=x onerror=alert(1)>'
    r = rec("r", (1, 2), variant=bad)
    s = rec("r", (1, 2), variant=XSS, role="shadow")
    rep = build_report(ExperimentData("e", [lp(r, 1)], [ShadowPair(r, s)], {XSS: 1}),
                       variants=[bad, "ok"], shadows=[XSS], now=0.0)
    page = _page(rep)
    assert bad not in page and XSS not in page
    assert "<img" not in page
    assert escaped(bad) in page and escaped(XSS) in page


def test_html_escapes_a_script_experiment_and_variant_name():
    r = rec("r", (1, 2), variant=XSS)
    data = ExperimentData(XSS, [lp(r, 1), lp(rec("q", (1, 2), variant="ok"), 2)])
    page = _page(build_report(data, variants=[XSS, "ok"], shadows=[], now=0.0))
    assert "<script" not in page.lower()
    assert f"<title>{escaped(XSS)} \u00b7 experiment report</title>" in page
    assert f"<h1>{escaped(XSS)}</h1>" in page
    assert f'aria-label="latency histogram of {escaped(XSS)}"' in page
    assert f"<td>ok vs {escaped(XSS)}</td>" in page  # the control, in the comparisons table
    assert page.count(escaped(XSS)) >= 6  # title, h1, meta's control, card, legend, comparison, chart tips


def test_service_modules_do_not_import_scipy():
    code = ("import sys, service.experiments.report, service.experiments.report_html, "
            "service.experiments.stats; sys.exit('scipy' in sys.modules)")
    root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=root, timeout=60).returncode == 0


def test_the_templates_ship_with_the_package():
    """A non-editable install (the image's ``pip install``) carries only the data files pyproject.toml names."""
    root = Path(__file__).resolve().parents[2]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    globs = setuptools["package-data"]["service.experiments"]
    package = root / "service" / "experiments"
    templates = [p.relative_to(package) for p in (package / "templates").iterdir() if p.is_file()]
    assert templates and all(any(t.match(g) for g in globs) for t in templates), (templates, globs)
