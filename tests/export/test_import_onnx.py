"""``python -m export import-onnx``: ONNX files made here (torch.onnx, onnx.helper), imported, gated and served."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import warnings

import httpx
import jsonschema
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torchvision
from onnx import TensorProto, helper, numpy_helper

from export.__main__ import main
from export.calibrate import calibrate_batchnorm, damp_residual_branches
from export.pipeline import imagenet_labels
from export.preprocess import reference_preprocess
from modelrepo import file_sha256, list_versions, load_manifest
from modelrepo.manifest import json_schema
from tests.images import jpeg

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CPU = ["CPUExecutionProvider"]


def torch_to_onnx(module: nn.Module, example: torch.Tensor, path, dynamic_axes=None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices, as in export/onnx_graph.py
        torch.onnx.export(module.eval(), (example,), str(path), input_names=["input"], output_names=["output"],
                          dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)


def by_hand(images: np.ndarray, mean, std, nchw: bool) -> np.ndarray:
    """uint8 NHWC images normalised in numpy, as the original graph takes them."""
    x = ((images.astype(np.float32) / 255 - np.float32(mean)) / np.float32(std)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2) if nchw else x)


def run(path, feed: dict) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=CPU).run(None, feed)[0]


def assert_same_logits(published: np.ndarray, original: np.ndarray) -> None:
    assert published.shape == original.shape
    np.testing.assert_array_equal(published.argmax(1), original.argmax(1))
    # The repository's fp32 gate: within 1e-4 of the logit range.
    np.testing.assert_allclose(published, original, rtol=0, atol=1e-4 * float(original.max() - original.min()))


def input_dims(path) -> list:
    (image,) = onnx.load(str(path)).graph.input
    return [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]


def import_cli(*args: str) -> int:
    return main(["import-onnx", *map(str, args)])


class TinyNet(nn.Module):
    """conv-bn-relu twice, global pool, linear: a classifier at any input size, NCHW or NHWC."""

    def __init__(self, classes: int = 10, nhwc: bool = False) -> None:
        super().__init__()
        self.nhwc = nhwc
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        return self.head(self.features(x).flatten(1))


@pytest.fixture(scope="module")
def resnet18(tmp_path_factory):
    """torchvision's ResNet-18 as a user would export it (batch 1, 224, float NCHW), imported with the defaults:
    (the file, its published version folder)."""
    root = tmp_path_factory.mktemp("import-resnet18")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    # Our exports' random-init recipe: raw random weights leave classes near-tied, where fp16 cannot agree with
    # fp32 on 99% of images (the import would publish fp32 only, as test_fp16_that_breaks_parity_... checks).
    damp_residual_branches(model)
    calibrate_batchnorm(model, 224, IMAGENET_MEAN, IMAGENET_STD, seed=0, batches=1, batch_size=8)
    source = root / "resnet18.onnx"
    torch_to_onnx(model, torch.zeros(1, 3, 224, 224), source)
    assert import_cli(source, "--name", "my-resnet", "--out", root / "models") == 0
    return source, root / "models" / "my-resnet" / "1"


def test_torchvision_model_is_published_with_parity_and_a_valid_manifest(resnet18):
    source, version_dir = resnet18
    document = json.loads((version_dir / "model.json").read_text())
    jsonschema.validate(document, json_schema())
    manifest = load_manifest(version_dir)
    assert (manifest.architecture, manifest.family) == ("resnet18", "imported")
    weights = manifest.weights
    assert (weights.source, weights.file, weights.sha256) == ("imported", "resnet18.onnx", file_sha256(source))
    assert (weights.input_name, weights.output_name, weights.layout) == ("input", "output", "NCHW")
    assert weights.defaulted == ["mean", "std", "crop", "resize", "interpolation", "labels"]
    p = manifest.preprocessing
    assert (p.resize, p.crop, p.interpolation, p.mean, p.std) == (256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    assert manifest.labels == imagenet_labels() and manifest.output.num_classes == 1000
    assert set(manifest.files) == {"fp32", "fp16"} and manifest.producer.torch is None
    assert manifest.parity.fp32.relative_diff <= manifest.parity.fp32.tolerance
    assert manifest.parity.fp16.top1_agreement_tie_aware >= manifest.parity.fp16.threshold
    # torchvision's card: 11.69M parameters (batch norms folded into the convolutions here), 1.81 GFLOPs.
    assert 11.6e6 < manifest.complexity.params < 11.7e6 and 1.80 < manifest.complexity.gflops < 1.83
    # Exported at batch 1, served at any batch.
    assert input_dims(version_dir / "model.onnx") == ["batch", 224, 224, 3]

    images = np.stack([reference_preprocess(io.BytesIO(jpeg(seed=s)), 256, 224, "bilinear") for s in range(3)])
    published = run(version_dir / "model.onnx", {"image": images})
    original = np.concatenate([run(source, {"input": by_hand(images[i : i + 1], IMAGENET_MEAN, IMAGENET_STD, True)})
                               for i in range(3)])
    assert len(set(original.argmax(1))) > 1  # the images are told apart: top-1 agreement means something
    assert_same_logits(published, original)
    np.testing.assert_array_equal(run(version_dir / "model.fp16.onnx", {"image": images}).argmax(1), original.argmax(1))


def test_dynamic_height_and_width_are_fixed_to_the_crop_and_the_batch_stays_dynamic(tmp_path):
    torch.manual_seed(1)
    source = tmp_path / "tiny_dynamic.onnx"
    torch_to_onnx(TinyNet(), torch.zeros(2, 3, 64, 64), source,
                  dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "output": {0: "n"}})
    half = (0.5, 0.5, 0.5)
    assert import_cli(source, "--name", "tiny", "--size", "64", "--mean", *half, "--std", *half,
                      "--out", tmp_path / "models") == 0
    version_dir = tmp_path / "models" / "tiny" / "1"
    manifest = load_manifest(version_dir)
    assert (manifest.preprocessing.crop, manifest.preprocessing.resize) == (64, 73)  # round(64 / 0.875)
    assert manifest.weights.defaulted == ["resize", "interpolation", "labels"]
    assert manifest.labels == [f"class_{i}" for i in range(10)]
    assert input_dims(version_dir / "model.onnx") == ["n", 64, 64, 3]  # the graph's own batch name, still free

    images = np.stack([reference_preprocess(io.BytesIO(jpeg(seed=s)), 73, 64, "bilinear") for s in range(3)])
    assert_same_logits(run(version_dir / "model.onnx", {"image": images}),
                       run(source, {"input": by_hand(images, half, half, True)}))

    # Without --size, a dynamic graph gets the usual 224 crop, recorded as a default.
    assert import_cli(source, "--name", "tiny", "--out", tmp_path / "models") == 0
    manifest = load_manifest(tmp_path / "models" / "tiny" / "2")
    assert manifest.preprocessing.crop == 224 and "crop" in manifest.weights.defaulted


def test_nhwc_graph_takes_its_size_from_the_graph(tmp_path, capsys):
    torch.manual_seed(2)
    source = tmp_path / "tiny_nhwc.onnx"
    torch_to_onnx(TinyNet(classes=3, nhwc=True), torch.zeros(1, 48, 48, 3), source)
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    out = tmp_path / "models"

    assert import_cli(source, "--name", "nhwc", "--out", out) == 2  # NCHW by default: the error says what fits
    assert "has 48 channel(s) at axis 1 (NCHW)" in capsys.readouterr().err
    assert import_cli(source, "--name", "nhwc", "--layout", "nhwc", "--size", "64", "--out", out) == 2
    assert "--size 64 but the graph's input 'input' is fixed at 48x48" in capsys.readouterr().err
    assert list_versions(out / "nhwc") == []

    assert import_cli(source, "--name", "nhwc", "--layout", "nhwc", "--labels", labels,
                      "--interpolation", "bicubic", "--out", out) == 0
    version_dir = out / "nhwc" / "1"
    manifest = load_manifest(version_dir)
    assert (manifest.preprocessing.crop, manifest.preprocessing.resize, manifest.preprocessing.interpolation) == (
        48, 55, "bicubic")
    assert manifest.weights.layout == "NHWC" and manifest.labels == ["cat", "dog", "bird"]
    assert input_dims(version_dir / "model.onnx") == ["batch", 48, 48, 3]

    images = np.stack([reference_preprocess(io.BytesIO(jpeg(seed=s)), 55, 48, "bicubic") for s in range(2)])
    original = np.concatenate([run(source, {"input": by_hand(images[i : i + 1], IMAGENET_MEAN, IMAGENET_STD, False)})
                               for i in range(2)])
    assert_same_logits(run(version_dir / "model.onnx", {"image": images}), original)


def helper_model(inputs, outputs, nodes, initializers=(), opset: int = 17, ir_version: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


def image_input(name="x", elem=TensorProto.FLOAT, shape=("N", 3, 8, 8)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def pooled(source: str) -> list:
    """GlobalAveragePool then Flatten: ``[N, C, H, W]`` to ``[N, C]`` logits."""
    return [helper.make_node("GlobalAveragePool", [source], ["pool"]), helper.make_node("Flatten", ["pool"], ["y"])]


def logits(classes: int = 3, rank: int = 2):
    return helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", classes, 8][:rank])


REFUSALS = {
    "two inputs": (
        helper_model([image_input("x"), image_input("x2")], [logits()],
                     [helper.make_node("Add", ["x", "x2"], ["sum"]), *pooled("sum")]),
        "not an image classifier: it takes 2 inputs ('x', 'x2'), expected one image batch",
    ),
    "3-D output": (
        helper_model([image_input()], [logits(rank=3)], [helper.make_node("ReduceMean", ["x"], ["y"], axes=[3], keepdims=0)]),
        "not an image classifier: output 'y' is 3-D [N, 3, 8], expected 2-D logits [N, classes]",
    ),
    "1 channel": (
        helper_model([image_input(shape=("N", 1, 8, 8))], [logits(1)], pooled("x")),
        "not an RGB image classifier: input 'x' [N, 1, 8, 8] has 1 channel(s) at axis 1 (NCHW); "
        "the repository serves 3-channel RGB images",
    ),
    "int input": (
        helper_model([image_input(elem=TensorProto.INT64)], [logits()],
                     [helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT), *pooled("xf")]),
        "not an image classifier: input 'x' is int64, expected float32 pixels",
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_what_is_not_an_image_classifier_is_refused_in_one_line(tmp_path, capsys, case):
    model, message = REFUSALS[case]
    source = tmp_path / "bad.onnx"
    onnx.save_model(model, source)
    assert import_cli(source, "--name", "bad", "--out", tmp_path / "models") == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: bad.onnx: {message}\n" and captured.out == ""
    assert list_versions(tmp_path / "models" / "bad") == []


def test_the_cli_exits_2_with_one_line_and_no_traceback(tmp_path):
    source = tmp_path / "two_inputs.onnx"
    onnx.save_model(REFUSALS["two inputs"][0], source)
    for args, message in (([source, "--name", "bad"], "it takes 2 inputs"),
                          ([source], "the following arguments are required: --name")):
        proc = subprocess.run([sys.executable, "-m", "export", "import-onnx", *map(str, args), "--out",
                               str(tmp_path / "models")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert list_versions(tmp_path / "models" / "bad") == []


@pytest.mark.parametrize("args, message", [
    (["missing.onnx", "--name", "bad"], "error: missing.onnx: cannot read missing.onnx as an ONNX model"),
    (["two_inputs.onnx", "--name", "Bad Name"], "--name 'Bad Name': use lower-case letters"),
    (["two_inputs.onnx", "--name", "bad", "--mean", "123.675", "116.28", "103.53"], "give it on the 0..1 pixel scale"),
    (["two_inputs.onnx", "--name", "bad", "--std", "0.2", "0", "0.2"], "a std must be above 0"),
    (["two_inputs.onnx", "--name", "bad", "--labels", "missing.txt"], "cannot read labels file missing.txt"),
])
def test_bad_options_are_explained_in_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)  # the file names in the messages are the ones given
    onnx.save_model(REFUSALS["two inputs"][0], tmp_path / "two_inputs.onnx")
    assert import_cli(*args, "--out", tmp_path / "models") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1, err
    assert list_versions(tmp_path / "models" / "bad") == []


def test_a_batch_1_graph_that_runs_only_at_batch_1_is_refused_and_nothing_is_left(tmp_path, capsys):
    """Exported at batch 1 with a reshape to the constant shape [1, 3]: served at batch 4, it cannot run."""
    shape = numpy_helper.from_array(np.array([1, 3], np.int64), "shape")
    scale = numpy_helper.from_array(np.array([1.0, 2.0, 3.0], np.float32), "scale")
    model = helper_model([image_input(shape=(1, 3, 8, 8))], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                         [pooled("x")[0], helper.make_node("Reshape", ["pool", "shape"], ["flat"]),
                          helper.make_node("Mul", ["flat", "scale"], ["y"])], initializers=[shape, scale])
    source = tmp_path / "batch1.onnx"
    onnx.save_model(model, source)
    assert import_cli(source, "--name", "batch1", "--out", tmp_path / "models") == 2
    assert "(exported at batch 1, it does not run at another: re-export it with a dynamic batch axis)" in (
        capsys.readouterr().err)
    assert list((tmp_path / "models" / "batch1").iterdir()) == []  # no version, no staging folder


def test_fp16_that_breaks_parity_is_not_published_and_the_summary_says_why(tmp_path, capsys):
    """Logit weights of 1e5 to 3e5, beyond fp16's largest number (65504): the converter clamps them all to it,
    so the fp16 file ranks classes its own way, fails the gate, and only fp32 is published."""
    weights = numpy_helper.from_array(np.diag([1e5, 2e5, 3e5]).astype(np.float32), "w")
    model = helper_model([image_input(shape=("N", 3, 16, 16))], [logits()],
                         [*pooled("x")[:1], helper.make_node("Flatten", ["pool"], ["f"]),
                          helper.make_node("Gemm", ["f", "w"], ["y"])], initializers=[weights])
    source = tmp_path / "huge.onnx"
    onnx.save_model(model, source)
    assert import_cli(source, "--name", "huge", "--out", tmp_path / "models") == 0
    assert "fp32 only (fp16 parity failed: top-1 agrees with fp32 on" in capsys.readouterr().out
    manifest = load_manifest(tmp_path / "models" / "huge" / "1")
    assert list(manifest.files) == ["fp32"] and manifest.parity.fp16 is None and manifest.parity.fp32 is not None
    assert sorted(p.name for p in (tmp_path / "models" / "huge" / "1").iterdir()) == ["model.json", "model.onnx"]


def test_old_opset_graph_with_weights_listed_as_inputs_is_converted_and_served_by_its_image_input(tmp_path):
    """An opset-13 graph in the older style (every weight also a graph input): converted to opset 17, the
    weights stay constants, and the published graph takes one input, the image."""
    rng = np.random.default_rng(0)
    conv_w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "conv_w")
    fc_w = numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "fc_w")
    weights_as_inputs = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in (conv_w, fc_w)]
    model = helper_model(
        [image_input(shape=("N", 3, 32, 32)), *weights_as_inputs], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        [helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
         helper.make_node("GlobalAveragePool", ["r"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
         helper.make_node("Gemm", ["f", "fc_w"], ["y"])],
        initializers=[conv_w, fc_w], opset=13, ir_version=7,
    )
    source = tmp_path / "old.onnx"
    onnx.save_model(model, source)
    assert import_cli(source, "--name", "old", "--out", tmp_path / "models") == 0
    version_dir = tmp_path / "models" / "old" / "1"
    manifest = load_manifest(version_dir)
    published = onnx.load(str(version_dir / "model.onnx"))
    assert [i.name for i in published.graph.input] == ["image"] and manifest.opset == 17
    assert manifest.complexity.params == 4 * 3 * 3 * 3 + 4 * 5
    assert manifest.complexity.gflops == pytest.approx((32 * 32 * 4 * 27 + 5 * 4) / 1e9, rel=1e-3)
    images = np.stack([reference_preprocess(io.BytesIO(jpeg(seed=s)), 37, 32, "bilinear") for s in range(2)])
    assert_same_logits(run(version_dir / "model.onnx", {"image": images}),
                       run(source, {"x": by_hand(images, IMAGENET_MEAN, IMAGENET_STD, True)}))


def test_an_imported_model_is_served_end_to_end(resnet18):
    from tests.service.server import running_server  # here: the service's import chain is no other test's concern

    _, version_dir = resnet18
    data = jpeg(seed=5)
    with running_server(device="cpu", models_dir=version_dir.parents[1], warmup=False, max_batch_size=4) as (url, _):
        response = httpx.post(f"{url}/classify/my-resnet?top_k=1", content=data, headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model"], body["version"], body["weights"]) == ("my-resnet", 1, "imported")
    (prediction,) = body["results"][0]["predictions"]
    # What the service must compute: the published fp32 file on the export stage's reference preprocessing.
    image = reference_preprocess(io.BytesIO(data), 256, 224, "bilinear")
    expected = int(run(version_dir / "model.onnx", {"image": image[None]})[0].argmax())
    assert (prediction["index"], prediction["label"]) == (expected, imagenet_labels()[expected])
