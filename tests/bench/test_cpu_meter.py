"""bench.cpu_meter.CpuMeter: a server's CPU includes its worker processes, and is split by what its threads do."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bench.cpu_meter import CpuMeter, process_tree_cpu_s, process_tree_threads_cpu_s, thread_group

# A parent that only waits, and a child that spins: what uvicorn's supervisor and a worker look like.
SUPERVISOR = (
    "import subprocess, sys\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time\\nend = time.time() + 30\\nwhile time.time() < end: pass'])\n"
    "print('ready', flush=True)\n"
    "child.wait()\n"
)


def test_a_servers_worker_processes_count_as_its_cpu():
    parent = subprocess.Popen([sys.executable, "-c", SUPERVISOR], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)  # its own process group: both go with one killpg
    try:
        assert parent.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        meter = CpuMeter(parent.pid)
        time.sleep(1.5)
        cores = meter.stop()
        # The parent itself is idle: only the child's spinning can make this more than a sliver of a core.
        assert cores["server_cores"] >= 0.3, cores
        assert cores["server_cores"] <= cores["machine_cores"] + 0.05, cores
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait()


def test_a_pid_that_is_not_running_has_no_cpu():
    assert process_tree_cpu_s(2**22 + 7) == 0.0  # above Linux's largest pid: never a live process


# A server-like process: an idle main thread, a spinning thread named as the decode pool names its threads,
# and a spinning thread named as onnxruntime's pool threads are.
NAMED_THREADS = (
    "import threading, time\n"
    "from service.threads import name_os_thread\n"
    "def spin(name):\n"
    "    name_os_thread(name)\n"
    "    end = time.time() + 30\n"
    "    while time.time() < end: pass\n"
    "for name in ('decode_0', 'ort resnet18/1'):\n"
    "    threading.Thread(target=spin, args=(name,), daemon=True).start()\n"
    "print('ready', flush=True)\n"
    "time.sleep(30)\n"
)


def test_a_servers_cpu_is_split_by_what_its_named_threads_do():
    proc = subprocess.Popen([sys.executable, "-c", NAMED_THREADS], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2], start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        meter = CpuMeter(proc.pid)
        time.sleep(2.0)
        threads = meter.stop()["server_threads_cores"]
        # Two spinning threads share whatever cores there are (the GIL: about one between them).
        assert threads["decode"] >= 0.15 and threads["inference"] >= 0.15, threads
        assert threads["event_loop"] < 0.1 and threads["other"] < 0.1, threads
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_threads_are_grouped_by_their_os_names():
    assert thread_group(100, 100, "python") == "event_loop"  # a process's main thread
    assert thread_group(100, 101, "decode_1") == "decode"
    assert thread_group(100, 102, "batch resnet50/") == "inference"
    assert thread_group(100, 103, "ort resnet50/1") == "inference"
    assert thread_group(100, 104, "libuv-worker") == "other"
    assert process_tree_threads_cpu_s(2**22 + 7) == {"event_loop": 0.0, "decode": 0.0, "inference": 0.0,
                                                     "other": 0.0}
