"""The server's threads carry OS names (``top -H``, /proc), so its CPU can be told apart by what each does."""

from __future__ import annotations

import asyncio
import io
import shutil
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from modelrepo import load_manifest
from service.models.batching import Batcher
from service.models.engine import EngineConfig, OnnxEngine
from service.threads import name_os_thread, os_thread_name

from .server import running_server

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OS thread names are read from /proc")


def thread_names() -> dict[int, str]:
    names = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            names[int(task.name)] = (task / "comm").read_text().rstrip("\n")
        except OSError:  # the thread ended meanwhile
            pass
    return names


def in_a_new_thread(fn):
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join()
    return out[0]


def test_a_thread_is_named_for_the_os_with_its_first_15_bytes():
    def name_and_read(name=None):
        return name_os_thread(name), os_thread_name()

    assert in_a_new_thread(lambda: name_and_read("decode_3")) == (True, "decode_3")
    assert in_a_new_thread(lambda: name_and_read("batch inception_v3/1")) == (True, "batch inception")
    # Without a name: the thread's Python name.
    def python_named():
        threading.current_thread().name = "loader"
        return name_and_read()

    assert in_a_new_thread(python_named) == (True, "loader")


def test_the_batch_threads_are_named_after_the_model():
    seen = []

    def run_batch(items):
        seen.append(os_thread_name())
        return items

    async def main():
        batcher = Batcher(run_batch, max_batch_size=4, max_queue_size=8, instances=2, name="resnet50/2")
        await batcher.start()
        try:
            await asyncio.gather(*(batcher.submit(i) for i in range(6)))
        finally:
            await batcher.close()

    asyncio.run(main())
    assert seen and set(seen) == {"batch resnet50/"}


def test_onnxruntimes_own_threads_are_named_after_the_model_and_the_caller_keeps_its_name(exported_repo, tmp_path):
    version_dir = tmp_path / "resnet18" / "1"
    shutil.copytree(exported_repo / "resnet18" / "1", version_dir)
    before = set(thread_names())

    def load():
        name_os_thread("loader")
        # Two intra-op threads: onnxruntime starts one pool thread besides the caller, on any machine.
        engine = OnnxEngine(version_dir, load_manifest(version_dir), EngineConfig(device="cpu", intra_op_threads=2))
        return engine, os_thread_name()

    engine, caller = in_a_new_thread(load)
    assert caller == "loader"
    started = {tid: name for tid, name in thread_names().items() if tid not in before}
    assert "ort resnet18/1" in started.values(), started
    assert engine.run(np.zeros((1, 224, 224, 3), np.uint8)).shape == (1, 1000)


def test_a_running_server_names_its_decode_batch_and_onnxruntime_threads(exported_repo):
    with running_server(models_dir=exported_repo, intra_op_threads=2, warmup=False) as (url, _):
        jpeg = io.BytesIO()
        Image.new("RGB", (320, 240), (200, 120, 40)).save(jpeg, format="JPEG")
        # Two images: a lone one on an idle model is decoded in the batch thread, several in the decode pool.
        files = [("image", (f"{i}.jpg", jpeg.getvalue(), "image/jpeg")) for i in range(2)]
        response = httpx.post(f"{url}/classify/resnet18", files=files, timeout=60)
        assert response.status_code == 200, response.text
        names = set(thread_names().values())
    assert {"decode_0", "batch resnet18/", "ort resnet18/1"} <= names, names
