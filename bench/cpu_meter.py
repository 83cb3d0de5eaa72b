"""CPU time of a process tree, from /proc: a server with its worker processes, split by what its threads do.

A benchmark shares the machine with whatever else runs there, so every
measurement also says how many cores the server, the benchmark itself and
everything else used over it.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from service import threads


def process_tree(pid: int) -> dict[int, list[str]]:
    """``pid`` and its live descendants (worker processes): each one's /proc stat fields after the command
    name (``[1]`` the parent pid, ``[11]``/``[12]`` utime/stime, ``[13]``/``[14]`` of reaped children). Empty if
    ``pid`` is not running."""
    stats: dict[int, list[str]] = {}
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree: dict[int, list[str]] = {}
    todo = [pid]
    while todo:
        current = todo.pop()
        if current in stats and current not in tree:
            tree[current] = stats[current]
            todo.extend(children.get(current, []))
    return tree


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and every live descendant (worker processes), plus what the tree has reaped."""
    tree = process_tree(pid)
    if pid not in tree:
        return 0.0
    total = sum(int(fields[11]) + int(fields[12]) for fields in tree.values())
    total += int(tree[pid][13]) + int(tree[pid][14])  # cutime + cstime: descendants already waited for
    return total / os.sysconf("SC_CLK_TCK")


# The server names its threads for the OS (service/threads.py); by that name, what each one does.
THREAD_GROUPS = ((threads.DECODE, "decode"), (threads.BATCH, "inference"), (threads.ONNXRUNTIME + " ", "inference"))


def thread_group(pid: int, tid: int, comm: str) -> str:
    if tid == pid:  # each process's main thread runs its event loop (uvicorn: the HTTP side)
        return "event_loop"
    return next((group for prefix, group in THREAD_GROUPS if comm.startswith(prefix)), "other")


def process_tree_threads_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of the live threads of ``pid`` and its descendants, by what they do: ``event_loop`` (main
    threads), ``decode``, ``inference`` (the batch threads and onnxruntime's own pool) and ``other``.

    A thread that ended is not counted: compare two samples of long-lived threads (a server's are)."""
    tick = os.sysconf("SC_CLK_TCK")
    groups = {"event_loop": 0.0, "decode": 0.0, "inference": 0.0, "other": 0.0}
    for proc in process_tree(pid):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{proc}/task").iterdir():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = (task / "stat").read_text()
                    comm = stat[stat.index("(") + 1:stat.rindex(")")]
                    fields = stat.rsplit(")", 1)[1].split()
                    groups[thread_group(proc, int(task.name), comm)] += (int(fields[11]) + int(fields[12])) / tick
    return groups


class CpuMeter:
    """CPU cores used over an interval: the whole machine, one process with its descendants, and this process."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.start = self._sample()
        self.threads_start = process_tree_threads_cpu_s(pid) if pid else None

    def _sample(self) -> tuple[float, float, float, float]:
        tick = os.sysconf("SC_CLK_TCK")
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(v) for v in fields]
        idle = values[3] + values[4]
        busy = sum(values[:8]) - idle
        proc = process_tree_cpu_s(self.pid) if self.pid else 0.0  # a server's worker processes count too
        t = os.times()
        me = t.user + t.system + t.children_user + t.children_system  # this process and reaped children
        return time.monotonic(), busy / tick, proc, me

    def stop(self) -> dict:
        t1, busy1, proc1, me1 = self._sample()
        t0, busy0, proc0, me0 = self.start
        wall = max(t1 - t0, 1e-9)
        machine, server, bench = (busy1 - busy0) / wall, (proc1 - proc0) / wall, (me1 - me0) / wall
        out = {"machine_cores": round(machine, 2), "server_cores": round(server, 2), "loadgen_cores": round(bench, 2),
               "other_cores": round(max(0.0, machine - server - bench), 2), "wall_s": round(wall, 1)}
        if self.threads_start is not None:
            end = process_tree_threads_cpu_s(self.pid)
            out["server_threads_cores"] = {k: round(max(0.0, end[k] - self.threads_start[k]) / wall, 3) for k in end}
        return out


def machine_busy_cores(seconds: float = 1.0) -> float:
    """Cores busy on the whole machine over ``seconds`` (from /proc/stat)."""
    meter = CpuMeter(None)
    time.sleep(seconds)
    return meter.stop()["machine_cores"]
