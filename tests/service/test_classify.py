"""The HTTP API over a real uvicorn server and real exported models."""

from __future__ import annotations

import asyncio
import base64
import io
import math
import os
import threading

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families

from export.preprocess import reference_preprocess
from modelrepo import load_manifest
from service import serving
from tests.images import jpeg, variants
from tests.service.server import cuda_runs, engine_held, running_server, until


@pytest.fixture(scope="module")
def server(exported_repo):
    # The CPU on every machine: these tests compare served scores with the fp32 file run on the CPU. What a
    # GPU machine serves is checked by test_auto_serves_what_the_machine_has.
    with running_server(
        device="cpu", models_dir=exported_repo, max_batch_size=8, max_body_bytes=2_000_000, max_image_pixels=4_000_000,
        max_images_per_request=8,
    ) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def url(server):
    return server[0]


def metric_samples(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=60).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def sample(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max())
    return probs / probs.sum()


def reference_input(version_dir, data: bytes) -> np.ndarray:
    """The export stage's reference preprocessing of ``data``, as the model's manifest says."""
    p = load_manifest(version_dir).preprocessing
    return reference_preprocess(io.BytesIO(data), p.resize, p.crop, p.interpolation)


def reference_top_k(repo, data: bytes, k: int):
    manifest = load_manifest(repo / "resnet18" / "1")
    array = reference_input(repo / "resnet18" / "1", data)
    session = ort.InferenceSession(str(repo / "resnet18" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    probs = softmax(session.run(None, {"image": array[None]})[0][0])
    order = np.argsort(-probs)[:k]
    return [(int(i), manifest.labels[i], float(probs[i])) for i in order]


@pytest.mark.parametrize("kind", ["jpeg", "png-rgba", "jpeg-exif-rotated", "webp"])
def test_top_k_equals_the_model_run_on_the_reference_preprocessing(url, exported_repo, kind):
    data = variants(seed=4)[kind]
    response = httpx.post(f"{url}/classify/resnet18?top_k=3", content=data, headers={"Content-Type": "image/*"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "resnet18" and body["version"] == 1 and body["weights"] == "random-init"
    assert response.headers["X-Request-ID"] == body["request_id"]
    (result,) = body["results"]
    got = [(p["index"], p["label"], p["score"]) for p in result["predictions"]]
    expected = reference_top_k(exported_repo, data, 3)
    assert [g[:2] for g in got] == [e[:2] for e in expected]
    np.testing.assert_allclose([g[2] for g in got], [e[2] for e in expected], rtol=1e-4)


def test_auto_serves_what_the_machine_has(exported_repo):
    """device=auto: CUDA with the fp16 file where CUDA runs, else the CPU with fp32; reported as such, and the
    scores are those of that file on that provider."""
    from service.models.engine import EngineConfig, OnnxEngine

    version_dir = exported_repo / "resnet18" / "1"
    cuda = cuda_runs(version_dir)
    expected = ("CUDAExecutionProvider", "fp16") if cuda else ("CPUExecutionProvider", "fp32")
    with running_server(models_dir=exported_repo, max_batch_size=4) as (url, _):
        (model,) = httpx.get(f"{url}/models").json()["models"]
        assert (model["provider"], model["precision"]) == expected
        # CUDA: one session per padded size. CPU: one, and one per lane where there are 2+ cores.
        lanes = model["batching"]["cpu_lanes"]
        assert model["batching"]["sessions"] == (len(model["batching"]["padded_sizes"]) if cuda
                                                 else 1 + lanes if lanes > 1 else 1)
        assert lanes == 1 if cuda else lanes in (1, 2)
        data = jpeg(seed=8)
        response = httpx.post(f"{url}/classify/resnet18?top_k=3", content=data, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    array = reference_input(version_dir, data)
    engine = OnnxEngine(version_dir, load_manifest(version_dir), EngineConfig(device="auto"))
    assert (engine.provider, engine.precision) == expected
    probs = softmax(engine.run(array[None])[0])
    got = response.json()["results"][0]["predictions"]
    # Same file, same provider: the scores agree closely. fp16 on CUDA may order near-ties differently between
    # two sessions (each picks its own cuDNN algorithms), so the scores are compared, not only the order.
    tolerance = 2e-2 if cuda else 1e-4
    np.testing.assert_allclose([g["score"] for g in got], probs[[g["index"] for g in got]], rtol=tolerance)
    assert got[0]["score"] >= probs.max() * (1 - tolerance)


def test_multipart_images_come_back_in_order(url, exported_repo):
    images = [jpeg(seed=s) for s in range(3)]
    files = [("images", (f"img{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    response = httpx.post(f"{url}/classify/resnet18/versions/1?top_k=1", files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["filename"] for r in results] == ["img0.jpg", "img1.jpg", "img2.jpg"]
    for data, result in zip(images, results):
        assert result["predictions"][0]["index"] == reference_top_k(exported_repo, data, 1)[0][0]


def test_client_request_id_is_echoed_but_ours_stays_unique(url):
    first = httpx.post(f"{url}/classify/resnet18", content=jpeg(), headers={"X-Request-ID": "abc-123"})
    second = httpx.post(f"{url}/classify/resnet18", content=jpeg(), headers={"X-Request-ID": "abc-123"})
    assert first.json()["client_request_id"] == "abc-123" and first.headers["X-Request-ID"] == "abc-123"
    assert first.json()["request_id"] != second.json()["request_id"]


def test_concurrent_requests_are_batched(server):
    """24 concurrent requests are batched: the engine is held while they arrive (one or two batches wait at the
    gate, one per CPU lane), so the rest queue however fast this machine is, and run in batches of at most
    max_batch_size=8 once it is released."""
    url, app = server
    batcher = app.state.archserve.models.get("resnet18").batcher
    before = metric_samples(url)

    async def burst():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=24)) as client:
            data = jpeg(seed=9)
            return await asyncio.gather(*(client.post(f"{url}/classify/resnet18", content=data) for _ in range(24)))

    async def scenario(gate):
        responses = asyncio.ensure_future(burst())
        await asyncio.to_thread(
            until, lambda: batcher.queue_depth + batcher.in_flight == 24,
            lambda: f"not all 24 reached the batcher: {batcher.queue_depth} queued, {batcher.in_flight} held",
        )
        held, queued = batcher.in_flight, batcher.queue_depth
        gate.set()
        return held, queued, await responses

    with engine_held(app.state.archserve.models.get("resnet18")) as gate:
        held, queued, responses = asyncio.run(scenario(gate))
    assert all(r.status_code == 200 for r in responses)
    after = metric_samples(url)
    labels = dict(model="resnet18", version=1)

    def delta(name, **extra):
        return sample(after, name, **labels, **extra) - sample(before, name, **labels, **extra)

    assert delta("archserve_batch_size_sum") == 24
    # At most one held batch per lane (2 here), then the queued images in full batches of 8 and one remainder.
    assert 1 <= held <= 16 and queued == 24 - held
    assert delta("archserve_batch_size_count") <= 2 + math.ceil(queued / 8), (held, queued)
    assert delta("archserve_batch_size_bucket", le="8.0") == delta("archserve_batch_size_count")  # none over 8
    assert delta("archserve_batch_size_bucket", le="4.0") < delta("archserve_batch_size_count")  # some full


def test_a_lone_image_is_decoded_in_the_batch_thread_that_runs_it_and_several_in_the_decode_pool(url, monkeypatch):
    """On an idle model a one-image request is decoded and run in one batch thread (one hand-off between
    threads instead of two); a request of several images decodes them side by side in the pool. Both give the
    same answer for the same image."""
    threads: list[str] = []
    decode_for = serving.decode_for

    def recording(*args):
        threads.append(threading.current_thread().name)
        return decode_for(*args)

    monkeypatch.setattr(serving, "decode_for", recording)
    data = jpeg(seed=21)
    lone = httpx.post(f"{url}/classify/resnet18", content=data, timeout=60)
    assert lone.status_code == 200, lone.text
    assert len(threads) == 1 and threads[0].startswith("batcher-"), threads
    threads.clear()
    files = [("image", ("a.jpg", data, "image/jpeg")), ("image", ("b.jpg", jpeg(seed=22), "image/jpeg"))]
    several = httpx.post(f"{url}/classify/resnet18", files=files, timeout=60)
    assert several.status_code == 200, several.text
    assert len(threads) == 2 and not any(t.startswith("batcher-") for t in threads), threads
    assert several.json()["results"][0]["predictions"] == lone.json()["results"][0]["predictions"]


def _chunks(data: bytes, size: int = 65536):
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize(
    "request_kwargs, status, code, message",
    [
        (dict(path="/classify/resnet99"), 404, "not_found", "served models: resnet18"),
        (dict(path="/classify/resnet18/versions/7"), 404, "not_found", "served versions: 1"),
        (dict(content=b"this is not an image"), 400, "invalid_image", "not an image"),
        (dict(content=jpeg()[:5000]), 400, "invalid_image", "truncated or corrupt"),
        (dict(content=b"", headers={"Content-Type": "image/jpeg"}), 400, "bad_request", "no body"),
        (dict(content=b"hello", headers={"Content-Type": "text/plain"}), 415, "unsupported_media_type", "text/plain"),
        (dict(content=b"%PDF-1.4 ..."), 415, "unsupported_media_type", "PDF"),
        (dict(content=b"x" * 2_000_001), 413, "payload_too_large", "over the limit of 2000000"),
        (dict(content=_chunks(b"x" * 3_000_000)), 413, "payload_too_large", "exceeds the limit"),
        (dict(content=jpeg(2400, 1800, quality=20)), 413, "image_too_large", "over the limit of 4000000"),
        (dict(path="/classify/resnet18?top_k=0"), 400, "bad_request", "top_k"),
        (dict(path="/classify/resnet18?top_k=many"), 400, "bad_request", "top_k"),
        (dict(path="/classify/resnet18?top_k=5.0"), 400, "bad_request", "top_k: Value error, must be a whole number"),
        (dict(files=[("f", ("a.txt", b"x", "text/plain"))] * 9), 400, "bad_request", "multipart"),
        (dict(files={"field": (None, "just text")}), 400, "bad_request", "no files"),
    ],
    ids=["unknown-model", "unknown-version", "not-image", "truncated", "empty", "text-type", "pdf",
         "too-large-declared", "too-large-chunked", "too-many-pixels", "top-k-zero", "top-k-text", "top-k-float",
         "too-many-files", "multipart-no-file"],
)
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(url, request_kwargs, status, code, message):
    kwargs = dict(request_kwargs)
    path = kwargs.pop("path", "/classify/resnet18")
    if "content" not in kwargs and "files" not in kwargs:
        kwargs["content"] = jpeg()
    response = httpx.post(url + path, timeout=60, **kwargs)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code and message in body["error"], body
    follow_up = httpx.post(f"{url}/classify/resnet18", content=jpeg(seed=1), timeout=60)
    assert follow_up.status_code == 200


@pytest.mark.parametrize("version", ["1.0", "%201", "01", "0", "-1", "+1", "1%20", "%EF%BC%91", "1e0"])
def test_a_version_segment_is_a_canonical_positive_integer_on_every_route(url, version):
    """Version 1 is served, and written any other way it is not found: on /classify as on the v2 routes."""
    image = jpeg()
    v2_body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1],
                           "data": [base64.b64encode(image).decode()]}]}
    routes = [("post", "/classify/resnet18/versions/{v}", {"content": image}),
              ("post", "/v2/models/resnet18/versions/{v}/infer", {"json": v2_body}),
              ("get", "/v2/models/resnet18/versions/{v}", {}),
              ("get", "/v2/models/resnet18/versions/{v}/ready", {})]
    for method, path, kwargs in routes:
        assert httpx.request(method, url + path.format(v="1"), timeout=60, **kwargs).status_code == 200, path
        response = httpx.request(method, url + path.format(v=version), timeout=60, **kwargs)
        assert response.status_code == 404, (path, response.text)
        assert response.json()["code"] == "not_found" and "served versions: 1" in response.json()["error"], path


def test_models_endpoints_describe_what_is_served(url):
    listing = httpx.get(f"{url}/models").json()
    (model,) = listing["models"]
    assert model["name"] == "resnet18" and model["version"] == 1
    assert model["provider"] == "CPUExecutionProvider" and model["precision"] == "fp32"
    assert model["random_init"] is True and model["weights"]["source"] == "random-init"
    assert model["batching"]["max_batch_size"] == 8 and model["input"]["shape"] == [None, 224, 224, 3]
    assert model["params"] == 11689512 and model["gflops"] > 1.8
    one = httpx.get(f"{url}/models/resnet18").json()
    assert one["latest_version"] == 1 and one["versions"][0]["architecture"] == "resnet18"
    missing = httpx.get(f"{url}/models/vgg16")
    assert missing.status_code == 404 and "resnet18" in missing.json()["error"]


def test_health_and_docs(url):
    assert httpx.get(f"{url}/health/live").json() == {"status": "alive", "pid": os.getpid()}
    ready = httpx.get(f"{url}/health/ready").json()
    assert ready["ready"] is True and ready["models"] == ["resnet18/1"]
    spec = httpx.get(f"{url}/openapi.json").json()
    assert "/classify/{model}" in spec["paths"] and "image/jpeg" in str(spec["paths"]["/classify/{model}"])
    assert httpx.get(f"{url}/docs").status_code == 200


def test_metrics_exposition_parses_and_uses_only_known_labels(url):
    # Names the route sees and no served model has: one label for all of them, never the raw name.
    for name in ("..%2F..%2Fetc%2Fpasswd", "no-such-model", "x" * 200):
        assert httpx.post(f"{url}/classify/{name}", content=jpeg()).status_code == 404
    httpx.post(f"{url}/classify/resnet18", content=jpeg())
    text = httpx.get(f"{url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in [
        ("archserve_requests", "counter"), ("archserve_images", "counter"),
        ("archserve_request_duration_seconds", "histogram"), ("archserve_preprocess_duration_seconds", "histogram"),
        ("archserve_queue_wait_seconds", "histogram"), ("archserve_inference_duration_seconds", "histogram"),
        ("archserve_batch_size", "histogram"), ("archserve_alone_batches", "counter"),
        ("archserve_queue_depth", "gauge"),
        ("archserve_inflight_requests", "gauge"), ("archserve_model_info", "gauge"),
    ]:
        assert families[name].type == kind, name
        assert families[name].documentation and "TODO" not in families[name].documentation
    models = {s.labels.get("model") for f in families.values() for s in f.samples if "model" in s.labels}
    assert models == {"resnet18", "_unknown"}
    (info,) = families["archserve_model_info"].samples
    assert info.labels == {"model": "resnet18", "version": "1", "architecture": "resnet18", "precision": "fp32",
                           "provider": "CPUExecutionProvider", "weights": "random-init"}
    samples = metric_samples(url)
    assert sample(samples, "archserve_requests_total", model="_unknown", version="", code="404") >= 1
