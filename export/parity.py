"""The parity gate: an exported file must compute what PyTorch computes.

fp32: onnxruntime (CPU provider) against PyTorch eager on the same uint8
inputs at batch 1 and a larger batch; the largest logit difference relative to
the logit range must be within ``fp32_tolerance``.
fp16: top-1 agreement with fp32 over structured synthetic images must reach
``fp16_threshold``. The fp32 reference is the fp32 file once it passed its own
check (what fp32 serving answers, and quicker to run than PyTorch eager), else
PyTorch. Randomly initialised networks put many images on near-ties between classes (fp32 gaps smaller than fp16's logit noise, whether
the fp16 graph runs in onnxruntime or in PyTorch), so the gate counts an image as
agreeing when fp16's top-1 class is fp32's or within ``TIE_TOLERANCE`` of the
logit range of it in fp32 -- classes fp16 cannot tell apart. A broken
conversion (overflow, wrong weights) still fails: its errors are far larger.
The strict figure is recorded beside the gated one.
A model that fails is not published; the error says by how much it failed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from modelrepo.manifest import Fp16Parity, Fp32Parity, Parity

from .onnx_graph import INPUT_NAME, ServingGraph
from .synthetic import structured_images

FP32_TOLERANCE = 1e-4
FP16_THRESHOLD = 0.99
TIE_TOLERANCE = 1e-3  # of the fp32 logit range: about two fp16 ulps
PROVIDER = "CPUExecutionProvider"


class ParityError(RuntimeError):
    """An exported graph disagrees with PyTorch beyond the gate."""


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=[PROVIDER])


@torch.no_grad()
def _torch_logits(graph: ServingGraph, images: np.ndarray, chunk: int = 16) -> np.ndarray:
    outs = [graph(torch.from_numpy(images[i : i + chunk])).numpy() for i in range(0, len(images), chunk)]
    return np.concatenate(outs)


def _ort_logits(session: ort.InferenceSession, images: np.ndarray, chunk: int = 16) -> np.ndarray:
    outs = [session.run(None, {INPUT_NAME: images[i : i + chunk]})[0] for i in range(0, len(images), chunk)]
    return np.concatenate(outs)


def check_fp32(
    graph: ServingGraph, path: Path, input_size: int, seed: int, batch: int = 4,
    tolerance: float = FP32_TOLERANCE,
) -> Fp32Parity:
    images = structured_images(batch, input_size, seed=seed + 1)
    session = _session(path)
    ref_single = _torch_logits(graph, images[:1])
    ref_batch = _torch_logits(graph, images)
    diff = max(
        float(np.abs(session.run(None, {INPUT_NAME: images[:1]})[0] - ref_single).max()),
        float(np.abs(session.run(None, {INPUT_NAME: images})[0] - ref_batch).max()),
    )
    logit_range = float(ref_batch.max() - ref_batch.min())
    relative = diff / logit_range if logit_range > 0 else float("inf")
    result = Fp32Parity(
        batch_sizes=[1, batch], max_abs_diff=diff, logit_range=logit_range,
        relative_diff=relative, tolerance=tolerance,
    )
    if not relative <= tolerance:
        raise ParityError(
            f"fp32 parity failed: max |onnxruntime - PyTorch| = {diff:.3g} is {relative:.3g} of the "
            f"logit range {logit_range:.3g}, over the tolerance {tolerance:g} by {relative / tolerance:.1f}x"
        )
    return result


def check_fp16(
    graph: ServingGraph, path: Path, input_size: int, seed: int, samples: int = 100,
    threshold: float = FP16_THRESHOLD, fp32_path: Path | None = None,
) -> Fp16Parity:
    """``fp32_path``: a checked fp32 file to take the reference from, instead of PyTorch."""
    images = structured_images(samples, input_size, seed=seed + 2)
    reference = _ort_logits(_session(fp32_path), images) if fp32_path else _torch_logits(graph, images)
    half = _ort_logits(_session(path), images)
    rows = np.arange(samples)
    ref_top1, half_top1 = reference.argmax(1), half.argmax(1)
    tie = TIE_TOLERANCE * float(reference.max() - reference.min())
    gap = reference[rows, ref_top1] - reference[rows, half_top1]
    strict = float((ref_top1 == half_top1).mean())
    tie_aware = float((gap <= tie).mean())
    result = Fp16Parity(
        samples=samples, top1_agreement=strict, tie_tolerance=tie, top1_agreement_tie_aware=tie_aware,
        max_abs_diff=float(np.abs(half - reference).max()), threshold=threshold,
    )
    if not tie_aware >= threshold:
        raise ParityError(
            f"fp16 parity failed: top-1 agrees with fp32 on {tie_aware:.1%} of {samples} images "
            f"counting near-ties ({strict:.1%} strictly), under the {threshold:.0%} gate by "
            f"{threshold - tie_aware:.1%} (max |fp16 - fp32| logit difference {result.max_abs_diff:.3g})"
        )
    return result


def check_parity(
    graph: ServingGraph, files: dict[str, Path], input_size: int, seed: int, samples: int = 100,
    fp32_tolerance: float = FP32_TOLERANCE, fp16_threshold: float = FP16_THRESHOLD,
) -> Parity:
    graph = graph.eval()
    fp32 = fp16 = None
    if "fp32" in files:
        fp32 = check_fp32(graph, files["fp32"], input_size, seed, tolerance=fp32_tolerance)
    if "fp16" in files:
        fp16 = check_fp16(graph, files["fp16"], input_size, seed, samples, threshold=fp16_threshold,
                          fp32_path=files.get("fp32"))
    return Parity(provider=PROVIDER, fp32=fp32, fp16=fp16)
