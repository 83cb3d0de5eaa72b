"""Front-end processes and one engine process (``--workers N``): the handoff, admin, metrics and every fault,
each by killing a real process under load."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest

from service.split import protocol as p
from tests.images import jpeg
from tests.service.test_v2 import binary_request, split_binary_response
from tests.service.server import (
    COLD, counter, first_answer, front_end_pids, live_pids, running_server, service_tree, traffic_until, until,
)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _maps_onnxruntime(pid: int) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return "onnxruntime" in f.read()


def _engine_pid(proc: subprocess.Popen, front_ends: set[int]) -> int:
    """The supervisor's child that maps onnxruntime: the engine (the front-ends must not)."""
    engines = [pid for pid in _children(proc.pid) if pid not in front_ends and _maps_onnxruntime(pid)]
    assert len(engines) == 1, engines
    return engines[0]


def _top(response: httpx.Response) -> list[tuple[int, float]]:
    return [(p_["index"], round(p_["score"], 5)) for p_ in response.json()["results"][0]["predictions"]]


def test_front_ends_hold_no_model_and_answer_as_one_worker_does(exported_repo, tmp_path):
    """Two front-ends and an engine answer every image as the in-process server does, through slots and inline
    (an image larger than a slot); the front-ends never load onnxruntime; batch metrics (engine) and request
    metrics (front-ends) are in one scrape."""
    images = [jpeg(seed=s) for s in range(3)]
    session = ort.InferenceSession(str(exported_repo / "resnet18" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    with running_server(warmup=False, models_dir=exported_repo, device="cpu") as (url, _):
        expected = [_top(httpx.post(f"{url}/classify/resnet18", content=data, timeout=60)) for data in images]
    for slot_bytes in ("1000000", "4096"):  # the second is smaller than one 224x224x3 image: all inline
        env = {**COLD, "ARCHSERVE_ENGINE_SLOT_BYTES": slot_bytes}
        with service_tree(exported_repo, tmp_path, "--workers", "2", "--device", "cpu", env=env) as (proc, url, _):
            assert first_answer(url, "/health/ready").status_code == 200
            front_ends = front_end_pids(url, 2)
            assert not any(_maps_onnxruntime(pid) for pid in front_ends)
            _engine_pid(proc, front_ends)
            with httpx.Client(timeout=60) as client:
                for _ in range(2):  # both front-ends, most likely: new connections alternate between them
                    got = [_top(client.post(f"{url}/classify/resnet18", content=data)) for data in images]
                    assert got == expected
            # v2 binary: three uint8 images in one request, each in its own slot, exactly the model's logits
            array = np.random.default_rng(3).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
            content, headers = binary_request(
                {"parameters": {"binary_data_output": True},
                 "inputs": [{"name": "image", "datatype": "UINT8", "shape": [3, 224, 224, 3],
                             "parameters": {"binary_data_size": array.nbytes}}]}, array.tobytes())
            response = httpx.post(f"{url}/v2/models/resnet18/infer", content=content, headers=headers, timeout=60)
            assert response.status_code == 200, response.text
            got = np.frombuffer(split_binary_response(response)[1], "<f4").reshape(3, 1000)
            np.testing.assert_allclose(got, session.run(None, {"image": array})[0], atol=1e-4, rtol=0)
            assert counter(url, "archserve_requests_total", model="resnet18", code=200) == 7
            assert counter(url, "archserve_batch_size_count", model="resnet18") >= 1  # counted by the engine
            assert counter(url, "archserve_model_info", model="resnet18") == 1  # the engine's one copy


def test_admin_load_and_unload_apply_once_for_every_front_end(exported_repo, tmp_path):
    env = {**COLD, "ARCHSERVE_ADMIN_TOKEN": "secret"}
    auth = {"Authorization": "Bearer secret"}
    with service_tree(exported_repo, tmp_path, "--workers", "2", "--device", "cpu", env=env) as (_, url, _):
        assert first_answer(url, "/health/ready").status_code == 200
        unload = httpx.post(f"{url}/v2/repository/models/resnet18/unload", headers=auth, timeout=60)
        assert unload.status_code == 200, unload.text
        codes = {httpx.Client().post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code
                 for _ in range(8)}
        assert codes == {404}  # on every front-end: the engine pushed the new table before answering
        index = httpx.post(f"{url}/v2/repository/index", timeout=60).json()
        assert index[0]["state"] == "UNAVAILABLE"
        load = httpx.post(f"{url}/v2/repository/models/resnet18/load", headers=auth, timeout=120)
        assert load.status_code == 200 and load.json()["versions"] == ["1"], load.text
        codes = {httpx.Client().post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code
                 for _ in range(8)}
        assert codes == {200}


def test_a_dead_engine_fails_requests_with_503_at_once_and_comes_back(exported_repo, tmp_path):
    """SIGKILL the engine under load: the requests it held answer 503 (never a hang), readiness says why, the
    supervisor starts another engine and the front-ends reconnect by themselves."""
    with service_tree(exported_repo, tmp_path, "--workers", "2", "--device", "cpu", env=COLD) as (proc, url, _):
        assert first_answer(url, "/health/ready").status_code == 200
        engine = _engine_pid(proc, front_ends := front_end_pids(url, 2))
        killed = {}

        def kill_once() -> bool:
            if not killed:
                os.kill(engine, signal.SIGKILL)
                killed["at"] = time.monotonic()
            return False

        async def scenario():
            load = asyncio.create_task(traffic_until(url, lambda: False, timeout=6, clients=6))
            await asyncio.sleep(1.5)
            await asyncio.to_thread(kill_once)
            return await load

        codes, _ = asyncio.run(scenario())
        assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, sorted(set(codes))
        # Back: a new engine, the same front-ends.
        until(lambda: httpx.get(f"{url}/health/ready", timeout=10).status_code == 200,
              lambda: httpx.get(f"{url}/health/ready").text, timeout=120, interval=0.2)
        assert _engine_pid(proc, front_ends) != engine
        assert front_end_pids(url, 2) == front_ends
        assert httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=60).status_code == 200


def test_a_stuck_engine_answers_504_by_the_deadline_and_readiness_says_why_when_it_dies(exported_repo, tmp_path):
    env = {**COLD, "ARCHSERVE_REQUEST_TIMEOUT_S": "2"}
    with service_tree(exported_repo, tmp_path, "--workers", "2", "--device", "cpu", env=env) as (proc, url, _):
        assert first_answer(url, "/health/ready").status_code == 200
        engine = _engine_pid(proc, front_end_pids(url, 2))
        os.kill(engine, signal.SIGSTOP)
        try:
            started = time.monotonic()
            response = httpx.post(f"{url}/classify/resnet18", content=jpeg(), timeout=30)
            took = time.monotonic() - started
            assert response.status_code == 504 and took < 2 + 2, (response.status_code, took)
        finally:
            os.kill(engine, signal.SIGKILL)
            os.kill(engine, signal.SIGCONT)
        def says_why() -> bool:  # once the front-end has read the end of the engine's socket
            ready = httpx.get(f"{url}/health/ready", timeout=10)
            return ready.status_code == 503 and "engine process" in ready.json()["reason"]

        until(says_why, lambda: httpx.get(f"{url}/health/ready").text, timeout=5, interval=0.02)
        until(lambda: httpx.get(f"{url}/health/ready", timeout=10).status_code == 200,
              lambda: httpx.get(f"{url}/health/ready").text, timeout=120, interval=0.2)


def test_a_dead_front_end_takes_no_one_elses_requests(exported_repo, tmp_path):
    """SIGKILL one front-end under load: every request that reached a living front-end answers 200 (those in
    the dead one's connections are reset), and the supervisor replaces it."""
    with service_tree(exported_repo, tmp_path, "--workers", "2", "--device", "cpu", env=COLD) as (proc, url, _):
        assert first_answer(url, "/health/ready").status_code == 200
        victim, survivor = sorted(front_end_pids(url, 2))

        async def scenario():
            load = asyncio.create_task(traffic_until(url, lambda: False, timeout=6, clients=6))
            await asyncio.sleep(1.5)
            os.kill(victim, signal.SIGKILL)
            return await load

        codes, resets = asyncio.run(scenario())
        assert set(codes) == {200}, sorted(set(codes))
        assert len(codes) > 10
        until(lambda: len(live_pids(url) - {victim}) == 2, lambda: "no new front-end", timeout=60, interval=0.5)
        assert survivor in live_pids(url)


def _raw_front_end(path: str, slots: int, slot_bytes: int = 3 * 224 * 224):
    """A front-end as the engine sees one: a socket and an arena, speaking the protocol by hand."""
    arena = p.Arena.create(slot_bytes, slots)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    socket.send_fds(sock, [b"%s %d %d %d" % (p.HELLO, os.getpid(), slot_bytes, slots)], [arena.fd])
    return sock, arena


def _receive(sock: socket.socket) -> tuple:
    import pickle

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            assert chunk, "the engine closed the connection"
            data += chunk
        return data

    (size,) = p.HEADER.unpack(exactly(p.HEADER.size))
    return pickle.loads(exactly(size))


def _until_ready_table(sock: socket.socket) -> tuple:
    while True:
        message = _receive(sock)
        if message[0] == p.TABLE and message[1]:
            return message


@pytest.fixture()
def engine_alone(exported_repo, tmp_path):
    """The engine process on its own (as the supervisor starts it), with a null engine: its socket path."""
    path = str(tmp_path / "engine.sock")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARCHSERVE_", "PROMETHEUS_"))}
    env.update(ARCHSERVE_MODELS_DIR=str(exported_repo), ARCHSERVE_NULL_ENGINE="true", ARCHSERVE_DEVICE="cpu",
               ARCHSERVE_POLL_INTERVAL_S="0", ARCHSERVE_LOG_LEVEL="warning")
    proc = subprocess.Popen([sys.executable, "-c", f"from service.split import server; server.run({path!r})"],
                            env=env)
    try:
        until(lambda: os.path.exists(path), lambda: "the engine never listened", timeout=60)
        yield path
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_engine_bounds_what_each_front_end_has_outstanding(engine_alone):
    """A front-end that asks for more images than its slots is refused (503), and one that stops reading its
    answers holds only its own slots: another front-end is served all along."""
    stuck, stuck_arena = _raw_front_end(engine_alone, slots=2)
    table = _until_ready_table(stuck)
    name, version = table[4][0][:2]
    image = np.full((224, 224, 3), 7, np.uint8)
    for slot in range(2):
        stuck_arena.write(slot, image)
    items = (image.shape, image.dtype.str, (0, 1), ())
    too_many = (image.shape, image.dtype.str, (0, 1, -1), (image.tobytes(),))
    stuck.sendall(p.frame((p.INFER, 1, name, version, too_many, time.monotonic() + 30, False)))
    refused = _receive(stuck)
    while refused[0] == p.TABLE:
        refused = _receive(stuck)
    assert refused[:3] == (p.ERROR, 1, "QueueFullError") and "ARCHSERVE_ENGINE_SLOTS" in refused[3], refused
    for request_id in range(2, 200):  # then it sends and never reads again
        stuck.sendall(p.frame((p.INFER, request_id, name, version, items, time.monotonic() + 30, False)))

    other, other_arena = _raw_front_end(engine_alone, slots=4)
    _until_ready_table(other)
    for request_id in range(1, 20):
        other_arena.write(request_id % 4, image)
        item = (image.shape, image.dtype.str, (request_id % 4,), ())
        other.sendall(p.frame((p.INFER, request_id, name, version, item, time.monotonic() + 30, False)))
        answer = _receive(other)
        assert answer[:3] == (p.OK, request_id, None), answer[:4]  # the logits are in the slot
        (logits,) = other_arena.take([request_id % 4], answer[3], answer[4])
        assert logits.shape == (1000,) and logits.argmax() == 0  # the null engine's fixed logits
    stuck.close()
    other.close()


def test_sigterm_drains_the_whole_tree_without_losing_a_request(exported_repo, tmp_path):
    """SIGTERM while requests are in flight: each one sent before it is answered 200, then every process exits
    and the server exits 0."""
    # A long queue delay holds the requests in the engine's queue (a batch of 16 is never full), so all of them
    # are in flight when SIGTERM comes, however slowly this machine sends them.
    with service_tree(exported_repo, tmp_path, "--workers", "2", "--device", "cpu", "--max-batch-size", "16",
                      "--max-queue-delay-ms", "5000", env=COLD) as (proc, url, _):
        assert first_answer(url, "/health/ready").status_code == 200
        children = _children(proc.pid)

        async def scenario():
            async with httpx.AsyncClient(timeout=60) as client:
                sent = [asyncio.create_task(client.post(f"{url}/classify/resnet18", content=jpeg()))
                        for _ in range(10)]
                await asyncio.sleep(2.0)
                proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*sent, return_exceptions=True)

        answers = asyncio.run(scenario())
        assert proc.wait(timeout=60) == 0
        assert [getattr(a, "status_code", a) for a in answers] == [200] * 10
        left = lambda: [pid for pid in children if os.path.exists(f"/proc/{pid}") and _state(pid) != "Z"]  # noqa: E731
        until(lambda: not left(), lambda: [_cmdline(pid) for pid in left()], timeout=10, interval=0.1)


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


