"""The Open Inference Protocol (KServe v2) data plane over a real uvicorn server and a real exported model."""

from __future__ import annotations

import base64
import json
import struct

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from modelrepo import load_manifest
from service.errors import BadRequestError
from service.v2 import codec
from tests.images import jpeg
from tests.service.server import running_server

MAX_IMAGES = 8
MAX_BODY = 2_000_000
PIXELS = 224 * 224 * 3


@pytest.fixture(scope="module")
def server(exported_repo):
    with running_server(  # the CPU on every machine: outputs are compared with the fp32 file on the CPU
        device="cpu", models_dir=exported_repo, max_batch_size=8, max_body_bytes=MAX_BODY,
        max_images_per_request=MAX_IMAGES, warmup=False,
    ) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def session(exported_repo):
    path = exported_repo / "resnet18" / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def labels(exported_repo):
    return load_manifest(exported_repo / "resnet18" / "1").labels


def pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def binary_request(header: dict, *blobs: bytes) -> tuple[bytes, dict]:
    head = json.dumps(header).encode()
    return head + b"".join(blobs), {"Inference-Header-Content-Length": str(len(head))}


def bytes_elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


def split_binary_response(response: httpx.Response) -> tuple[dict, bytes]:
    length = int(response.headers["Inference-Header-Content-Length"])
    return json.loads(response.content[:length]), response.content[length:]


def parse_bytes(blob: bytes) -> list[bytes]:
    out, offset = [], 0
    while offset < len(blob):
        (n,) = struct.unpack_from("<I", blob, offset)
        out.append(blob[offset + 4:offset + 4 + n])
        offset += 4 + n
    return out


def uint8_json(array: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(array.shape),
                        "data": array.ravel().tolist()}], **extra}


def small_valid(client: httpx.Client) -> None:
    """The request that follows every rejected one: the server keeps serving."""
    content, headers = binary_request(
        {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 224, 224, 3],
                     "parameters": {"binary_data_size": PIXELS}}],
         "outputs": [{"name": "logits", "parameters": {"classification": 1}}]},
        pixels(1, seed=9).tobytes(),
    )
    response = client.post("/v2/models/resnet18/infer", content=content, headers=headers)
    assert response.status_code == 200, response.text


# ----------------------------------------------------------------------------- health and metadata


def test_server_metadata_and_health(client):
    meta = client.get("/v2")
    assert meta.status_code == 200
    body = meta.json()
    assert body["name"] == "archserve" and body["version"]
    assert {"binary_tensor_data", "classification"} <= set(body["extensions"])
    assert client.get("/v2/health/live").status_code == 200
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}


@pytest.mark.parametrize("path", ["/v2/models/resnet18", "/v2/models/resnet18/versions/1"])
def test_model_metadata(client, path):
    response = client.get(path)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "name": "resnet18",
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": "image", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}],
    }


def test_model_ready_and_unknown_models(client):
    assert client.get("/v2/models/resnet18/ready").status_code == 200
    assert client.get("/v2/models/resnet18/versions/1/ready").status_code == 200
    for path, fragment in [
        ("/v2/models/nope/ready", "model 'nope' is not served; served models: resnet18"),
        ("/v2/models/nope", "model 'nope' is not served; served models: resnet18"),
        ("/v2/models/resnet18/versions/2/ready", "no served version 2; served versions: 1"),
        ("/v2/models/resnet18/versions/2", "no served version 2; served versions: 1"),
        ("/v2/models/resnet18/versions/latest", "no version 'latest'"),
    ]:
        response = client.get(path)
        assert response.status_code == 404, path
        assert fragment in response.json()["error"], response.text
    response = client.post("/v2/models/nope/infer", json=uint8_json(pixels(1)))
    assert response.status_code == 404 and "served models: resnet18" in response.json()["error"]
    response = client.post("/v2/models/resnet18/versions/3/infer", json=uint8_json(pixels(1)))
    assert response.status_code == 404 and "served versions: 1" in response.json()["error"]
    small_valid(client)


