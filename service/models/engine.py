"""onnxruntime sessions: provider choice, the precision file that goes with it, warm-up.

CUDA runs the fp16 file (prefer_nhwc, cuDNN exhaustive search, bounded arena);
the CPU runs the fp32 one. On CUDA an engine can hold one session per batch
size (``specialise``): a session that changes input shape rebuilds its cuDNN
plans, a stall of hundreds of milliseconds per change (docs/benchmarks.md).
onnxruntime falls back to the CPU silently when the CUDA libraries are
missing, so the provider is read back from the session and reported, never
assumed.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from modelrepo.layout import file_sha256
from modelrepo.manifest import Manifest
from ..threads import ONNXRUNTIME, name_os_thread, os_thread_name


class _OnFirstUse:
    """onnxruntime, imported when first used: front-end processes import this module but run no session, and
    they should not carry the library's memory."""

    def __getattr__(self, name: str):
        import onnxruntime

        globals()["ort"] = onnxruntime
        return getattr(onnxruntime, name)


ort = _OnFirstUse()

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_preload_lock = threading.Lock()
_preloaded = False
# Set once a session asked for CUDA and got the CPU: later models skip the
# failing (and loudly logged) CUDA attempt.
_cuda_failed_reason: str | None = None


class ModelLoadError(RuntimeError):
    """A model version on disk cannot be served."""


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # auto | cuda | cpu
    device_id: int = 0
    cuda_mem_limit_bytes: int = 0
    cudnn_exhaustive: bool = True
    intra_op_threads: int = 0


def cuda_available() -> bool:
    return CUDA in ort.get_available_providers()


def _preload_cuda_libraries() -> None:
    """Let onnxruntime find CUDA/cuDNN installed from pip (nvidia-* wheels)."""
    global _preloaded
    with _preload_lock:
        if _preloaded or not hasattr(ort, "preload_dlls"):
            return
        _preloaded = True
        try:
            ort.preload_dlls()
        except Exception as exc:  # missing libraries: the session will say so and fall back
            log.info("onnxruntime.preload_dlls() found nothing to load: %s", exc)


def _cuda_options(config: EngineConfig) -> dict[str, str]:
    options = {
        "device_id": str(config.device_id),
        "prefer_nhwc": "1",
        "cudnn_conv_algo_search": "EXHAUSTIVE" if config.cudnn_exhaustive else "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",
        "do_copy_in_default_stream": "1",
    }
    if config.cuda_mem_limit_bytes:
        options["gpu_mem_limit"] = str(config.cuda_mem_limit_bytes)
    return options


