"""``/openapi.json`` tells the truth: every answer a real server gives to a sample of good and bad requests, for
every operation, has its status documented for that operation, and its JSON body validates against the
documented schema. No 422 (invalid requests are 400), readable operation ids, a schema for every JSON answer."""

from __future__ import annotations

import base64
import re

import httpx
import jsonschema
import pytest

from tests.images import jpeg
from tests.service.server import running_server
from tests.service.test_v2 import binary_request, pixels

TOKEN = "openapi-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BODY = 1_000_000
EXPERIMENTS = """
experiments:
  - name: ab
    variants:
      - {name: a, model: resnet18, weight: 1}
      - {name: b, model: resnet18, version: 1, weight: 1}
"""


@pytest.fixture(scope="module")
def ready(exported_repo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("openapi")
    (folder / "experiments.yaml").write_text(EXPERIMENTS)
    with running_server(device="cpu", models_dir=exported_repo, warmup=False, max_body_bytes=MAX_BODY,
                        experiments_file=folder / "experiments.yaml", store_path=folder / "store.sqlite3",
                        admin_token=TOKEN) as (url, _):
        yield url


@pytest.fixture(scope="module")
def spec(ready) -> dict:
    return httpx.get(f"{ready}/openapi.json", timeout=30).json()


def _operations(spec: dict):
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            yield path, method, operation


def test_no_operation_documents_422_and_every_id_is_readable(spec):
    ids = []
    for path, method, operation in _operations(spec):
        assert "422" not in operation["responses"], (method, path)
        ids.append(operation["operationId"])
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", operation["operationId"]), operation["operationId"]
    assert len(ids) == len(set(ids)), ids
    assert not {"HTTPValidationError", "ValidationError"} & set(spec["components"]["schemas"])


NOT_JSON = {"metrics": "text/plain", "experiment_report_html": "text/html"}
READINESS_503 = {"health_ready", "v2_server_ready"}  # not ready: the readiness body, not an error


def test_every_json_operation_has_a_response_schema_and_every_error_is_the_error_body(spec):
    error_body = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    for path, method, operation in _operations(spec):
        name = operation["operationId"]
        ok = operation["responses"]["200"].get("content", {})
        assert ok.get(NOT_JSON.get(name, "application/json"), {}).get("schema"), (method, path, ok)
        for status, response in operation["responses"].items():
            if int(status) >= 400 and not (status == "503" and name in READINESS_503):
                assert response["content"] == error_body, (method, path, status)
            if status == "503":
                assert "Retry-After" in response["headers"], (method, path)


def _operation(spec: dict, method: str, url_path: str) -> tuple[str, dict]:
    """The documented operation a request reaches: a literal path beats a template (as the router declares)."""
    found = []
    for template, operations in spec["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, url_path) and method in operations:
            found.append((template.count("{"), template, operations[method]))
    assert found, f"{method.upper()} {url_path} is not documented"
    _, template, operation = min(found, key=lambda f: f[0])
    return template, operation


def _check(spec: dict, response: httpx.Response, seen: set) -> None:
    request = response.request
    method, path = request.method.lower(), request.url.path
    template, operation = _operation(spec, method, path)
    seen.add((method, template))
    status = str(response.status_code)
    what = f"{method.upper()} {path} -> {status}: {response.text[:300]}"
    assert status in operation["responses"], f"undocumented status: {what}"
    documented = operation["responses"][status]
    media_type = response.headers.get("content-type", "").split(";")[0].strip()
    content = documented.get("content", {})
    assert media_type in content, f"undocumented media type {media_type!r} (documented {list(content)}): {what}"
    if "headers" in documented:
        for header in documented["headers"]:
            assert header in response.headers, f"documented header {header} missing: {what}"
    if media_type == "application/json":
        schema = {"components": spec["components"], **content[media_type]["schema"]}  # $refs resolve in it
        try:
            jsonschema.validate(response.json(), schema, cls=jsonschema.Draft202012Validator)
        except jsonschema.ValidationError as exc:
            raise AssertionError(f"the body does not match the documented schema: {exc.message}: {what}") from None


def _v2_json(count: int = 1) -> dict:
    return {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [count],
                        "data": [base64.b64encode(jpeg(seed=s)).decode() for s in range(count)]}],
            "outputs": [{"name": "logits", "parameters": {"classification": 2}}]}


