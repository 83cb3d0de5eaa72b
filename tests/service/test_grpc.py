"""The KServe v2 gRPC service against a real server process (``python -m service``), with NVIDIA's
``tritonclient.grpc``, and the raw stub where the client cannot say what a test needs (typed contents, metadata).

One server for the module: resnet18 v1 and v2 (the same weights), an experiment between them, and small limits
so that the limit checks are cheap. REST answers the same requests on the same server, as the reference.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.service.reference import images, manifest, preprocessed, session  # noqa: F401 (fixtures)
from tests.service.server import counter, free_port

ROOT = Path(__file__).resolve().parents[2]
MAX_BODY_BYTES = 1_000_000  # 6 images of pixels fit; larger messages are grpc's to refuse
EXPERIMENTS = """\
experiments:
  - name: v1-vs-v2
    sticky_key: X-User-Id
    variants:
      - {name: old, model: resnet18, version: 1, weight: 1}
      - {name: new, model: resnet18, version: 2, weight: 1}
"""


def place_version(source: Path, target: Path, version: int) -> None:
    """resnet18 ``version`` at ``target``: the model files hard-linked from the session's export (never written
    to), the manifest a new file that names the version."""
    shutil.copytree(source, target, copy_function=os.link)
    manifest = json.loads((source / "model.json").read_text())
    manifest["version"] = version
    (target / "model.json").unlink()
    (target / "model.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def server(exported_repo, tmp_path_factory):
    """``(http_url, grpc_address)`` of a server with resnet18 v1 and v2 and the experiment ``v1-vs-v2``."""
    root = tmp_path_factory.mktemp("grpc-server")
    for version in (1, 2):
        place_version(exported_repo / "resnet18" / "1", root / "models" / "resnet18" / str(version), version)
    (root / "experiments.yaml").write_text(EXPERIMENTS)
    port, grpc_port = free_port(), free_port()
    log = (root / "server.log").open("w+b")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ARCHSERVE_")},
           "ARCHSERVE_WARMUP": "false", "ARCHSERVE_MAX_IMAGES_PER_REQUEST": "8", "ARCHSERVE_VERSION_POLICY": "all",
           "ARCHSERVE_MAX_BODY_BYTES": str(MAX_BODY_BYTES), "ARCHSERVE_EXPERIMENTS_FILE": str(root / "experiments.yaml"),
           "ARCHSERVE_STORE_PATH": str(root / "store.sqlite3")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "--port", str(port), "--grpc-port", str(grpc_port),
         "--models-dir", str(root / "models"), "--max-batch-size", "8", "--device", "cpu", "--log-level", "warning"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}: {_tail(log)}")
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the server did not become ready within 120 s")
            time.sleep(0.2)
        yield url, f"127.0.0.1:{grpc_port}"
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
def client(server):
    c = triton.InferenceServerClient(url=server[1])
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server):
    """The raw stub (tritonclient's generated one): typed contents, invocation and trailing metadata."""
    with grpc.insecure_channel(server[1]) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)




def pixels_input(array: np.ndarray) -> triton.InferInput:
    inp = triton.InferInput("image", list(array.shape), "UINT8")
    inp.set_data_from_numpy(array)  # raw_input_contents, as tritonclient always sends
    return inp


def grpc_error(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


def test_health_metadata_and_repository_index(client, server):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("resnet18") and client.is_model_ready("resnet18", "2")
    # As Triton (and tritonclient.http against the REST side): not ready, not an error.
    assert not client.is_model_ready("resnet18", "3") and not client.is_model_ready("nope")

    metadata = client.get_server_metadata()
    assert metadata.name == "archserve" and "classification" in metadata.extensions
    assert "model_repository" in metadata.extensions

    # The same document as REST's, field by field (the int64 shapes come back as JSON strings).
    rest = httpx.get(f"{server[0]}/v2/models/resnet18").json()
    for version in ("", "1"):
        got = client.get_model_metadata("resnet18", version, as_json=True)
        for tensors in ("inputs", "outputs"):
            for tensor in got[tensors]:
                tensor["shape"] = [int(d) for d in tensor["shape"]]
        assert got == rest
    assert rest["versions"] == ["1", "2"]

    error = grpc_error(client.get_model_metadata, "nope")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert error.message() == httpx.get(f"{server[0]}/v2/models/nope").json()["error"]

    index = client.get_model_repository_index(as_json=True)["models"]
    assert index == [{"name": "resnet18", "version": v, "state": "READY"} for v in ("1", "2")]


def test_uint8_infer_equals_onnxruntime_and_counts_in_the_request_metrics(client, server, session, preprocessed):
    before = counter(server[0], "archserve_requests_total", model="resnet18", version="1", code="200")
    result = client.infer("resnet18", [pixels_input(preprocessed)], model_version="1", request_id="grpc-1")
    logits = result.as_numpy("logits")
    assert logits.dtype == np.float32 and logits.shape == (2, 1000)
    np.testing.assert_allclose(logits, session.run(None, {"image": preprocessed})[0], atol=1e-4, rtol=0)
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == ("resnet18", "1", "grpc-1")
    assert counter(server[0], "archserve_requests_total", model="resnet18", version="1", code="200") == before + 1


def test_typed_contents_give_what_raw_contents_give(stub, session, preprocessed, images):
    expected = session.run(None, {"image": preprocessed})[0]
    request = service_pb2.ModelInferRequest(model_name="resnet18", model_version="1")
    tensor = request.inputs.add(name="image", datatype="UINT8", shape=list(preprocessed.shape))
    tensor.contents.uint_contents.extend(preprocessed.ravel().tolist())
    response = stub.ModelInfer(request, timeout=60)
    assert not response.outputs[0].HasField("contents")  # outputs come back raw, as Triton sends them
    logits = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(2, 1000)
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)

    encoded = service_pb2.ModelInferRequest(model_name="resnet18", model_version="1")
    encoded.inputs.add(name="image", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(images)
    from_jpeg = np.frombuffer(stub.ModelInfer(encoded, timeout=60).raw_output_contents[0], "<f4").reshape(2, 1000)
    np.testing.assert_allclose(from_jpeg, expected, atol=1e-4, rtol=0)  # decoded as the reference does

    tensor.contents.uint_contents[0] = 256
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "input 'image': UINT8 data must be integers from 0 to 255, got 256"


def test_classification_extension(client, session, manifest, preprocessed):
    outputs = [triton.InferRequestedOutput("logits", class_count=3)]
    classes = client.infer("resnet18", [pixels_input(preprocessed)], outputs=outputs).as_numpy("logits")
    assert classes.shape == (2, 3)
    for row, logits in zip(classes, session.run(None, {"image": preprocessed})[0]):
        parsed = [entry.decode().split(":", 2) for entry in row]
        indices = [int(p[1]) for p in parsed]
        assert indices == list(np.argsort(-logits, kind="stable")[:3])
        assert [p[2] for p in parsed] == [manifest.labels[i] for i in indices]
        np.testing.assert_allclose([float(p[0]) for p in parsed], logits[indices], atol=1e-4)


def test_encoded_images_as_bytes_classify_as_rest_does(client, server, images):
    inp = triton.InferInput("image", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=np.object_))
    result = client.infer("resnet18", [inp], outputs=[triton.InferRequestedOutput("logits", class_count=3)])
    got = [[int(e.split(b":")[1]) for e in row] for row in result.as_numpy("logits")]
    expected = [
        [p["index"] for p in httpx.post(f"{server[0]}/classify/resnet18?top_k=3", content=data, timeout=60,
                                        headers={"Content-Type": "image/jpeg"}).json()["results"][0]["predictions"]]
        for data in images
    ]
    assert got == expected


