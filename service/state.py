"""What the running app holds: settings, metrics, served models, readiness."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .models.engine import ModelLoadError
from .experiments.runtime import Experiments, served_check_from_table
from .metrics import ExperimentMetrics, Metrics
from .models.served import ModelTable, ServedModel, load_model, plan_versions
from .settings import Settings
from .store.base import ExperimentStore
from .store.writer import StoreWriter

log = logging.getLogger(__name__)
_live_states: "weakref.WeakSet[AppState]"


def begin_shutdown_everywhere() -> None:
    """SIGTERM: every app in this process turns not ready and answers new requests 503 at once."""
    for state in list(_live_states):
        state.ready, state.shutting_down = False, True
        state.metrics.ready.set(0)


@dataclass(eq=False)
class AppState:
    settings: Settings
    metrics: Metrics
    decode_pool: ThreadPoolExecutor
    experiment_metrics: ExperimentMetrics
    experiments: Experiments
    store: ExperimentStore | None = None
    store_writer: StoreWriter | None = None
    models: ModelTable = field(default_factory=ModelTable)
    background: set = field(default_factory=set)
    daemons: set = field(default_factory=set)
    ready: bool = False
    shutting_down: bool = False
    status: str = "loading"
    reason: str = "models are loading and warming up"
    loaded_in_s: float | None = None

    def __post_init__(self) -> None:
        _live_states.add(self)

    async def load(self) -> None:
        """Load and verify every model, then warm each up and start its batcher (``ServedModel.start``), and
        turn ready. If anything fails (or loading is cancelled), the batchers already started are closed."""
        started = time.monotonic()
        running: list[ServedModel] = []
        try:
            loaded = await asyncio.to_thread(self._load_all)
            for model in loaded:
                self.reason = f"warming up {model.name} v{model.version}"
                await model.start(self.metrics)
                running.append(model)
        except asyncio.CancelledError:  # shutdown while loading: leave nothing running
            await self._stop(running)
            raise
        except ModelLoadError as exc:
            await self._stop(running)
            self.status, self.reason = "failed", str(exc)
            self.metrics.ready.set(0)
            log.error("not ready: %s", exc)
            return
        except Exception as exc:  # an unexpected failure must still be visible at /health/ready
            await self._stop(running)
            self.status, self.reason = "failed", f"{type(exc).__name__}: {exc}"
            self.metrics.ready.set(0)
            log.exception("model loading failed")
            return
        table = ModelTable(loaded)
        try:
            self.experiments.load(served_check_from_table(table))
        except Exception as exc:
            await self._stop(running)
            self.status, self.reason = "failed", str(exc)
            log.error("not ready: %s", exc)
            return
        self.models = table
        self.loaded_in_s = time.monotonic() - started
        self.ready, self.status, self.reason = True, "ready", ""
        self.metrics.ready.set(1)
        for model in loaded:
            log.info(
                "serving %s v%d on %s (%s), %d instance(s)",
                model.name, model.version, model.engine.provider, model.engine.precision, model.instances,
            )

    async def _stop(self, models: list[ServedModel]) -> None:
        """Close batchers that were started but will never serve, and withdraw their model info."""
        for model in models:
            model.withdraw_info(self.metrics)
            await model.batcher.close(drain=False)

    def _load_all(self) -> list[ServedModel]:
        loaded = []
        for name, version in plan_versions(self.settings):
            self.reason = f"loading {name} v{version}"
            loaded.append(load_model(name, version, self.settings, self.metrics))
        return loaded

    def spawn(self, coro, daemon: bool = False) -> None:
        """Run background work: shutdown waits for it (shadow runs), or cancels it (``daemon``: loops, timers)."""
        task = asyncio.ensure_future(coro)
        tasks = self.daemons if daemon else self.background
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def close(self) -> None:
        self.ready, self.shutting_down = False, True
        self.metrics.ready.set(0)
        for model in self.models:
            await model.batcher.close(drain=True, timeout=self.settings.graceful_shutdown_s)
        if self.background:
            await asyncio.wait(set(self.background), timeout=5)
        for task in list(self.daemons):
            task.cancel()
        await asyncio.gather(*self.daemons, return_exceptions=True)
        if self.store_writer is not None:
            await self.store_writer.flush()
            self.store_writer.close()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)
        if self.store is not None:
            self.store.close()


_live_states = weakref.WeakSet()
