"""Load, unload, hot reload of new and broken versions under load, path safety."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import shutil
import threading
import weakref

import httpx
import pytest

from tests.images import jpeg
from tests.service.server import running_server, until

TOKEN = "admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture()
def repo(exported_repo, tmp_path):
    root = tmp_path / "models"
    shutil.copytree(exported_repo / "resnet18", root / "resnet18")
    return root


def publish(repo, version: int, damage=None):
    """Publish a copy of v1 as ``version`` the way the export stage does: build aside, rename into place."""
    staging = repo / "resnet18" / f".tmp-{version}"
    shutil.copytree(repo / "resnet18" / "1", staging)
    manifest = json.loads((staging / "model.json").read_text())
    manifest["version"] = version
    (staging / "model.json").write_text(json.dumps(manifest))
    if damage:
        damage(staging)
    os.rename(staging, repo / "resnet18" / str(version))


class Traffic:
    """Closed-loop clients in a thread; every response is kept."""

    def __init__(self, url: str, clients: int = 4):
        self.url, self.clients = url, clients
        self.statuses: list[int] = []
        self.versions: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _client(self, data: bytes):
        async with httpx.AsyncClient(timeout=60) as client:
            while not self._stop.is_set():
                r = await client.post(f"{self.url}/classify/resnet18", content=data)
                self.statuses.append(r.status_code)
                if r.status_code == 200:
                    self.versions.append(r.json()["version"])

    async def _run(self):
        await asyncio.gather(*(self._client(jpeg(seed=i)) for i in range(self.clients)))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=60)


def wait_for(predicate, timeout=60.0):
    until(predicate, lambda: "condition not reached in time", timeout, interval=0.1)  # the predicates poll HTTP


def served_versions(url):
    return [m["version"] for m in httpx.get(f"{url}/models", timeout=60).json()["models"]]


def loads(url, outcome):
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=60).text.splitlines():
        if line.startswith("archserve_model_loads_total") and f'outcome="{outcome}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_new_version_takes_over_under_load_with_no_failed_request(repo):
    with running_server(models_dir=repo, poll_interval_s=0.3, max_batch_size=4) as (url, _):
        with Traffic(url) as traffic:
            wait_for(lambda: len(traffic.statuses) > 10)
            publish(repo, 2)
            wait_for(lambda: served_versions(url) == [2])
            seen = len(traffic.statuses)
            wait_for(lambda: len(traffic.statuses) > seen + 10)
        assert traffic.statuses and set(traffic.statuses) == {200}
        assert traffic.versions[0] == 1 and traffic.versions[-1] == 2
        assert loads(url, "loaded") == 1


def _truncate(d):
    data = (d / "model.onnx").read_bytes()
    (d / "model.onnx").write_bytes(data[: len(data) // 2])


def _flip(d):
    data = bytearray((d / "model.onnx").read_bytes())
    data[len(data) // 3] ^= 0x55
    (d / "model.onnx").write_bytes(bytes(data))


def _bad_manifest(d):
    (d / "model.json").write_text('{"name": "resnet18", "version": ')


def _external_data_outside(d):
    import hashlib

    import onnx
    from onnx import TensorProto, helper

    (d.parent.parent / "secret.bin").write_bytes(b"\0" * 16)
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "../../secret.bin"), ("offset", "0"), ("length", "16")):
        entry = weight.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    data = model.SerializeToString()
    (d / "model.onnx").write_bytes(data)
    (d / "model.fp16.onnx").unlink()
    manifest = json.loads((d / "model.json").read_text())
    manifest["files"] = {"fp32": {"path": "model.onnx", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}}
    (d / "model.json").write_text(json.dumps(manifest))
    assert onnx.load_model_from_string(data)  # a well-formed file: only its data path is hostile


@pytest.mark.parametrize(
    "damage", [_truncate, _flip, _bad_manifest, _external_data_outside],
    ids=["truncated", "checksum-mismatch", "bad-manifest", "external-data-outside"],
)
def test_a_broken_version_never_replaces_the_working_one(repo, damage):
    with running_server(models_dir=repo, poll_interval_s=0.3, admin_token=TOKEN, warmup=False) as (url, _):
        with Traffic(url) as traffic:
            wait_for(lambda: len(traffic.statuses) > 5)
            publish(repo, 2, damage)
            wait_for(lambda: loads(url, "failed") >= 1)
            seen = len(traffic.statuses)
            wait_for(lambda: len(traffic.statuses) > seen + 5)
        assert set(traffic.statuses) == {200} and set(traffic.versions) == {1}
        assert served_versions(url) == [1]
        explicit = httpx.post(f"{url}/v2/repository/models/resnet18/load", headers=AUTH, timeout=60)
        assert explicit.status_code == 400 and "still serving v1" in explicit.json()["error"]
        index = httpx.post(f"{url}/v2/repository/index", headers=AUTH).json()  # reasons are for the admin
        broken = next(e for e in index if e["version"] == "2")
        assert broken["state"] == "UNAVAILABLE" and broken["reason"]


def test_unload_then_load(repo):
    with running_server(models_dir=repo, poll_interval_s=0, admin_token=TOKEN, warmup=False) as (url, _):
        assert httpx.post(f"{url}/v2/repository/models/resnet18/unload").status_code == 401
        assert httpx.post(f"{url}/v2/repository/models/resnet18/unload", headers=AUTH).status_code == 200
        gone = httpx.post(f"{url}/classify/resnet18", content=jpeg())
        assert gone.status_code == 404
        assert httpx.post(f"{url}/v2/repository/models/resnet18/unload", headers=AUTH).status_code == 404
        loaded = httpx.post(f"{url}/v2/repository/models/resnet18/load", headers=AUTH, timeout=60)
        assert loaded.status_code == 200 and loaded.json()["versions"] == ["1"]
        assert httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code == 200


@contextlib.contextmanager
def no_garbage_collection():
    """Only reference counting frees objects meanwhile: what lives in a reference cycle stays."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def held_objects(model) -> dict[str, weakref.ref]:
    engine = model.engine
    sessions = {f"session {i}": s for i, s in enumerate([engine.session, *engine._lanes, *engine._by_size.values()])}
    return {name: weakref.ref(obj) for name, obj in {"engine": engine, "batcher": model.batcher, **sessions}.items()}


