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
    """Run ``work``; if the client disconnects first, cancel it (its images leave the queue).

    The watcher cancels ``work`` from a done-callback rather than the two being
    raced with ``asyncio.wait`` (a waiter future, a set and four callbacks per
    request on the event loop's thread). As before: work that finished first
    wins (cancelling a done task does nothing), and once the client is gone the
    request ends in ``ClientGone`` whatever the cancelled work did.
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(work)
    watcher = loop.create_task(wait_for_disconnect(request))
    gone = False

    def on_watcher_done(finished: asyncio.Task) -> None:
        nonlocal gone
        if not finished.cancelled():  # disconnected (or receive failed): the client is gone either way
            gone = task.cancel()

    watcher.add_done_callback(on_watcher_done)
    try:
        try:
            result = await task
        except (Exception, asyncio.CancelledError):
            # Cancelled because this request itself is being cancelled (shutdown): not a disconnect.
            if gone and not asyncio.current_task().cancelling():
                raise ClientGone() from None
            raise
        if gone:  # the work swallowed its cancellation
            raise ClientGone()
        return result
    finally:
        watcher.remove_done_callback(on_watcher_done)
        watcher.cancel()
        if not task.done():
            task.cancel()


async def wait_for_disconnect(request: Request) -> None:
    # Called once the body has been read, so the next message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
