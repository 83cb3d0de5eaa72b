"""Experiments that act on what they learn, end to end over HTTP: a shadow identical to the serving variant is
skipped; guardrails pause (or only flag) a variant, and the decision holds across reloads, restarts and workers."""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import httpx
import pytest

from tests.images import jpeg
from tests.service.server import counter, running_server

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def two_model_repo(exports, tmp_path_factory):
    """resnet18 and googlenet: two architectures, without inception_v3 (slow to export and to run)."""
    out = tmp_path_factory.mktemp("guardrail-models")
    for name in ("resnet18", "googlenet"):
        exports.copy(exports.checked(name), out)
    return out


def test_a_shadow_identical_to_the_serving_variant_is_skipped_not_run_twice(two_model_repo, tmp_path):
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text("""
experiments:
  - name: twice
    sticky_key: X-User-Id
    variants:
      - {name: resnet, model: resnet18}
      - {name: inception1, model: googlenet}
    shadows:
      - {name: googlenet-shadow, model: googlenet}
""")
    with running_server(models_dir=two_model_repo, experiments_file=experiments, store_path=tmp_path / "s.sqlite3",
                        warmup=False, max_batch_size=4) as (url, _):
        served = {}
        for user in range(24):  # sticky keys: both variants serve some of them
            r = httpx.post(f"{url}/classify/twice", content=jpeg(seed=user), headers={"X-User-Id": f"u{user}"},
                           timeout=60)
            assert r.status_code == 200, r.text
            served[r.json()["request_id"]] = r.json()["variant"]
        by_googlenet = sum(1 for v in served.values() if v == "inception1")
        assert 0 < by_googlenet < len(served), served  # both kinds of request were sent

        def done() -> float:
            return counter(url, "archserve_shadow_images_total", experiment="twice", variant="googlenet-shadow",
                           outcome="done")

        deadline = time.monotonic() + 60
        while done() < len(served) - by_googlenet and time.monotonic() < deadline:
            time.sleep(0.1)  # shadows run in the background, after the answers
        assert done() == len(served) - by_googlenet  # only requests resnet served ran the shadow
        assert counter(url, "archserve_shadow_images_total", experiment="twice", variant="googlenet-shadow",
                       outcome="skipped_identical") == by_googlenet
        report = httpx.get(f"{url}/experiments/twice/report").json()
        pairs = {(s["primary"], s["shadow"]): s["n_pairs"] for s in report["shadow_comparisons"]}
        assert pairs == {("resnet", "googlenet-shadow"): len(served) - by_googlenet,
                         ("inception1", "googlenet-shadow"): 0}  # no "100 % agreement" of googlenet with itself


GUARDED = """
experiments:
  - name: guarded
    variants:
      - {name: control, model: resnet18, weight: 1}
      - {name: worse, model: googlenet, weight: 1}
    guardrails:
      min_images: 12
      accuracy: {max_drop: 0.02}
      action: %s
      interval_s: 0.3
"""


def guarded_file(tmp_path, action: str = "pause"):
    path = tmp_path / "experiments.yaml"
    path.write_text(GUARDED % action)
    return path


