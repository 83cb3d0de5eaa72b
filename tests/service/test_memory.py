"""The memory figures the server logs when it releases a model version."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from service.models.memory import resident_bytes, trim_heap

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read from /proc, trimmed by glibc")


def test_resident_memory_follows_an_allocation_and_its_release():
    before = resident_bytes()
    block = np.ones(256 * 2**20, dtype=np.uint8)  # touched: resident, not only reserved
    held = resident_bytes()
    del block
    assert trim_heap() is True  # glibc: it ran
    after = resident_bytes()
    assert before and held and after
    assert held - before > 200 * 2**20, (before, held)
    assert held - after > 200 * 2**20, (held, after)
