"""The model manifest (``model.json``): the contract between export and service.

This module is deliberately light (pydantic only): the export stage imports it
to write manifests, the service imports it to read them, and neither imports
the other. ``model.schema.json`` beside this file is generated from
:class:`Manifest` (``python -m modelrepo > modelrepo/model.schema.json``)
and a test keeps the two in step.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

MANIFEST_FILENAME = "model.json"
SCHEMA_VERSION = 1
PRECISION_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx"}

Precision = Literal["fp32", "fp16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    name: str = Field(description="Name of the graph input.")
    layout: Literal["NHWC"] = Field(description="Memory layout of the input tensor.")
    dtype: Literal["uint8"] = Field(description="Element type of the input tensor.")
    shape: tuple[None, int, int, Literal[3]] = Field(
        description="[batch, height, width, channels]; batch is dynamic (null)."
    )
    color: Literal["RGB"] = Field(default="RGB", description="Channel order.")


class Preprocessing(_Strict):
    resize: int = Field(gt=0, description="The shorter image side is resized to this many pixels.")
    crop: int = Field(gt=0, description="Then a centre crop of crop x crop pixels is taken.")
    interpolation: Literal["nearest", "bilinear", "bicubic"] = Field(
        description="Resampling filter used for the resize."
    )
    mean: tuple[float, float, float] = Field(
        description="Per-channel mean on the 0..1 scale, subtracted inside the graph."
    )
    std: tuple[float, float, float] = Field(
        description="Per-channel std on the 0..1 scale, divided inside the graph."
    )
    normalization_in_graph: Literal[True] = Field(
        default=True,
        description="The cast to float and mean/std normalisation are part of the ONNX graph; "
        "clients send raw uint8 pixels.",
    )

    @model_validator(mode="after")
    def _crop_fits(self) -> "Preprocessing":
        if self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}")
        return self


class OutputSpec(_Strict):
    name: str = Field(description="Name of the graph output.")
    dtype: Literal["float32"] = "float32"
    kind: Literal["logits"] = Field(
        default="logits", description="Raw class scores; apply softmax for probabilities."
    )
    num_classes: int = Field(gt=0)


class ModelFile(_Strict):
    path: str = Field(description="File name relative to the version directory.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(gt=0)


class Complexity(_Strict):
    params: int = Field(gt=0, description="Number of parameters (the exported graph's).")
    gflops: float = Field(
        ge=0,
        description="Billions of multiply-accumulates for one image at the crop size "
        "(the convention of torchvision's and timm's published figures). An imported graph's are counted on its "
        "Conv, Gemm and MatMul nodes: 0 where it has none.",
    )


class RandomInit(_Strict):
    source: Literal["random-init"] = "random-init"
    seed: int = Field(description="Seed of the deterministic initialisation.")
    batchnorm_calibrated: bool = Field(
        description="Whether batch-norm statistics were calibrated on synthetic images."
    )
    residual_branch_scale: float | None = Field(
        default=None,
        description="Initial scale of the last batch norm in each residual branch, if damped (null: none).",
    )
    batchnorm_bias: float | None = Field(
        default=None,
        description="Initial bias of every batch norm, set before calibration in a network without residual "
        "branches to damp, so its random activations stay close to linear (null: not set).",
    )


class Checkpoint(_Strict):
    source: Literal["checkpoint"] = "checkpoint"
    file: str = Field(description="File name of the checkpoint the weights came from.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    dropped_keys: list[str] = Field(
        default_factory=list,
        description="Training-only keys (auxiliary heads) that were not exported.",
    )


class Imported(_Strict):
    """A graph imported from an ONNX file (``python -m export import-onnx``), wrapped in the repository's input."""

    source: Literal["imported"] = "imported"
    file: str = Field(description="File name of the imported ONNX graph.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the imported file.")
    producer: str = Field(description="The imported file's producer name and version (empty if it names none).")
    input_name: str = Field(description="The imported graph's input, fed the normalised float image.")
    output_name: str = Field(description="The imported graph's output, served as the logits.")
    layout: Literal["NCHW", "NHWC"] = Field(description="Layout of the imported graph's float input.")
    defaulted: list[Literal["mean", "std", "crop", "resize", "interpolation", "labels"]] = Field(
        default_factory=list,
        description="Preprocessing options the import was not given, so defaults: ImageNet's mean and std, the "
        "graph's fixed size (224 if dynamic), crop / 0.875, bilinear, ImageNet's or class_N labels.",
    )


