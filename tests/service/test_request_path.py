"""The per-request plumbing of /classify: disconnect watching, cached metric children, the frozen startup heap.

``until_disconnected`` runs against a real Starlette ``Request`` fed by an ASGI
receive channel (an ``asyncio.Queue``): the same messages uvicorn sends.
"""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from starlette.requests import Request

from service.app import freeze_startup_objects
from service.errors import ClientGoneError
from service.serving import until_disconnected
from service.metrics import ExperimentMetrics, Metrics


def _request() -> tuple[Request, asyncio.Queue]:
    channel: asyncio.Queue = asyncio.Queue()
    scope = {"type": "http", "method": "POST", "path": "/classify/m", "headers": [], "query_string": b""}
    return Request(scope, channel.get), channel


def _run(scenario):
    return asyncio.run(scenario())


async def _sleep_noting_cancellation(seen: list[str], note: str) -> None:
    """Work that would run 30 s; records ``note`` when it is cancelled."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        seen.append(note)
        raise


def test_work_that_finishes_first_wins_and_leaves_no_task_behind():
    async def scenario():
        request, _ = _request()
        before = asyncio.all_tasks()

        async def work():
            await asyncio.sleep(0.01)
            return {"ok": 1}

        result = await until_disconnected(request, work())
        await asyncio.sleep(0)  # let the cancelled watcher finish
        return result, asyncio.all_tasks() - before

    result, left = _run(scenario)
    assert result == {"ok": 1}
    assert left == set()


def test_a_disconnect_cancels_the_work_and_ends_in_client_gone():
    async def scenario():
        request, channel = _request()
        seen = []
        asyncio.get_running_loop().call_later(0.01, channel.put_nowait, {"type": "http.disconnect"})
        with pytest.raises(ClientGoneError):
            await until_disconnected(request, _sleep_noting_cancellation(seen, "cancelled"))
        return seen

    assert _run(scenario) == ["cancelled"]


def test_other_messages_before_the_disconnect_are_ignored():
    async def scenario():
        request, channel = _request()
        channel.put_nowait({"type": "http.request", "body": b"", "more_body": False})

        async def work():
            await asyncio.sleep(0.05)
            return "done"

        return await until_disconnected(request, work())

    assert _run(scenario) == "done"


def test_work_that_ignores_its_cancellation_still_ends_in_client_gone():
    async def scenario():
        request, channel = _request()

        async def work():
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                return "swallowed"

        channel.put_nowait({"type": "http.disconnect"})
        with pytest.raises(ClientGoneError):
            await until_disconnected(request, work())

    _run(scenario)


def test_errors_of_the_work_propagate():
    async def scenario():
        request, _ = _request()

        async def work():
            raise ValueError("bad image")

        with pytest.raises(ValueError, match="bad image"):
            await until_disconnected(request, work())

    _run(scenario)


def test_cancelling_the_request_itself_is_a_cancellation_not_a_disconnect():
    """Shutdown cancels the request's task: that must stay a CancelledError (and cancel the work)."""
    async def scenario():
        request, channel = _request()
        seen = []

        async def handler():
            try:
                await until_disconnected(request, _sleep_noting_cancellation(seen, "work cancelled"))
            except ClientGoneError:
                seen.append("client gone")
                raise

        task = asyncio.ensure_future(handler())
        await asyncio.sleep(0.01)
        task.cancel()
        channel.put_nowait({"type": "http.disconnect"})  # arriving as well must not turn it into ClientGoneError
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    assert _run(scenario) == ["work cancelled"]


def test_metric_children_are_the_labelled_ones_created_on_first_use():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    assert b'model="resnet18"' not in generate_latest(registry)
    child = metrics.child(metrics.requests, "resnet18", "1", "200")
    assert child is metrics.requests.labels("resnet18", "1", "200")
    assert metrics.child(metrics.requests, "resnet18", "1", "200") is child
    assert metrics.child(metrics.requests, "resnet18", "1", "503") is not child
    # same label values on another metric: another child
    assert metrics.child(metrics.request_latency, "resnet18", "1") is not metrics.child(metrics.images, "resnet18", "1")
    child.inc(2)
    text = generate_latest(registry).decode()
    assert 'archserve_requests_total{code="200",model="resnet18",version="1"} 2.0' in text
    assert 'archserve_images_total{model="resnet18",version="1"} 0.0' in text
    assert 'archserve_inflight_requests{model="resnet18"' not in text  # never asked for: not exported

    experiments = ExperimentMetrics(registry)
    latency = experiments.child(experiments.latency, "exp", "a")
    assert latency is experiments.latency.labels("exp", "a")


def test_the_startup_freeze_happens_once_and_later_garbage_is_still_collected():
    freeze_startup_objects()
    frozen = gc.get_freeze_count()
    assert frozen > 0
    freeze_startup_objects()
    assert gc.get_freeze_count() == frozen  # once per process

    class Model:  # stands for a model version loaded after startup, then retired
        pass

    model = Model()
    model.self = model  # a reference cycle: only the cyclic collector frees it
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None
