"""``python -m export import-onnx``: any ONNX image classifier into the model repository, served like our exports.

Usage::

    python -m export import-onnx model.onnx --name NAME [--out models] [--version N] [--force]
        [--mean R G B] [--std R G B] [--size CROP] [--resize SHORT_SIDE]
        [--interpolation bilinear] [--layout nchw|nhwc] [--labels FILE] [--parity-samples 100]

The graph must take one float32 image batch (``--layout``: NCHW by default, or NHWC), normalised as
``(pixel / 255 - mean) / std``, and give one ``[N, classes]`` logits output. It is published as our exports
are: ``models/NAME/<version>/`` holds ``model.onnx`` (uint8 NHWC ``[batch, crop, crop, 3]`` in, float32 logits
out, the cast and mean/std inside the graph: export/onnx_wrap.py), ``model.fp16.onnx`` where the fp16 conversion
keeps top-1 parity, and ``model.json`` whose ``weights`` say ``imported`` with the source file's name and
sha256, the layout and which preprocessing options were defaults. The service serves it unchanged.

Defaults: mean/std ImageNet's; the crop is the graph's fixed input size, or 224 where it is dynamic (a fixed
size other than ``--size`` is an error); resize ``round(crop / 0.875)`` (256 for 224, as our exports); bilinear;
labels the 1000 ImageNet classes for 1000 logits, else ``class_0`` ... A graph with a batch of 1 is served at
any batch size. The gates: onnxruntime runs the ORIGINAL graph on the normalised float images and the published
file on the uint8 ones, at batch 1 and 4, the logits within 1e-4 of their range (else nothing is published);
fp16's top-1 must agree with the fp32 file on 99% of the images (else only fp32 is published). Errors are one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from modelrepo.layout import file_sha256
from modelrepo.manifest import (
    MANIFEST_FILENAME, PRECISION_FILES, Complexity, Fp32Parity, Imported, InputSpec, Manifest, ModelFile, OutputSpec,
    Parity, Preprocessing, Producer,
)

from .onnx_graph import INPUT_NAME, OUTPUT_NAME
from .onnx_wrap import (
    ClassifierSignature, OnnxImportError, count_gmacs, count_params, default_opset, one_line, read_signature,
    to_fp16, to_repository_opset, wrap_classifier,
)
from .parity import FP16_THRESHOLD, FP32_TOLERANCE, PROVIDER, ParityError, check_fp16
from .pipeline import ExportError, imagenet_labels, read_labels
from .publish import PublishError, check_target_free, discard, make_staging_dir, next_version, publish
from .synthetic import structured_images

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP = 224
CROP_FRACTION = 0.875  # torchvision's resize 256 for a 224 crop; 299 -> 342 for Inception, as our specs have
PARITY_BATCH = 4
SEED = 0  # of the parity images, as `python -m export` by default
EXPORTER = "onnx.compose.merge_models (python -m export import-onnx)"
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]*")  # the manifest's pattern for a model name (its folder)


@dataclass
class ImportOptions:
    name: str
    out: Path = Path("models")
    version: int | None = None
    force: bool = False
    mean: tuple[float, float, float] | None = None  # None: not given, the default is used and recorded as such
    std: tuple[float, float, float] | None = None
    size: int | None = None
    resize: int | None = None
    interpolation: str | None = None
    layout: str = "nchw"
    labels: list[str] | None = None
    parity_samples: int = 100


@dataclass
class ImportResult:
    manifest: Manifest
    path: Path
    seconds: float
    fp16_skipped: str | None  # why no fp16 file was published, None when one was


def _session(path: Path, what: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # a user's graph can draw onnxruntime warnings; our errors say what matters
    try:
        return ort.InferenceSession(str(path), options, providers=[PROVIDER])
    except Exception as exc:  # onnxruntime's errors are its own pybind types
        raise OnnxImportError(f"onnxruntime cannot load {what}: {one_line(exc)}") from exc


def _run(session: ort.InferenceSession, feed: dict, what: str) -> np.ndarray:
    try:
        return session.run(None, feed)[0]
    except Exception as exc:
        raise OnnxImportError(f"onnxruntime cannot run {what}: {one_line(exc)}") from exc


def normalise(images: np.ndarray, mean, std, layout: str) -> np.ndarray:
    """uint8 NHWC images as the original graph takes them: ``(x / 255 - mean) / std`` in float32, in its layout."""
    x = (images.astype(np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x)


def original_logits(session: ort.InferenceSession, sig: ClassifierSignature, images: np.ndarray, mean, std) -> np.ndarray:
    """The original graph's logits; a graph fixed at batch 1 runs one image at a time."""
    chunk = 1 if sig.batch == 1 else len(images)
    logits = np.concatenate([
        _run(session, {sig.input_name: normalise(images[i : i + chunk], mean, std, sig.layout)}, "the original graph")
        for i in range(0, len(images), chunk)
    ])
    if logits.ndim != 2 or logits.shape[0] != len(images):
        raise OnnxImportError(
            f"not an image classifier: {len(images)} images gave {sig.output_name!r} of shape {list(logits.shape)}, "
            f"expected [{len(images)}, classes]"
        )
    return logits.astype(np.float32)


