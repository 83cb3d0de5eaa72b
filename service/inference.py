"""What /classify and the v2 infer route share: submitting to a model's batcher and client disconnects."""

from __future__ import annotations

import asyncio

from fastapi import Request

from . import batching
from .errors import DeadlineExceededError, InferenceError, QueueFullError, ServiceUnavailableError
from .repository import ServedModel


async def infer(served: ServedModel, arrays: list, deadline: float, timeout_s: float) -> list:
    """Each array joins the model's batch queue as its own item; batching errors become HTTP errors."""
    try:
        return await served.batcher.submit_many(arrays, deadline=deadline)
    except batching.QueueFullError as exc:
        raise QueueFullError(
            f"{served.name} v{served.version} has {served.batcher.queue_depth} images queued, at its limit; "
            "retry after a moment"
        ) from exc
    except batching.DeadlineExceededError as exc:
        raise DeadlineExceededError(
            f"no result within the request deadline of {timeout_s:g}s; the server is overloaded, retry later"
        ) from exc
    except batching.BatcherClosedError as exc:
        raise ServiceUnavailableError("the model is shutting down; retry on another replica") from exc
    except batching.BatchFailedError as exc:
        raise InferenceError(f"inference failed for {served.name} v{served.version}: {exc.__cause__ or exc}") from exc


class ClientGone(Exception):
    """The client disconnected before its response was ready."""


async def until_disconnected(request: Request, work):
    """Run ``work``; if the client disconnects first, cancel it (its images leave the queue)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


async def wait_for_disconnect(request: Request) -> None:
    # Called once the body has been read, so the next message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
