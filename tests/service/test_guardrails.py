"""Experiments that act on what they learn, end to end over HTTP: a shadow identical to the serving variant is
skipped; guardrails pause (or only flag) a variant, and the decision holds across reloads, restarts and workers."""

from __future__ import annotations

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

        import time
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