def check_imported_fp32(
    sig: ClassifierSignature, wrapped: Path, images: np.ndarray, reference: np.ndarray,
    tolerance: float = FP32_TOLERANCE,
) -> Fp32Parity:
    """The published graph on uint8 images against the original on normalised ones (``reference``), at batch 1
    and the whole batch: what :func:`export.parity.check_fp32` does against PyTorch for our exports."""
    published = _session(wrapped, "the wrapped graph")
    single = _run(published, {INPUT_NAME: images[:1]}, "the wrapped graph")
    # A graph exported at batch 1 is served at any batch; one built for batch 1 only fails here.
    fixed = " (exported at batch 1, it does not run at another: re-export it with a dynamic batch axis)"
    batch = _run(published, {INPUT_NAME: images},
                 f"the wrapped graph at batch {len(images)}" + (fixed if sig.batch == 1 else ""))
    if batch.shape != reference.shape:
        raise ParityError(
            f"fp32 parity failed: the wrapped graph gives logits {list(batch.shape)} for {len(images)} images, the "
            f"original {list(reference.shape)}; does the graph depend on its batch of {sig.batch}?"
        )
    diff = max(float(np.abs(single - reference[:1]).max()), float(np.abs(batch - reference).max()))
    logit_range = float(reference.max() - reference.min())
    relative = diff / logit_range if logit_range > 0 else float("inf")
    if not relative <= tolerance:
        raise ParityError(
            f"fp32 parity failed: max |wrapped - original| = {diff:.3g} is {relative:.3g} of the logit range "
            f"{logit_range:.3g}, over the tolerance {tolerance:g}"
        )
    return Fp32Parity(batch_sizes=[1, len(images)], max_abs_diff=diff, logit_range=logit_range,
                      relative_diff=relative, tolerance=tolerance)


def _labels(options: ImportOptions, num_classes: int) -> list[str]:
    if options.labels is not None:
        if len(options.labels) != num_classes:
            raise OnnxImportError(f"--labels has {len(options.labels)} names but the graph gives {num_classes} logits")
        return options.labels
    # What our exports default to (pipeline._resolve_labels).
    return imagenet_labels() if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]


def _crop(options: ImportOptions, sig: ClassifierSignature) -> int:
    if options.size is None:
        return sig.size or DEFAULT_CROP
    if sig.size is not None and sig.size != options.size:
        raise OnnxImportError(
            f"--size {options.size} but the graph's input {sig.input_name!r} is fixed at {sig.size}x{sig.size}; "
            f"pass --size {sig.size} or omit it"
        )
    return options.size


def _check_options(options: ImportOptions) -> None:
    if not _NAME.fullmatch(options.name):
        raise OnnxImportError(f"--name {options.name!r}: use lower-case letters, digits, '_', '.', '-', starting "
                              "with a letter or digit (it names the model's folder)")
    # Both are on the 0..1 scale in the manifest: 123.675 or 58.395 (the 0..255 scale's) would be silently wrong.
    bad = [(flag, values) for flag, values, ok in (
        ("--mean", options.mean, lambda v: 0 <= v <= 1), ("--std", options.std, lambda v: 0 < v <= 1),
    ) if values is not None and not all(map(ok, values))]
    if bad:
        flag, values = bad[0]
        raise OnnxImportError(f"{flag} {' '.join(map(str, values))}: give it on the 0..1 pixel scale (ImageNet's "
                              "mean is 0.485 0.456 0.406, std 0.229 0.224 0.225); a std must be above 0")
    for flag, value in (("--version", options.version), ("--size", options.size), ("--resize", options.resize),
                        ("--parity-samples", options.parity_samples)):
        if value is not None and value < 1:
            raise OnnxImportError(f"{flag} must be a positive integer, got {value}")
    if options.layout not in ("nchw", "nhwc"):
        raise OnnxImportError(f"--layout {options.layout!r}: use nchw or nhwc")


