"""Overload, deadlines, readiness, disconnects, worker processes and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.images import jpeg
from tests.service.server import (
    COLD, counter, cuda_runs, engine_held, first_answer, free_port, front_end_pids, live_pids, running_server,
    service_tree, start_service, traffic_until, until, wait_for_pids, wait_until, worker_pids,
)


async def _burst(url: str, count: int, data: bytes, timeout: float = 120) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=count)) as client:
        return await asyncio.gather(*(client.post(f"{url}/classify/resnet18", content=data) for _ in range(count)))


def test_full_queue_answers_503_with_retry_after_and_recovers(exported_repo):
    # One batch at a time (max_batch_size=1, no CPU lanes), held at a gate: one request runs, two fill the
    # queue, the other 21 must be refused, however fast or slow this machine is.
    with running_server(device="cpu", models_dir=exported_repo, max_batch_size=1, max_queue_size=2,
                        cpu_lanes=1) as (url, app):
        served = app.state.archserve.models.get("resnet18")

        def refused() -> float:
            return counter(url, "archserve_requests_total", code=503)

        async def scenario(gate):
            burst = asyncio.ensure_future(_burst(url, 24, jpeg()))
            await asyncio.to_thread(until, lambda: refused() >= 21,
                                    lambda: f"{refused()} of 21 refused, queue depth {served.batcher.queue_depth}")
            assert served.batcher.queue_depth == 2
            gate.set()
            return await burst

        with engine_held(served) as gate:
            responses = asyncio.run(scenario(gate))
        codes = sorted(r.status_code for r in responses)
        assert codes == [200] * 3 + [503] * 21, codes
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers["Retry-After"] == "1" and rejected.json()["code"] == "queue_full"
        assert "at its limit" in rejected.json()["error"]
        assert httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code == 200
        assert counter(url, "archserve_requests_total", code=503) == 21


@pytest.mark.parametrize("max_queue_wait_ms", [100, 0])
def test_a_queue_too_slow_to_drain_in_time_refuses_at_arrival(exported_repo, max_queue_wait_ms):
    """32 requests at once, one batch at a time: with a queue-wait limit of 100 ms, what would wait longer
    (a few images' run time) is answered 503 at once; with none (0), the count bound alone admits them all to
    wait seconds."""
    with running_server(device="cpu", models_dir=exported_repo, max_batch_size=4, cpu_lanes=1, warmup=False,
                        max_queue_wait_ms=max_queue_wait_ms) as (url, app):
        batcher = app.state.archserve.models.get("resnet18").batcher
        for _ in range(2):  # the run time per image is learned from batches
            assert httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code == 200
        responses = asyncio.run(_burst(url, 32, jpeg()))
        codes = [r.status_code for r in responses]
        if not max_queue_wait_ms:
            assert codes == [200] * 32
            return
        refused = [r for r in responses if r.status_code == 503]
        assert 8 <= len(refused) <= 30 and codes.count(200) == 32 - len(refused), codes
        for r in refused:
            assert r.json()["code"] == "overloaded" and r.headers["Retry-After"] == "1"
            assert "would wait about" in r.json()["error"]
        # Refused at arrival, before decoding: faster than any admitted request waited for its answer.
        slowest_refusal = max(r.elapsed.total_seconds() for r in refused)
        slowest_answer = max(r.elapsed.total_seconds() for r in responses if r.status_code == 200)
        assert slowest_refusal < slowest_answer
        assert batcher.expected_wait_s() is not None
        assert httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code == 200


def test_deadline_exceeded_is_504_and_the_server_keeps_serving(exported_repo):
    with running_server(models_dir=exported_repo, request_timeout_s=0.001, warmup=False) as (url, app):
        response = httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60)
        assert response.status_code == 504 and response.json()["code"] == "deadline_exceeded"
        app.state.archserve.settings.request_timeout_s = 60.0
        assert httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code == 200


def test_empty_repository_is_live_but_not_ready_and_says_why(tmp_path):
    with running_server(wait_ready=False, models_dir=tmp_path) as (url, _):
        deadline = time.monotonic() + 30
        while (ready := httpx.get(f"{url}/health/ready")).json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "no models in" in ready.json()["reason"] and "python -m export" in ready.json()["reason"]
        refused = httpx.post(f"{url}/classify/resnet18", content=jpeg())
        assert refused.status_code == 503 and "not ready" in refused.json()["error"]


def test_require_gpu_is_ready_only_on_a_gpu(exported_repo):
    """Without a working CUDA provider the model falls back to the CPU and require_gpu keeps the server not
    ready, saying why; where CUDA runs, the server turns ready on it."""
    cuda = cuda_runs(exported_repo / "resnet18" / "1")
    with running_server(wait_ready=False, models_dir=exported_repo, require_gpu=True) as (url, _):
        deadline = time.monotonic() + 60
        while (ready := httpx.get(f"{url}/health/ready")).json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.1)
        if cuda:
            assert ready.status_code == 200, ready.text
            (model,) = httpx.get(f"{url}/models").json()["models"]
            assert model["provider"] == "CUDAExecutionProvider"
        else:
            assert ready.status_code == 503
            assert "require_gpu" in ready.json()["reason"] and "CPUExecutionProvider" in ready.json()["reason"]


def test_a_disconnected_client_leaves_the_queue(exported_repo):
    """Clients that disconnect while their images wait are answered 499 and their images leave the queue
    before their turn. The engine is held (its run waits on a gate) while they queue and leave, so the test
    does not depend on how fast this machine serves the requests queued ahead of them."""
    # One batch at a time (max_batch_size=1, no CPU lanes): the first request holds the engine, the rest queue.
    with running_server(device="cpu", models_dir=exported_repo, max_batch_size=1, cpu_lanes=1) as (url, app):
        served = app.state.archserve.models.get("resnet18")
        data = jpeg()
        request = (
            f"POST /classify/resnet18 HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode() + data

        def failed(what: str):
            return lambda: f"{what}: queue depth {served.batcher.queue_depth}"

        async def scenario(gate):
            busy = asyncio.ensure_future(_burst(url, 6, data))  # one runs (held at the gate), five queue
            await asyncio.to_thread(until, lambda: served.batcher.queue_depth == 5, failed("the burst never queued"))
            socks = []
            for _ in range(4):
                s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
                s.sendall(request)
                socks.append(s)
            await asyncio.to_thread(
                until, lambda: served.batcher.queue_depth == 9, failed("the 4 clients never queued")
            )
            for s in socks:
                s.close()  # gone before their turn
            # They leave while the engine is still held: nothing of theirs waits for a turn.
            await asyncio.to_thread(
                until, lambda: counter(url, "archserve_requests_total", code=499) == 4, failed("not all 4 left as 499s")
            )
            assert served.batcher.queue_depth == 5
            gate.set()
            return await busy

        with engine_held(served) as gate:
            responses = asyncio.run(scenario(gate))
        assert [r.status_code for r in responses] == [200] * 6
        assert served.batcher.queue_depth == 0
        codes = {code: counter(url, "archserve_requests_total", code=code) for code in (200, 499, 500)}
        assert codes == {200: 6, 499: 4, 500: 0}
        # 6 served + 1 check below; the 4 abandoned images never reached the engine
        assert httpx.post(f"{url}/classify/resnet18", content=data, timeout=60).status_code == 200
        assert counter(url, "archserve_batch_size_sum") == 7


@pytest.mark.parametrize("path, content_type", [("/classify/resnet18", "image/jpeg"),
                                                 ("/v2/models/resnet18/infer", "application/json")])
def test_a_client_that_leaves_during_its_upload_is_a_499_not_a_server_error(exported_repo, path, content_type):
    with running_server(device="cpu", models_dir=exported_repo, warmup=False) as (url, _app):
        data = jpeg()
        host, port = url.rsplit("/", 1)[1].split(":")
        with socket.create_connection((host, int(port))) as s:  # half the declared body, then gone
            s.sendall((f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
                       f"Content-Length: {len(data)}\r\n\r\n").encode() + data[: len(data) // 2])
            time.sleep(0.3)  # the server has the headers and waits for the rest of the body
        deadline = time.monotonic() + 10
        while counter(url, "archserve_requests_total", code=499) + counter(
                url, "archserve_requests_total", code=500) < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counter(url, "archserve_requests_total", code=499) == 1
        assert counter(url, "archserve_requests_total", code=500) == 0
        assert httpx.post(f"{url}/classify/resnet18", content=data, timeout=60).status_code == 200


@pytest.fixture()
def own_repo(exported_repo, tmp_path):
    """A copy of the repository that a test may damage."""
    root = tmp_path / "models"
    shutil.copytree(exported_repo / "resnet18", root / "resnet18")
    return root


def test_metrics_from_every_worker_process_are_in_one_scrape(exported_repo, tmp_path):
    with service_tree(exported_repo, tmp_path, "--workers", "2") as (proc, url, _):
        # A worker takes connections only once it has loaded: the very first answer, and every one after it,
        # comes from a ready worker, never a 503 from one still loading beside a ready one.
        first = first_answer(url, "/health/ready")
        later = [httpx.get(f"{url}/health/ready").status_code for _ in range(30)]
        assert first.status_code == 200 and later == [200] * 30, (first.text, later)
        responses = asyncio.run(_burst(url, 20, jpeg()))
        assert all(r.status_code == 200 for r in responses)
        for _ in range(6):  # whichever worker answers the scrape, it reports all of them
            assert counter(url, "archserve_requests_total", model="resnet18", code=200) == 20
            assert counter(url, "archserve_images_total", model="resnet18") == 20
        assert len(front_end_pids(url, 2)) == 2
        assert len(wait_for_pids(url, 1)) == 1, "model info comes from the one engine process"


def _running(pids: set[int]) -> set[int]:
    """Those of ``pids`` that are processes still running (not exited, nor exited and waiting to be reaped)."""
    alive = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            if open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(pid)
    return alive


def test_sighup_restarts_workers_one_at_a_time_without_a_failed_request(exported_repo, tmp_path):
    """SIGHUP to the main process replaces every front-end, each new one ready before it takes requests, while
    the engine serves on; requests sent all along succeed."""
    with service_tree(exported_repo, tmp_path, "--workers", "2") as (proc, url, _):
        assert first_answer(url, "/health/ready").status_code == 200
        old = front_end_pids(url, 2)
        engine = wait_for_pids(url, 1)
        proc.send_signal(signal.SIGHUP)
        # Gone as processes, not only unseen: 12 new connections can all land on the other front-end.
        codes, resets = asyncio.run(traffic_until(url, lambda: not _running(old), timeout=180))
        new = front_end_pids(url, 2)
        assert not new & old, (old, new)
        assert worker_pids(url) == engine  # the engine and its models stay
        # Sent while the workers were being replaced: every answer was a 200. A connection that an old worker
        # accepted just as it stopped can be closed unanswered (uvicorn closes connections that have not yet
        # sent a request); the client retries those, as it should any connection reset.
        assert len(codes) >= 8 and set(codes) == {200}, codes
        assert resets <= len(codes) // 10, (resets, len(codes))
        assert counter(url, "archserve_ready") == 1  # livemin over the live workers only
        assert proc.poll() is None


def test_a_retired_version_stays_at_0_in_model_info_with_several_workers(own_repo, tmp_path):
    """prometheus-client cannot remove a series in multiprocess mode: after a hot reload, the old version must
    read 0 (not 1 beside the new one) in the process that holds the models (the engine), and the new one 1."""
    from tests.service.test_model_lifecycle import publish

    def info(url) -> dict[tuple[str, str], float]:
        return {(s.labels["version"], s.labels["pid"]): s.value
                for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
                if family.name == "archserve_model_info" for s in family.samples}

    with service_tree(own_repo, tmp_path, "--workers", "2", "--device", "cpu",
                  env={"ARCHSERVE_POLL_INTERVAL_S": "0.3", **COLD}) as (proc, url, log):
        assert first_answer(url, "/health/ready").status_code == 200
        pids = wait_for_pids(url, 1)
        assert info(url) == {("1", pid): 1.0 for pid in pids}
        publish(own_repo, 2)
        wanted = {**{("1", pid): 0.0 for pid in pids}, **{("2", pid): 1.0 for pid in pids}}
        deadline = time.monotonic() + 120
        while info(url) != wanted and time.monotonic() < deadline:
            time.sleep(0.3)
        assert info(url) == wanted, log.read_text()[-2000:]


def _truncate_model(repo) -> None:
    path = repo / "resnet18" / "1" / "model.onnx"
    path.write_bytes(path.read_bytes()[:1000])


def test_a_worker_that_cannot_load_stops_the_server_with_exit_1(own_repo, tmp_path):
    _truncate_model(own_repo)
    with service_tree(own_repo, tmp_path, "--workers", "2", "--device", "cpu") as (proc, _, log):
        assert proc.wait(timeout=120) == 1
        output = log.read_text()
        assert "could not load its models" in output and "resnet18" in output, output[-3000:]


def test_a_bad_experiments_file_stops_a_server_with_several_workers_with_exit_1(exported_repo, tmp_path):
    """Raised while the app is built (before its lifespan): uvicorn would restart such a worker forever."""
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text("experiments:\n  - name: resnet18\n    variants: []\n")
    env = {"ARCHSERVE_EXPERIMENTS_FILE": str(experiments), "ARCHSERVE_STORE_PATH": str(tmp_path / "store.sqlite3")}
    with service_tree(exported_repo, tmp_path, "--workers", "2", "--device", "cpu", env=env) as (proc, _, log):
        assert proc.wait(timeout=120) == 1, log.read_text()[-3000:]
        output = log.read_text()
        assert "could not start" in output and "experiments" in output, output[-3000:]


def test_a_dead_workers_replacement_that_cannot_load_leaves_the_others_serving(own_repo, tmp_path):
    """Once the server has served, a worker that cannot start (here: the model broke on disk after the start, and
    a worker died) must not take the healthy workers down with it; it is started again, with a growing delay.
    (Each worker loads the models only without an engine process.)"""
    with service_tree(own_repo, tmp_path, "--workers", "2", "--engine-process", "off", "--device", "cpu",
                      "--log-level", "info", env=COLD) as (proc, url, log):
        assert first_answer(url, "/health/ready").status_code == 200
        pids = wait_for_pids(url, 2)
        assert len(pids) == 2
        deadline = time.monotonic() + 60  # the supervisor sees both ready (it checks every 0.5 s)
        while "All 2 workers are ready" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "All 2 workers are ready" in log.read_text(), log.read_text()[-3000:]
        _truncate_model(own_repo)
        victim, survivor = sorted(pids)
        os.kill(int(victim), signal.SIGKILL)
        deadline = time.monotonic() + 120
        while log.read_text().count("could not start; the other workers serve on") < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        output = log.read_text()
        assert output.count("could not start; the other workers serve on") >= 2, output[-3000:]
        assert "trying again in 2 s" in output and "trying again in 4 s" in output  # not every tick (0.5 s)
        assert proc.poll() is None
        assert [httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code
                for _ in range(5)] == [200] * 5
        assert worker_pids(url) == {survivor}


def test_sighup_keeps_the_old_workers_when_a_new_one_cannot_load(own_repo, tmp_path):
    """Without an engine process each worker loads the models: a new one that cannot ends the restart."""
    with service_tree(own_repo, tmp_path, "--workers", "2", "--engine-process", "off", "--device", "cpu",
                      "--log-level", "info", env=COLD) as (proc, url, log):
        assert first_answer(url, "/health/ready").status_code == 200
        assert len(old := wait_for_pids(url, 2)) == 2
        _truncate_model(own_repo)  # the running workers hold their sessions; a new one would fail to load
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while "aborting the restart" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "aborting the restart" in log.read_text(), log.read_text()[-3000:]
        assert proc.poll() is None and worker_pids(url) == old
        assert httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code == 200


def test_sigterm_ends_a_rolling_restart_at_once(own_repo, tmp_path):
    """A new worker that hangs while starting (its experiments file is now a FIFO nobody writes) would hold a SIGHUP
    restart for ARCHSERVE_WORKER_START_TIMEOUT_S (600 s): SIGTERM must not wait for it. With uvicorn's own signal
    handling the server was still up 20 s after SIGTERM."""
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text("experiments: []\n")
    env = {"ARCHSERVE_EXPERIMENTS_FILE": str(experiments), "ARCHSERVE_STORE_PATH": str(tmp_path / "store.sqlite3"),
           **COLD}
    with service_tree(own_repo, tmp_path, "--workers", "2", "--device", "cpu", "--log-level", "info",
                  env=env) as (proc, url, log):
        assert first_answer(url, "/health/ready").status_code == 200
        front_end_pids(url, 2)
        experiments.unlink()
        os.mkfifo(experiments)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while "restarting processes" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)  # the new worker is now stuck reading the experiments file
        assert proc.poll() is None and "aborting the restart" not in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]


def test_sigterm_finishes_in_flight_requests_then_exits_0(exported_repo):
    port = free_port()
    # A long queue delay holds the 10 requests in the queue (a batch of 16 is never full), so all of them are
    # still in flight when SIGTERM comes, however slowly this machine sends them.
    proc = start_service(exported_repo, port, "--max-batch-size", "16", "--max-queue-delay-ms", "5000", env=COLD)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(url, "/health/ready", timeout=120)

        def in_flight() -> float:
            return counter(url, "archserve_inflight_requests", model="resnet18")

        def all_in_flight() -> None:
            until(lambda: in_flight() >= 10, lambda: f"only {in_flight()} of 10 requests in flight", timeout=60)

        async def scenario():
            work = asyncio.ensure_future(_burst(url, 10, jpeg()))
            await asyncio.to_thread(all_in_flight)  # every request admitted, none answered yet
            proc.send_signal(signal.SIGTERM)
            return await work

        responses = asyncio.run(scenario())
        assert [r.status_code for r in responses] == [200] * 10
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_warmup_that_fails_leaves_no_model_running_or_reported(experiment_repo, monkeypatch):
    """googlenet warms up and starts; resnet18's warm-up fails: the server is not ready, googlenet's batcher
    is closed (its thread gone) and no model is reported in archserve_model_info."""
    import threading

    from service.models.engine import OnnxEngine

    real_warmup = OnnxEngine.warmup

    def warmup(self, sizes):
        if self.manifest.name == "resnet18":
            raise RuntimeError("out of memory while warming up")
        real_warmup(self, sizes)

    monkeypatch.setattr(OnnxEngine, "warmup", warmup)
    with running_server(wait_ready=False, models_dir=experiment_repo, models=["googlenet", "resnet18"],
                        max_batch_size=2) as (url, _):
        deadline = time.monotonic() + 120
        while (ready := httpx.get(f"{url}/health/ready")).json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.status_code == 503 and ready.json()["status"] == "failed"
        assert "out of memory while warming up" in ready.json()["reason"]
        names = {family.name for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
                 for sample in family.samples if sample.name == "archserve_model_info"}
        assert names == set()
        assert not [t.name for t in threading.enumerate() if t.name.startswith("batcher-googlenet")]
