"""Every registered architecture through the export: graph, parity, manifest, files; the fp16 gate on one model
per family and on the deepest."""

from __future__ import annotations

import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export.calibrate import ACTIVE_BIAS
from export.models import get_model_spec, list_models
from export.parity import FP16_THRESHOLD, FP32_TOLERANCE, ParityError, check_fp16
from export.synthetic import structured_images
from modelrepo import file_sha256, list_versions, load_manifest
from modelrepo.manifest import json_schema
from tests.exports import FULL

QUICK = {"resnet18", "googlenet"}  # not marked slow


def _param(name: str):
    return pytest.param(name, marks=() if name in QUICK else pytest.mark.slow)


def test_the_full_exports_cover_every_family():
    assert set(FULL) <= set(list_models())
    assert {get_model_spec(n).family for n in FULL} == {get_model_spec(n).family for n in list_models()}


@pytest.fixture(scope="module")
def schema():
    return json_schema()


@pytest.mark.parametrize("name", [_param(n) for n in list_models()])
def test_export_publishes_a_checked_servable_model(name, exports, schema):
    # The session's export (tests/exports.py): the service tests serve these very files.
    full = name in FULL
    result = exports.checked(name)
    out = result.path.parents[1]
    spec = get_model_spec(name)
    size = spec.input_size
    version_dir = out / name / "1"
    assert result.path == version_dir
    assert list_versions(out / name) == [1]
    assert sorted(p.name for p in (out / name).iterdir()) == ["1"], "staging folder left behind"

    # The manifest on disk is valid under both the pydantic model and the JSON Schema.
    manifest = load_manifest(version_dir)
    jsonschema.validate(manifest.model_dump(mode="json"), schema)
    assert manifest.name == name and manifest.version == 1
    assert manifest.weights.source == "random-init" and manifest.weights.seed == 0
    assert manifest.weights.batchnorm_calibrated is full
    # A calibrated random network gets one of the two remedies: ResNets damped branches, the others active biases.
    remedies = [manifest.weights.residual_branch_scale, manifest.weights.batchnorm_bias]
    assert sum(r is not None for r in remedies) == (1 if full else 0)
    if full and spec.family.startswith(("inception", "se_inception", "googlenet")):
        assert manifest.weights.batchnorm_bias == ACTIVE_BIAS
    assert sorted(manifest.files) == (["fp16", "fp32"] if full else ["fp32"])
    assert manifest.input.shape == (None, size, size, 3)
    assert (manifest.preprocessing.resize, manifest.preprocessing.crop) == (spec.resize_size, size)
    assert len(manifest.labels) == manifest.output.num_classes == 1000
    assert manifest.labels[0] == "tench"
    assert manifest.opset >= 17
    assert manifest.parity.fp32.relative_diff <= FP32_TOLERANCE
    if full:
        assert manifest.parity.fp16.samples == FULL[name]
        assert manifest.parity.fp16.top1_agreement_tie_aware >= FP16_THRESHOLD

    for precision, entry in manifest.files.items():
        path = version_dir / entry.path
        assert file_sha256(path) == entry.sha256 and path.stat().st_size == entry.bytes
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        (graph_input,) = proto.graph.input
        dims = graph_input.type.tensor_type.shape.dim
        assert graph_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [size, size, 3]
        (graph_output,) = proto.graph.output
        assert graph_output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        if precision == "fp16":
            weights = [t for t in proto.graph.initializer if len(t.dims) == 4]
            assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)

    # Independent of the gate: a batch gives each image what it gets alone,
    # and fp16 picks fp32's class on the clear-cut images.
    images = structured_images(3, size, seed=1234)
    fp32 = ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = fp32.run(None, {"image": images})[0]
    assert batch.shape == (3, 1000) and batch.dtype == np.float32
    alone = np.concatenate([fp32.run(None, {"image": images[i : i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(alone, batch, atol=1e-4 * float(np.ptp(batch)))
    if not full:
        return
    fp16 = ort.InferenceSession(str(version_dir / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    half = fp16.run(None, {"image": images})[0]
    assert half.dtype == np.float32
    assert np.abs(half - batch).max() < 0.05 * float(np.ptp(batch))


@pytest.mark.parametrize("name", [n for n in list_models() if get_model_spec(n).published])
def test_params_and_gflops_match_the_published_figures(name):
    from export.complexity import count_gmacs, count_params

    spec = get_model_spec(name)
    with torch.device("meta"):  # counts need no weights
        model = spec.build()
        ours = count_params(model), count_gmacs(model, spec.input_size)
    params_m, gmacs = spec.published
    # the figures are published to 3 or 4 significant digits
    assert ours[0] / 1e6 == pytest.approx(params_m, rel=0.005)
    assert ours[1] == pytest.approx(gmacs, rel=0.01)


def test_the_fp16_gate_takes_the_checked_fp32_file_as_reference_and_catches_wrong_weights(exports):
    resnet18, googlenet = exports("resnet18").path, exports("googlenet").path
    size = get_model_spec("resnet18").input_size
    assert get_model_spec("googlenet").input_size == size
    ok = check_fp16(None, resnet18 / "model.fp16.onnx", size, seed=0, samples=20, fp32_path=resnet18 / "model.onnx")
    assert ok.samples == 20 and ok.top1_agreement_tie_aware >= FP16_THRESHOLD
    # Another network's fp16 file (same input and classes): a conversion that broke the weights.
    with pytest.raises(ParityError, match=r"fp16 parity failed: top-1 agrees with fp32 on [0-9.]+% of 20 images"):
        check_fp16(None, googlenet / "model.fp16.onnx", size, seed=0, samples=20, fp32_path=resnet18 / "model.onnx")