EXPERIMENT = """
experiments:
  - name: ab
    variants:
      - {name: a, model: resnet18, weight: 1}
      - {name: b, model: resnet18, weight: 1}
    shadows:
      - {name: s, model: googlenet}  # not a variant's model: a shadow identical to the serving variant is skipped
"""


def test_experiments_with_shadows_and_their_reload_reach_every_front_end(experiment_repo, tmp_path):
    """An experiment's shadows run in the engine's low-priority lane from any front-end, and POST
    /experiments/reload to one front-end re-reads the file in all of them (200, not 409)."""
    experiments = tmp_path / "experiments.yaml"
    experiments.write_text(EXPERIMENT)
    env = {**COLD, "ARCHSERVE_EXPERIMENTS_FILE": str(experiments), "ARCHSERVE_ADMIN_TOKEN": "secret",
           "ARCHSERVE_STORE_PATH": str(tmp_path / "store.sqlite3")}
    with service_tree(experiment_repo, tmp_path, "--workers", "2", "--device", "cpu", "--models", "resnet18,googlenet",
                      env=env) as (_, url, log):
        assert first_answer(url, "/health/ready").status_code == 200
        for _ in range(6):
            with httpx.Client(timeout=60) as client:
                assert client.post(f"{url}/classify/ab", content=jpeg()).status_code == 200
        until(lambda: counter(url, "archserve_shadow_images_total", experiment="ab", outcome="done") == 6,
              lambda: httpx.get(f"{url}/metrics").text[-3000:], timeout=60, interval=0.2)

        experiments.write_text(EXPERIMENT + EXPERIMENT.replace("experiments:\n", "").replace("name: ab", "name: cd"))
        reload = httpx.post(f"{url}/experiments/reload", headers={"Authorization": "Bearer secret"}, timeout=60)
        assert reload.status_code == 200 and reload.json()["experiments"] == ["ab", "cd"], reload.text

        def everywhere() -> bool:
            seen = {}
            for _ in range(10):
                with httpx.Client(timeout=30) as client:
                    seen[client.get(f"{url}/health/live").json()["pid"]] = client.get(f"{url}/experiments/cd")
            return len(seen) == 2 and all(r.status_code == 200 for r in seen.values())

        until(everywhere, lambda: log.read_text()[-3000:], timeout=20, interval=0.2)


