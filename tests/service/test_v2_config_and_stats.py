"""Triton's model configuration and statistics extensions, read by ``tritonclient.http`` from real servers: the
configuration is the manifest and the batcher's settings, the statistics move with the requests served, in one
process and across front-ends whose batchers live in the engine process."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.images import jpeg
from tests.service.server import COLD, counter, engine_held, first_answer, running_server, service_tree, until


@pytest.fixture(scope="module")
def server(exported_repo):
    # One batch of one image at a time and room for two more: a held batch makes the queue refuse at once. No
    # queue delay: a lone image on the idle model runs at once (run_now), the others are submitted.
    with running_server(device="cpu", models_dir=exported_repo, max_batch_size=1, max_queue_size=2, cpu_lanes=1,
                        warmup=False) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(url=server[0].removeprefix("http://"), network_timeout=60.0)
    yield c
    c.close()


def _status(call) -> str:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return caught.value.status()


def test_model_config_is_the_manifest_and_the_batchers_settings(client):
    config = client.get_model_config("resnet18")
    assert config["name"] == "resnet18" and config["platform"] == "onnxruntime_onnx"
    assert config["max_batch_size"] == 1
    assert config["input"] == [{"name": "image", "data_type": "TYPE_UINT8", "format": "FORMAT_NHWC",
                                "dims": [224, 224, 3]}]
    assert config["output"] == [{"name": "logits", "data_type": "TYPE_FP32", "dims": [1000], "label_filename": ""}]
    batching = config["dynamic_batching"]
    assert batching["max_queue_delay_microseconds"] == 0
    assert batching["default_queue_policy"]["max_queue_size"] == 2
    assert batching["default_queue_policy"]["default_timeout_microseconds"] == 30_000_000
    assert config["instance_group"] == [{"name": "resnet18_0", "kind": "KIND_CPU", "count": 1, "gpus": []}]
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["default_model_filename"] == "model.onnx"
    assert config["parameters"]["execution_provider"] == {"string_value": "CPUExecutionProvider"}
    assert client.get_model_config("resnet18", "1") == config
    assert {"model_configuration", "statistics"} <= set(client.get_server_metadata()["extensions"])
    assert _status(lambda: client.get_model_config("nope")) == "404"
    assert _status(lambda: client.get_model_config("resnet18", "2")) == "404"


async def _burst(url: str, count: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count)) as http:
        return await asyncio.gather(*(http.post(f"{url}/classify/resnet18", content=jpeg()) for _ in range(count)))


def test_statistics_count_the_requests_images_and_batches_served(server, client):
    url, app = server
    served = app.state.archserve.models.get("resnet18")
    before = client.get_inference_statistics("resnet18")["model_stats"][0]
    started_ms = time.time_ns() // 1_000_000

    assert httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code == 200  # 1 request
    pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    image = triton.InferInput("image", list(pixels.shape), "UINT8")
    image.set_data_from_numpy(pixels)
    assert client.infer("resnet18", [image]).as_numpy("logits").shape == (2, 1000)  # 1 request, 2 batches of 1

    async def held_burst(gate):  # 1 runs (held), 2 wait, 3 are refused: queue full
        burst = asyncio.ensure_future(_burst(url, 6))
        await asyncio.to_thread(until, lambda: counter(url, "archserve_requests_total", code=503) >= 3,
                                lambda: f"queue depth {served.batcher.queue_depth}")
        gate.set()
        return await burst

    with engine_held(served) as gate:
        codes = sorted(r.status_code for r in asyncio.run(held_burst(gate)))
    assert codes == [200] * 3 + [503] * 3

    after = client.get_inference_statistics("resnet18")["model_stats"][0]
    assert after["name"] == "resnet18" and after["version"] == "1"
    stats, was = after["inference_stats"], before["inference_stats"]

    def delta(key: str) -> int:
        return stats[key]["count"] - was[key]["count"]

    assert delta("success") == 5 and delta("fail") == 3
    assert after["inference_count"] - before["inference_count"] == 6  # images
    assert after["execution_count"] - before["execution_count"] == 6  # batches of one
    assert delta("queue") == 6 and delta("compute_infer") == 6  # per request and batch it ran in
    assert stats["compute_infer"]["ns"] > was["compute_infer"]["ns"] and stats["success"]["ns"] > was["success"]["ns"]
    assert stats["fail"]["ns"] >= was["fail"]["ns"]
    assert stats["compute_input"] == stats["cache_hit"] == {"count": 0, "ns": 0}  # not collected, no cache
    assert after["last_inference"] >= started_ms
    ones = {b["batch_size"]: b for b in after["batch_stats"]}[1]["compute_infer"]
    assert ones["count"] == after["execution_count"] and ones["ns"] > 0

    assert client.get_inference_statistics("resnet18", "1")["model_stats"] == [after]
    assert client.get_inference_statistics()["model_stats"] == [after]  # every model: GET /v2/models/stats
    assert _status(lambda: client.get_inference_statistics("nope")) == "404"
    assert _status(lambda: client.get_inference_statistics("resnet18", "2")) == "404"
    assert _status(lambda: client.get_inference_statistics("resnet18", "01")) == "404"


def test_front_ends_report_the_engines_statistics(exported_repo, tmp_path):
    """With an engine process the batchers, hence the counts, are there: any front-end answers for all."""
    env = {**COLD, "ARCHSERVE_MAX_QUEUE_DELAY_MS": "1.5"}
    with service_tree(exported_repo, tmp_path, "--workers", "2", "--device", "cpu", env=env) as (_, url, _log):
        assert first_answer(url, "/health/ready").status_code == 200
        for _ in range(4):  # new connections: they land on either front-end
            assert httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code == 200
        client = triton.InferenceServerClient(url=url.removeprefix("http://"), network_timeout=60.0)
        try:
            stats = client.get_inference_statistics("resnet18")["model_stats"]
            assert [(s["name"], s["version"]) for s in stats] == [("resnet18", "1")]
            assert stats[0]["inference_stats"]["success"]["count"] == 4 and stats[0]["inference_count"] == 4
            config = client.get_model_config("resnet18")  # the engine's batcher, as the front-end has it
            assert config["max_batch_size"] == 4  # start_service's
            assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 1500
            assert _status(lambda: client.get_inference_statistics("nope")) == "404"
        finally:
            client.close()
