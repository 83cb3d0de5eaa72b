"""Giving memory back to the operating system once a model version is released.

A released version's onnxruntime sessions are freed as soon as its last
reference goes (nothing holds them in a reference cycle: tested), but glibc
keeps freed heap in its per-thread arenas for reuse, so the process's resident
memory would not show it. ``trim_heap`` hands that back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

__all__ = ["resident_bytes", "trim_heap"]


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def trim_heap() -> bool:
    """Return the heap that malloc keeps free to the system (glibc's ``malloc_trim``); False where the C library
    is not glibc. Walks every arena: call it from a worker thread, not the event loop."""
    if _LIBC is None:
        return False
    _LIBC.malloc_trim(0)
    return True


def resident_bytes() -> int | None:
    """This process's resident memory, or None where ``/proc`` does not say."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
