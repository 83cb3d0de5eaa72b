"""Operating-system names for the server's threads.

Python 3.11 names its threads for Python only: ``top -H``, ``ps -L``, py-spy's
native view and ``/proc/<pid>/task/*/comm`` show every thread as ``python``.
The thread pools here name theirs (``decode_0``, ``batch resnet50/``) so an
operator, and ``bench.run``'s CPU breakdown, can tell decoding from inference.
Threads that onnxruntime starts itself keep the name of the thread that created
the session. Linux keeps the first 15 bytes of a name; elsewhere this does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

_PR_SET_NAME = 15  # <linux/prctl.h>
_PR_GET_NAME = 16
_NAME_BYTES = 15

__all__ = ["BATCH", "DECODE", "ONNXRUNTIME", "STORE", "name_os_thread", "os_thread_name"]

# How the server's threads are named (bench.run groups their CPU by these prefixes).
DECODE = "decode"  # the decode pool: decode_0, decode_1, ...
BATCH = "batch"  # the threads that call onnxruntime: "batch resnet50/1"
ONNXRUNTIME = "ort"  # onnxruntime's own intra-op pool: "ort resnet50/1"
STORE = "store"  # the prediction-log writer's: store_0, store_1, ...


def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def name_os_thread(name: str | None = None) -> bool:
    """Name the calling thread for the OS (default: its Python name), cut to 15 bytes.

    Returns whether the name was set. Never raises: a name is a convenience.
    """
    if _PRCTL is None:
        return False
    raw = (threading.current_thread().name if name is None else name).encode("utf-8", "replace")[:_NAME_BYTES]
    try:
        return _PRCTL(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0
    except (OSError, ctypes.ArgumentError):
        return False


def os_thread_name() -> str | None:
    """The calling thread's OS name (Linux), or None where it cannot be read."""
    if _PRCTL is None:
        return None
    buffer = ctypes.create_string_buffer(_NAME_BYTES + 1)
    try:
        if _PRCTL(_PR_GET_NAME, buffer, 0, 0, 0) != 0:
            return None
    except (OSError, ctypes.ArgumentError):
        return None
    return buffer.value.decode("utf-8", "replace")
