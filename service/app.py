"""The FastAPI application: routes, one error handler, model loading (in the background with one worker)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.config import STARTUP_FAILURE

from .errors import ServiceError
from .experiments import guardrails
from .experiments.runtime import Experiments, served_check_from_plan
from .grpc import server as grpc_server
from .logs import RequestLogMiddleware
from .metrics import ExperimentMetrics, Metrics, multiprocess_dir
from .models.lifecycle import Lifecycle
from .models.served import plan_versions
from .http import classify, experiments, health, model_repository, models
from .http import openapi, v2
from .runtime_metrics import register_standard
from .settings import Settings
from .split.client import EngineClient, RemoteLifecycle
from .state import AppState
from .store.factory import is_postgres_url, open_store
from .store.lazy import LazyStore
from .store.writer import StoreWriter
from .threads import DECODE, name_os_thread

log = logging.getLogger("archserve")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The application (uvicorn's factory). A bad experiments file or repository stops the server before it
    listens. With several workers that must be a startup failure: uvicorn restarts a worker that exits
    otherwise, forever, but stops the server when one exits with STARTUP_FAILURE."""
    settings = settings or Settings()
    if settings.workers == 1 and not settings.split:
        return _build_app(settings)
    try:
        return _build_app(settings)
    except Exception:
        log.exception("worker %d could not start", os.getpid())
        raise SystemExit(STARTUP_FAILURE) from None


def _build_app(settings: Settings) -> FastAPI:

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state: AppState = app.state.archserve
        client = None
        if settings.split:
            # A front-end: the engine process holds the models; this process decodes and hands images over.
            client = EngineClient(state, settings)
            lifecycle = RemoteLifecycle(client)
        else:
            lifecycle = Lifecycle(state)
        app.state.lifecycle = lifecycle
        app.state.engine_client = client

        async def load_then_poll() -> None:
            await state.load()  # live at once, ready once loaded
            await lifecycle.run_polling()  # then pick up newly published versions

        freeze_startup_objects()
        if client is not None:
            # As with a worker that loads its own models (below): take connections only once the engine is ready.
            started = time.monotonic()
            client.start()
            try:
                await client.wait_ready(settings.worker_start_timeout_s)
            except BaseException:
                await client.close()
                raise
            state.loaded_in_s = time.monotonic() - started
            loading = asyncio.create_task(lifecycle.run_polling())
        elif settings.workers > 1:
            # Worker processes share one listening socket, and a worker takes connections only once its
            # lifespan has started. Loading here, before that, means a request never lands on a worker that is
            # still loading while its siblings serve: every answer comes from a loaded worker. The price: nothing
            # answers, not even /health/live, until the first worker has loaded (connections wait in the backlog).
            await state.load()
            if state.status == "failed":
                # Exit instead of serving 503 beside ready siblings: uvicorn then stops the server at its first
                # start (python -m service exits 1), and abandons a rolling restart (SIGHUP), keeping the old
                # worker, instead of replacing a working worker with a broken one.
                raise RuntimeError(f"worker {os.getpid()} could not load its models: {state.reason}")
            loading = asyncio.create_task(lifecycle.run_polling())
        else:
            loading = asyncio.create_task(load_then_poll())
        if state.store_writer is not None:
            state.spawn(state.store_writer.run(), daemon=True)
        if app.state.guardrails is not None:
            state.spawn(app.state.guardrails.run(), daemon=True)
        experiments.install_reload_signal(app)
        rpc = None
        try:
            rpc = await grpc_server.start(app)  # this process's gRPC, beside its HTTP (None when grpc_port is 0)
            yield
        finally:
            await grpc_server.stop(rpc, settings.graceful_shutdown_s)  # first: calls in flight still need models
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await state.close()
            if client is not None:
                await client.close()

    app = FastAPI(
        title="archserve",
        version="0.1.0",
        summary="Batched ONNX inference for image classifiers",
        lifespan=lifespan,
        generate_unique_id_function=openapi.operation_id,  # readable ids for routes that do not name theirs
    )
    app.add_middleware(RequestLogMiddleware, enabled=settings.access_log)  # request ids, the access log
    # Each app gets its own registry unless metrics are shared across worker processes.
    registry = None if multiprocess_dir() else CollectorRegistry()
    if registry is not None:
        register_standard(registry)  # process_*, python_*, the GPUs: what the default registry would have
    Image.MAX_IMAGE_PIXELS = settings.max_image_pixels
    experiment_set = Experiments(settings.experiments_file)
    store = None
    if settings.experiments_file is not None:
        # A bad experiments file stops the server here, before it listens.
        experiment_set.load(served_check_from_plan(plan_versions(settings)))
        store = _open_store(settings)
    metric_args = (registry,) if registry is not None else ()
    experiment_metrics = ExperimentMetrics(*metric_args)
    writer = None
    experiment_metrics.store_up.set(1)
    if store is not None:
        writer = StoreWriter(store, on_state=lambda up: experiment_metrics.store_up.set(1 if up else 0),
                             on_drop=experiment_metrics.store_dropped.inc)
        experiment_metrics.store_up.set(1)
        experiment_metrics.store_pending.set_function(lambda: len(writer.pending))
    app.state.archserve = AppState(
        settings=settings,
        metrics=Metrics(*metric_args),
        experiment_metrics=experiment_metrics,
        experiments=experiment_set,
        store=store,
        store_writer=writer,
        decode_pool=ThreadPoolExecutor(settings.decode_thread_count(), thread_name_prefix=DECODE,
                                       initializer=name_os_thread),
    )
    app.state.guardrails = guardrails.install(app.state.archserve)  # stored pauses apply before any request
    app.state.engine_client = None  # a front-end's EngineClient, set at startup with an engine process
    app.include_router(classify.router)
    app.include_router(experiments.router)
    app.include_router(models.router)
    app.include_router(model_repository.router)
    app.include_router(health.router)
    app.include_router(v2.router)
    _install_error_handlers(app)
    openapi.install(app)  # documents the 400 the validation handler answers, not FastAPI's 422
    return app


_startup_frozen = False


def freeze_startup_objects() -> None:
    """Take what startup left alive out of the cyclic GC's scans, once per process.

    The objects the imports and the app leave (modules, classes, FastAPI and
    pydantic internals) live as long as the process, yet every full collection
    would walk them all on whichever thread tripped it, the event loop included
    (docs/benchmarks.md). Done before any model loads, so a model version
    retired later is still freed; garbage from before is collected first
    rather than frozen.
    """
    global _startup_frozen
    if _startup_frozen:
        return
    _startup_frozen = True
    gc.collect()
    gc.freeze()


def _open_store(settings: Settings):
    target = settings.store_url.get_secret_value() if settings.store_url else str(settings.store_path)
    options = {"retention_days": settings.store_retention_days, "max_predictions": settings.store_max_predictions}
    if is_postgres_url(target):
        options["pool_max"] = settings.store_pool_max
        # A database that is not up yet must not stop the server: it starts degraded and retries.
        return LazyStore(lambda: open_store(target, **options))
    return open_store(target, **options)


def _error_body(message: str, code: str) -> dict:
    return {"error": message, "code": code}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(_error_body(exc.message, exc.code), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p not in ('query', 'path'))}: {e.get('msg')}"
            for e in exc.errors()
        )
        return JSONResponse(_error_body(f"invalid request: {problems}", "bad_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"{message}: no such endpoint; see /docs for the API"
        return JSONResponse(_error_body(message, "http_error"), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(_error_body(f"internal error: {type(exc).__name__}", "internal_error"), status_code=500)
