"""The requests a load run sends, built once: JPEGs to ``/classify`` (raw or multipart), or v2 binary tensors.

Each :class:`Workload` also knows how to check the first answer, so a load run
against the wrong endpoint fails before it starts instead of counting errors.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from .http_client import ProtocolError, Target, build_request, http_get
from .images import make_jpegs, random_pixels

PROTOCOLS = ("classify", "v2")
V2_HEADER_LENGTH = "Inference-Header-Content-Length"  # Triton's binary tensor data extension
MULTIPART_FIELD = "image"  # /classify takes any file field; its documentation names this one


@dataclass(frozen=True)
class Workload:
    """What the requests carry: prebuilt request bytes (cycled), and how to check the first answer."""

    protocol: str
    path: str
    payloads: list[bytes]
    images_per_request: int
    size: str  # "WxH" of each image sent: the JPEGs', or the v2 tensor's (the model's crop size)
    distinct_images: int
    check: Callable[[bytes], None]  # raises ProtocolError when the body is not the expected answer


def _groups(count: int, batch: int) -> list[list[int]]:
    """``batch`` indices per request, cycling ``count`` distinct items; as many requests as there are different ones."""
    return [[(j * batch + i) % count for i in range(batch)] for j in range(count // math.gcd(count, batch))]


def _image_size(data: bytes) -> str:
    try:
        width, height = Image.open(io.BytesIO(data)).size  # the header only
    except Exception:
        return "?"
    return f"{width}x{height}"


def _multipart(parts: list[tuple[str, bytes]], boundary: str) -> bytes:
    out = []
    for filename, data in parts:
        out.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{MULTIPART_FIELD}"; filename="{filename}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n".encode("latin-1") + data + b"\r\n"
        )
    out.append(f"--{boundary}--\r\n".encode("latin-1"))
    return b"".join(out)


def _boundary(images: list[bytes]) -> str:
    for n in range(1000):
        boundary = f"archserve-bench-boundary-{n:03d}"
        if not any(boundary.encode() in data for data in images):
            return boundary
    raise ValueError("no multipart boundary found that the images do not contain")


def classify_workload(
    target: Target, model: str, images: list[bytes], batch: int = 1, top_k: int | None = None
) -> Workload:
    """``POST /classify/{model}``: one JPEG as the raw body, or ``batch`` > 1 of them as multipart/form-data."""
    if not images:
        raise ValueError("no images to send")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    path = f"/classify/{model}" + (f"?top_k={top_k}" if top_k else "")
    if batch == 1:
        payloads = [build_request("POST", path, target, body, "image/jpeg") for body in images]
    else:
        boundary = _boundary(images)
        content_type = f"multipart/form-data; boundary={boundary}"
        payloads = [
            build_request("POST", path, target, _multipart([(f"img{k}.jpg", images[k]) for k in group], boundary),
                          content_type)
            for group in _groups(len(images), batch)
        ]

    def check(body: bytes) -> None:
        doc = _json(body)
        if not (isinstance(doc, dict) and (doc.get("results") or doc.get("predictions"))):
            raise ProtocolError(f"unexpected response body {body[:200]!r}")
        if batch > 1 and len(doc.get("results") or []) != batch:
            raise ProtocolError(f"{batch} images sent but {len(doc.get('results') or [])} results: {body[:200]!r}")

    return Workload("classify", path, payloads, batch, _image_size(images[0]), len(images), check)


def _json(body: bytes):
    try:
        return json.loads(body)
    except ValueError:
        raise ProtocolError(f"the response is not JSON: {body[:200]!r}") from None


def _error_text(body: bytes) -> str:
    try:
        doc = json.loads(body)
    except ValueError:
        return repr(body[:300])
    if isinstance(doc, dict) and isinstance(doc.get("error") or doc.get("detail"), str):
        return doc.get("error") or doc.get("detail")
    return repr(body[:300])


async def v2_model_io(target: Target, model: str, timeout: float = 10.0) -> dict:
    """The model's input name, crop size and output name, from ``GET /v2`` and ``GET /v2/models/{model}``.

    Raises RuntimeError, saying what is missing, when the server does not speak the Open
    Inference Protocol with the binary tensor data and classification extensions, or does not
    serve ``model`` with one UINT8 ``[N, H, W, 3]`` input.
    """
    status, body = await http_get(target, "/v2", timeout)
    if status != 200:
        raise RuntimeError(
            f"the server at {target.authority} has no Open Inference Protocol (KServe v2) endpoint: GET /v2 "
            f"answered {status}; use --protocol classify"
        )
    server = _json(body)
    extensions = server.get("extensions") if isinstance(server, dict) else None
    if isinstance(extensions, list):
        missing = [e for e in ("binary_tensor_data", "classification") if e not in extensions]
        if missing:
            raise RuntimeError(
                f"the server's v2 endpoint lacks the {' and '.join(missing)} extension(s) --protocol v2 uses "
                f"(it lists {extensions})"
            )
    path = f"/v2/models/{model}"
    status, body = await http_get(target, path, timeout)
    if status != 200:
        raise RuntimeError(f"GET {path} answered {status}: {_error_text(body)}")
    doc = _json(body)
    inputs = doc.get("inputs") if isinstance(doc, dict) else None
    outputs = doc.get("outputs") if isinstance(doc, dict) else None
    if not (isinstance(inputs, list) and len(inputs) == 1 and isinstance(outputs, list) and outputs):
        raise RuntimeError(f"GET {path}: expected one input and an output in the metadata, got {body[:300]!r}")
    shape, datatype = inputs[0].get("shape"), inputs[0].get("datatype")
    if not (datatype == "UINT8" and isinstance(shape, list) and len(shape) == 4 and shape[3] == 3
            and all(isinstance(d, int) and d > 0 for d in shape[1:3])):
        raise RuntimeError(
            f"model {model!r} takes {datatype} {shape}; --protocol v2 sends UINT8 pixels [B, H, W, 3]"
        )
    return {"input": inputs[0]["name"], "height": shape[1], "width": shape[2], "output": outputs[0]["name"],
            "batch_dim": shape[0]}


def v2_workload(
    target: Target, model: str, io_: dict, batch: int = 1, distinct: int = 8, top_k: int | None = None
) -> Workload:
    """``POST /v2/models/{model}/infer``: a UINT8 ``[batch, H, W, 3]`` tensor as binary data, top-k back as JSON.

    ``io_`` is :func:`v2_model_io`'s answer. The classification extension answers
    ``[batch, k]`` strings ``"<logit>:<index>:<label>"`` in the response JSON
    (not binary: the request asks for no binary output).
    """
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if distinct < 1:
        raise ValueError(f"distinct must be >= 1, got {distinct}")
    fixed = io_.get("batch_dim", -1)
    if isinstance(fixed, int) and fixed > 0 and fixed != batch:
        raise RuntimeError(f"model {model!r} takes batches of exactly {fixed}; pass --batch {fixed}")
    k = top_k or 5
    height, width = io_["height"], io_["width"]
    arrays = random_pixels(distinct, height, width)
    path = f"/v2/models/{model}/infer"
    payloads = []
    for group in _groups(distinct, batch):
        tensor = b"".join(arrays[i].tobytes() for i in group)
        header = json.dumps({
            "inputs": [{"name": io_["input"], "shape": [batch, height, width, 3], "datatype": "UINT8",
                        "parameters": {"binary_data_size": len(tensor)}}],
            "outputs": [{"name": io_["output"], "parameters": {"classification": k}}],
        }, separators=(",", ":")).encode()
        payloads.append(build_request("POST", path, target, header + tensor, "application/octet-stream",
                                      {V2_HEADER_LENGTH: str(len(header))}))

    def check(body: bytes) -> None:
        doc = _json(body)
        outs = doc.get("outputs") if isinstance(doc, dict) else None
        out = outs[0] if isinstance(outs, list) and len(outs) == 1 and isinstance(outs[0], dict) else {}
        data = out.get("data")
        if not (out.get("datatype") == "BYTES" and out.get("shape") == [batch, k] and isinstance(data, list)
                and len(data) == batch * k):
            raise ProtocolError(f"expected {batch}x{k} classification strings, got {body[:300]!r}")

    return Workload("v2", path, payloads, batch, f"{width}x{height}", distinct, check)


async def make_workload(
    target: Target, model: str, protocol: str = "classify", batch: int = 1, images: list[bytes] | None = None,
    distinct: int | None = None, top_k: int | None = None, timeout: float = 10.0,
) -> Workload:
    """The requests to send. classify: ``images`` (default: 8 photo-like 500x375 JPEGs); v2: ``distinct``
    random arrays at the model's crop size (default: as many as ``images``, else 8), from its metadata."""
    if protocol == "classify":
        return classify_workload(target, model, images or make_jpegs(distinct or 8), batch, top_k)
    if protocol == "v2":
        io_ = await v2_model_io(target, model, min(timeout, 10.0))
        return v2_workload(target, model, io_, batch, distinct or (len(images) if images else 8), top_k)
    raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")


def check_first(workload: Workload, status: int | str, body: bytes) -> None:
    """The first request, before any load: the endpoint must answer what we expect."""
    if status != 200:
        raise RuntimeError(f"POST {workload.path} answered {status}: {_error_text(body) if body else ''}")
    try:
        workload.check(body)
    except ProtocolError as exc:
        raise RuntimeError(f"POST {workload.path}: {exc}") from None