def test_one_batch_forms_from_the_images_of_several_front_ends(exported_repo, tmp_path):
    """Two requests through each of two front-ends, held by a long queue delay until a batch of 4 is full: the
    engine runs them as one batch, which independent workers could not."""
    env = {**COLD, "ARCHSERVE_CPU_LANES": "1"}
    with service_tree(exported_repo, tmp_path, "--workers", "2", "--device", "cpu", "--max-batch-size", "4",
                      "--max-queue-delay-ms", "20000", env=env) as (_, url, _):
        assert first_answer(url, "/health/ready").status_code == 200
        by_front_end: dict[int, list[httpx.AsyncClient]] = {}
        clients = []
        deadline = time.monotonic() + 60
        while min((len(v) for v in by_front_end.values()), default=0) < 2 or len(by_front_end) < 2:
            assert time.monotonic() < deadline, {pid: len(v) for pid, v in by_front_end.items()}
            client = httpx.Client(timeout=60, limits=httpx.Limits(max_connections=1))  # one kept-alive connection
            clients.append(client)
            by_front_end.setdefault(client.get(f"{url}/health/live").json()["pid"], []).append(client)
        chosen = [c for pids in by_front_end.values() for c in pids[:2]]
        assert len(chosen) == 4
        before = counter(url, "archserve_batch_size_count", model="resnet18")
        images_before = counter(url, "archserve_batch_size_sum", model="resnet18")

        async def four():
            return await asyncio.gather(*(asyncio.to_thread(c.post, f"{url}/classify/resnet18", content=jpeg())
                                          for c in chosen))

        started = time.monotonic()
        assert [r.status_code for r in asyncio.run(four())] == [200] * 4
        assert time.monotonic() - started < 15  # dispatched when full, not after the 20 s delay
        assert counter(url, "archserve_batch_size_count", model="resnet18") - before == 1
        assert counter(url, "archserve_batch_size_sum", model="resnet18") - images_before == 4
        for client in clients:
            client.close()