class OnnxEngine:
    """The sessions of one model version (one, or one per batch size); ``run`` is safe from several threads."""

    def __init__(self, version_dir: Path, manifest: Manifest, config: EngineConfig) -> None:
        version_dir = Path(version_dir)
        self.manifest = manifest
        self.input_name = manifest.input.name
        self.output_name = manifest.output.name
        global _cuda_failed_reason
        want_cuda = config.device in ("auto", "cuda") and cuda_available() and _cuda_failed_reason is None
        if want_cuda:
            _preload_cuda_libraries()
        precision = "fp16" if want_cuda and "fp16" in manifest.files else "fp32"
        if precision not in manifest.files:
            precision = next(iter(manifest.files))
        self.session = self.open_session(version_dir / manifest.files[precision].path, want_cuda, config)
        self.provider = self.session.get_providers()[0]
        if want_cuda and self.provider != CUDA:
            _cuda_failed_reason = "the CUDA provider did not load (no GPU, or CUDA/cuDNN libraries missing)"
            log.warning("%s: %s; running on the CPU provider", version_dir, _cuda_failed_reason)
            if precision == "fp16" and "fp32" in manifest.files:
                precision = "fp32"
            # opened again as the CPU opens its session (the fp32 file, threads that spin between runs)
            self.session = self.open_session(version_dir / manifest.files[precision].path, False, config)
            self.provider = self.session.get_providers()[0]
        self.precision = precision
        self._entry = version_dir / manifest.files[precision].path
        self._config = config
        self._by_size: dict[int, ort.InferenceSession] = {}
        # Lanes (split): one session per lane, each bound to the first thread that runs on it.
        self._lanes: list[ort.InferenceSession] = []
        self._lane_of = threading.local()
        self._lane_lock = threading.Lock()
        self._lanes_bound = 0
        self._alone_warm = False
        self.lane_threads: int | None = None

    @property
    def sessions(self) -> int:
        """How many onnxruntime sessions this engine holds (each a copy of the weights)."""
        return max(1, len(self._by_size)) + len(self._lanes)

    def specialise(self, batch_sizes: list[int]) -> None:
        """Give each of ``batch_sizes`` a session of its own; batches of other sizes use the shared one.

        A CUDA session keeps cuDNN plans for the last input shape it ran; with batches of changing size it
        searched again on every change (docs/benchmarks.md). A session per padded size never changes shape. Costs one copy of the weights (and one arena) per size.
        """
        cuda = self.provider == CUDA
        for size in batch_sizes:
            if size in self._by_size:
                continue
            if not self._by_size:  # the first size takes the session already open
                self._by_size[size] = self.session
                continue
            try:
                session = self.open_session(self._entry, cuda, self._config)
            except ModelLoadError as exc:
                raise ModelLoadError(
                    f"{exc} (the session for batch size {size}, one per padded size: if GPU memory ran out, set "
                    "ARCHSERVE_SESSION_PER_BATCH_SIZE=never or lower ARCHSERVE_MAX_BATCH_SIZE)"
                ) from exc
            if session.get_providers()[0] != self.provider:
                raise ModelLoadError(
                    f"{self._entry}: the session for batch size {size} got {session.get_providers()[0]}, "
                    f"the first one {self.provider}"
                )
            self._by_size[size] = session

    @staticmethod
    def open_session(entry: Path, cuda: bool, config: EngineConfig,
                     cuda_extra: dict[str, str] | None = None, lane: bool = False) -> ort.InferenceSession:
        """A session as the server opens it; ``cuda_extra`` overrides single CUDA provider options (bench.gpu
        compares them); ``lane``: one of the sessions that run beside others (``split``)."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if config.intra_op_threads:
            options.intra_op_num_threads = config.intra_op_threads
        if cuda or lane:
            # Their pool threads would spin on after each run, on cores that decoding, the event loop and the
            # other lane need. The CPU session on every core runs requests that find the model idle: there,
            # threads still spinning when the next run starts answer it sooner (docs/benchmarks.md).
            options.add_session_config_entry("session.force_spinning_stop", "1")
        providers: list = [CPU]
        if cuda:
            providers = [(CUDA, {**_cuda_options(config), **(cuda_extra or {})}), CPU]
        # onnxruntime's own threads (its intra-op pool), started by this call, inherit this thread's OS name:
        # "ort resnet50/1" in `top -H` and /proc, instead of "python" (service/threads.py).
        previous = os_thread_name()
        if previous is not None:  # renamed only where it can be named back
            name_os_thread(f"{ONNXRUNTIME} {entry.parent.parent.name}/{entry.parent.name}")
        try:
            return ort.InferenceSession(str(entry), options, providers=providers)
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime could not load {entry}: {exc}") from exc
        finally:
            if previous is not None:
                name_os_thread(previous)

    def split(self, lanes: int, threads: int) -> None:
        """Open one session of ``threads`` intra-op threads per lane, for the batches that run beside others;
        ``run_alone`` keeps the first session, on every core. Each thread that calls ``run`` gets a lane's
        session of its own (the batcher has one thread per lane): concurrent runs of one session would share
        its thread pool. CPU only; one more copy of the weights per lane."""
        if self.provider != CPU or self._by_size or self._lanes:
            raise ValueError("lanes are for one CPU session; this engine runs on "
                             f"{self.provider} with {self.sessions} session(s)")
        config = replace(self._config, intra_op_threads=threads)
        self._lanes = [self.open_session(self._entry, False, config, lane=True) for _ in range(lanes)]
        self.lane_threads = threads

    def _lane_session(self) -> ort.InferenceSession:
        session = getattr(self._lane_of, "session", None)
        if session is None:
            with self._lane_lock:  # the first run in a thread binds it to the next lane, round robin
                session = self._lanes[self._lanes_bound % len(self._lanes)]
                self._lanes_bound += 1
            self._lane_of.session = session
        return session

    def session_for(self, batch_size: int) -> ort.InferenceSession:
        """The session that runs batches of ``batch_size`` images."""
        return self._by_size.get(batch_size, self.session)

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch: on its lane's session after ``split``, else on the session for its size."""
        return self._infer(self._lane_session() if self._lanes else self.session_for(len(batch)), batch)

    def run_alone(self, batch: np.ndarray) -> np.ndarray:
        """Run a batch on the session for its size (after ``split``: the one on every core)."""
        return self._infer(self.session_for(len(batch)), batch)

    def _infer(self, session: ort.InferenceSession, batch: np.ndarray) -> np.ndarray:
        return session.run([self.output_name], {self.input_name: batch})[0]

    @property
    def lanes(self) -> int:
        """Batches that may run at once on this engine's lane sessions (1 without ``split``)."""
        return len(self._lanes) or 1

    def warmup(self, batch_sizes: list[int]) -> None:
        _, height, width, channels = self.manifest.input.shape
        for size in batch_sizes:
            self.run(np.zeros((size, height, width, channels), dtype=np.uint8))
        if self._lanes:  # and, once, the session a lone request runs on (a CPU session keeps nothing per thread)
            with self._lane_lock:
                if self._alone_warm:
                    return
                self._alone_warm = True
            for size in batch_sizes:
                self.run_alone(np.zeros((size, height, width, channels), dtype=np.uint8))


