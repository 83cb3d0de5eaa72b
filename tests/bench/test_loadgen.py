"""python -m bench.loadgen (and bench.load's loops) against a real archserve server (uvicorn, a real exported resnet18): every protocol and batch mode.

Each load run is short (0.5 s warm-up, 1.5 s measured, 2 clients); the server's
own /metrics, read independently of the load generator, must account for at
least every image the load generator counted as answered.
"""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench import loadgen
from bench.http_client import run_async
from bench.load import closed_loop, open_loop
from tests.images import jpeg
from tests.service.server import free_port, running_server, serving

MODEL = "resnet18"
LOAD = ["--warmup", "0.5", "--duration", "1.5", "--concurrency", "2", "--timeout", "20"]


@pytest.fixture(scope="module")
def server(exported_repo):
    with running_server(models_dir=exported_repo, warmup=False) as (url, _app):
        yield url


def server_counts(url: str) -> dict[str, float]:
    """Images answered, 200 responses and decoded images for MODEL, from the server's /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    counts = {"images": 0.0, "ok_requests": 0.0, "decoded": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model") != MODEL:
                continue
            if sample.name == "archserve_images_total":
                counts["images"] += sample.value
            elif sample.name == "archserve_requests_total" and sample.labels.get("code") == "200":
                counts["ok_requests"] += sample.value
            elif sample.name == "archserve_preprocess_duration_seconds_count":
                counts["decoded"] += sample.value
    return counts


def run_main(args: list[str], tmp_path, capsys) -> tuple[dict, str]:
    out = tmp_path / "report.json"
    assert loadgen.main([*args, "--json", str(out)]) == 0, capsys.readouterr().err
    return json.loads(out.read_text()), capsys.readouterr().out


@pytest.mark.parametrize("protocol, batch, size, expected_size", [
    ("classify", 1, None, "500x375"),  # the defaults: one 500x375 JPEG as the raw body
    ("classify", 1, "1024x768", "1024x768"),
    ("classify", 3, None, "500x375"),  # three JPEGs per request, multipart/form-data
    ("v2", 4, None, "224x224"),  # a UINT8 [4, 224, 224, 3] tensor, binary tensor data
])
def test_load_counts_every_image(server, tmp_path, capsys, protocol, batch, size, expected_size):
    before = server_counts(server)
    args = ["--url", server, "--model", MODEL, *LOAD, "--protocol", protocol, "--batch", str(batch)]
    report, printed = run_main(args + (["--size", size] if size else []), tmp_path, capsys)
    after = server_counts(server)

    assert report["errors"] == {}
    assert report["requests"] > 0 and report["ok"] == report["requests"]
    assert (report["protocol"], report["size"], report["batch"]) == (protocol, expected_size, batch)
    assert report["images_per_request"] == batch
    assert report["images_ok"] == report["ok"] * batch
    assert report["throughput_img_s"] == pytest.approx(report["ok"] * batch / 1.5, abs=1e-3)
    assert report["throughput_req_s"] == pytest.approx(report["ok"] / 1.5, abs=1e-3)
    assert f"protocol {protocol}: {batch} image(s) per request, {expected_size}" in printed

    # The server saw at least what the client counted (plus the check request and the warm-up).
    assert after["images"] - before["images"] >= report["images_ok"] + batch
    assert after["ok_requests"] - before["ok_requests"] >= report["ok"] + 1
    decoded = after["decoded"] - before["decoded"]
    if protocol == "v2":
        assert decoded == 0  # pixels straight to the batcher: nothing decoded
    else:
        assert decoded >= report["images_ok"]
    assert report["server"]["images_batched"] > 0  # the load generator's own /metrics deltas
    assert report["server"]["requests_by_code"].get("200", 0) >= 1
    assert 0 <= report["server"]["alone_batches"] <= report["server"]["batches"]


def test_open_loop_counts_images(server):
    report = run_async(open_loop(
        server, MODEL, rate=8, duration=1.0, warmup=0.3, protocol="v2", batch=2, distinct=3,
    ))
    assert report["errors"] == {} and report["ok"] == report["requests"] > 0
    assert report["throughput_img_s"] == pytest.approx(2 * report["throughput_req_s"], abs=1e-3)
    assert (report["protocol"], report["batch"], report["distinct_images"]) == ("v2", 2, 3)


# ------------------------------------------------------------------------------------------ errors


def test_v2_unknown_model_is_a_clear_error(server, capsys):
    assert loadgen.main(["--url", server, "--model", "no-such-model", "--protocol", "v2", "--duration", "1"]) == 1
    err = capsys.readouterr().err
    assert "GET /v2/models/no-such-model answered 404" in err and "not served" in err and MODEL in err
    with pytest.raises(RuntimeError, match="no-such-model"):
        run_async(closed_loop(server, "no-such-model", 1, 1.0, warmup=0, protocol="v2"))


def test_v2_against_a_server_without_the_protocol(exported_repo, capsys):
    from bench.naive_server import create_app, latest_version

    with serving(create_app(latest_version(exported_repo / MODEL)), free_port(), timeout=60) as url:
        assert loadgen.main(["--url", url, "--model", MODEL, "--protocol", "v2", "--duration", "1"]) == 1
        err = capsys.readouterr().err
        assert "no Open Inference Protocol (KServe v2) endpoint" in err and "--protocol classify" in err
        # The classify protocol still works against it (no /metrics there: no server figures).
        report = run_async(closed_loop(url, MODEL, 1, 2.0, warmup=0.0, images=[jpeg()]))
        assert report["ok"] > 0 and report["server"] is None and report["throughput_req_s"] > 0


@pytest.mark.parametrize("text", ["500", "10x", "x10", "axb", "0x10", "10x0", "-5x5", "70000x10", "10000x10000"])
def test_bad_size_is_refused(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        loadgen.main(["--size", text])
    assert exit_info.value.code == 2
    assert "--size" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--protocol", "v2", "--size", "640x480"], "--size is for --protocol classify"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--images", "0"], "--images must be >= 1"),
])
def test_inconsistent_arguments_are_refused(args, message, capsys):
    assert loadgen.main(args) == 2
    assert message in capsys.readouterr().err


def test_protocol_must_be_known():
    with pytest.raises(SystemExit):
        loadgen.build_parser().parse_args(["--protocol", "grpc"])