def test_an_experiment_is_routed_as_rest_routes_it(stub, server, images):
    """The sticky key in the call metadata picks the variant REST's header picks; the answer says which."""
    request = service_pb2.ModelInferRequest(model_name="v1-vs-v2")
    request.inputs.add(name="image", datatype="BYTES", shape=[1]).contents.bytes_contents.append(images[0])
    seen = set()
    for user in ("ada", "grace", "alan", "edsger", "barbara", "donald"):
        rest = httpx.post(f"{server[0]}/classify/v1-vs-v2", content=images[0], timeout=60,
                          headers={"Content-Type": "image/jpeg", "X-User-Id": user}).json()
        response, call = stub.ModelInfer.with_call(request, metadata=[("x-user-id", user), ("x-request-id", user)],
                                                   timeout=60)
        variant = response.parameters["variant"].string_param
        assert variant == rest["variant"] and response.parameters["experiment"].string_param == "v1-vs-v2"
        assert response.model_version == str(rest["version"])
        assert dict(call.trailing_metadata()) == {"x-request-id": user, "x-variant": variant}
        seen.add(variant)
    assert seen == {"old", "new"}  # six users, two variants of equal weight: both served (as REST showed)


def test_errors_map_to_grpc_codes_with_rests_messages(client, server, preprocessed):
    def rest_error(path: str, body: dict) -> str:
        return httpx.post(f"{server[0]}{path}", json=body, timeout=60).json()["error"]

    pixels = {"name": "image", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": [0] * (224 * 224 * 3)}
    unknown = counter(server[0], "archserve_requests_total", model="_unknown", code="404")
    error = grpc_error(client.infer, "nope", [pixels_input(preprocessed[:1])])
    assert error.status() == "StatusCode.NOT_FOUND"
    assert counter(server[0], "archserve_requests_total", model="_unknown", code="404") == unknown + 1
    assert error.message() == rest_error("/v2/models/nope/infer", {"inputs": [pixels]})

    error = grpc_error(client.infer, "resnet18", [pixels_input(preprocessed[:1])], model_version="7")
    assert error.status() == "StatusCode.NOT_FOUND"
    assert error.message() == rest_error("/v2/models/resnet18/versions/7/infer", {"inputs": [pixels]})

    channels_first = np.zeros((1, 3, 224, 224), np.uint8)
    error = grpc_error(client.infer, "resnet18", [pixels_input(channels_first)])
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    wrong = {**pixels, "shape": [1, 3, 224, 224]}
    assert error.message() == rest_error("/v2/models/resnet18/infer", {"inputs": [wrong]})

    error = grpc_error(client.infer, "resnet18", [pixels_input(preprocessed)],
                       outputs=[triton.InferRequestedOutput("logits", class_count=1001)])
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "'classification' must be" in error.message()

    # Over the body limit: grpc refuses the message before it is read, with the code our 413 maps to.
    big = np.zeros((8, 224, 224, 3), np.uint8)
    assert big.nbytes > MAX_BODY_BYTES
    error = grpc_error(client.infer, "resnet18", [pixels_input(big)])
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED"

    # ... and the server serves on.
    assert client.infer("resnet18", [pixels_input(preprocessed)]).as_numpy("logits").shape == (2, 1000)
