import json
from pathlib import Path

import jsonschema
import pytest
from pydantic import ValidationError

from modelrepo import list_model_names, list_versions, load_manifest
from modelrepo.manifest import Manifest, json_schema, schema_text

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "modelrepo" / "model.schema.json"


def test_committed_schema_is_generated_from_the_model():
    assert SCHEMA_FILE.read_text() == schema_text(), (
        "modelrepo/model.schema.json is stale: run `python -m modelrepo > modelrepo/model.schema.json`"
    )


def test_schema_is_a_valid_json_schema():
    jsonschema.Draft202012Validator.check_schema(json_schema())


def _valid_manifest() -> dict:
    return {
        "name": "tiny",
        "version": 3,
        "architecture": "resnet18",
        "family": "resnet",
        "created_at": "2026-11-27T05:00:00Z",
        "input": {"name": "image", "layout": "NHWC", "dtype": "uint8", "shape": [None, 224, 224, 3]},
        "preprocessing": {
            "resize": 256, "crop": 224, "interpolation": "bilinear",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        },
        "output": {"name": "logits", "num_classes": 2},
        "labels": ["cat", "dog"],
        "files": {"fp32": {"path": "model.onnx", "sha256": "a" * 64, "bytes": 10}},
        "complexity": {"params": 10, "gflops": 1.5},
        "weights": {"source": "random-init", "seed": 0, "batchnorm_calibrated": True},
        "parity": {"provider": "CPUExecutionProvider"},
        "opset": 17,
        "producer": {"torch": "2", "onnx": "1", "onnxruntime": "1", "exporter": "x"},
    }


def test_valid_manifest_passes_both_pydantic_and_json_schema():
    doc = _valid_manifest()
    jsonschema.validate(doc, json_schema())
    assert Manifest.model_validate(doc).version == 3


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d.update(labels=["cat"]), "1 labels for 2 classes"),
        (lambda d: d["files"]["fp32"].update(path="../model.onnx"), "bare file name"),
        (lambda d: d["input"].update(shape=[None, 299, 299, 3]), "does not match the crop"),
        (lambda d: d["preprocessing"].update(crop=300), "larger than resize"),
        (lambda d: d.update(opset=13), "greater than or equal to 17"),
        (lambda d: d.update(version=0), "greater than 0"),
        (lambda d: d["weights"].update(source="downloaded"), "does not match any of the expected tags"),
        (lambda d: d.update(surprise=1), "Extra inputs are not permitted"),
    ],
)
def test_invalid_manifests_are_refused_with_the_reason(change, message):
    doc = _valid_manifest()
    change(doc)
    with pytest.raises(ValidationError, match=message):
        Manifest.model_validate(doc)


def test_json_schema_refuses_what_pydantic_refuses_structurally():
    doc = _valid_manifest()
    doc["input"]["dtype"] = "float32"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, json_schema())


def test_repository_listing_ignores_staging_and_unfinished_folders(tmp_path):
    model = tmp_path / "tiny"
    for version in ("1", "2", "10"):
        (model / version).mkdir(parents=True)
        (model / version / "model.json").write_text(json.dumps(_valid_manifest()))
    (model / "3").mkdir()  # no manifest: not published
    (model / ".tmp-abc").mkdir()
    (model / ".tmp-abc" / "model.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    assert list_versions(model) == [1, 2, 10]
    assert list_model_names(tmp_path) == ["tiny"]
    assert load_manifest(model / "10").labels == ["cat", "dog"]
