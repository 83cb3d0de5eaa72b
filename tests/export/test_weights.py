"""The checkpoint loader: formats, nesting, strictness and its error messages."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from export.models import build_model, get_model_spec
from export.pipeline import ExportOptions, export_model
from export.synthetic import structured_images
from export.weights import WeightsError, load_weights, read_state_dict


@pytest.fixture(scope="module")
def tv_resnet18():
    torch.manual_seed(7)
    return torchvision.models.resnet18(weights=None).eval()


def _assert_same_weights(model, reference):
    ours = model.state_dict()
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {}},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["plain", "state_dict-key", "model-key", "data-parallel"],
)
def test_pth_checkpoints_load_however_they_were_saved(wrap, tv_resnet18, tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(tv_resnet18.state_dict()), path)
    model = build_model("resnet18")
    load_weights(model, read_state_dict(path))
    _assert_same_weights(model, tv_resnet18)


def test_safetensors_checkpoint_loads(tv_resnet18, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in tv_resnet18.state_dict().items()}, str(path))
    model = build_model("resnet18")
    load_weights(model, read_state_dict(path))
    _assert_same_weights(model, tv_resnet18)


def test_wrong_architecture_lists_missing_and_unexpected_keys(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), path)
    with pytest.raises(WeightsError) as err:
        load_weights(build_model("resnet50"), read_state_dict(path))
    message = str(err.value)
    assert "missing keys" in message and "layer1.0.conv3.weight" in message
    assert "mis-shaped keys" in message and "fc.weight: checkpoint (1000, 512) vs model (1000, 2048)" in message
    assert "--num-classes" not in message  # not a class-count problem
    with pytest.raises(WeightsError, match=r"(?s)unexpected keys:.*layer1\.2\.conv1\.weight"):
        load_weights(build_model("resnet18"), read_state_dict(path))


def test_other_class_count_says_to_use_num_classes(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "ft.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), path)
    with pytest.raises(WeightsError, match="--num-classes"):
        load_weights(build_model("resnet18"), read_state_dict(path))
    model = build_model("resnet18", num_classes=10)
    load_weights(model, read_state_dict(path))  # and with the right count it loads


def test_googlenet_auxiliary_heads_are_dropped_and_reported():
    torch.manual_seed(0)
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=True)
    spec = get_model_spec("googlenet")
    report = load_weights(spec.build(), reference.state_dict(), spec.training_only_prefixes)
    assert report.dropped_keys and all(k.startswith(("aux1.", "aux2.")) for k in report.dropped_keys)


@pytest.mark.parametrize(
    "content, suffix, message",
    [
        (None, ".pth", "does not exist"),
        (b"hello", ".ckpt", "unsupported file type '.ckpt'"),
        (b"\x00not a zip archive", ".pth", "could not be read"),
        (b"garbage", ".safetensors", "could not be read"),
    ],
)
def test_unreadable_checkpoints_fail_clearly(content, suffix, message, tmp_path):
    path = tmp_path / f"ckpt{suffix}"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=message):
        read_state_dict(path)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_checkpoints_cannot_run_code(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _Payload()}, path)
    with pytest.raises(WeightsError, match="could not be read"):
        read_state_dict(path)
    assert "code ran" not in capsys.readouterr().out


def test_dict_without_a_state_dict_names_its_keys(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"epoch": 3, "weights_here": {"a": 1}}, path)
    with pytest.raises(WeightsError, match="top-level keys are: epoch, weights_here"):
        read_state_dict(path)


def test_exported_checkpoint_matches_torchvision_end_to_end(tv_resnet18, tmp_path):
    """uint8 NHWC through our ONNX graph == torchvision on the normalised float input."""
    path = tmp_path / "resnet18.pth"
    torch.save(tv_resnet18.state_dict(), path)
    result = export_model("resnet18", ExportOptions(out=tmp_path / "models", weights=path, precisions=("fp32",)))
    manifest = result.manifest
    assert manifest.weights.source == "checkpoint" and manifest.weights.file == "resnet18.pth"
    assert len(manifest.weights.sha256) == 64

    images = structured_images(4, 224, seed=5)
    session = ort.InferenceSession(str(result.path / "model.onnx"), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"image": images})[0]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = tv_resnet18(x).numpy()
    assert np.abs(ours - expected).max() <= 1e-4 * float(np.ptp(expected))
