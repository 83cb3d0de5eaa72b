"""A/B experiments end to end over HTTP: routing, shadows, feedback, report, persistence, admin."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from service.app import create_app
from service.experiments.config import ExperimentConfigError
from service.settings import Settings
from tests.images import jpeg
from tests.service.server import running_server

TOKEN = "s3cret-token"
EXPERIMENTS = """
experiments:
  - name: arch-ab
    sticky_key: X-User-Id
    variants:
      - {name: resnet, model: resnet18, weight: 1}
      - {name: inception1, model: googlenet, weight: 1}
    shadows:
      - {name: inception3, model: inception_v3}
"""


@pytest.fixture()
def experiments_file(tmp_path):
    path = tmp_path / "experiments.yaml"
    path.write_text(EXPERIMENTS)
    return path


def serve(repo, experiments_file, store, **extra):
    extra.setdefault("max_batch_size", 8)
    extra.setdefault("warmup", False)  # no test here checks it, and inception_v3's is long (see running_server)
    return running_server(
        models_dir=repo, experiments_file=experiments_file, store_path=store, admin_token=TOKEN, **extra,
    )


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_experiment_routing_shadows_feedback_report_and_restart(experiment_repo, experiments_file, tmp_path):
    store = tmp_path / "store.sqlite3"
    image = jpeg(seed=11)
    with serve(experiment_repo, experiments_file, store) as (url, _):
        listing = httpx.get(f"{url}/experiments").json()
        assert [e["name"] for e in listing["experiments"]] == ["arch-ab"]
        assert listing["experiments"][0]["shadows"][0]["served_version"] == 1

        # sticky: a user always gets the same variant, and the response says which
        served_by = {}
        for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
            variants = set()
            for _ in range(2):
                r = httpx.post(f"{url}/classify/arch-ab", content=image, headers={"X-User-Id": user}, timeout=60)
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["experiment"] == "arch-ab" and r.headers["X-Variant"] == body["variant"]
                variants.add(body["variant"])
            assert len(variants) == 1
            served_by[user] = variants.pop()
        assert set(served_by.values()) <= {"resnet", "inception1"}

        # the primary's answer is what the model itself answers: shadows change nothing
        user = next(u for u, v in served_by.items() if v == "resnet")
        via_experiment = httpx.post(f"{url}/classify/arch-ab", content=image, headers={"X-User-Id": user}).json()
        direct = httpx.post(f"{url}/classify/resnet18", content=image).json()
        assert via_experiment["results"] == direct["results"]

        # feedback by index and by name, idempotent, conflicting, unknown
        request_id = via_experiment["request_id"]
        top1 = via_experiment["results"][0]["predictions"][0]
        first = httpx.post(f"{url}/feedback", json={"request_id": request_id, "label": top1["index"]})
        assert first.status_code == 200 and first.json()["status"] == "created" and first.json()["top1_correct"]
        again = httpx.post(f"{url}/feedback", json={"request_id": request_id, "label": top1["label"]})
        assert again.status_code == 200 and again.json()["status"] == "duplicate"
        conflict = httpx.post(f"{url}/feedback", json={"request_id": request_id, "label": (top1["index"] + 1) % 1000})
        assert conflict.status_code == 409
        unknown = httpx.post(f"{url}/feedback", json={"request_id": "no-such-request", "label": 3})
        assert unknown.status_code == 404 and "no logged prediction" in unknown.json()["error"]
        bad_name = httpx.post(f"{url}/feedback", json={"request_id": request_id, "label": "unicorn"})
        assert bad_name.status_code == 400

        # shadows ran on the same images and were recorded
        def shadow_pairs():
            report = httpx.get(f"{url}/experiments/arch-ab/report").json()
            return sum(c["n_pairs"] for c in report["shadow_comparisons"])
        wait_for(lambda: shadow_pairs() >= 13)
        report = httpx.get(f"{url}/experiments/arch-ab/report").json()
        variants = {v["name"]: v for v in report["variants"]}
        assert sum(v["n_images"] for v in variants.values()) == 13
        assert variants["resnet"]["labelled_n"] == 1 and variants["resnet"]["top1_accuracy"]["rate"] == 1.0
        assert "verdict" in report and "not enough data" in report["verdict"]
        page = httpx.get(f"{url}/experiments/arch-ab/report.html")
        assert page.status_code == 200 and "<svg" in page.text and "arch-ab" in page.text

    # restart on the same store: nothing is lost, feedback still finds old requests
    with serve(experiment_repo, experiments_file, store) as (url, _):
        report = httpx.get(f"{url}/experiments/arch-ab/report").json()
        assert sum(v["n_images"] for v in report["variants"]) == 13
        assert sum(c["n_pairs"] for c in report["shadow_comparisons"]) >= 13
        other = next(u for u, v in served_by.items() if v == "inception1")
        r = httpx.post(f"{url}/classify/arch-ab", content=image, headers={"X-User-Id": other}).json()
        assert r["variant"] == "inception1", "sticky across restarts too"
        late = httpx.post(f"{url}/feedback", json={"request_id": request_id, "label": top1["index"]})
        assert late.json()["status"] == "duplicate"


def test_saturated_queues_shed_shadows_not_primaries(experiment_repo, experiments_file, tmp_path):
    store = tmp_path / "store.sqlite3"
    with serve(experiment_repo, experiments_file, store, max_batch_size=1) as (url, _):
        # make the shadow model the busy one: primaries of inception_v3 itself keep its queue long
        async def burst():
            async with httpx.AsyncClient(timeout=120) as client:
                data = jpeg(seed=2)
                shadowed = [client.post(f"{url}/classify/arch-ab", content=data) for _ in range(12)]
                load = [client.post(f"{url}/classify/inception_v3", content=data) for _ in range(12)]
                return await asyncio.gather(*shadowed, *load)

        responses = asyncio.run(burst())
        assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
        metrics = httpx.get(f"{url}/metrics").text
        shed = [line for line in metrics.splitlines()
                if line.startswith("archserve_shadow_images_total") and 'outcome="shed"' in line]
        assert shed and float(shed[0].rsplit(" ", 1)[1]) > 0


def test_admin_reload_needs_the_token_and_a_bad_file_keeps_the_old_experiments(
    experiment_repo, experiments_file, tmp_path
):
    with serve(experiment_repo, experiments_file, tmp_path / "s.sqlite3") as (url, _):
        assert httpx.post(f"{url}/experiments/reload").status_code == 401
        wrong = httpx.post(f"{url}/experiments/reload", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}

        experiments_file.write_text(EXPERIMENTS.replace("googlenet", "vgg16"))
        bad = httpx.post(f"{url}/experiments/reload", headers=auth)
        assert bad.status_code == 400 and "vgg16" in bad.json()["error"] and "previous experiments stay" in bad.json()["error"]
        assert httpx.get(f"{url}/experiments/arch-ab").json()["variants"][1]["model"] == "googlenet"

        experiments_file.write_text(EXPERIMENTS.replace("arch-ab", "arch-ab2"))
        good = httpx.post(f"{url}/experiments/reload", headers=auth)
        assert good.status_code == 200 and good.json()["experiments"] == ["arch-ab2"]
        assert httpx.post(f"{url}/classify/arch-ab2", content=jpeg(), timeout=60).status_code == 200
        assert httpx.post(f"{url}/classify/arch-ab", content=jpeg()).status_code == 404


def test_admin_endpoints_are_disabled_without_a_token(experiment_repo, experiments_file, tmp_path):
    with running_server(models_dir=experiment_repo, experiments_file=experiments_file,
                        store_path=tmp_path / "s.sqlite3", warmup=False) as (url, _):
        refused = httpx.post(f"{url}/experiments/reload", headers={"Authorization": "Bearer anything"})
        assert refused.status_code == 403 and "ARCHSERVE_ADMIN_TOKEN" in refused.json()["error"]


def test_a_server_with_a_bad_experiments_file_does_not_start(experiment_repo, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXPERIMENTS.replace("name: arch-ab", "name: resnet18"))
    with pytest.raises(ExperimentConfigError, match="has the name of a served model"):
        create_app(Settings(models_dir=experiment_repo, experiments_file=bad, store_path=tmp_path / "s.sqlite3"))


def test_two_replicas_route_the_same_keys_the_same_way(experiment_repo, experiments_file, tmp_path):
    keys = [f"user-{i}" for i in range(12)]
    chosen = []
    for replica in range(2):
        with serve(experiment_repo, experiments_file, tmp_path / f"replica{replica}.sqlite3") as (url, _):
            chosen.append([
                httpx.post(f"{url}/classify/arch-ab", content=jpeg(), headers={"X-User-Id": k}, timeout=60)
                .headers["X-Variant"] for k in keys
            ])
    assert chosen[0] == chosen[1] and len(set(chosen[0])) == 2


def test_an_unreachable_store_degrades_but_never_fails_or_loses_a_request(
    experiment_repo, experiments_file, tmp_path
):
    from service.store.base import StoreError

    with serve(experiment_repo, experiments_file, tmp_path / "s.sqlite3") as (url, app):
        state = app.state.archserve
        real_record = state.store.record

        def down(records):
            raise StoreError("database unreachable (simulated outage)")

        state.store.record = down
        responses = [httpx.post(f"{url}/classify/arch-ab", content=jpeg(), headers={"X-User-Id": f"u{i}"}, timeout=60)
                     for i in range(4)]
        assert all(r.status_code == 200 for r in responses)
        ready = httpx.get(f"{url}/health/ready").json()
        assert ready["ready"] is True and ready["store"]["state"] == "degraded"
        assert ready["store"]["pending_records"] >= 4
        assert "archserve_store_up 0.0" in httpx.get(f"{url}/metrics").text

        state.store.record = real_record  # the database is back: the buffer is written
        wait_for(lambda: httpx.get(f"{url}/health/ready").json()["store"]["state"] == "ok", timeout=30)
        for r in responses:  # nothing was lost: feedback finds every request
            fb = httpx.post(f"{url}/feedback", json={"request_id": r.json()["request_id"], "label": 0})
            assert fb.status_code == 200, fb.text


def test_feedback_reaches_a_shared_postgres_store_through_another_replica(experiment_repo, experiments_file):
    from tests.service import postgres as pg

    with pg.fresh_schema() as store_url:
        common = dict(models_dir=experiment_repo, experiments_file=experiments_file, store_url=store_url,
                      max_batch_size=8, warmup=False)
        with running_server(**common) as (url_a, _), running_server(**common) as (url_b, _):
            served = httpx.post(f"{url_a}/classify/arch-ab", content=jpeg(), headers={"X-User-Id": "zoe"}, timeout=60)
            assert served.status_code == 200
            request_id = served.json()["request_id"]
            feedback = httpx.post(f"{url_b}/feedback", json={"request_id": request_id, "label": 5})
            assert feedback.status_code == 200 and feedback.json()["status"] == "created", feedback.text
            again = httpx.post(f"{url_a}/feedback", json={"request_id": request_id, "label": 5})
            assert again.json()["status"] == "duplicate"
            report = httpx.get(f"{url_b}/experiments/arch-ab/report").json()
            assert sum(v["labelled_n"] for v in report["variants"]) == 1


def test_a_database_that_is_down_at_start_does_not_stop_the_server(experiment_repo, experiments_file):
    unreachable = "postgresql://archserve:secret@127.0.0.1:1/nowhere"
    with running_server(models_dir=experiment_repo, experiments_file=experiments_file, store_url=unreachable,
                        warmup=False) as (url, _):
        r = httpx.post(f"{url}/classify/arch-ab", content=jpeg(), timeout=60)
        assert r.status_code == 200
        ready = httpx.get(f"{url}/health/ready").json()
        assert ready["ready"] is True and ready["store"]["state"] == "degraded"
        assert "secret" not in str(ready)
        fb = httpx.post(f"{url}/feedback", json={"request_id": r.json()["request_id"], "label": 1})
        assert fb.status_code == 503 and "retry later" in fb.json()["error"]


def test_sighup_reloads_the_experiments_file(experiment_repo, experiments_file, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from tests.service.server import free_port, wait_until

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHSERVE_", "PROMETHEUS_"))}
    env.update(ARCHSERVE_EXPERIMENTS_FILE=str(experiments_file), ARCHSERVE_STORE_PATH=str(tmp_path / "s.sqlite3"),
               ARCHSERVE_WARMUP="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--models-dir", str(experiment_repo),
         "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(url, "/health/ready", timeout=120)
        experiments_file.write_text(EXPERIMENTS.replace("arch-ab", "arch-hup"))
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: [e["name"] for e in httpx.get(f"{url}/experiments").json()["experiments"]] == ["arch-hup"])
        experiments_file.write_text("experiments: [")  # a bad file on SIGHUP: refused, the old set stays
        proc.send_signal(signal.SIGHUP)
        time.sleep(1)
        assert [e["name"] for e in httpx.get(f"{url}/experiments").json()["experiments"]] == ["arch-hup"]
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


@pytest.mark.slow
def test_an_experiment_compares_inception_v3_with_the_hybrid_and_shadows_se_inception(exports, tmp_path):
    # The three Inception generations side by side in one experiment: the factorised v3 against the residual
    # hybrid, SE-Inception v3 in the shadow; the session's exports, as test_pipeline checks them.
    repo = tmp_path / "models"
    for name in ("inception_v3", "inception_resnet_v2", "se_inception_v3"):
        exports.copy(exports.checked(name), repo)
    config = tmp_path / "experiments.yaml"
    config.write_text("""
