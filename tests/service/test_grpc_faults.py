"""The gRPC service when things go wrong: a client deadline shorter than ours, a client that cancels, a full
queue, a server that is not ready (servers in this process, so that a test can hold its model's batches with
``engine_held``); and the gRPC service of every front-end process of ``--workers 2``."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from service.grpc import server as grpc_server
from tests.service.server import COLD, counter, engine_held, free_port, running_server, service_tree, until, wait_until

REQUESTS = "archserve_requests_total"
RESNET18 = {"model": "resnet18", "version": "1"}


def pixels(count: int = 1) -> triton.InferInput:
    inp = triton.InferInput("image", [count, 224, 224, 3], "UINT8")
    inp.set_data_from_numpy(np.zeros((count, 224, 224, 3), np.uint8))
    return inp


def grpc_error(call, *args, **kwargs) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        call(*args, **kwargs)
    return caught.value


def batch_started(model) -> threading.Event:
    """Set when a batch of ``model`` reaches its engine, held by ``engine_held`` (which, on leaving, removes this
    wrapper with its own)."""
    started = threading.Event()
    engine = model.engine
    for method in ("run", "run_alone"):
        held = getattr(engine, method)
        setattr(engine, method, lambda batch, held=held: (started.set(), held(batch))[1])
    return started


@pytest.fixture(scope="module")
def served(exported_repo):
    """A server whose resnet18 runs one image per batch, one batch at a time (no CPU lanes), with room for two
    images in its queue and no queue-wait estimate: what a held engine leaves queued is exactly what was sent."""
    port = free_port()
    with running_server(models_dir=exported_repo, grpc_port=port, warmup=False, max_batch_size=1, cpu_lanes=1,
                        max_queue_size=2, max_queue_wait_ms=0) as (url, app):
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        yield url, client, app.state.archserve.models.get("resnet18")
        client.close()


def test_a_client_deadline_shorter_than_ours_is_the_requests_deadline(served):
    url, client, model = served
    codes = {code: counter(url, REQUESTS, code=code, **RESNET18) for code in ("499", "504")}
    with engine_held(model):
        error = grpc_error(client.infer, "resnet18", [pixels()], client_timeout=1.0)
        assert error.status() == "StatusCode.DEADLINE_EXCEEDED"
        # Ours ended it (504), 30 s early: not grpc cancelling a call we would have gone on with (499).
        until(lambda: counter(url, REQUESTS, code="504", **RESNET18) == codes["504"] + 1,
              lambda: "the request was not counted 504")
    assert counter(url, REQUESTS, code="499", **RESNET18) == codes["499"]


def test_a_client_cancel_is_a_disconnect(served):
    url, client, model = served
    before = counter(url, REQUESTS, code="499", **RESNET18)
    answers = []
    with engine_held(model):
        call = client.async_infer("resnet18", [pixels()], callback=lambda result, error: answers.append(error))
        until(lambda: counter(url, "archserve_inflight_requests", **RESNET18) == 1,
              lambda: "the call never arrived")
        call.cancel()
        until(lambda: counter(url, REQUESTS, code="499", **RESNET18) == before + 1,
              lambda: "the cancel was not counted 499")
        assert counter(url, "archserve_inflight_requests", **RESNET18) == 0
    until(lambda: answers, lambda: "no callback")
    assert answers[0].status() == "StatusCode.CANCELLED"


def test_a_full_queue_is_unavailable_and_the_queued_calls_are_then_served(served):
    url, client, model = served
    answers = []
    done = threading.Event()

    def answered(result, error):
        answers.append(error or result.as_numpy("logits").shape)
        if len(answers) == 3:
            done.set()

    with engine_held(model):
        running = batch_started(model)
        client.async_infer("resnet18", [pixels()], callback=answered)
        assert running.wait(20), "the first call never reached the model"  # out of the queue, held in its batch
        for _ in range(2):  # the queue's two places
            client.async_infer("resnet18", [pixels()], callback=answered)
        until(lambda: counter(url, "archserve_queue_depth", **RESNET18) == 2, lambda: (
            f"the queue did not fill: depth {counter(url, 'archserve_queue_depth', **RESNET18)}, answers {answers}"))
        error = grpc_error(client.infer, "resnet18", [pixels()])
        assert error.status() == "StatusCode.UNAVAILABLE"
        assert "queue full, at its limit of 2 images" in error.message()
    assert done.wait(60)
    assert answers == [(1, 1000)] * 3


def test_a_server_that_is_not_ready_is_unavailable_with_rests_reason(exported_repo):
    port = free_port()
    # A CPU server that requires a GPU loads its model, then refuses to become ready (on any machine).
    with running_server(wait_ready=False, models_dir=exported_repo, grpc_port=port, warmup=False, device="cpu",
                        require_gpu=True) as (url, app):
        state = app.state.archserve
        until(lambda: state.status == "failed", lambda: f"still {state.status}: {state.reason}", timeout=120)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        assert client.is_server_live()
        assert not client.is_server_ready() and not client.is_model_ready("resnet18")
        error = grpc_error(client.infer, "resnet18", [pixels()])
        assert error.status() == "StatusCode.UNAVAILABLE"
        rest = httpx.post(f"{url}/v2/models/resnet18/infer", timeout=60, json={
            "inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 224, 224, 3], "data": [0] * 150528}]})
        assert rest.status_code == 503 and error.message() == rest.json()["error"]
        assert "require_gpu" in error.message()
        assert grpc_error(client.get_model_metadata, "resnet18").status() == "StatusCode.UNAVAILABLE"
        client.close()


def _listeners(port: int, group: int) -> set[int]:
    """The processes of process group ``group`` that hold a socket listening on TCP ``port``."""
    inodes = set()
    for table in ("tcp", "tcp6"):  # grpc listens on IPv6 sockets, an IPv4 address as ::ffff:127.0.0.1
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    owners = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.getpgid(int(pid)) != group:
                continue
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{pid}/fd")):
                owners.add(int(pid))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return owners


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the listening sockets from /proc")
def test_every_front_end_of_two_workers_serves_grpc(exported_repo, tmp_path):
    port = free_port()
    with service_tree(exported_repo, tmp_path, "--workers", "2", "--grpc-port", str(port), env=COLD) as (
            proc, url, log):
        wait_until(url, "/health/ready", 180)
        until(lambda: len(_listeners(port, proc.pid)) == 2, lambda: f"listeners: {_listeners(port, proc.pid)}",
              timeout=60)
        assert proc.pid not in _listeners(port, proc.pid)  # the front-ends, not the supervisor
        for _ in range(6):  # new connections, spread by the kernel over both; each answered through the engine
            with triton.InferenceServerClient(f"127.0.0.1:{port}") as client:
                assert client.infer("resnet18", [pixels(2)]).as_numpy("logits").shape == (2, 1000)
        assert "in use" not in log.read_text()  # the supervisor found the port free


def test_grpc_port_0_serves_no_grpc_and_a_taken_port_is_warned_of(caplog):
    settings = SimpleNamespace(grpc_port=0)
    assert asyncio.run(grpc_server.start(SimpleNamespace(state=SimpleNamespace(
        archserve=SimpleNamespace(settings=settings))))) is None

    port = free_port()
    with caplog.at_level(logging.WARNING, logger="archserve.grpc"):
        grpc_server.warn_if_taken("127.0.0.1", port)
        assert not caplog.records  # free
        with socket.socket() as other:  # another server's gRPC, as grpc binds it
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            other.bind(("127.0.0.1", port))
            other.listen()
            grpc_server.warn_if_taken("127.0.0.1", port)
    assert len(caplog.records) == 1 and f"gRPC port 127.0.0.1:{port} is in use" in caplog.text