def test_a_full_engine_queue_is_a_503_and_a_client_that_leaves_takes_its_image_out(exported_repo, tmp_path):
    """The engine's errors reach the client as they would from one worker (503 queue_full with Retry-After),
    and a client that disconnects is a 499 whose image leaves the engine's queue at once."""
    env = {**COLD, "ARCHSERVE_CPU_LANES": "1", "ARCHSERVE_MAX_QUEUE_SIZE": "2"}
    # A long queue delay holds what is queued (a batch of 4 is never full) for as long as the test needs.
    with service_tree(exported_repo, tmp_path, "--workers", "2", "--device", "cpu", "--max-batch-size", "4",
                      "--max-queue-delay-ms", "8000", env=env) as (_, url, _):
        assert first_answer(url, "/health/ready").status_code == 200
        data = jpeg()
        request = (f"POST /classify/resnet18 HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                   f"Content-Length: {len(data)}\r\n\r\n").encode() + data
        port = int(url.rsplit(":", 1)[1])
        socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for s in socks:
            s.sendall(request)
        queued = lambda: counter(url, "archserve_queue_depth", model="resnet18")  # noqa: E731
        until(lambda: queued() == 2, lambda: f"queue depth {queued()}")
        full = httpx.post(f"{url}/classify/resnet18", content=data, timeout=60)
        assert full.status_code == 503 and full.json()["code"] == "queue_full", full.text
        assert full.headers["Retry-After"] == "1"
        socks[0].close()
        until(lambda: counter(url, "archserve_requests_total", code=499) == 1, lambda: "no 499")
        until(lambda: queued() == 1, lambda: f"queue depth {queued()}")  # it left the engine's queue
        socks[1].settimeout(30)
        assert socks[1].recv(64).startswith(b"HTTP/1.1 200"), "the one still waiting is served"
        socks[1].close()


class _DeadEngine:
    """A process that has exited with ``exitcode``, as multiprocessing shows one."""

    def __init__(self, exitcode: int) -> None:
        self.exitcode, self.pid = exitcode, 1

    def is_alive(self) -> bool:
        return False


def test_an_engine_that_cannot_load_is_started_again_after_2_4_8_seconds_and_one_that_died_at_once():
    from uvicorn.config import STARTUP_FAILURE

    from service.__main__ import EngineProcess

    engine = EngineProcess("unused.sock")
    starts: list[float] = []
    now = 100.0

    def start() -> None:
        starts.append(now)
        engine.process = _DeadEngine(STARTUP_FAILURE)  # the replacement cannot load either

    engine.start = start
    engine.process = _DeadEngine(STARTUP_FAILURE)
    assert engine.keep_alive(now, served=False) is False and engine.failed_to_start  # first start: stop
    engine.failed_to_start = False
    for now in (100.0, 101.9, 102.0, 102.5, 106.4, 106.5, 107.0, 114.9, 115.0):  # the supervisor's checks
        assert engine.keep_alive(now, served=True) is True
    assert starts == [102.0, 106.5, 115.0]  # 2, 4 and 8 s after each failure was seen (100, 102.5, 107)

    engine.process = _DeadEngine(-9)  # killed: started again at the next check, and the delays start over
    now = 200.0
    assert engine.keep_alive(now, served=True) and starts[-1] == 200.0
