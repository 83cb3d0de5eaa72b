"""Configuration: environment variables with the ``ARCHSERVE_`` prefix (or a ``.env`` file)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ARCHSERVE_", env_file=".env", extra="ignore")

    # Where and what to serve
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(
        8001, ge=0, le=65535,
        description="The Open Inference Protocol's gRPC service (inference.GRPCInferenceService, as Triton's), "
        "served by every worker process on this port (SO_REUSEPORT); 0 = no gRPC.",
    )
    workers: int = Field(
        1, ge=1,
        description="HTTP front-end processes. With more than one, they share one engine process that holds the "
        "models (engine_process).",
    )
    engine_process: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Run the models in one engine process that every front-end process feeds (images through "
        "shared memory), instead of in each worker. auto = on when workers > 1; off = each worker loads every "
        "model and batches only its own traffic (the design before the engine process).",
    )
    engine_slots: int = Field(
        0, ge=0,
        description="Images one front-end may have at the engine at once (its shared-memory slots); more answer "
        "503. 0 = auto: max(max_batch_size, max_queue_size // workers), so one front-end cannot fill a queue.",
    )
    engine_slot_bytes: int = Field(
        3 * 320 * 320, ge=1024,
        description="Bytes of one shared-memory slot: one preprocessed image. A larger image travels inline on "
        "the engine socket instead (a copy more).",
    )
    engine_socket: Path | None = Field(
        None, description="Set by the supervisor: the engine process's Unix socket, for the front-ends."
    )
    null_engine: bool = Field(
        False,
        description="For measurement only: every batch answers at once with fixed logits, so a benchmark sees "
        "what the server costs around the model.",
    )
    worker_start_timeout_s: int = Field(
        600, ge=1,
        description="With workers > 1: how long a worker restarted by SIGHUP may take to load before the "
        "restart is given up (the old worker keeps serving), and how long a new worker may take to become "
        "ready before it is replaced as hung (a ready one must answer the health ping within 5 s).",
    )
    models_dir: Path = Path("models")
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated models to serve, each NAME or NAME@VERSION; empty serves every model.",
    )
    version_policy: Literal["latest", "all"] = Field(
        "latest", description="Serve only the highest version of each model, or every published version."
    )
    allow_symlinks: bool = Field(
        False,
        description="Serve model and version folders that are symlinks resolving outside models_dir (for "
        "repositories mounted that way). Off: such a folder is refused wherever it is read, and logged once.",
    )

    # Execution
    device: Literal["auto", "cuda", "cpu"] = "auto"
    device_id: int = Field(0, ge=0)
    require_gpu: bool = Field(False, description="Refuse to become ready if a model falls back to the CPU.")
    cuda_mem_limit_gb: float = Field(0.0, ge=0, description="CUDA memory arena limit per session; 0 = no limit.")
    cudnn_exhaustive: bool = True
    intra_op_threads: int = Field(0, ge=0, description="onnxruntime CPU threads per session; 0 = one per core.")
    instances: int = Field(
        0, ge=0,
        description="Concurrent batches per model; 0 = 1. Two may let a GPU copy overlap compute, but that is "
        "unmeasured with per-size sessions (docs/benchmarks.md): raise it only after measuring.",
    )
    cpu_lanes: int = Field(
        0, ge=0,
        description="On the CPU provider: how many batches run at once under load, each on cores/lanes onnxruntime "
        "threads (cores = intra_op_threads if set), while a request that finds the model idle runs alone on every "
        "core. onnxruntime splits each "
        "operator across its threads and waits for the slowest, so one session on all cores loses about as much "
        "CPU as decoding takes from it; batches side by side do not (docs/benchmarks.md). 0 = auto: 2 where "
        "there are at least 2 cores, unless instances is set or several workers each load the models "
        "(engine_process off); 1 = off.",
    )
    pad_batches: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Pad each batch with blank images up to the next warmed-up size (1, 2, 4, ... max_batch_size), "
        "so no batch size the engine has not seen reaches it (on CUDA a new shape costs a cuDNN algorithm search "
        "of up to seconds); auto = on CUDA only.",
    )
    session_per_batch_size: Literal["auto", "always", "never"] = Field(
        "auto",
        description="With padded batches, one onnxruntime session per padded size instead of one for all: a CUDA "
        "session that changes batch size rebuilds its cuDNN plans, a stall of hundreds of ms per change "
        "(docs/benchmarks.md). Costs a copy of the weights per size. auto = on CUDA only.",
    )

    # Batching and limits
    max_batch_size: int = Field(32, ge=1)
    max_queue_delay_ms: float = Field(0.0, ge=0)
    max_queue_size: int = Field(256, ge=1, description="Images waiting per model version before 503.")
    max_queue_wait_ms: float = Field(
        1000.0, ge=0,
        description="Refuse a request with 503 at arrival when its model's queue would keep it waiting longer "
        "than this, estimated from the model's recent compute time per image; 0 = count bound only.",
    )
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline of a request, from arrival.")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_header_bytes: int = Field(
        64 * 1024, ge=1024, description="Request line and headers, in bytes; more is answered 431 and closed."
    )
    max_header_count: int = Field(100, ge=1, description="Request headers; more is answered 431 and closed.")
    header_timeout_s: float = Field(
        10.0, gt=0, description="Time a connection has to send a request's headers once it starts one (slowloris)."
    )
    max_images_per_request: int = Field(64, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1, description="Larger images are refused before decoding.")
    decode_threads: int = Field(0, ge=0, description="Image decoding threads; 0 = one per core.")
    warmup: bool = True
    poll_interval_s: float = Field(
        10.0, ge=0, description="How often the repository is scanned for new versions; 0 disables hot reload."
    )
    graceful_shutdown_s: float = Field(30.0, ge=0)

    # A/B experiments and their store
    experiments_file: Path | None = Field(None, description="YAML file of experiments; none: no experiments.")
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for admin endpoints (reload); unset disables them."
    )
    store_path: Path = Field(Path("data/experiments.sqlite3"), description="SQLite file of the prediction log.")
    store_url: SecretStr | None = Field(
        None,
        description="Experiment store: postgresql://USER:PASSWORD@HOST:PORT/DATABASE (shared by all replicas) "
        "or sqlite:///PATH; unset: the SQLite file store_path.",
    )
    store_pool_max: int = Field(8, ge=1, description="PostgreSQL connections per worker process.")
    store_retention_days: float = Field(30.0, gt=0)
    store_max_predictions: int = Field(1_000_000, ge=1000)
    shadow_timeout_s: float = Field(30.0, gt=0, description="A shadow run not finished by then is dropped.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="json: one JSON object per line (time, level, logger, message, request_id, model, "
        "version, status, duration_ms), for a log pipeline; the same for the access log and the service's log.",
    )
    access_log: bool = Field(True, description="Log one line per request, with its id, status and duration.")

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, value):
        return value.lower() if isinstance(value, str) else value  # INFO and info alike, as uvicorn takes them

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value):
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @property
    def split(self) -> bool:
        """Whether models run in a separate engine process that front-end processes feed."""
        return self.engine_process == "on" or (self.engine_process == "auto" and self.workers > 1)

    def engine_slot_count(self) -> int:
        return self.engine_slots or max(self.max_batch_size, self.max_queue_size // self.workers)

    def decode_thread_count(self) -> int:
        return self.decode_threads or (os.cpu_count() or 1)
