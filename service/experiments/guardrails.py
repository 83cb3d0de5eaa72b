"""Guardrails: checks that pause (or flag) a variant doing harm, and the one decision every worker applies.

Each experiment with a ``guardrails`` block (``guardrails_config``) is checked
every ``interval_s`` by every worker process, in the background:

* ``accuracy``: top-1 accuracy on the labelled images, variant vs the control
  (the first variant, as in the report); breached when a one-sided z-test
  (unpooled variance) shows the drop ``control - variant`` larger than
  ``max_drop`` at ``ALPHA`` (the report's alpha).
* ``latency_p99_ms``: the p99 of the variant's logged request latencies.
* ``error_rate``: the share of the variant's answers that were 5xx (504
  included), counted by this process (each worker sees its own answers; any one
  of them may decide).

Nothing is decided about a variant before it (and for accuracy, the control)
has ``min_images`` primary images in the prediction log. The first breach of a
variant becomes its decision: ``pause`` (routing gives it weight 0) or
``alert`` (the gauge and the log only). The control is never paused, nor the
last variant with traffic: their breach is recorded as an alert that says so.

How one decision holds for every worker and replica: decisions live in the
experiment store (``guardrail_decisions``, ``service.store.decisions``), keyed
by (experiment, variant, fingerprint), inserted if absent: the first writer
wins, and every writer gets the stored row back. Each worker, at each check,
reads the experiment's decisions from the store and applies those whose
fingerprint (of the variant's spec and the guardrails block) matches the file
it serves, so workers that evaluated different figures still converge on the
one stored row within an interval, and a restart or reload finds it again (the
decisions are read when the server starts). A decision is never lifted by the
checks: only a change of the variant's spec or of the guardrails block (a new
fingerprint) does, so a variant cannot flap. The store is the shared state
rather than a leader election or the metrics because it already is the one
thing every replica shares (PostgreSQL; one SQLite file for the workers of one
machine), and its insert-if-absent is atomic in both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import defaultdict
from statistics import NormalDist
from typing import TYPE_CHECKING, Any

from ..store.base import StoreError
from ..store.decisions import GuardrailDecision
from ..store.records import ExperimentData
from .config import Experiment
from .guardrails_config import Guardrails
from .stats import percentiles

if TYPE_CHECKING:
    from ..state import AppState

log = logging.getLogger(__name__)

ALPHA = 0.05  # the report's alpha (build_report's default, which the report endpoint uses)
IDLE_INTERVAL_S = 10.0  # how often to look again while no experiment has guardrails (a reload may add some)


def accuracy_test(sc: int, nc: int, sv: int, nv: int, max_drop: float, alpha: float = ALPHA) -> dict[str, Any]:
    """One-sided z-test of H0: ``p_control - p_variant <= max_drop`` (unpooled); ``breached`` when rejected."""
    pc, pv = sc / nc, sv / nv
    drop = pc - pv
    se = math.sqrt(pc * (1 - pc) / nc + pv * (1 - pv) / nv)
    if se == 0:  # both rates 0 or 1: no variance, the drop is what it is
        z, p = (math.inf if drop > max_drop else -math.inf), (0.0 if drop > max_drop else 1.0)
    else:
        z = (drop - max_drop) / se
        p = 1.0 - NormalDist().cdf(z)
    return {
        "control_accuracy": pc, "control_n": nc, "variant_accuracy": pv, "variant_n": nv, "drop": drop,
        "threshold": max_drop, "z": z if math.isfinite(z) else None, "p_value": p, "alpha": alpha,
        "test": "one-sided z-test (unpooled) of drop > max_drop", "breached": p < alpha,
    }


@dataclasses.dataclass
class _Figures:
    images: int = 0
    labelled: int = 0
    correct: int = 0
    request_latency: dict[str, float] = dataclasses.field(default_factory=dict)


def _figures(data: ExperimentData) -> dict[str, _Figures]:
    figures: dict[str, _Figures] = defaultdict(_Figures)
    for lp in data.primaries:
        f = figures[lp.prediction.variant]
        f.images += 1
        rid = lp.prediction.request_id
        # A request's latency is the same for all its images; the max if they differ (as the report takes it).
        f.request_latency[rid] = max(f.request_latency.get(rid, 0.0), lp.prediction.latency_s)
        if lp.label is not None:
            f.labelled += 1
            f.correct += lp.prediction.top5[:1] == (lp.label,)
    return figures


def check_variant(guardrails: Guardrails, variant: str, control: str, figures: dict[str, _Figures],
                  answers: tuple[int, int] | None) -> tuple[str, dict[str, Any]] | None:
    """The first guardrail ``variant`` breaches, with its evidence, or None."""
    mine = figures.get(variant, _Figures())
    if mine.images < guardrails.min_images:
        return None  # too early to tell
    base = {"n_images": mine.images, "min_images": guardrails.min_images}
    if guardrails.max_accuracy_drop is not None and variant != control:
        theirs = figures.get(control, _Figures())
        if theirs.images >= guardrails.min_images and theirs.labelled and mine.labelled:
            test = accuracy_test(theirs.correct, theirs.labelled, mine.correct, mine.labelled,
                                 guardrails.max_accuracy_drop)
            if test.pop("breached"):
                return "accuracy", base | {"control": control} | test
    if guardrails.latency_p99_ms is not None and mine.request_latency:
        (p99,) = percentiles(list(mine.request_latency.values()), (99,))
        if p99 * 1000 > guardrails.latency_p99_ms:
            return "latency_p99_ms", base | {"p99_ms": p99 * 1000, "threshold": guardrails.latency_p99_ms,
                                             "n_requests": len(mine.request_latency)}
    if guardrails.error_rate is not None and answers and answers[0] >= guardrails.min_images:
        rate = answers[1] / answers[0]
        if rate > guardrails.error_rate:
            return "error_rate", base | {"error_rate": rate, "errors": answers[1], "answers": answers[0],
                                         "threshold": guardrails.error_rate, "counted_by": "one worker process"}
    return None


class GuardrailKeeper:
    """One worker's view of the decisions: reads and writes them in the store, applies them to routing."""

    def __init__(self, state: AppState) -> None:
        self.state = state
        self.known: dict[str, list[GuardrailDecision]] = {}  # experiment -> every stored decision, last read
        self._gauged: set[tuple[str, str, str]] = set()
        self._logged: set[tuple[str, str, str]] = set()

    # -- applying ----------------------------------------------------------------------------------------------

    def standing(self, experiment: Experiment) -> dict[str, GuardrailDecision]:
        """variant -> the decision made under its current spec and guardrails (the first, if ever several)."""
        if experiment.guardrails is None:
            return {}
        prints = {v.name: experiment.guardrails.fingerprint(v) for v in experiment.variants}
        out: dict[str, GuardrailDecision] = {}
        for d in self.known.get(experiment.name, []):
            if prints.get(d.variant) == d.fingerprint and d.variant not in out:
                out[d.variant] = d
        return out

    def overlay(self, experiments: dict[str, Experiment]) -> dict[str, Experiment]:
        """``experiments`` with every standing pause applied as weight 0 (never leaving none with traffic)."""
        out = {}
        for name, experiment in experiments.items():
            paused = {v for v, d in self.standing(experiment).items() if d.action == "pause"}
            variants = [dataclasses.replace(v, weight=0) if v.name in paused else v for v in experiment.variants]
            if paused and any(v.weight > 0 for v in variants):  # the evaluation never stores more; a safety net
                experiment = dataclasses.replace(experiment, variants=tuple(variants))
            out[name] = experiment
        return out

    def apply(self) -> None:
        """On the event loop: route by what is known now, and set the gauges (with one log line per decision)."""
        experiments = self.state.experiments
        experiments.current = self.overlay(experiments.configured)
        gauge = self.state.experiment_metrics.guardrail_breached
        now_set = set()
        for experiment in experiments.configured.values():
            for variant, d in self.standing(experiment).items():
                key = (experiment.name, variant, d.guardrail)
                now_set.add(key)
                gauge.labels(*key).set(1)
                if key not in self._logged:  # each worker says once what it now applies, and why
                    self._logged.add(key)
                    log.warning("guardrail %s of experiment %s: variant %s %s (decided %s): %s", d.guardrail,
                                experiment.name, variant, "paused" if d.action == "pause" else "flagged (alert)",
                                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(d.decided_at)),
                                _evidence_text(d.evidence))
        for key in self._gauged - now_set:  # a decision the YAML lifted
            gauge.labels(*key).set(0)
        self._gauged = now_set

    # -- reading and deciding (in a worker thread: the store is synchronous) -------------------------------------

    def read(self, names: list[str] | None = None) -> None:
        store = self.state.store
        if store is None:
            return
        configured = self.state.experiments.configured
        for name in names if names is not None else [n for n, e in configured.items() if e.guardrails]:
            try:
                self.known[name] = store.decisions(name)
            except StoreError as exc:  # keep what was known; the next check tries again
                log.warning("cannot read the guardrail decisions of %s: %s", name, exc)

    def evaluate(self) -> None:
        """Read the decisions, check every undecided variant, store the first breach of each."""
        store = self.state.store
        if store is None:
            return
        for experiment in list(self.state.experiments.configured.values()):
            if experiment.guardrails is None:
                continue
            try:
                self._evaluate(experiment)
            except StoreError as exc:
                log.warning("guardrails of %s not checked now: %s", experiment.name, exc)

    def _evaluate(self, experiment: Experiment) -> None:
        store, guardrails = self.state.store, experiment.guardrails
        self.known[experiment.name] = store.decisions(experiment.name)
        standing = self.standing(experiment)
        undecided = [v for v in experiment.variants if v.name not in standing]
        if not undecided:
            return
        figures = _figures(store.experiment_data(experiment.name))
        control = experiment.variants[0].name
        answers = self.state.experiment_metrics.answers
        for variant in undecided:
            breach = check_variant(guardrails, variant.name, control, figures,
                                   tuple(answers.get((experiment.name, variant.name), ())) or None)
            if breach is None:
                continue
            guardrail, evidence = breach
            action = guardrails.action
            paused = {n for n, d in standing.items() if d.action == "pause"}
            with_traffic = [v.name for v in experiment.variants if v.weight > 0 and v.name not in paused]
            if action == "pause" and variant.name == control:
                action, evidence = "alert", evidence | {"not_paused": "the control is never paused"}
            elif action == "pause" and with_traffic == [variant.name]:
                action, evidence = "alert", evidence | {"not_paused": "the last variant with traffic is never paused"}
            stored = store.record_decision(GuardrailDecision(
                experiment.name, variant.name, guardrails.fingerprint(variant), guardrail, action, time.time(),
                evidence,
            ))
            standing[variant.name] = stored  # the winner's, which may be another worker's
        self.known[experiment.name] = store.decisions(experiment.name)

    # -- the report ------------------------------------------------------------------------------------------------

    def report_block(self, name: str) -> dict[str, Any] | None:
        """For the report: the guardrails in force and the decisions standing (read from the store)."""
        experiment = self.state.experiments.configured.get(name)
        if experiment is None or experiment.guardrails is None:
            return None
        self.read([name])
        return {
            "config": dataclasses.asdict(experiment.guardrails) | {"alpha": ALPHA},
            "decisions": [
                {"variant": d.variant, "guardrail": d.guardrail, "action": d.action, "decided_at": d.decided_at,
                 "paused": d.action == "pause", "evidence": d.evidence}
                for d in self.standing(experiment).values()
            ],
        }

    async def run(self) -> None:
        """Check every interval (the shortest of the experiments'), for as long as the server runs."""
        while True:
            intervals = [e.guardrails.interval_s for e in self.state.experiments.configured.values()
                         if e.guardrails is not None]
            await asyncio.sleep(min(intervals, default=IDLE_INTERVAL_S))
            if not intervals:
                continue
            try:
                await asyncio.to_thread(self.evaluate)
            except Exception:  # a bug here must not end the checks for good
                log.exception("guardrail check failed")
            self.apply()


def _evidence_text(evidence: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(evidence.items()))


def install(state: AppState) -> GuardrailKeeper | None:
    """Route by the stored decisions from now on (read once here, before the server takes requests)."""
    if state.store is None:
        return None
    keeper = GuardrailKeeper(state)
    keeper.read()
    state.experiments.overlay = keeper.overlay
    keeper.apply()
    return keeper
