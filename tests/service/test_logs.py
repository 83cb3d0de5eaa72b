"""Logs a platform can read: one format for uvicorn's lines and ours, JSON on request, the request id in every
line about a request, and a log level checked like every other setting."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import httpx
import pytest

from service.logs import CURRENT, JsonFormatter, RequestFilter, RequestLog, TextFormatter
from tests.images import jpeg
from tests.service.server import service_tree, wait_until


def _lines_about(log_path, request_id: str) -> list[str]:
    return [line for line in log_path.read_text().splitlines() if request_id in line]


def test_json_logs_every_line_one_object_with_the_request_id_model_and_status(exported_repo, tmp_path):
    with service_tree(exported_repo, tmp_path, "--models", "resnet18", "--log-format", "json",
                      "--log-level", "info") as (proc, url, log_path):
        wait_until(url, "/health/ready")
        given = httpx.post(f"{url}/classify/resnet18", content=jpeg(64, 48), timeout=60,
                           headers={"X-Request-ID": "trace-abc.1"})
        ours = httpx.post(f"{url}/classify/resnet18", content=jpeg(64, 48), timeout=60)
        missing = httpx.post(f"{url}/classify/nope", content=b"x", timeout=60)
        health = httpx.get(f"{url}/health/live", timeout=60)
    assert (given.status_code, ours.status_code, missing.status_code) == (200, 200, 404)
    assert given.headers["x-request-id"] == "trace-abc.1"
    ours_id = ours.headers["x-request-id"]
    lines = log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line, uvicorn's startup and shutdown too
    assert {"time", "level", "logger", "message"} <= set(records[0])
    assert any(r["logger"].startswith("uvicorn") for r in records)  # uvicorn's own lines, in our format

    def access(request_id):
        found = [r for r in records if r["logger"] == "archserve.access" and r.get("request_id") == request_id]
        assert len(found) == 1, (request_id, found)
        return found[0]

    for request_id in ("trace-abc.1", ours_id):
        line = access(request_id)
        assert (line["model"], line["version"], line["status"]) == ("resnet18", "1", 200)
        assert 0 < line["duration_ms"] < 60_000
    assert access(missing.headers["x-request-id"])["status"] == 404
    health_line = access(health.headers["x-request-id"])  # every request has an id, not only inference
    assert health_line["status"] == 200 and "model" not in health_line


def test_a_grpc_call_has_its_access_line_and_request_id_too(exported_repo, tmp_path):
    import numpy as np
    import tritonclient.grpc as grpcclient

    from tests.service.server import free_port

    grpc_port = free_port()
    with service_tree(exported_repo, tmp_path, "--models", "resnet18", "--log-format", "json", "--log-level", "info",
                      "--grpc-port", str(grpc_port)) as (_, url, log_path):
        wait_until(url, "/health/ready")
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        image = grpcclient.InferInput("image", [1], "BYTES")
        image.set_data_from_numpy(np.array([jpeg(64, 48)], dtype=object))
        result = client.infer("resnet18", [image], headers={"x-request-id": "grpc-7"})
        assert result.as_numpy("logits").shape == (1, 1000)
        with pytest.raises(grpcclient.InferenceServerException):
            client.infer("nope", [image], headers={"x-request-id": "grpc-8"})
        client.close()
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    lines = {r["request_id"]: r for r in records if r["logger"] == "archserve.access" and "request_id" in r}
    assert "gRPC ModelInfer" in lines["grpc-7"]["message"] and " OK " in lines["grpc-7"]["message"]
    assert (lines["grpc-7"]["model"], lines["grpc-7"]["version"], lines["grpc-7"]["status"]) == ("resnet18", "1", 200)
    assert lines["grpc-8"]["status"] == 404 and "NOT_FOUND" in lines["grpc-8"]["message"]


def test_text_logs_put_the_request_id_on_the_access_line(exported_repo, tmp_path):
    with service_tree(exported_repo, tmp_path, "--models", "resnet18", "--log-level", "info") as (_, url, log_path):
        wait_until(url, "/health/ready")
        assert httpx.post(f"{url}/classify/resnet18", content=jpeg(64, 48), timeout=60,
                          headers={"X-Request-ID": "text-1"}).status_code == 200
    (line,) = _lines_about(log_path, "text-1")
    assert "archserve.access" in line and '"POST /classify/resnet18" 200' in line
    assert line.endswith("[request_id=text-1 model=resnet18 version=1]")


def test_a_bad_log_level_or_format_is_refused_like_any_setting():
    for args in (["--log-level", "foo"], ["--log-format", "xml"]):
        done = subprocess.run([sys.executable, "-m", "service", *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "invalid configuration" in done.stderr and args[0][2:].replace("-", "_") in done.stderr
        assert "Traceback" not in done.stderr


def _record(message="m", exc_info=None) -> logging.LogRecord:
    return logging.LogRecord("archserve", logging.ERROR, __file__, 1, message, (), exc_info)


def test_a_record_logged_during_a_request_carries_its_context_and_a_traceback_stays_one_json_line():
    token = CURRENT.set(RequestLog("r-1", True, "resnet50", "3"))
    try:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            record = _record("failed", sys.exc_info())
        assert RequestFilter().filter(record)
    finally:
        CURRENT.reset(token)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    parsed = json.loads(line)
    assert (parsed["request_id"], parsed["model"], parsed["version"]) == ("r-1", "resnet50", "3")
    assert "ValueError: boom" in parsed["exception"] and parsed["level"] == "error"
    text = TextFormatter().format(record)
    assert text.splitlines()[0].endswith("failed [request_id=r-1 model=resnet50 version=3]")
    assert "Traceback" in text


def test_outside_a_request_no_request_fields_are_made_up():
    record = _record()
    RequestFilter().filter(record)
    assert "request_id" not in json.loads(JsonFormatter().format(record))
    assert "request_id" not in TextFormatter().format(record)


@pytest.mark.parametrize("value", ["INFO", "Debug"])
def test_the_log_level_is_case_insensitive(value):
    from service.settings import Settings

    assert Settings(log_level=value).log_level == value.lower()
