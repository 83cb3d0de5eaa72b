"""``python -m export`` as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from export.models import list_models
from modelrepo import load_manifest


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "export", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def test_list_prints_every_model_with_its_size():
    proc = run_cli("--list")
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line.split() for line in proc.stdout.splitlines()[1:-1]}
    assert set(lines) == set(list_models())
    assert lines["inception_v3"][2:4] == ["299", "342"]
    assert float(lines["resnet50"][5]) == 25.56 and float(lines["resnet50"][6]) == 4.09


def test_unknown_model_exits_2_and_lists_the_valid_names(tmp_path):
    proc = run_cli("--models", "resnet51", "--out", str(tmp_path))
    assert proc.returncode == 2
    assert "unknown model 'resnet51'" in proc.stderr and "resnet50" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_malformed_weights_option_is_explained(tmp_path):
    proc = run_cli("--models", "resnet18", "--weights", "resnet18.pth", "--out", str(tmp_path))
    assert proc.returncode != 0 and "NAME=PATH" in proc.stderr


def test_export_with_labels_reports_progress_and_a_summary(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    proc = run_cli("--models", "resnet18", "--precision", "fp32", "--labels", str(labels), "--out", str(tmp_path / "m"))
    assert proc.returncode == 0, proc.stderr
    assert "resnet18: export fp32 done" in proc.stderr and "resnet18: parity done" in proc.stderr
    assert "ok     resnet18 v1" in proc.stdout and "random-init" in proc.stdout
    manifest = load_manifest(tmp_path / "m" / "resnet18" / "1")
    assert manifest.labels == ["cat", "dog", "bird"] and manifest.output.num_classes == 3
    assert list(manifest.files) == ["fp32"]

    again = run_cli("--models", "resnet18", "--precision", "fp32", "--version", "1", "--out", str(tmp_path / "m"))
    assert again.returncode == 1 and "FAILED resnet18" in again.stdout and "already exists" in again.stdout


def test_labels_and_num_classes_must_agree(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    proc = run_cli("--models", "resnet18", "--labels", str(labels), "--num-classes", "5", "--out", str(tmp_path / "m"))
    assert proc.returncode == 1 and "--labels has 2 names but --num-classes is 5" in proc.stdout
