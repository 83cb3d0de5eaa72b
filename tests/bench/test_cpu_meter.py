"""bench.run.CpuMeter: a server's CPU includes its worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from bench.run import CpuMeter, process_tree_cpu_s

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
