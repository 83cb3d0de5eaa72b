"""The obvious alternative a user would write: FastAPI + onnxruntime, one image per inference call.

One onnxruntime session on the same ``model.onnx`` (fp32, CPU provider; the
fp16 file on CUDA when onnxruntime's CUDA provider is available), created with
onnxruntime's defaults. Each request body is decoded with Pillow (RGB, shorter
side resized to the manifest's size with its filter, centre crop), run on its
own (batch of one, no queue, no batching), and answered with the top-5 classes.
The decode + inference runs in Starlette's thread pool, so the event loop stays
free and several requests run at once, as a competent user would write it.

    python -m bench.naive_server --models-dir bench/models --model resnet50 --port 8001
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image

RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
            "bicubic": Image.Resampling.BICUBIC}


def latest_version(model_dir: Path) -> Path:
    versions = sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / "model.json").is_file())
    if not versions:
        raise SystemExit(f"error: no versions of {model_dir.name} in {model_dir.parent}/")
    return model_dir / str(versions[-1])


def create_app(version_dir: Path) -> FastAPI:
    manifest = json.loads((version_dir / "model.json").read_text())
    name = manifest["name"]
    pre = manifest["preprocessing"]
    resize, crop, resample = pre["resize"], pre["crop"], RESAMPLE[pre["interpolation"]]
    labels = manifest["labels"]
    use_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and "fp16" in manifest["files"]
    model_file = manifest["files"]["fp16" if use_cuda else "fp32"]["path"]
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(version_dir / model_file), providers=providers)
    if use_cuda and session.get_providers()[0] != "CUDAExecutionProvider":  # no GPU after all: the fp32 file
        session = ort.InferenceSession(str(version_dir / manifest["files"]["fp32"]["path"]),
                                       providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    session.run(None, {input_name: np.zeros((1, crop, crop, 3), np.uint8)})  # warm-up

    def preprocess(data: bytes) -> np.ndarray:
        img = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = img.size
        scale = resize / min(w, h)
        img = img.resize((max(resize, round(w * scale)), max(resize, round(h * scale))), resample)
        w, h = img.size
        left, top = (w - crop) // 2, (h - crop) // 2
        img = img.crop((left, top, left + crop, top + crop))
        return np.asarray(img, dtype=np.uint8)[None]

    def classify(data: bytes) -> dict:
        try:
            x = preprocess(data)
        except Exception as exc:
            raise HTTPException(400, f"cannot decode the image: {exc}") from exc
        logits = session.run(None, {input_name: x})[0][0].astype(np.float64)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs)[:5]
        return {"model": name, "predictions": [
            {"label": labels[i], "index": int(i), "score": float(probs[i])} for i in top]}

    app = FastAPI(title=f"naive {name}")

    @app.post(f"/classify/{name}")
    async def classify_endpoint(request: Request) -> dict:
        body = await request.body()
        return await run_in_threadpool(classify, body)

    @app.get("/health/ready")
    def ready() -> dict:
        return {"ready": True}

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--models-dir", type=Path, default=Path("bench/models"))
    p.add_argument("--model", default="resnet50")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    app = create_app(latest_version(args.models_dir / args.model))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