def wait_freed(refs: dict[str, weakref.ref], timeout: float = 30.0) -> None:
    until(lambda: not any(ref() for ref in refs.values()),
          lambda: f"not freed {timeout} s on: {[name for name, ref in refs.items() if ref()]}", timeout)


def test_a_retired_version_is_freed_at_once(repo, caplog):
    """A version replaced by a new one, then one unloaded by hand: once released (the request deadline, 1 s, plus
    1 s), its engine, batcher and every onnxruntime session are freed with no garbage collection, so its memory
    goes back when the log says "released", not at some later collection."""
    # Warmed up (a cold first batch could miss the 1 s deadline), in a few images: a batch cap of 2.
    with running_server(models_dir=repo, poll_interval_s=0.3, admin_token=TOKEN, request_timeout_s=1.0,
                        max_batch_size=2) as (url, app):
        state = app.state.archserve
        caplog.set_level(logging.INFO, logger="service.models.lifecycle")
        released = lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith("released resnet18")]  # noqa: E731
        with no_garbage_collection():
            v1 = held_objects(state.models.get("resnet18", 1))
            assert len(v1) >= 3, v1  # engine, batcher, at least one session
            assert httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code == 200
            publish(repo, 2)
            wait_for(lambda: served_versions(url) == [2])
            wait_freed(v1)

            v2 = held_objects(state.models.get("resnet18", 2))
            assert httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code == 200
            assert httpx.post(f"{url}/v2/repository/models/resnet18/unload", headers=AUTH).status_code == 200
            wait_freed(v2)
            wait_for(lambda: len(released()) == 2)
    assert all(": resident memory " in line for line in released()), released()  # e.g. "1247 -> 328 MiB"


def test_admin_repository_endpoints_are_disabled_without_a_token(repo):
    with running_server(models_dir=repo, poll_interval_s=0, warmup=False) as (url, _):
        assert httpx.post(f"{url}/v2/repository/models/resnet18/unload", headers=AUTH).status_code == 403


def test_admin_changes_are_refused_with_several_workers_that_each_load_the_models(repo):
    """With several worker processes and no engine process an admin change would reach only the worker that took
    it: 409, saying what reaches them all. The settings say two workers; this in-process server is one, which is
    all the check reads. (With an engine process they answer 200: test_engine_process.py.)"""
    with running_server(models_dir=repo, poll_interval_s=0, admin_token=TOKEN, workers=2, engine_process="off",
                        warmup=False) as (url, _):
        for path, instead in (("/v2/repository/models/resnet18/unload", "ARCHSERVE_MODELS"),
                              ("/v2/repository/models/resnet18/load", "SIGHUP"), ("/experiments/reload", "SIGHUP")):
            assert httpx.post(url + path).status_code == 401  # the token is checked first
            refused = httpx.post(url + path, headers=AUTH)
            assert refused.status_code == 409, (path, refused.text)
            assert refused.json()["code"] == "several_workers"
            assert "2 worker processes" in refused.json()["error"] and instead in refused.json()["error"]
        assert served_versions(url) == [1]
        assert httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code == 200


@pytest.fixture(scope="module")
def traversal_server(exported_repo, tmp_path_factory):
    """One server for every name below: a refused load changes nothing, as each of them checks. Its repository
    has a symlink, ``outside``, to a model folder outside it."""
    root = tmp_path_factory.mktemp("traversal")
    repo, elsewhere = root / "models", root / "elsewhere" / "outside"
    shutil.copytree(exported_repo / "resnet18", repo / "resnet18")
    shutil.copytree(repo / "resnet18", elsewhere)
    (repo / "outside").symlink_to(elsewhere, target_is_directory=True)
    with running_server(models_dir=repo, models=["resnet18"], poll_interval_s=0, admin_token=TOKEN,
                        warmup=False) as (url, _):
        yield url


@pytest.mark.parametrize(
    "name, status",
    [
        ("..", 404),  # the client already removes the dot segment
        ("%2e%2e", 400),
        ("..%2F..%2Fetc", 404),
        ("%2Fetc%2Fpasswd", 404),
        ("resnet18%2F..%2F..", 404),
        ("Resnet18", 400),
        ("vgg16", 404),
        ("outside", 400),
    ],
)
def test_traversal_and_unknown_names_are_refused(traversal_server, name, status):
    url = traversal_server
    response = httpx.post(f"{url}/v2/repository/models/{name}/load", headers=AUTH, timeout=60)
    assert response.status_code == status, response.text
    assert served_versions(url) == [1]
    assert httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code == 200