def test_not_ready_server_answers_503(tmp_path):
    with running_server(wait_ready=False, models_dir=tmp_path, warmup=False) as (url, _):
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/v2/health/live").status_code == 200
            ready = c.get("/v2/health/ready")
            assert ready.status_code == 503 and ready.json() == {"ready": False}
            assert c.get("/v2/models/resnet18/ready").status_code == 503
            for path in ("/v2/models/resnet18", "/v2/models/resnet18/versions/1", "/models/resnet18"):  # not 404
                metadata = c.get(path)
                assert metadata.status_code == 503 and "not ready" in metadata.json()["error"], metadata.text
            response = c.post("/v2/models/resnet18/infer", json=uint8_json(pixels(1)))
            assert response.status_code == 503 and "not ready" in response.json()["error"]


# ----------------------------------------------------------------------------- inference


@pytest.mark.parametrize("nested", [False, True])
def test_json_uint8_infer_equals_onnxruntime(client, session, nested):
    array = pixels(2, seed=1)
    request = uint8_json(array, id="req-7")
    if nested:
        request["inputs"][0]["data"] = array.tolist()  # the protocol allows nested row-major data
    response = client.post("/v2/models/resnet18/versions/1/infer", json=request)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["model_name"] == "resnet18" and body["model_version"] == "1" and body["id"] == "req-7"
    (out,) = body["outputs"]
    assert out["name"] == "logits" and out["datatype"] == "FP32" and out["shape"] == [2, 1000]
    got = np.asarray(out["data"], np.float32).reshape(2, 1000)
    expected = session.run(None, {"image": array})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_bytes_infer_equals_classify(client):
    images = [jpeg(seed=s) for s in range(3)]
    classify = [
        client.post("/classify/resnet18?top_k=3", content=data, headers={"Content-Type": "image/jpeg"}).json()
        for data in images
    ]
    expected = [[p["index"] for p in c["results"][0]["predictions"]] for c in classify]
    expected_scores = [[p["score"] for p in c["results"][0]["predictions"]] for c in classify]

    as_json = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3],
                           "data": [base64.b64encode(d).decode() for d in images]}]}
    content, headers = binary_request(
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3, 1],
                     "parameters": {"binary_data_size": len(bytes_elements(*images))}}]},
        bytes_elements(*images),
    )
    for response in (client.post("/v2/models/resnet18/infer", json=as_json),
                     client.post("/v2/models/resnet18/infer", content=content, headers=headers)):
        assert response.status_code == 200, response.text
        logits = np.asarray(response.json()["outputs"][0]["data"], np.float64).reshape(3, 1000)
        assert [list(np.argsort(-row, kind="stable")[:3]) for row in logits] == expected
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        for row, idx, scores in zip(probs, expected, expected_scores):
            np.testing.assert_allclose(row[idx], scores, rtol=1e-4)


def test_classification_extension(client, session, labels):
    array = pixels(2, seed=2)
    logits = session.run(None, {"image": array})[0]
    request = uint8_json(array, outputs=[{"name": "logits", "parameters": {"classification": 4}}])
    response = client.post("/v2/models/resnet18/infer", json=request)
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    assert out["datatype"] == "BYTES" and out["shape"] == [2, 4]
    rows = [out["data"][:4], out["data"][4:]]
    for row, expected in zip(rows, logits):
        parsed = [s.split(":", 2) for s in row]
        indices = [int(p[1]) for p in parsed]
        assert indices == list(np.argsort(-expected, kind="stable")[:4])
        assert [p[2] for p in parsed] == [labels[i] for i in indices]
        np.testing.assert_allclose([float(p[0]) for p in parsed], expected[indices], atol=1e-4)
        assert all(len(p[0].split(".")[1]) == 6 for p in parsed)  # std::to_string's "%f", as Triton

    # The same, as binary BYTES (length-prefixed strings).
    request["outputs"][0]["parameters"]["binary_data"] = True
    response = client.post("/v2/models/resnet18/infer", json=request)
    assert response.headers["content-type"] == "application/octet-stream"
    header, blob = split_binary_response(response)
    assert header["outputs"][0]["parameters"]["binary_data_size"] == len(blob)
    assert [s.decode() for s in parse_bytes(blob)] == out["data"]


