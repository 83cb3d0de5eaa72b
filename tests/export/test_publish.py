"""Versioning and atomic publication into the model repository."""

from __future__ import annotations

import pytest

from export.parity import ParityError
from export.pipeline import ExportOptions, export_model
from export.publish import PublishError, make_staging_dir, next_version, publish
from modelrepo import list_versions, load_manifest

FAST = dict(precisions=("fp32",), calibrate=False)


def test_versions_count_up_and_are_never_overwritten(tmp_path):
    first = export_model("resnet18", ExportOptions(out=tmp_path, **FAST))
    second = export_model("resnet18", ExportOptions(out=tmp_path, **FAST))
    assert (first.manifest.version, second.manifest.version) == (1, 2)
    assert list_versions(tmp_path / "resnet18") == [1, 2]
    before = (tmp_path / "resnet18" / "1" / "model.json").read_bytes()
    with pytest.raises(PublishError, match="never overwritten.*--force"):
        export_model("resnet18", ExportOptions(out=tmp_path, version=1, seed=5, **FAST))
    assert (tmp_path / "resnet18" / "1" / "model.json").read_bytes() == before


def test_force_replaces_a_version_in_one_step(tmp_path):
    export_model("resnet18", ExportOptions(out=tmp_path, version=4, seed=1, **FAST))
    export_model("resnet18", ExportOptions(out=tmp_path, version=4, seed=2, force=True, **FAST))
    assert load_manifest(tmp_path / "resnet18" / "4").weights.seed == 2
    assert sorted(p.name for p in (tmp_path / "resnet18").iterdir()) == ["4"]


def test_a_model_failing_parity_is_not_published_and_says_by_how_much(tmp_path):
    with pytest.raises(ParityError, match=r"fp32 parity failed: .* over the tolerance 1e-12 by [0-9.e+]+x"):
        export_model("resnet18", ExportOptions(out=tmp_path, fp32_tolerance=1e-12, **FAST))
    assert list(tmp_path.joinpath("resnet18").iterdir()) == []


def test_publish_refuses_a_taken_number_and_keeps_both_folders(tmp_path):
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.json").write_text("{}")
    staging = make_staging_dir(model_dir)
    (staging / "model.json").write_text("{}")
    with pytest.raises(PublishError):
        publish(staging, model_dir, 1)
    assert staging.exists() and (model_dir / "1" / "model.json").exists()


def test_next_version_skips_numbers_that_are_taken_even_without_manifest(tmp_path):
    assert next_version(tmp_path / "new") == 1
    (tmp_path / "m" / "7").mkdir(parents=True)
    (tmp_path / "m" / ".tmp-x").mkdir()
    assert next_version(tmp_path / "m") == 8