def classify(url: str, client: httpx.Client | None = None) -> dict:
    r = (client or httpx).post(f"{url}/classify/guarded", content=jpeg(seed=3), timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def label_for(body: dict) -> int:
    """The true label the test claims: the control is always right, the other variant always wrong."""
    top1 = body["results"][0]["predictions"][0]["index"]
    return top1 if body["variant"] == "control" else (top1 + 1) % 1000


def drive_until_decided(url: str, timeout: float = 90.0) -> tuple[list[int], dict]:
    """Requests from two clients without pause, feedback on each; until the report shows a decision, and for
    1 s after (traffic goes on while the pause takes effect). The status codes, and the report."""
    codes: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client() as client:
            while not stop.is_set():
                r = client.post(f"{url}/classify/guarded", content=jpeg(seed=5), timeout=60)
                codes.append(r.status_code)
                if r.status_code == 200:
                    body = r.json()
                    client.post(f"{url}/feedback", json={"request_id": body["request_id"], "label": label_for(body)})

    threads = [threading.Thread(target=load) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + timeout
        while True:
            report = httpx.get(f"{url}/experiments/guarded/report", timeout=60).json()
            if report["guardrails"]["decisions"]:
                break
            assert time.monotonic() < deadline, report["variants"]
            time.sleep(0.2)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    return codes, report


def assert_never_served_by(url: str, variant: str, n: int = 30) -> None:
    with httpx.Client() as client:
        served = [classify(url, client)["variant"] for _ in range(n)]
    assert variant not in served, served


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_breach_under_load_pauses_the_variant_and_the_pause_survives_reload_and_restart(
    two_model_repo, tmp_path, backend, caplog
):
    from tests.service import postgres as pg

    experiments = guarded_file(tmp_path)
    with contextlib.ExitStack() as stack:
        if backend == "postgres":
            store = {"store_url": stack.enter_context(pg.fresh_schema())}
        else:
            store = {"store_path": tmp_path / "s.sqlite3"}
        common = dict(models_dir=two_model_repo, experiments_file=experiments, warmup=False, max_batch_size=4,
                      admin_token=TOKEN, **store)
        with caplog.at_level(logging.WARNING, logger="service.experiments.guardrails"), \
                running_server(**common) as (url, _):
            codes, report = drive_until_decided(url)
            assert codes and set(codes) == {200}  # no request failed while the pause happened
            (decision,) = report["guardrails"]["decisions"]
            assert (decision["variant"], decision["guardrail"], decision["action"]) == ("worse", "accuracy", "pause")
            evidence = decision["evidence"]
            assert evidence["drop"] == 1.0 and evidence["p_value"] < evidence["alpha"] == 0.05
            assert evidence["threshold"] == 0.02 and evidence["control"] == "control"
            assert_never_served_by(url, "worse")
            assert counter(url, "archserve_experiment_guardrail_breached", experiment="guarded", variant="worse",
                           guardrail="accuracy") == 1
            assert any("variant worse paused" in r.getMessage() and "p_value" in r.getMessage()
                       for r in caplog.records)
            page = httpx.get(f"{url}/experiments/guarded/report.html").text
            assert "Guardrails" in page and "paused" in page and "p_value" in page
            # A reload of the unchanged file keeps the pause.
            reload = httpx.post(f"{url}/experiments/reload", headers={"Authorization": f"Bearer {TOKEN}"})
            assert reload.status_code == 200, reload.text
            weights = {v["name"]: v["weight"] for v in httpx.get(f"{url}/experiments/guarded").json()["variants"]}
            assert weights == {"control": 1, "worse": 0}
            assert_never_served_by(url, "worse")
        # A restart on the same store: paused from the first request, by the same stored decision.
        with running_server(**common) as (url, _):
            weights = {v["name"]: v["weight"] for v in httpx.get(f"{url}/experiments/guarded").json()["variants"]}
            assert weights == {"control": 1, "worse": 0}
            assert_never_served_by(url, "worse")
            again = httpx.get(f"{url}/experiments/guarded/report").json()["guardrails"]["decisions"]
            assert [d["decided_at"] for d in again] == [decision["decided_at"]]
            # Changing the variant's spec in the YAML lifts the decision (a new fingerprint).
            experiments.write_text((GUARDED % "pause").replace("model: googlenet, weight: 1", "model: googlenet, weight: 3"))
            assert httpx.post(f"{url}/experiments/reload", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
            weights = {v["name"]: v["weight"] for v in httpx.get(f"{url}/experiments/guarded").json()["variants"]}
            assert weights == {"control": 1, "worse": 3}


def test_action_alert_flags_and_logs_but_keeps_traffic(two_model_repo, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="service.experiments.guardrails"), running_server(
        models_dir=two_model_repo, experiments_file=guarded_file(tmp_path, "alert"), store_path=tmp_path / "s.db",
        warmup=False, max_batch_size=4,
    ) as (url, _):
        codes, report = drive_until_decided(url)
        assert set(codes) == {200}
        (decision,) = report["guardrails"]["decisions"]
        assert (decision["variant"], decision["action"], decision["paused"]) == ("worse", "alert", False)
        assert counter(url, "archserve_experiment_guardrail_breached", experiment="guarded", variant="worse",
                       guardrail="accuracy") == 1
        assert any("variant worse flagged (alert)" in r.getMessage() for r in caplog.records)
        with httpx.Client() as client:
            served = {classify(url, client)["variant"] for _ in range(40)}
        assert served == {"control", "worse"}  # both still get traffic (40 random picks: all one is 2e-12)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_two_workers_apply_one_decision(two_model_repo, tmp_path, backend):
    from tests.service import postgres as pg
    from tests.service.server import COLD, front_end_pids, service_tree, wait_until

    with contextlib.ExitStack() as stack:
        env = {**COLD, "ARCHSERVE_EXPERIMENTS_FILE": str(guarded_file(tmp_path))}
        if backend == "postgres":
            env["ARCHSERVE_STORE_URL"] = store_url = stack.enter_context(pg.fresh_schema())
        else:
            env["ARCHSERVE_STORE_PATH"] = str(tmp_path / "s.sqlite3")
        proc, url, log = stack.enter_context(service_tree(two_model_repo, tmp_path, "--workers", "2", env=env))
        wait_until(url, "/health/ready", timeout=180)
        front_end_pids(url, 2)  # both front-ends are up and take connections
        codes, _ = drive_until_decided(url, timeout=120)
        assert set(codes) == {200}
        time.sleep(1.0)  # an interval or three: every worker has read the stored decision
        seen: dict[int, set[str]] = {}
        for _ in range(40):  # a new connection each: they land on both front-ends
            with httpx.Client() as client:
                pid = client.get(f"{url}/health/live", timeout=10).json()["pid"]
                seen.setdefault(pid, set()).add(classify(url, client)["variant"])
        assert len(seen) == 2 and all(variants == {"control"} for variants in seen.values()), seen
        if backend == "postgres":
            from service.store.postgres import PostgresStore as Store
            target = store_url
        else:
            from service.store.sqlite import SQLiteStore as Store
            target = tmp_path / "s.sqlite3"
        with Store(target) as store:
            rows = store.decisions("guarded")
        assert [(d.variant, d.action) for d in rows] == [("worse", "pause")], rows


@pytest.mark.parametrize("guardrails, problem", [
    ("{accuracy: {max_drop: 0.02}, action: stop}", "guardrails.action: Input should be 'pause' or 'alert'"),
    ("{accuracy: {max_drop: 1.5}}", "guardrails.accuracy.max_drop: Input should be less than 1"),
    ("{accuracy: {max_drop: -0.1}}", "guardrails.accuracy.max_drop: Input should be greater than or equal to 0"),
    ("{min_images: 100}", "at least one check: accuracy, latency_p99_ms or error_rate"),
    ("{latency_p99_ms: 0}", "guardrails.latency_p99_ms: Input should be greater than 0"),
    ("{error_rate: 1.0}", "guardrails.error_rate: Input should be less than 1"),
    ("{accuracy: {max_drop: 0.02}, latency: 80}", "guardrails.latency: Extra inputs are not permitted"),
])
def test_bad_guardrails_are_refused_with_the_reason(guardrails, problem):
    from service.experiments.config import ExperimentConfigError, parse_experiments

    text = f"""
experiments:
  - name: e
    variants: [{{model: a}}, {{model: b}}]
    guardrails: {guardrails}
"""
    with pytest.raises(ExperimentConfigError) as refused:
        parse_experiments(text, "x.yaml", lambda model, version: None if model in ("a", "b") else "not served")
    assert problem in str(refused.value)
    assert "experiments.0." in str(refused.value)  # which experiment


def test_a_good_guardrails_block_is_parsed_with_its_defaults():
    from service.experiments.config import parse_experiments

    text = """
experiments:
  - name: e
    variants: [{model: a}, {model: b}]
    guardrails: {latency_p99_ms: 80, error_rate: 0.01}
"""
    (experiment,) = parse_experiments(text, "x.yaml", lambda m, v: None if m in ("a", "b") else "no").values()
    g = experiment.guardrails
    assert (g.min_images, g.max_accuracy_drop, g.latency_p99_ms, g.error_rate, g.action, g.interval_s) == (
        500, None, 80, 0.01, "pause", 10.0)
    a, b = experiment.variants
    assert g.fingerprint(a) != g.fingerprint(b)  # one decision per variant