def test_binary_input_and_output_round_trip(client, session):
    array = pixels(3, seed=3)
    content, headers = binary_request(
        {"id": "bin-1", "parameters": {"binary_data_output": True},
         "inputs": [{"name": "image", "datatype": "UINT8", "shape": [3, 224, 224, 3],
                     "parameters": {"binary_data_size": array.nbytes}}]},
        array.tobytes(),
    )
    response = client.post("/v2/models/resnet18/infer", content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    header, blob = split_binary_response(response)
    assert header["id"] == "bin-1" and header["model_name"] == "resnet18" and header["model_version"] == "1"
    (out,) = header["outputs"]
    assert out["datatype"] == "FP32" and out["shape"] == [3, 1000] and "data" not in out
    assert out["parameters"]["binary_data_size"] == len(blob) == 3 * 1000 * 4
    got = np.frombuffer(blob, "<f4").reshape(3, 1000)
    np.testing.assert_allclose(got, session.run(None, {"image": array})[0], atol=1e-4, rtol=0)

    # A per-output binary_data: false wins over the request-wide default.
    body = json.loads(content[: int(headers["Inference-Header-Content-Length"])])
    body["outputs"] = [{"name": "logits", "parameters": {"binary_data": False}}]
    content2, headers2 = binary_request(body, array.tobytes())
    response = client.post("/v2/models/resnet18/infer", content=content2, headers=headers2)
    assert response.headers["content-type"].startswith("application/json")
    assert "inference-header-content-length" not in response.headers
    np.testing.assert_allclose(np.asarray(response.json()["outputs"][0]["data"], np.float32).reshape(3, 1000), got,
                               atol=1e-5)


# ----------------------------------------------------------------------------- bad requests


def _img(**overrides) -> dict:
    return {"name": "image", "datatype": "UINT8", "shape": [1, 224, 224, 3], **overrides}


def _json(*inputs, **extra) -> tuple[bytes, dict]:
    return json.dumps({"inputs": list(inputs), **extra}).encode(), {}


ONE = [0] * PIXELS

BAD_REQUESTS = {
    "no body": ((b"", {}), "the request has no body"),
    "malformed json": ((b'{"inputs": [', {}), "not valid JSON"),
    "top level array": ((b"[]", {}), "must be a JSON object, got an array"),
    "NaN": ((b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [NaN]}]}', {}),
            "NaN is not a valid JSON number"),
    "Infinity": ((b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1], "data": [-Infinity]}]}', {}),
                 "-Infinity is not a valid JSON number"),
    "no inputs": (_json(), "'inputs' must be a non-empty array"),
    "two inputs": (_json(_img(data=ONE), _img(data=ONE)), "2 inputs given; this model takes exactly one input"),
    "unknown input": (_json(_img(name="pixels", data=ONE)), "unknown input 'pixels'; the model's input is 'image'"),
    "FP32 input": (_json(_img(datatype="FP32", data=ONE)), "input 'image' has datatype FP32; send UINT8 pixels"),
    "unknown datatype": (_json(_img(datatype="FLOAT", data=ONE)), "unknown datatype 'FLOAT'"),
    "negative dim": (_json(_img(shape=[-1, 224, 224, 3], data=ONE)), "has a negative dimension (-1)"),
    "huge batch dim": (_json(_img(shape=[2**64, 224, 224, 3], data=ONE)),
                       f"{2**64} images in one request, over the limit of {MAX_IMAGES}"),
    "overflowing dims": (_json(_img(shape=[1, 2**40, 2**40, 3], data=ONE)), "UINT8 shape must be [N, 224, 224, 3]"),
    "float dim": (_json(_img(shape=[1.0, 224, 224, 3], data=ONE)), "'shape' must be a non-empty array of integers"),
    "wrong rank": (_json(_img(shape=[224, 224, 3], data=ONE)), "got [224, 224, 3]"),
    "wrong size": (_json(_img(shape=[1, 100, 100, 3], data=[0] * 30000)), "got [1, 100, 100, 3]; resize and crop"),
    "empty batch": (_json(_img(shape=[0, 224, 224, 3], data=[])), "holds no image"),
    "too many images": (_json(_img(shape=[MAX_IMAGES + 1, 224, 224, 3], data=ONE)),
                        f"{MAX_IMAGES + 1} images in one request, over the limit of {MAX_IMAGES}; split it"),
    "data length mismatch": (_json(_img(data=ONE[:-1])), "has 150528 elements but 'data' holds 150527"),
    "data not a list": (_json(_img(data="abc")), "'data' must be a JSON array, got a string"),
    "no data": (_json(_img()), "has neither 'data' nor a binary_data_size parameter"),
    "float data": (_json(_img(data=[0.5] + ONE[1:])), "integers from 0 to 255, got a number (0.5)"),
    "bool data": (_json(_img(data=[True] + ONE[1:])), "integers from 0 to 255, got a boolean"),
    "data over 255": (_json(_img(data=[256] + ONE[1:])), "integers from 0 to 255, got 256"),
    "negative data": (_json(_img(data=[-1] + ONE[1:])), "integers from 0 to 255, got -1"),
    "BYTES bad shape": (_json(_img(datatype="BYTES", shape=[1, 2], data=["a", "b"])),
                        "BYTES shape must be [N] or [N, 1]"),
    "BYTES not base64": (_json(_img(datatype="BYTES", shape=[1], data=["***"])), "is not valid base64"),
    "BYTES not an image": (_json(_img(datatype="BYTES", shape=[1], data=[base64.b64encode(b"hello").decode()])),
                           "input 'image' element 0: the body is not an image"),
    "unknown output": (_json(_img(data=ONE), outputs=[{"name": "probs"}]), "unknown output 'probs'"),
    "duplicate output": (_json(_img(data=ONE), outputs=[{"name": "logits"}, {"name": "logits"}]),
                         "2 outputs requested"),
    "classification 0": (_json(_img(data=ONE), outputs=[{"name": "logits", "parameters": {"classification": 0}}]),
                         "'classification' must be an integer from 1 to 1000 (the number of classes), got 0"),
    "classification too big": (
        _json(_img(data=ONE), outputs=[{"name": "logits", "parameters": {"classification": 1001}}]),
        "'classification' must be an integer from 1 to 1000 (the number of classes), got 1001"),
    "header length not a number": ((b"{}", {"Inference-Header-Content-Length": "ten"}),
                                   "Inference-Header-Content-Length 'ten' is not a number of bytes"),
    "header length over body": ((b"{}", {"Inference-Header-Content-Length": "3"}),
                                "Inference-Header-Content-Length is 3 but the body has only 2 bytes"),
    "binary size short": (
        binary_request({"inputs": [_img(parameters={"binary_data_size": PIXELS - 1})]}, bytes(PIXELS)),
        f"binary_data_size is {PIXELS - 1} but {PIXELS} bytes follow the JSON header"),
    "binary size long": (
        binary_request({"inputs": [_img(parameters={"binary_data_size": PIXELS + 1})]}, bytes(PIXELS)),
        f"binary_data_size is {PIXELS + 1} but {PIXELS} bytes follow the JSON header"),
    "binary shape mismatch": (
        binary_request({"inputs": [_img(shape=[2, 224, 224, 3], parameters={"binary_data_size": PIXELS})]},
                       bytes(PIXELS)),
        f"UINT8 shape [2, 224, 224, 3] needs {2 * PIXELS} bytes but binary_data_size is {PIXELS}"),
    "binary without size": (binary_request({"inputs": [_img(data=ONE)]}, b"\x00" * 10),
                            "10 bytes follow the JSON header but no input has binary_data_size"),
    "size without header": (
        (json.dumps({"inputs": [_img(parameters={"binary_data_size": PIXELS})]}).encode() + bytes(PIXELS), {}),
        "binary tensor data after the JSON need the Inference-Header-Content-Length header"),
    "size without header, JSON only": (
        (json.dumps({"inputs": [_img(parameters={"binary_data_size": 0})]}).encode(), {}),
        "has binary_data_size but the request has no Inference-Header-Content-Length header"),
    "BYTES truncated prefix": (
        binary_request({"inputs": [_img(datatype="BYTES", shape=[1], parameters={"binary_data_size": 2})]},
                       b"\x05\x00"),
        "BYTES element 0 is truncated"),
    "BYTES element too long": (
        binary_request({"inputs": [_img(datatype="BYTES", shape=[1], parameters={"binary_data_size": 6})]},
                       struct.pack("<I", 100) + b"ab"),
        "BYTES element 0 declares 100 bytes but only 2 remain"),
    "BYTES count mismatch": (
        binary_request({"inputs": [_img(datatype="BYTES", shape=[2], parameters={"binary_data_size": 6})]},
                       bytes_elements(b"ab")),
        "the shape has 2 BYTES element(s) but the binary data hold 1"),
    "bad id": (_json(_img(data=ONE), id=5), "'id' must be a string"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_400_and_the_server_keeps_serving(client, case):
    (content, headers), fragment = BAD_REQUESTS[case]
    response = client.post("/v2/models/resnet18/infer", content=content, headers=headers)
    assert response.status_code == 400, (case, response.status_code, response.text)
    body = response.json()
    assert fragment in body["error"], (case, body)
    assert body["code"] in ("bad_request", "invalid_image")
    small_valid(client)


def test_body_over_the_limit_is_413(client):
    content, headers = binary_request(
        {"inputs": [_img(shape=[7, 224, 224, 3], parameters={"binary_data_size": MAX_BODY})]}, bytes(MAX_BODY)
    )
    response = client.post("/v2/models/resnet18/infer", content=content, headers=headers)
    assert response.status_code == 413 and "over the limit" in response.json()["error"]
    small_valid(client)


def test_pixels_over_the_body_limit_are_refused_before_reading_data():
    model = codec.ModelIO("image", 224, 224, 3, "logits", 1000)
    body = json.dumps({"inputs": [_img(shape=[8, 224, 224, 3], data=[])]}).encode()
    with pytest.raises(BadRequestError, match="over the request body limit of 1000000 bytes"):
        codec.parse_infer_request(body, None, model, max_images=64, max_body_bytes=1_000_000)


def test_binary_pixels_are_a_view_of_the_body():
    model = codec.ModelIO("image", 2, 2, 3, "logits", 10)
    raw = bytes(range(24))
    content, headers = binary_request(
        {"inputs": [_img(shape=[2, 2, 2, 3], parameters={"binary_data_size": 24})]}, raw
    )
    parsed = codec.parse_infer_request(content, headers["Inference-Header-Content-Length"], model, max_images=4)
    assert parsed.input.pixels.base is not None and not parsed.input.pixels.flags.owndata
    assert parsed.input.pixels.tobytes() == raw and parsed.input.count == 2


# ----------------------------------------------------------------------------- metrics


def metric(client: httpx.Client, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    want = {k: str(v) for k, v in labels.items()}
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items()):
                total += s.value
    return total


def test_v2_requests_are_counted_like_classify(client):
    labels = {"model": "resnet18", "version": "1"}
    before = {
        "ok": metric(client, "archserve_requests_total", code="200", **labels),
        "bad": metric(client, "archserve_requests_total", code="400", **labels),
        "unknown": metric(client, "archserve_requests_total", model="_unknown", code="404"),
        "images": metric(client, "archserve_images_total", **labels),
        "batches": metric(client, "archserve_batch_size_count", **labels),
        "latency": metric(client, "archserve_request_duration_seconds_count", **labels),
    }
    content, headers = binary_request(
        {"inputs": [_img(shape=[2, 224, 224, 3], parameters={"binary_data_size": 2 * PIXELS})]}, bytes(2 * PIXELS)
    )
    assert client.post("/v2/models/resnet18/infer", content=content, headers=headers).status_code == 200
    assert client.post("/v2/models/resnet18/infer", json={"inputs": []}).status_code == 400
    assert client.post("/v2/models/nope/infer", json={"inputs": []}).status_code == 404
    assert metric(client, "archserve_requests_total", code="200", **labels) == before["ok"] + 1
    assert metric(client, "archserve_requests_total", code="400", **labels) == before["bad"] + 1
    assert metric(client, "archserve_requests_total", model="_unknown", code="404") == before["unknown"] + 1
    assert metric(client, "archserve_images_total", **labels) == before["images"] + 2
    assert metric(client, "archserve_batch_size_count", **labels) >= before["batches"] + 1
    assert metric(client, "archserve_request_duration_seconds_count", **labels) == before["latency"] + 2


def test_binary_pixels_and_top_k_answers_skip_the_busy_decode_pool(server, client, session):
    """A large body of raw pixels is only viewed, and top-k answers are small: neither waits for JPEG decoding."""
    import threading

    state = server[1].state.archserve
    release = threading.Event()
    blockers = [state.decode_pool.submit(release.wait, 30) for _ in range(state.settings.decode_thread_count())]
    try:
        array = pixels(MAX_IMAGES, seed=9)  # 1.2 MB of pixels, well over the inline-parse size
        content, headers = binary_request(
            {"inputs": [{"name": "image", "datatype": "UINT8", "shape": list(array.shape),
                         "parameters": {"binary_data_size": array.nbytes}}],
             "outputs": [{"name": "logits", "parameters": {"classification": 3}}]},
            array.tobytes(),
        )
        response = client.post("/v2/models/resnet18/infer", content=content, headers=headers, timeout=10)
        assert all(not b.done() for b in blockers), "the decode pool was free after all"
    finally:
        release.set()
    assert response.status_code == 200, response.text
    (out,) = response.json()["outputs"]
    assert out["shape"] == [MAX_IMAGES, 3]
    expected = session.run(None, {"image": array})[0].argmax(axis=1)
    assert [int(row[0].split(":")[1]) for row in np.asarray(out["data"]).reshape(MAX_IMAGES, 3)] == list(expected)


def test_a_large_json_body_is_parsed_without_stalling_the_event_loop(exported_repo, monkeypatch):
    """JSON pixels (13 MB here) are parsed in the decode pool, and sharing the GIL: json.loads holds it to its
    end, so a thread alone would still stall the event loop for most of the parse. /health/live, asked again and
    again meanwhile, answers many times, each within a small part of the parse's time."""
    import threading
    import time

    parses = []  # (thread, started, ended) of each parse in the server
    real = codec.parse_infer_request

    def timed(*args, **kwargs):
        started = time.monotonic()
        try:
            return real(*args, **kwargs)
        finally:
            parses.append((threading.current_thread().name, started, time.monotonic()))

    monkeypatch.setattr(codec, "parse_infer_request", timed)
    array = pixels(24, seed=3)
    body = json.dumps(uint8_json(array, outputs=[{"name": "logits", "parameters": {"classification": 1}}])).encode()
    with running_server(device="cpu", models_dir=exported_repo, warmup=False, max_body_bytes=len(body)) as (url, _):
        answer, probes = {}, []  # probes: (sent, answered)

        def send() -> None:
            answer["response"] = httpx.post(f"{url}/v2/models/resnet18/infer", content=body, timeout=120,
                                            headers={"Content-Type": "application/json"})

        sender = threading.Thread(target=send)
        sender.start()
        with httpx.Client(base_url=url, timeout=60) as probe:
            while sender.is_alive():
                sent = time.monotonic()
                assert probe.get("/health/live").status_code == 200
                probes.append((sent, time.monotonic()))
        sender.join()
    assert answer["response"].status_code == 200, answer["response"].text
    ((thread, started, ended),) = parses
    assert thread.startswith("decode"), thread  # in the pool, not on the event loop's thread
    during = [answered - sent for sent, answered in probes if sent < ended and answered > started]
    parse_s = ended - started
    assert len(during) >= 5, (len(during), parse_s)
    assert max(during) < parse_s / 5, (max(during), parse_s)