Weights = Annotated[Union[RandomInit, Checkpoint, Imported], Field(discriminator="source")]


class Fp32Parity(_Strict):
    batch_sizes: list[int] = Field(description="Batch sizes compared.")
    max_abs_diff: float = Field(
        ge=0, description="Largest |onnxruntime - PyTorch| logit difference (an imported graph's reference: the "
        "original graph in onnxruntime, fed the normalised float image).",
    )
    logit_range: float = Field(ge=0, description="max - min of the reference logits.")
    relative_diff: float = Field(ge=0, description="max_abs_diff / logit_range.")
    tolerance: float = Field(gt=0, description="Gate on relative_diff.")


class Fp16Parity(_Strict):
    samples: int = Field(gt=0, description="Structured synthetic images compared.")
    top1_agreement: float = Field(
        ge=0, le=1,
        description="Share of images whose fp16 top-1 class equals fp32's (the checked fp32 file, else PyTorch).",
    )
    tie_tolerance: float = Field(
        ge=0, description="fp32 logit gap below which two classes are tied at fp16 resolution."
    )
    top1_agreement_tie_aware: float = Field(
        ge=0, le=1,
        description="Share of images whose fp16 top-1 class is fp32's top-1 or within tie_tolerance of it "
        "in fp32; the gate. Equal to top1_agreement for any model without near-tied classes.",
    )
    max_abs_diff: float = Field(ge=0, description="Largest |fp16 - fp32| logit difference.")
    threshold: float = Field(gt=0, le=1, description="Gate on top1_agreement_tie_aware.")


class Parity(_Strict):
    provider: str = Field(description="onnxruntime execution provider used for the checks.")
    fp32: Fp32Parity | None = None
    fp16: Fp16Parity | None = None


class Producer(_Strict):
    torch: str | None = Field(default=None, description="torch version of the export; null for an imported graph.")
    onnx: str
    onnxruntime: str
    exporter: str = Field(description="Which torch.onnx exporter wrote the graph, or what wrapped an imported one.")


class Manifest(_Strict):
    schema_version: Literal[1] = SCHEMA_VERSION
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$", description="Model name (its folder).")
    version: int = Field(gt=0)
    architecture: str = Field(
        description="Registered architecture the graph was built from; an imported graph's file name stem."
    )
    family: str = Field(description="Architecture family, e.g. resnet, googlenet; imported for an imported graph.")
    created_at: datetime
    input: InputSpec
    preprocessing: Preprocessing
    output: OutputSpec
    labels: list[str] = Field(description="Class names, index i naming logit i.")
    files: dict[Precision, ModelFile] = Field(min_length=1)
    complexity: Complexity
    weights: Weights
    parity: Parity
    opset: int = Field(ge=17)
    producer: Producer

    @model_validator(mode="after")
    def _consistent(self) -> "Manifest":
        if len(self.labels) != self.output.num_classes:
            raise ValueError(
                f"{len(self.labels)} labels for {self.output.num_classes} classes; they must match"
            )
        h, w = self.input.shape[1], self.input.shape[2]
        if h != self.preprocessing.crop or w != self.preprocessing.crop:
            raise ValueError(f"input {h}x{w} does not match the crop {self.preprocessing.crop}")
        for precision, entry in self.files.items():
            if Path(entry.path).name != entry.path:
                raise ValueError(f"files.{precision}.path must be a bare file name, got {entry.path!r}")
        return self


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a ``model.json`` (a file or its version directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILENAME
    return Manifest.model_validate_json(path.read_bytes())


def json_schema() -> dict:
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "archserve model manifest"
    return schema


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
