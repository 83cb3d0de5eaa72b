"""allocation: thompson and cost per variant through HTTP, against a real server and the real stores."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from modelrepo.manifest import load_manifest
from tests.images import jpeg
from tests.service.server import running_server, until

EXPERIMENTS = """
experiments:
  - name: bandit-ab
    allocation: thompson
    bandit: {floor: 0.05, warmup_images: 4, refresh_s: 0.2, sticky_window_s: 3600}
    variants:
      - {name: control, model: resnet18, weight: 1}
      - {name: better, model: googlenet, weight: 1}
"""


@pytest.fixture(scope="module")
def bandit_repo(exports, tmp_path_factory):
    out = tmp_path_factory.mktemp("bandit-models")
    for name in ("resnet18", "googlenet"):
        exports.copy(exports.checked(name), out)
    return out


@contextlib.contextmanager
def store_settings(kind, tmp_path):
    if kind == "sqlite":
        yield {"store_path": tmp_path / "store.sqlite3"}
        return
    from tests.service import postgres as pg

    with pg.fresh_schema() as url:
        yield {"store_url": url}


def classify(url, seed):
    r = httpx.post(f"{url}/classify/bandit-ab", content=jpeg(seed=seed), timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    return body["variant"], body["request_id"], body["results"][0]["predictions"][0]["index"]


def shares(url):
    (experiment,) = httpx.get(f"{url}/experiments").json()["experiments"]
    return {v["name"]: v["share"] for v in experiment["variants"]}


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_shares_move_to_the_better_variant_after_feedback(bandit_repo, tmp_path, kind):
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(EXPERIMENTS)
    with store_settings(kind, tmp_path) as store, running_server(
        models_dir=bandit_repo, experiments_file=experiments, max_batch_size=8, warmup=False, **store,
    ) as (url, _):
        assert httpx.get(f"{url}/experiments").json()["experiments"][0]["allocation"] == "thompson"
        served = []
        for seed in range(60):  # the warm-up's weights are 1:1: both variants get images
            served.append(classify(url, seed))
            if min(sum(1 for v, _, _ in served if v == name) for name in ("control", "better")) >= 5:
                break
        assert shares(url) == {"control": 0.5, "better": 0.5}
        before = httpx.get(f"{url}/experiments/bandit-ab/report").json()["bandit"]
        assert before["phase"] == "warmup" and all(a["labelled"] == 0 for a in before["arms"])

        for variant, request_id, top1 in served:  # better is always right, control always wrong
            label = top1 if variant == "better" else (top1 + 1) % 1000
            assert httpx.post(f"{url}/feedback", json={"request_id": request_id, "label": label}).status_code == 200

        def moved():
            classify(url, 0)  # requests trigger the background refresh; the listing shows its shares
            return shares(url)["better"] >= 0.8
        until(moved, lambda: "the shares did not move", timeout=30, interval=0.1)
        assert shares(url)["control"] == pytest.approx(0.05, abs=0.01)  # the floor, not starvation
        after = [classify(url, seed)[0] for seed in range(40)]
        assert after.count("better") >= 30, after  # 95% expected

        report = httpx.get(f"{url}/experiments/bandit-ab/report").json()
        bandit = {a["name"]: a for a in report["bandit"]["arms"]}
        n_control = sum(1 for v, _, _ in served if v == "control")
        n_better = len(served) - n_control
        assert report["bandit"]["phase"] == "thompson"
        assert (bandit["better"]["alpha"], bandit["better"]["beta"]) == (1 + n_better, 1)
        assert (bandit["control"]["alpha"], bandit["control"]["beta"]) == (1, 1 + n_control)
        assert report["bandit"]["expected_regret"] == pytest.approx(
            n_control * ((1 + n_better) / (2 + n_better) - 1 / (2 + n_control)))

        cost = {v["name"]: v["cost"] for v in report["variants"]}
        manifest = load_manifest(bandit_repo / "googlenet" / "1")
        assert cost["better"]["params"] == manifest.complexity.params
        assert cost["better"]["gflops"] == manifest.complexity.gflops
        assert cost["control"]["compute_s_per_image"] > 0 and cost["better"]["compute_s_per_image"] > 0
        assert cost["better"]["top1_difference"] == pytest.approx(1.0)  # 100% vs 0%
        assert cost["better"]["summary"].startswith("better (googlenet) costs ")
        assert cost["better"]["summary"].endswith("for +100.0 top-1 points against control")
        page = httpx.get(f"{url}/experiments/bandit-ab/report.html").text
        assert "Bandit allocation" in page and "Cost per variant" in page and "better (googlenet) costs" in page
        metrics = httpx.get(f"{url}/metrics").text
        assert 'archserve_experiment_variant_model{experiment="bandit-ab",model="googlenet",variant="better",' \
               'version="1"} 1.0' in metrics


def test_several_workers_agree_on_the_shares_and_the_compute_per_image(bandit_repo, tmp_path):
    """Two front-ends and the engine: every worker reads the same store (same shares, seeded from the same
    counts) and the same metrics directory (the engine's batches, whichever worker reports)."""
    from tests.service.server import COLD, first_answer, service_tree

    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(EXPERIMENTS)
    env = {**COLD, "ARCHSERVE_EXPERIMENTS_FILE": str(experiments), "ARCHSERVE_STORE_PATH": str(tmp_path / "s.db")}
    with service_tree(bandit_repo, tmp_path, "--workers", "2", "--device", "cpu", env=env) as (_, url, _):
        assert first_answer(url, "/health/ready").status_code == 200
        served = [classify(url, seed) for seed in range(16)]
        for variant, request_id, top1 in served:
            label = top1 if variant == "better" else (top1 + 1) % 1000
            assert httpx.post(f"{url}/feedback", json={"request_id": request_id, "label": label}).status_code == 200

        calls = [len(served)]

        def agreed():
            for seed in range(6):  # requests land on both workers and trigger their refreshes
                classify(url, seed)
            calls[0] += 6
            seen = {tuple(sorted(shares(url).items())) for _ in range(12)}  # listings from both workers
            return len(seen) == 1 and dict(next(iter(seen)))["better"] >= 0.8
        until(agreed, lambda: "the workers did not agree", timeout=60, interval=0.1)

        def measured():  # every worker sees every image's batch (run in the engine): the same totals
            reports = [httpx.get(f"{url}/experiments/bandit-ab/report").json() for _ in range(6)]
            assert all(v["cost"]["compute_s_per_image"] > 0 for r in reports for v in r["variants"])
            return {sum(v["cost"]["measured_images"] for v in r["variants"]) for r in reports} == {calls[0]}
        until(measured, lambda: "no compute measured", timeout=10, interval=0.1)
