"""Command line: ``python -m export --list`` / ``python -m export --models a,b --out models`` /
``python -m export import-onnx model.onnx --name NAME`` (export/import_onnx.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

DEFAULT_MODELS = "resnet18,resnet50"


def _parse_weights(values: list[str]) -> dict[str, Path]:
    weights: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"error: --weights expects NAME=PATH (e.g. resnet50=ckpt/resnet50.pth), got {value!r}")
        weights[name] = Path(path)
    return weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export the seed architectures to a versioned ONNX model repository.",
        epilog="To publish your own ONNX classifier: python -m export import-onnx model.onnx --name NAME "
        "(python -m export import-onnx --help).",
    )
    parser.add_argument("--list", action="store_true", help="print the registered models and exit")
    parser.add_argument("--models", default=DEFAULT_MODELS, help=f"comma-separated model names (default: {DEFAULT_MODELS})")
    parser.add_argument("--out", type=Path, default=Path("models"), help="model repository folder (default: models)")
    parser.add_argument("--weights", action="append", default=[], metavar="NAME=PATH",
                        help="load a .pth/.pt/.safetensors state dict for model NAME (repeatable); "
                        "without it the model is randomly initialised and says so in its manifest")
    parser.add_argument("--precision", default="fp32,fp16", help="files to write: fp32, fp16 or both (default: fp32,fp16)")
    parser.add_argument("--version", type=int, help="version number to publish (default: the next free one)")
    parser.add_argument("--force", action="store_true", help="replace an existing version")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random initialisation and of the parity images")
    parser.add_argument("--num-classes", type=int, help="number of classes of a fine-tuned checkpoint")
    parser.add_argument("--labels", type=Path, help="class names, one per line (default: the 1000 ImageNet-1k classes)")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17)")
    parser.add_argument("--parity-samples", type=int, default=100, help="images in the fp16 agreement check (default: 100)")
    return parser


def print_registry() -> None:
    import torch

    from .complexity import count_gmacs, count_params
    from .models import get_model_spec, list_models

    names = list_models()
    # Columns as wide as the longest name and family, so the fields never run together.
    nw = max(len("name"), *map(len, names)) + 2
    fw = max(len("family"), *(len(get_model_spec(n).family) for n in names)) + 2
    print(f"{'name':<{nw}}{'family':<{fw}}{'input':>7}{'resize':>8}  {'interp':<9}{'params (M)':>11}{'GFLOPs':>8}"
          f"  {'published (M / GFLOPs)'}")
    for name in names:
        spec = get_model_spec(name)
        with torch.device("meta"):  # shapes only: counting needs no weights, building them takes seconds
            model = spec.build()
            params, gmacs = count_params(model), count_gmacs(model, spec.input_size)
        print(
            f"{name:<{nw}}{spec.family:<{fw}}{spec.input_size:>7}{spec.resize_size:>8}  {spec.interpolation:<9}"
            f"{params / 1e6:>11.2f}{gmacs:>8.2f}  "
            + (f"{spec.published[0]:g} / {spec.published[1]:g}" if spec.published else "-")
        )
    print("GFLOPs are multiply-accumulates for one image at the input size (torchvision's convention); published: "
          "the checkpoint's model card (torchvision, timm).")


IMPORT_COMMAND = "import-onnx"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A subcommand word, not an argparse subparser: the export's options stay top-level, as they always were.
    if argv[:1] == [IMPORT_COMMAND]:
        from .import_onnx import main as import_main

        return import_main(argv[1:])
    args = build_parser().parse_args(argv)
    from .models import UnknownModelError, get_model_spec
    from .onnx_graph import DEFAULT_OPSET
    from .parity import ParityError
    from .pipeline import ExportError, ExportOptions, export_model, read_labels
    from .publish import PublishError
    from .weights import WeightsError

    if args.list:
        print_registry()
        return 0
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    weights = _parse_weights(args.weights)
    try:
        for name in names + list(weights):
            get_model_spec(name)
    except UnknownModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stray = sorted(set(weights) - set(names))
    if stray:
        print(f"error: --weights names {', '.join(stray)}, which --models does not export", file=sys.stderr)
        return 2
    try:
        labels = read_labels(args.labels) if args.labels else None
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def progress(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    failures = 0
    summaries = []
    started = time.monotonic()
    for name in names:
        options = ExportOptions(
            out=args.out,
            precisions=tuple(p.strip() for p in args.precision.split(",") if p.strip()),
            version=args.version,
            force=args.force,
            seed=args.seed,
            weights=weights.get(name),
            num_classes=args.num_classes,
            labels=labels,
            opset=args.opset or DEFAULT_OPSET,
            parity_samples=args.parity_samples,
        )
        print(f"exporting {name}", file=sys.stderr, flush=True)
        try:
            result = export_model(name, options, progress)
        except (ExportError, ParityError, PublishError, WeightsError) as exc:
            failures += 1
            summaries.append(f"FAILED {name}: {exc}")
            continue
        m = result.manifest
        fp16 = f", fp16 top-1 {m.parity.fp16.top1_agreement_tie_aware:.0%} ({m.parity.fp16.top1_agreement:.0%} strict)" if m.parity.fp16 else ""
        fp32 = f", fp32 rel diff {m.parity.fp32.relative_diff:.1e}" if m.parity.fp32 else ""
        summaries.append(
            f"ok     {name} v{m.version} -> {result.path} ({m.complexity.params / 1e6:.2f}M params, "
            f"{m.complexity.gflops:.2f} GFLOPs, {m.weights.source}{fp32}{fp16}, {result.seconds:.0f}s)"
        )
    print("\n".join(summaries))
    print(f"{len(names) - failures} exported, {failures} failed in {time.monotonic() - started:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
