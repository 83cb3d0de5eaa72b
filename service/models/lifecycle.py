"""Model lifecycle at run time: load, unload and hot reload of new versions.

A new version is verified (manifest, sha256 of every file), its session
created and warmed up, and its batcher started *before* the model table is
swapped; requests that already hold the old version finish on it, and its
batcher is drained and its sessions released after ``retire_after_s`` (the
request deadline: no request can still be using it by then), and the freed heap
handed back to the system. A broken version
never replaces a working one: the failure is logged, counted in
``archserve_model_loads_total{outcome="failed"}`` and remembered, so polling
does not retry it until its folder changes.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from modelrepo.manifest import MANIFEST_FILENAME

from ..errors import BadRequestError, NotFoundError
from .memory import resident_bytes, trim_heap
from .repository import Repository
from .served import ServedModel, load_model
from ..state import AppState

log = logging.getLogger(__name__)


class BrokenModelError(BadRequestError):
    code = "model_load_failed"


def _version_key(model: ServedModel) -> tuple[str, int]:
    return model.name, model.version


def _fingerprint(version_dir: Path) -> tuple:
    try:
        stat = (version_dir / MANIFEST_FILENAME).stat()
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in version_dir.iterdir())
        return stat.st_mtime_ns, stat.st_size, tuple(files)
    except OSError:
        return ()


@dataclass
class Lifecycle:
    state: AppState
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    failed: dict[tuple[str, int], tuple[tuple, str]] = field(default_factory=dict)  # -> (fingerprint, reason)
    unloaded: set[str] = field(default_factory=set)  # unloaded by hand: polling leaves them alone

    @property
    def retire_after_s(self) -> float:
        return self.state.settings.request_timeout_s + 1.0

    def _pinned(self) -> dict[str, int | None]:
        pinned = {}
        for entry in self.state.settings.models:
            name, _, version = entry.partition("@")
            pinned[name] = int(version) if version.isdigit() else None
        return pinned

    def _wanted_versions(self, name: str, on_disk: list[int]) -> list[int]:
        pinned = self._pinned()
        if pinned.get(name) is not None:
            return [pinned[name]] if pinned[name] in on_disk else []
        if self.state.settings.version_policy == "all":
            return on_disk
        return on_disk[-1:]

    async def load(self, name: str, *, explicit: bool = True) -> list[ServedModel]:
        """(Re)load what should be served of ``name``; returns the versions newly loaded."""
        repository = Repository(self.state.settings)
        folder = repository.model_dir(name)
        on_disk = repository.versions(name)
        if not on_disk:
            raise NotFoundError(
                f"model {name!r} has no published version in {repository.root}/{repository.refused_note()}"
            )
        async with self.lock:
            if explicit:
                self.unloaded.discard(name)
            served = self.state.models.versions(name)
            wanted = self._wanted_versions(name, on_disk)
            newly: list[ServedModel] = []
            errors = []
            for version in wanted:
                if version in served:
                    continue
                version_dir = folder / str(version)
                fingerprint = _fingerprint(version_dir)
                known = self.failed.get((name, version))
                if known and known[0] == fingerprint and not explicit:
                    continue  # already reported; retried when the folder changes or on a load call
                try:
                    model = await asyncio.to_thread(
                        load_model, name, version, self.state.settings, self.state.metrics
                    )
                    await model.start(self.state.metrics)
                except Exception as exc:  # ModelLoadError, or anything onnxruntime raises
                    reason = str(exc)
                    self.failed[(name, version)] = (fingerprint, reason)
                    self.state.metrics.model_loads.labels(name, "failed").inc()
                    log.error("model %s v%d was not loaded, still serving %s: %s", name, version,
                              ", ".join(f"v{v}" for v in sorted(served)) or "nothing", reason)
                    errors.append(f"v{version}: {reason}")
                    continue
                self.failed.pop((name, version), None)
                self.state.metrics.model_loads.labels(name, "loaded").inc()
                newly.append(model)
            if newly:
                keep = set(wanted) | {m.version for m in newly}
                # A working old version stays if its replacement failed.
                if errors:
                    keep |= set(served)
                retired = [m for v, m in served.items() if v not in keep]
                self._swap(newly, retired)
                log.info("now serving %s %s", name, ", ".join(f"v{m.version}" for m in self.state.models.versions(name).values()))
            if errors and explicit:
                raise BrokenModelError(
                    f"model {name!r}: {'; '.join(errors)}; still serving "
                    f"{', '.join(f'v{v}' for v in sorted(self.state.models.versions(name))) or 'nothing'}"
                )
            return newly

    async def unload(self, name: str) -> list[int]:
        Repository(self.state.settings).model_dir(name)
        async with self.lock:
            served = list(self.state.models.versions(name).values())
            if not served:
                raise NotFoundError(f"model {name!r} is not loaded")
            self.unloaded.add(name)
            self._swap([], served)
            return sorted(m.version for m in served)

    def _swap(self, added: list[ServedModel], retired: list[ServedModel]) -> None:
        self.state.models = self.state.models.with_models(added, retired)
        for model in retired:
            model.withdraw_info(self.state.metrics)
            self.state.spawn(self._retire(model), daemon=True)

    async def _retire(self, model: ServedModel) -> None:
        """Let requests already holding ``model`` finish, then release its sessions and give their memory back."""
        label = f"{model.name} v{model.version}"
        try:
            await asyncio.sleep(self.retire_after_s)
        finally:
            await model.batcher.close(drain=True, timeout=self.state.settings.graceful_shutdown_s)
            before = resident_bytes()
            # The last reference: its sessions (weights, arenas) are freed here, not at a later garbage collection
            # (test_model_lifecycle.py checks that nothing else holds them).
            del model
            await asyncio.to_thread(trim_heap)
            after = resident_bytes()
            if before is None or after is None:
                log.info("released %s", label)
            else:
                log.info("released %s: resident memory %d -> %d MiB", label, before >> 20, after >> 20)

    async def poll_once(self) -> None:
        selected = set(self._pinned()) or set(Repository(self.state.settings).model_names())
        for name in sorted(selected - self.unloaded):
            try:
                await self.load(name, explicit=False)
            except (NotFoundError, BadRequestError) as exc:
                log.debug("hot reload skipped %s: %s", name, exc)

    async def run_polling(self) -> None:
        interval = self.state.settings.poll_interval_s
        if interval <= 0:
            return
        while True:
            await asyncio.sleep(interval)
            if self.state.ready and not self.state.shutting_down:
                try:
                    await self.poll_once()
                except Exception:
                    log.exception("repository poll failed")

    async def repository_index(self) -> list[dict]:
        return self.index()

    async def statistics(self) -> list[dict]:
        """Triton's ``$model_stat`` of every served version, from its batcher (async as ``RemoteLifecycle``'s)."""
        return [m.statistics.model_stat(m.name, m.version) for m in sorted(self.state.models, key=_version_key)]

    def index(self) -> list[dict]:
        """Every model version in the repository and whether it is served (Triton's repository index)."""
        repository = Repository(self.state.settings)
        entries = []
        for name in repository.model_names():
            served = self.state.models.versions(name)
            for version in repository.versions(name):
                entry = {"name": name, "version": str(version), "path": str(repository.root / name / str(version))}
                if version in served:
                    entry["state"] = "READY"
                else:
                    entry["state"] = "UNAVAILABLE"
                    failure = self.failed.get((name, version))
                    entry["reason"] = failure[1] if failure else "not loaded"
                entries.append(entry)
        return entries
