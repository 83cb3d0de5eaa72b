"""One model, end to end: build, weights, export, parity gate, manifest, publish."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Callable

import onnx
import onnxruntime
import torch

from modelrepo.layout import file_sha256
from modelrepo.manifest import (
    MANIFEST_FILENAME,
    PRECISION_FILES,
    Checkpoint,
    Complexity,
    InputSpec,
    Manifest,
    ModelFile,
    OutputSpec,
    Preprocessing,
    Producer,
    RandomInit,
)

from .calibrate import (
    ACTIVE_BIAS, RESIDUAL_BRANCH_SCALE, activate_plain_networks, calibrate_batchnorm, damp_residual_branches,
)
from .complexity import count_gmacs, count_params
from .models import get_model_spec
from .onnx_graph import DEFAULT_OPSET, EXPORTER, INPUT_NAME, OUTPUT_NAME, ServingGraph, export_onnx
from .parity import FP16_THRESHOLD, FP32_TOLERANCE, check_parity
from .publish import check_target_free, discard, make_staging_dir, next_version, publish
from .weights import load_weights, read_state_dict

PRECISIONS = ("fp32", "fp16")


class ExportError(RuntimeError):
    """A model could not be exported; the message says why."""


@dataclass
class ExportOptions:
    out: Path = Path("models")
    precisions: tuple[str, ...] = PRECISIONS
    version: int | None = None
    force: bool = False
    seed: int = 0
    weights: Path | None = None
    num_classes: int | None = None
    labels: list[str] | None = None
    opset: int = DEFAULT_OPSET
    parity_samples: int = 100
    fp32_tolerance: float = FP32_TOLERANCE
    fp16_threshold: float = FP16_THRESHOLD
    calibrate: bool = True


@dataclass
class ExportResult:
    manifest: Manifest
    path: Path
    seconds: float
    step_seconds: dict[str, float] = field(default_factory=dict)


def imagenet_labels() -> list[str]:
    text = resources.files("export").joinpath("data/imagenet_classes.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line]


def read_labels(path: Path) -> list[str]:
    try:
        labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as exc:
        raise ExportError(f"cannot read labels file {path}: {exc}") from exc
    if not labels:
        raise ExportError(f"labels file {path} is empty; write one class name per line")
    return labels


def _resolve_labels(options: ExportOptions, default_classes: int) -> list[str]:
    num_classes = options.num_classes
    if options.labels is not None:
        if num_classes is not None and len(options.labels) != num_classes:
            raise ExportError(
                f"--labels has {len(options.labels)} names but --num-classes is {num_classes}; they must agree"
            )
        return options.labels
    num_classes = num_classes or default_classes
    if num_classes == 1000:
        return imagenet_labels()
    return [f"class_{i}" for i in range(num_classes)]


Progress = Callable[[str], None]


def export_model(arch: str, options: ExportOptions, progress: Progress = lambda _msg: None) -> ExportResult:
    started = time.monotonic()
    steps: dict[str, float] = {}

    def step(label: str, fn, *args, **kwargs):
        progress(f"{arch}: {label} ...")
        t0 = time.monotonic()
        value = fn(*args, **kwargs)
        steps[label] = time.monotonic() - t0
        progress(f"{arch}: {label} done in {steps[label]:.1f}s")
        return value

    spec = get_model_spec(arch)
    bad = [p for p in options.precisions if p not in PRECISIONS]
    if bad or not options.precisions:
        raise ExportError(f"unknown precision {', '.join(bad) or '(none)'}; choose from {', '.join(PRECISIONS)}")
    if options.opset < 17:
        raise ExportError(f"opset {options.opset} is too old; the repository requires opset 17 or newer")
    labels = _resolve_labels(options, spec.num_classes)
    model_dir = options.out / arch
    version = options.version if options.version is not None else next_version(model_dir)
    if version < 1:
        raise ExportError(f"version must be a positive integer, got {version}")
    check_target_free(model_dir, version, options.force)

    torch.manual_seed(options.seed)
    model = step("build", spec.build, len(labels))
    if options.weights is not None:
        state = read_state_dict(options.weights)
        report = load_weights(model, state, spec.training_only_prefixes)
        weights = Checkpoint(
            file=options.weights.name, sha256=file_sha256(options.weights), dropped_keys=report.dropped_keys
        )
    else:
        damped = activated = 0
        if options.calibrate:
            damped = damp_residual_branches(model)
            activated = activate_plain_networks(model)
            step("calibrate batch-norm", calibrate_batchnorm, model, spec.input_size, spec.mean, spec.std, options.seed)
        weights = RandomInit(
            seed=options.seed, batchnorm_calibrated=options.calibrate,
            residual_branch_scale=RESIDUAL_BRANCH_SCALE if damped else None,
            batchnorm_bias=ACTIVE_BIAS if activated else None,
        )
    model.eval()
    complexity = Complexity(params=count_params(model), gflops=round(count_gmacs(model, spec.input_size), 4))
    graph = ServingGraph(model, spec.mean, spec.std).eval()

    staging = make_staging_dir(model_dir)
    try:
        files: dict[str, Path] = {}
        for precision in options.precisions:
            proto = step(f"export {precision}", export_onnx, graph, spec.input_size, precision, options.opset)
            files[precision] = staging / PRECISION_FILES[precision]
            onnx.save_model(proto, files[precision])
            del proto
        parity = step(
            "parity", check_parity, graph, files, spec.input_size, options.seed, options.parity_samples,
            options.fp32_tolerance, options.fp16_threshold,
        )
        manifest = Manifest(
            name=arch,
            version=version,
            architecture=spec.name,
            family=spec.family,
            created_at=datetime.now(timezone.utc),
            input=InputSpec(name=INPUT_NAME, layout="NHWC", dtype="uint8", shape=(None, spec.input_size, spec.input_size, 3)),
            preprocessing=Preprocessing(
                resize=spec.resize_size, crop=spec.input_size, interpolation=spec.interpolation,
                mean=spec.mean, std=spec.std,
            ),
            output=OutputSpec(name=OUTPUT_NAME, num_classes=len(labels)),
            labels=labels,
            files={
                p: ModelFile(path=f.name, sha256=file_sha256(f), bytes=f.stat().st_size) for p, f in files.items()
            },
            complexity=complexity,
            weights=weights,
            parity=parity,
            opset=options.opset,
            producer=Producer(
                torch=torch.__version__, onnx=onnx.__version__, onnxruntime=onnxruntime.__version__,
                exporter=EXPORTER,
            ),
        )
        (staging / MANIFEST_FILENAME).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        path = publish(staging, model_dir, version, options.force)
    except BaseException:
        discard(staging)
        raise
    return ExportResult(manifest=manifest, path=path, seconds=time.monotonic() - started, step_seconds=steps)