experiments:
  - name: inception-generations
    sticky_key: X-User-Id
    variants:
      - {name: factorised, model: inception_v3, weight: 1}
      - {name: hybrid, model: inception_resnet_v2, weight: 1}
    shadows:
      - {name: se, model: se_inception_v3}
""")
    image = jpeg(seed=5)
    with serve(repo, config, tmp_path / "store.sqlite3") as (url, _):
        served_by = {}
        for user in [f"user-{i}" for i in range(8)]:
            r = httpx.post(f"{url}/classify/inception-generations", content=image, headers={"X-User-Id": user},
                           timeout=120)
            assert r.status_code == 200, r.text
            served_by[user] = r.json()
        assert {b["variant"] for b in served_by.values()} == {"factorised", "hybrid"}
        for body in served_by.values():  # each variant's answer is its model's own
            model = {"factorised": "inception_v3", "hybrid": "inception_resnet_v2"}[body["variant"]]
            assert body["model"] == model
        hybrid = next(b for b in served_by.values() if b["variant"] == "hybrid")
        direct = httpx.post(f"{url}/classify/inception_resnet_v2", content=image, timeout=120).json()
        assert hybrid["results"] == direct["results"]

        def shadow_pairs():
            report = httpx.get(f"{url}/experiments/inception-generations/report").json()
            return sum(c["n_pairs"] for c in report["shadow_comparisons"])
        wait_for(lambda: shadow_pairs() >= 8, timeout=120)  # one pair per request through the experiment
        report = httpx.get(f"{url}/experiments/inception-generations/report").json()
        assert {c["shadow"] for c in report["shadow_comparisons"]} == {"se"}
        assert {c["primary"] for c in report["shadow_comparisons"]} == {"factorised", "hybrid"}
        assert sorted(v["name"] for v in report["variants"]) == ["factorised", "hybrid"]
        assert sum(v["n_images"] for v in report["variants"]) == 8