def verify_files(version_dir: Path, manifest: Manifest) -> None:
    """Every file the manifest lists exists inside the folder with its sha256."""
    root = Path(version_dir).resolve()
    for precision, entry in manifest.files.items():
        path = (root / entry.path).resolve()
        if path.parent != root:
            raise ModelLoadError(f"{version_dir}: {precision} file {entry.path!r} is outside the version folder")
        if not path.is_file():
            raise ModelLoadError(f"{version_dir}: {precision} file {entry.path} is missing")
        if path.stat().st_size != entry.bytes:
            raise ModelLoadError(
                f"{version_dir}: {entry.path} is {path.stat().st_size} bytes, the manifest says {entry.bytes}"
            )
        if file_sha256(path) != entry.sha256:
            raise ModelLoadError(f"{version_dir}: {entry.path} does not match its sha256 in the manifest")


def padded_size(count: int, sizes: list[int] | None) -> int:
    """The smallest of ``sizes`` (ascending) that holds ``count`` items (``count`` itself if none does, or no
    sizes)."""
    if not sizes:
        return count
    return next((size for size in sizes if size >= count), count)


def batch_runner(engine: OnnxEngine, sizes: list[int] | None = None, alone: bool = False):
    """The batcher's ``run_batch``: stack the items, padded with zeros to one of ``sizes`` if given, and run them
    (``engine.run_alone`` with ``alone``, the batcher's ``run_alone``)."""

    def run(batch: np.ndarray) -> np.ndarray:
        return engine.run_alone(batch) if alone else engine.run(batch)

    def run_batch(items: list[np.ndarray]) -> list[np.ndarray]:
        count = len(items)
        size = padded_size(count, sizes)
        if size == count:
            return list(run(np.stack(items)))
        batch = np.empty((size, *items[0].shape), dtype=items[0].dtype)
        np.stack(items, out=batch[:count])
        batch[count:] = 0  # blank padding; the items are copied once, not over zeros
        return list(run(batch)[:count])

    return run_batch


def null_runner(num_classes: int):
    """A ``run_batch`` that answers every item at once with the same logits (class 0 first): the null engine of
    ``ARCHSERVE_NULL_ENGINE``, so a benchmark measures what the server costs around the model."""
    logits = np.linspace(1.0, 0.0, num_classes, dtype=np.float32)

    def run_batch(items: list[np.ndarray]) -> list[np.ndarray]:
        return [logits] * len(items)

    return run_batch
