"""Off-the-shelf Open Inference Protocol clients against a real server process (``python -m service``).

NVIDIA's ``tritonclient.http`` speaks the protocol with Triton's binary tensor
data and classification extensions; it is the most widely used v2 REST client.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.service.reference import images, manifest, preprocessed, session  # noqa: F401 (fixtures)
from tests.service.server import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server_url(exported_repo, tmp_path_factory):
    port = free_port()
    log = (tmp_path_factory.mktemp("v2-server") / "server.log").open("w+b")
    env = {**os.environ, "ARCHSERVE_WARMUP": "false", "ARCHSERVE_MAX_IMAGES_PER_REQUEST": "8"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--models-dir", str(exported_repo),
         "--max-batch-size", "8", "--device", "cpu", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: {_tail(log)}")
            try:
                if httpx.get(f"http://{url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not become ready within 120 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            returncode = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert returncode == 0, _tail(log)
    log.close()


def _tail(log) -> str:
    log.seek(0)
    return log.read()[-4000:].decode(errors="replace")


@pytest.fixture(scope="module")
def client(server_url):
    c = triton.InferenceServerClient(url=server_url, network_timeout=60.0)
    yield c
    c.close()




def test_health_and_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("resnet18")
    assert client.is_model_ready("resnet18", "1")
    assert not client.is_model_ready("resnet18", "2")
    assert not client.is_model_ready("nope")

    server = client.get_server_metadata()
    assert server["name"] == "archserve"
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])

    meta = client.get_model_metadata("resnet18")
    assert meta["versions"] == ["1"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 224, 224, 3]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 1000]}]
    assert client.get_model_metadata("resnet18", "1") == meta
    with pytest.raises(InferenceServerException) as caught:
        client.get_model_metadata("nope")
    assert caught.value.status() == "404" and "served models: resnet18" in caught.value.message()


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_uint8_infer_equals_onnxruntime(client, session, preprocessed, binary):
    inp = triton.InferInput("image", list(preprocessed.shape), "UINT8")
    inp.set_data_from_numpy(preprocessed, binary_data=binary)
    # JSON both ways; binary: no outputs named, so the client asks for all of them in binary.
    outputs = None if binary else [triton.InferRequestedOutput("logits", binary_data=False)]
    result = client.infer("resnet18", [inp], outputs=outputs, request_id="triton-1")
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (2, 1000)
    np.testing.assert_allclose(logits, session.run(None, {"image": preprocessed})[0], atol=1e-4, rtol=0)
    response = result.get_response()
    assert response["model_name"] == "resnet18" and response["model_version"] == "1"
    assert response["id"] == "triton-1"


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_classification(client, session, manifest, preprocessed, binary):
    inp = triton.InferInput("image", list(preprocessed.shape), "UINT8")
    inp.set_data_from_numpy(preprocessed)
    result = client.infer(
        "resnet18", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=binary, class_count=3)]
    )
    classes = result.as_numpy("logits")
    assert classes.shape == (2, 3)
    expected = session.run(None, {"image": preprocessed})[0]
    for row, logits in zip(classes, expected):
        parsed = [(e.decode() if isinstance(e, bytes) else e).split(":", 2) for e in row]
        indices = [int(p[1]) for p in parsed]
        assert indices == list(np.argsort(-logits, kind="stable")[:3])
        assert [p[2] for p in parsed] == [manifest.labels[i] for i in indices]
        np.testing.assert_allclose([float(p[0]) for p in parsed], logits[indices], atol=1e-4)


def test_bytes_input_of_encoded_images(client, server_url, images):
    inp = triton.InferInput("image", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_))  # binary: 4-byte length-prefixed elements
    result = client.infer("resnet18", [inp], outputs=[triton.InferRequestedOutput("logits", class_count=3)])
    got = [[int(e.split(b":")[1]) for e in row] for row in result.as_numpy("logits")]
    expected = [
        [p["index"] for p in httpx.post(f"http://{server_url}/classify/resnet18?top_k=3", content=data,
                                        headers={"Content-Type": "image/jpeg"}).json()["results"][0]["predictions"]]
        for data in images
    ]
    assert got == expected


def test_errors_reach_the_client_and_the_server_keeps_serving(client, preprocessed):
    wrong = triton.InferInput("image", [1, 3, 224, 224], "UINT8")
    wrong.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.uint8))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("resnet18", [wrong])
    assert caught.value.status() == "400"
    assert "UINT8 shape must be [N, 224, 224, 3]" in caught.value.message()

    fp32 = triton.InferInput("image", list(preprocessed.shape), "FP32")
    fp32.set_data_from_numpy(preprocessed.astype(np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer("resnet18", [fp32])
    assert caught.value.status() == "400" and "datatype FP32" in caught.value.message()

    ok = triton.InferInput("image", list(preprocessed.shape), "UINT8")
    ok.set_data_from_numpy(preprocessed)
    assert client.infer("resnet18", [ok]).as_numpy("logits").shape == (2, 1000)