def import_onnx(source: Path, options: ImportOptions, progress=lambda _msg: None) -> ImportResult:
    """Wrap, gate and publish ``source`` as ``options.name``; raises OnnxImportError, ParityError, PublishError."""
    started = time.monotonic()
    _check_options(options)
    model_dir = options.out / options.name
    version = options.version if options.version is not None else next_version(model_dir)
    check_target_free(model_dir, version, options.force)
    try:
        original = onnx.load(str(source))
    except Exception as exc:  # a missing file (OSError) or not an ONNX protobuf (DecodeError)
        raise OnnxImportError(f"cannot read {source} as an ONNX model: {one_line(exc)}") from exc
    sig = read_signature(original, options.layout.upper())
    crop = _crop(options, sig)
    resize = options.resize if options.resize is not None else round(crop / CROP_FRACTION)
    if resize < crop:
        raise OnnxImportError(f"--resize {resize} is smaller than the crop {crop}; the crop is taken from the resize")
    mean, std = options.mean or IMAGENET_MEAN, options.std or IMAGENET_STD
    preprocessing = Preprocessing(resize=resize, crop=crop, interpolation=options.interpolation or "bilinear",
                                  mean=mean, std=std)
    params = count_params(original)
    if params == 0:
        raise OnnxImportError("not an image classifier: the graph has no weights (no float initializers or constants)")

    progress(f"{options.name}: running the original graph")
    session = _session(source, source.name)
    images = structured_images(PARITY_BATCH, crop, seed=SEED + 1)  # the images check_fp32 uses for our exports
    reference = original_logits(session, sig, images, mean, std)
    num_classes = reference.shape[1]
    labels = _labels(options, num_classes)

    progress(f"{options.name}: wrapping (opset {default_opset(original)}, {sig.layout}, crop {crop})")
    wrapped = wrap_classifier(to_repository_opset(original), sig, crop, num_classes, mean, std)
    staging = make_staging_dir(model_dir)
    try:
        files = {"fp32": staging / PRECISION_FILES["fp32"]}
        onnx.save_model(wrapped, files["fp32"])
        progress(f"{options.name}: fp32 parity against the original")
        fp32 = check_imported_fp32(sig, files["fp32"], images, reference)
        fp16, fp16_skipped = _fp16(wrapped, files["fp32"], staging / PRECISION_FILES["fp16"], crop, options, progress)
        if fp16 is not None:
            files["fp16"] = staging / PRECISION_FILES["fp16"]
        manifest = Manifest(
            name=options.name, version=version,
            architecture=source.stem, family="imported",
            created_at=datetime.now(timezone.utc),
            input=InputSpec(name=INPUT_NAME, layout="NHWC", dtype="uint8", shape=(None, crop, crop, 3)),
            preprocessing=preprocessing,
            output=OutputSpec(name=OUTPUT_NAME, num_classes=num_classes),
            labels=labels,
            files={p: ModelFile(path=f.name, sha256=file_sha256(f), bytes=f.stat().st_size) for p, f in files.items()},
            # Four significant figures: a small imported graph's count would round to 0 at four decimals.
            complexity=Complexity(params=params, gflops=float(f"{count_gmacs(wrapped):.4g}")),
            weights=Imported(
                file=source.name, sha256=file_sha256(source),
                producer=f"{original.producer_name} {original.producer_version}".strip(),
                input_name=sig.input_name, output_name=sig.output_name, layout=sig.layout,
                defaulted=[flag for flag, value in (
                    ("mean", options.mean), ("std", options.std), ("crop", options.size), ("resize", options.resize),
                    ("interpolation", options.interpolation), ("labels", options.labels)) if value is None],
            ),
            parity=Parity(provider=PROVIDER, fp32=fp32, fp16=fp16),
            opset=default_opset(wrapped),
            producer=Producer(onnx=onnx.__version__, onnxruntime=ort.__version__, exporter=EXPORTER),
        )
        (staging / MANIFEST_FILENAME).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        path = publish(staging, model_dir, version, options.force)
    except BaseException:
        discard(staging)
        raise
    return ImportResult(manifest=manifest, path=path, seconds=time.monotonic() - started, fp16_skipped=fp16_skipped)