def test_every_answer_is_documented_for_its_operation(ready, spec, tmp_path):
    seen: set = set()
    image = jpeg()
    binary, binary_headers = binary_request(
        {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 224, 224, 3],
                     "parameters": {"binary_data_size": 224 * 224 * 3}}]}, pixels(1).tobytes())
    with httpx.Client(base_url=ready, timeout=60) as c:
        jpg = {"Content-Type": "image/jpeg"}
        answers = [
            c.get("/health/live"), c.get("/health/ready"), c.get("/metrics"),
            c.get("/models"), c.get("/models/resnet18"), c.get("/models/nope"),
            c.get("/v2"), c.get("/v2/health/live"), c.get("/v2/health/ready"),
            c.get("/v2/models/resnet18"), c.get("/v2/models/nope"),
            c.get("/v2/models/resnet18/versions/1"), c.get("/v2/models/resnet18/versions/01"),
            c.get("/v2/models/resnet18/ready"), c.get("/v2/models/resnet18/versions/1/ready"),
            c.get("/v2/models/nope/ready"), c.get("/v2/models/resnet18/versions/7/ready"),
            c.get("/v2/models/resnet18/config"), c.get("/v2/models/resnet18/versions/1/config"),
            c.get("/v2/models/nope/config"), c.get("/v2/models/resnet18/versions/2/config"),
            # classify: good (raw, multipart with file names, a version, an experiment) and bad
            c.post("/classify/resnet18?top_k=3", content=image, headers=jpg),
            c.post("/classify/resnet18", files=[("image", ("a.jpg", image, "image/jpeg")),
                                                ("image", ("b.jpg", jpeg(seed=2), "image/jpeg"))]),
            c.post("/classify/resnet18/versions/1", content=image, headers=jpg),
            c.post("/classify/resnet18?top_k=0", content=image, headers=jpg),
            c.post("/classify/resnet18?top_k=many", content=image, headers=jpg),
            c.post("/classify/resnet18", content=b"not an image", headers=jpg),
            c.post("/classify/resnet18", content=b"", headers=jpg),
            c.post("/classify/resnet18", content=b"hello", headers={"Content-Type": "text/plain"}),
            c.post("/classify/resnet18", content=b"\xff" * (MAX_BODY + 1), headers=jpg),
            c.post("/classify/nope", content=image, headers=jpg),
            c.post("/classify/resnet18/versions/9", content=image, headers=jpg),
            # v2 inference: JSON and binary, good and bad
            c.post("/v2/models/resnet18/infer", json=_v2_json(2)),
            c.post("/v2/models/resnet18/infer", content=binary, headers=binary_headers),
            c.post("/v2/models/resnet18/versions/1/infer", json=_v2_json()),
            c.post("/v2/models/resnet18/infer", json={"inputs": []}),
            c.post("/v2/models/resnet18/infer", content=b"{not json"),
            c.post("/v2/models/resnet18/infer", json=_v2_json(), headers={"Content-Encoding": "gzip"}),
            c.post("/v2/models/resnet18/infer", content=b"0" * (MAX_BODY + 1)),
            c.post("/v2/models/nope/infer", json=_v2_json()),
            c.post("/v2/models/resnet18/versions/3/infer", json=_v2_json()),
            # statistics, after the inferences
            c.get("/v2/models/stats"), c.get("/v2/models/resnet18/stats"),
            c.get("/v2/models/resnet18/versions/1/stats"), c.get("/v2/models/nope/stats"),
            c.get("/v2/models/resnet18/versions/4/stats"),
        ]
        routed = c.post("/classify/ab", content=image, headers=jpg)
        assert routed.status_code == 200 and routed.json()["experiment"] == "ab"
        request_id = routed.json()["request_id"]
        answers += [
            routed,
            c.get("/experiments"), c.get("/experiments/ab"), c.get("/experiments/nope"),
            c.post("/experiments/reload"), c.post("/experiments/reload", headers={"Authorization": "Bearer no"}),
            c.post("/experiments/reload", headers=AUTH),
            c.post("/feedback", json={"request_id": request_id, "label": 1}),
            c.post("/feedback", json={"request_id": request_id, "label": 2}),  # another label: 409
            c.post("/feedback", json={"request_id": "unknown", "label": 1}),
            c.post("/feedback", json={"label": 1}),
            c.post("/feedback", content=b"{oops", headers={"Content-Type": "application/json"}),
            c.get("/experiments/ab/report"), c.get("/experiments/nope/report"),
            c.get("/experiments/ab/report.html"), c.get("/experiments/nope/report.html"),
            c.post("/v2/repository/index"), c.post("/v2/repository/index", headers=AUTH),
            c.post("/v2/repository/index", headers={"Authorization": "Bearer no"}),
            c.post("/v2/repository/models/resnet18/load", headers=AUTH),
            c.post("/v2/repository/models/resnet18/load"),
            c.post("/v2/repository/models/nope/load", headers=AUTH),
            c.post("/v2/repository/models/NOPE/load", headers=AUTH),
            c.post("/v2/repository/models/nope/unload", headers=AUTH),
            c.post("/v2/repository/models/NOPE/unload", headers=AUTH),
            c.post("/v2/repository/models/resnet18/unload"),
            c.post("/v2/repository/models/resnet18/unload", headers=AUTH),  # last: nothing is served after it
        ]
    for response in answers:
        _check(spec, response, seen)
    codes = {(r.request.url.path, r.status_code) for r in answers}
    assert {("/classify/resnet18", 413), ("/classify/resnet18", 415), ("/feedback", 409),
            ("/v2/repository/models/resnet18/unload", 200), ("/experiments/reload", 401)} <= codes, codes

    # A server that never gets ready (no models): 503 with Retry-After, and 403 for admin without a token.
    with running_server(wait_ready=False, models_dir=tmp_path, warmup=False) as (url, _):
        with httpx.Client(base_url=url, timeout=60) as c:
            down = [
                c.get("/health/ready"), c.get("/v2/health/ready"), c.get("/models/resnet18"),
                c.get("/v2/models/resnet18"), c.get("/v2/models/resnet18/config"), c.get("/v2/models/resnet18/stats"),
                c.post("/classify/resnet18", content=jpeg(), headers={"Content-Type": "image/jpeg"}),
                c.post("/v2/models/resnet18/infer", json=_v2_json()),
                c.post("/experiments/reload", headers=AUTH), c.post("/v2/repository/models/resnet18/load"),
            ]
    for response in down:
        assert response.status_code in (503, 403), response.text
        _check(spec, response, seen)

    every = {(method, path) for path, method, _ in _operations(spec)}
    assert every - seen == set(), f"operations no sample request reached: {sorted(every - seen)}"
