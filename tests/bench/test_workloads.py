"""bench.workloads: request bytes built once per distinct request, for /classify and for v2."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.http_client import ProtocolError, Target
from bench.workloads import classify_workload, make_workload, v2_workload
from tests.images import jpeg

MODEL = "resnet18"
TARGET = Target("127.0.0.1", 1)


def test_payloads_are_built_once_per_distinct_request():
    images = [jpeg(64, 48, seed=i) for i in range(4)]
    assert len(classify_workload(TARGET, MODEL, images).payloads) == 4
    multipart = classify_workload(TARGET, MODEL, images, batch=2)
    assert len(multipart.payloads) == 2 and multipart.images_per_request == 2
    assert multipart.payloads[0].count(b'name="image"') == 2
    io_ = {"input": "image", "height": 8, "width": 8, "output": "logits"}
    v2 = v2_workload(TARGET, MODEL, io_, batch=4, distinct=4)
    assert len(v2.payloads) == 1
    head, body = v2.payloads[0].split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"inference-header-content-length")))
    header = json.loads(body[:length])
    assert header["inputs"][0]["shape"] == [4, 8, 8, 3]
    assert header["inputs"][0]["parameters"]["binary_data_size"] == len(body) - length == 4 * 8 * 8 * 3
    assert header["outputs"] == [{"name": "logits", "parameters": {"classification": 5}}]
    assert b"Content-Type: application/octet-stream" in head


def test_the_first_answer_is_checked_against_what_was_sent():
    images = [jpeg(64, 48, seed=i) for i in range(3)]
    multipart = classify_workload(TARGET, MODEL, images, batch=3)
    multipart.check(json.dumps({"results": [{}, {}, {}]}).encode())
    with pytest.raises(ProtocolError, match="3 images sent but 1 results"):
        multipart.check(json.dumps({"results": [{}]}).encode())
    with pytest.raises(ProtocolError, match="not JSON"):
        classify_workload(TARGET, MODEL, images).check(b"<html>")


def test_protocol_must_be_known():
    with pytest.raises(ValueError, match="protocol must be one of"):
        asyncio.run(make_workload(TARGET, MODEL, "grpc"))
