"""What the v2 client tests (REST and gRPC) compare the server with: resnet18 v1 run directly in onnxruntime,
on images preprocessed by the export stage's reference. Fixtures: import them into a test module."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest

from export.preprocess import reference_preprocess
from modelrepo import load_manifest
from tests.images import jpeg


@pytest.fixture(scope="module")
def session(exported_repo):
    path = exported_repo / "resnet18" / "1" / "model.onnx"
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def manifest(exported_repo):
    return load_manifest(exported_repo / "resnet18" / "1")


@pytest.fixture(scope="module")
def images():
    return [jpeg(seed=s) for s in range(2)]


@pytest.fixture(scope="module")
def preprocessed(manifest, images):
    p = manifest.preprocessing
    return np.stack([reference_preprocess(io.BytesIO(d), p.resize, p.crop, p.interpolation) for d in images])
