"""The engine socket: frames, messages, errors across the process boundary, and the shared-memory arena.

A frame is a 4-byte little-endian length and a pickled tuple whose first item names the message. Pixels never
travel in a frame: a front-end writes each preprocessed image into one slot of its arena (a ``memfd`` it
passes to the engine once, when it connects) and the frame names the slot. Logits come back as the bytes of
one float array. Pickle is safe here: both ends are processes of one server, on a socket in a folder only its
user can open.

Front-end -> engine: ``(INFER, id, name, version, images, deadline, low)`` with ``images`` =
``(shape, dtype, slots, inline)``: one shape and dtype for every image of the request (one model's input),
a slot number per image, -1 for one larger than a slot, whose bytes are the next of ``inline``;
``(CANCEL, id)``; ``(ADMIN, id, op, arg)``.
Engine -> front-end: ``(TABLE, ready, status, reason, models)``, ``(OK, id, data, shape, dtype)`` (``data``
None: each image's logits, of ``shape``, are in its slot; else the bytes of all of them),
``(ERROR, id, class name, message, headers)``, ``(ADMIN_OK, id, result)``, ``(RELOAD_EXPERIMENTS,)``.
A request's slots are the front-end's again only once its OK or ERROR has arrived, whatever happened to it.
"""

from __future__ import annotations

import asyncio
import math
import mmap
import os
import pickle
import struct

import numpy as np

from ..errors import ServiceError

HELLO = b"archserve-engine-1"  # then the front-end's pid, slot bytes and slot count; the arena's fd beside it
HEADER = struct.Struct("<I")
MAX_FRAME = 256 * 1024 * 1024  # an inline image of the largest allowed size, with room

INFER, CANCEL, ADMIN = "infer", "cancel", "admin"
TABLE, OK, ERROR, ADMIN_OK, RELOAD_EXPERIMENTS = "table", "ok", "error", "admin_ok", "reload_experiments"


def frame(message: tuple) -> bytes:
    body = pickle.dumps(message, protocol=5)
    return HEADER.pack(len(body)) + body


class FrameProtocol(asyncio.Protocol):
    """Frames in, messages out: ``on_message`` for each whole frame, ``on_lost`` once when the connection ends.
    A protocol rather than a stream reader: no coroutine and no awaits per message, on both ends."""

    def __init__(self, on_message, on_lost) -> None:
        self.on_message, self.on_lost = on_message, on_lost
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        offset, end = 0, len(buffer)
        while end - offset >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, offset)
            if size > MAX_FRAME:
                self.transport.close()
                raise ConnectionError(f"a frame of {size} bytes: the other end does not speak this protocol")
            if end - offset - HEADER.size < size:
                break
            start = offset + HEADER.size
            message = pickle.loads(buffer[start:start + size])  # a copy of one frame: small (logits, control)
            offset = start + size
            self.on_message(message)
        if offset:
            del buffer[:offset]

    def send(self, message: tuple) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frame(message))

    def connection_lost(self, exc) -> None:
        self.on_lost()


def error_message(request_id: int, exc: ServiceError) -> tuple:
    return (ERROR, request_id, type(exc).__name__, exc.message, dict(exc.headers))


def rebuild_error(name: str, message: str, headers: dict) -> ServiceError:
    """The engine's error as the front-end raises it: same class, so the same status, code and headers."""
    cls = _error_classes().get(name, ServiceError)
    exc = cls.__new__(cls)
    ServiceError.__init__(exc, message, headers)
    return exc


def _error_classes() -> dict[str, type[ServiceError]]:
    classes, todo = {}, [ServiceError]
    while todo:
        cls = todo.pop()
        classes[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return classes


class Arena:
    """``count`` slots of ``slot_bytes`` in one shared ``memfd``: created by a front-end, mapped by the engine."""

    def __init__(self, fd: int, slot_bytes: int, count: int) -> None:
        self.fd, self.slot_bytes, self.count = fd, slot_bytes, count
        self.map = mmap.mmap(fd, slot_bytes * count)

    @classmethod
    def create(cls, slot_bytes: int, count: int) -> "Arena":
        fd = os.memfd_create("archserve-arena", os.MFD_CLOEXEC)  # anonymous: nothing to clean up if we die
        os.ftruncate(fd, slot_bytes * count)
        return cls(fd, slot_bytes, count)

    def fits(self, array: np.ndarray) -> bool:
        return array.nbytes <= self.slot_bytes

    def write(self, slot: int, array: np.ndarray) -> None:
        # An ndarray straight on the mapping: far cheaper per image than slicing a view of it.
        np.copyto(np.ndarray(array.shape, array.dtype, self.map, slot * self.slot_bytes), array)

    def views(self, images: tuple) -> list[np.ndarray]:
        """The images of an INFER message, without a copy (the batch that stacks them is their one copy)."""
        shape, dtype, slots, inline = images
        dtype = np.dtype(dtype)
        size = math.prod(shape) * dtype.itemsize
        if inline:
            pending = iter(inline)
            return [np.frombuffer(next(pending), dtype).reshape(shape) if slot < 0
                    else self._view(slot, shape, dtype, size) for slot in slots]
        return [self._view(slot, shape, dtype, size) for slot in slots]

    def put(self, slots: tuple, rows: list[np.ndarray]) -> bool:
        """The engine writes each image's logits over its pixels (the batch has copied them): the answer then
        carries no data. False if a row does not fit a slot (it goes in the frame instead)."""
        if rows[0].nbytes > self.slot_bytes:
            return False
        for slot, row in zip(slots, rows):
            np.copyto(np.ndarray(row.shape, row.dtype, self.map, slot * self.slot_bytes), row)
        return True

    def take(self, slots: list[int], shape: tuple, dtype: str) -> list[np.ndarray]:
        """The front-end copies the logits out of its slots before they are used again."""
        return [np.ndarray(shape, dtype, self.map, slot * self.slot_bytes).copy() for slot in slots]

    def _view(self, slot: int, shape: tuple, dtype: np.dtype, size: int) -> np.ndarray:
        if not 0 <= slot < self.count or size > self.slot_bytes:
            raise ValueError(f"{size} bytes in slot {slot}: the arena has {self.count} slots of {self.slot_bytes}")
        return np.ndarray(shape, dtype, self.map, slot * self.slot_bytes)

    def close(self) -> None:
        try:
            self.map.close()
        except BufferError:  # a view still in a running batch: the mapping goes with it
            pass
        os.close(self.fd)