def _fp16(wrapped: onnx.ModelProto, fp32_path: Path, fp16_path: Path, crop: int, options: ImportOptions, progress):
    """The fp16 file and its gate result, or (None, why) where conversion does not keep parity: an imported graph
    cannot be fixed here, so it is served in fp32 rather than refused."""
    progress(f"{options.name}: fp16 conversion and parity against the fp32 file")
    try:
        onnx.save_model(to_fp16(wrapped), fp16_path)
        # The fp32 file is the reference, so check_fp16 never needs the PyTorch graph it takes for our exports.
        return check_fp16(None, fp16_path, crop, SEED, options.parity_samples, FP16_THRESHOLD, fp32_path=fp32_path), None
    except Exception as exc:  # a converter or onnxruntime failure is as much a reason to keep fp32 only as the gate
        fp16_path.unlink(missing_ok=True)
        reason = one_line(exc)
        progress(f"{options.name}: no fp16 file: {reason}")
        return None, reason


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own prints the usage block too; errors here are one line
        self.exit(2, f"error: {message} (see python -m export import-onnx --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m export import-onnx",
                            description="Import an ONNX image classifier into the model repository.")
    parser.add_argument("model", type=Path, help="the ONNX file: one float image input, one [N, classes] output")
    parser.add_argument("--name", required=True, help="model name in the repository (its folder)")
    parser.add_argument("--out", type=Path, default=Path("models"), help="model repository folder (default: models)")
    parser.add_argument("--version", type=int, help="version number to publish (default: the next free one)")
    parser.add_argument("--force", action="store_true", help="replace an existing version")
    parser.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                        help=f"per-channel mean on the 0..1 scale (default: ImageNet's {' '.join(map(str, IMAGENET_MEAN))})")
    parser.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"),
                        help=f"per-channel std on the 0..1 scale (default: ImageNet's {' '.join(map(str, IMAGENET_STD))})")
    parser.add_argument("--size", type=int, metavar="CROP",
                        help=f"square crop the graph takes (default: its fixed input size, else {DEFAULT_CROP})")
    parser.add_argument("--resize", type=int, metavar="SHORT_SIDE",
                        help="shorter image side before the centre crop (default: round(crop / 0.875))")
    parser.add_argument("--interpolation", choices=("nearest", "bilinear", "bicubic"),
                        help="resampling filter of the resize (default: bilinear)")
    parser.add_argument("--layout", choices=("nchw", "nhwc"), default="nchw",
                        help="layout of the graph's float input (default: nchw)")
    parser.add_argument("--labels", type=Path, help="class names, one per line (default: ImageNet's for 1000 "
                        "logits, else class_0, class_1, ...)")
    parser.add_argument("--parity-samples", type=int, default=100, help="images in the fp16 gate (default: 100)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)

    def progress(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    try:
        options = ImportOptions(
            name=args.name, out=args.out, version=args.version, force=args.force,
            mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None,
            size=args.size, resize=args.resize, interpolation=args.interpolation, layout=args.layout,
            labels=read_labels(args.labels) if args.labels else None, parity_samples=args.parity_samples,
        )
        result = import_onnx(args.model, options, progress)
    except (OnnxImportError, ParityError, PublishError, ExportError) as exc:
        print(f"error: {args.model.name}: {one_line(exc)}", file=sys.stderr)
        return 2
    m = result.manifest
    fp16 = (f", fp16 top-1 {m.parity.fp16.top1_agreement_tie_aware:.0%}" if m.parity.fp16
            else f", fp32 only ({result.fp16_skipped})")
    print(f"ok     {m.name} v{m.version} -> {result.path} (imported {m.weights.file}, {m.output.num_classes} classes, "
          f"crop {m.preprocessing.crop}, fp32 rel diff {m.parity.fp32.relative_diff:.1e}{fp16}, {result.seconds:.0f}s)")
    return 0
