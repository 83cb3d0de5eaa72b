"""Per-image CPU cost of decoding a JPEG to the model's input, by how the centre crop is resized.

``service``  ``service.images.preprocess.decode_image``, as the server runs it.
``box``      the same decode, then ``export.preprocess.resized_centre_crop``: ``Image.resize((crop, crop),
             box=...)``, only the source box the crop maps back to resampled, straight to the crop size.
``full``     the same decode, then the whole image resized (shorter side to ``resize``) and centre-cropped, as
             torchvision's ``Resize`` + ``CenterCrop`` do.

Each case times the three in turn, rotating which goes first, so drift over seconds falls on all alike; the
figure is the median of the per-image thread CPU time (``time.thread_time``: the core-ms one decode costs,
whatever else shares the machine). ``resize`` columns time the resize step alone, on the decoded image.
``max |box - full|`` is the largest difference of one 8-bit sample between the two. The JPEGs are
``bench.images``' photo-like ones, quality 90.

    python -m bench.resize [--repeats 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import time

import numpy as np
from PIL import Image, ImageOps

from export.preprocess import RESAMPLE, centre_crop_box, resized_centre_crop, resized_size
from service.images.preprocess import PreprocessSpec, decode_image
from bench.images import make_jpegs

SIZES = [(500, 375), (300, 1000), (4032, 3024)]
SPECS = [(256, 224, "bilinear"), (342, 299, "bilinear"), (256, 224, "bicubic")]


def decoded(data: bytes, spec: PreprocessSpec) -> Image.Image:
    """The service's decode up to the resize: draft scaling for ``spec``, orientation, RGB."""
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG":
        img.draft("RGB", resized_size(*img.size, spec.resize))
    ImageOps.exif_transpose(img, in_place=True)
    return img if img.mode == "RGB" else img.convert("RGB")


def full(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    size = resized_size(*img.size, spec.resize)
    return np.asarray(img.resize(size, RESAMPLE[spec.interpolation]).crop(centre_crop_box(*size, spec.crop)))


def box(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    return np.asarray(resized_centre_crop(img, spec.resize, spec.crop, RESAMPLE[spec.interpolation]))


def cost(fn, *args) -> float:
    start = time.thread_time()
    fn(*args)
    return (time.thread_time() - start) * 1e3


def measure(data: bytes, spec: PreprocessSpec, repeats: int) -> dict:
    ways = {
        "service": lambda: decode_image(data, spec),
        "box": lambda: box(decoded(data, spec), spec),
        "full": lambda: full(decoded(data, spec), spec),
    }
    img = decoded(data, spec)
    img.load()
    steps = {"resize_box": lambda: box(img, spec), "resize_full": lambda: full(img, spec)}
    every = {**ways, **steps}
    samples: dict[str, list[float]] = {name: [] for name in every}
    names = list(every)
    for fn in every.values():
        fn()  # warm
    for i in range(repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            samples[name].append(cost(every[name]))
    row = {name: round(statistics.median(values), 3) for name, values in samples.items()}
    difference = np.abs(ways["box"]().astype(np.int16) - ways["full"]().astype(np.int16))
    row["max_abs_box_full"] = int(difference.max())
    row["differing_samples"] = round(float((difference > 0).mean()), 4)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed decodes per way and case (4032x3024: a fifth)")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'image':>10} {'spec':>17} | {'service':>8} {'box':>8} {'full':>8} | {'resize box':>10} "
          f"{'resize full':>11} | {'max |box-full|':>14}   (median thread-CPU ms per image)")
    for width, height in SIZES:
        data = make_jpegs(1, width, height, seed=width + height)[0]
        repeats = args.repeats if width * height < 2_000_000 else max(args.repeats // 5, 10)
        for resize, crop, interpolation in SPECS:
            spec = PreprocessSpec(resize, crop, interpolation, max_pixels=50_000_000)
            row = {"image": f"{width}x{height}", "spec": f"{resize}/{crop} {interpolation}", "repeats": repeats,
                   **measure(data, spec, repeats)}
            rows.append(row)
            print(f"{row['image']:>10} {row['spec']:>17} | {row['service']:8.3f} {row['box']:8.3f} "
                  f"{row['full']:8.3f} | {row['resize_box']:10.3f} {row['resize_full']:11.3f} | "
                  f"{row['max_abs_box_full']:14d}", flush=True)
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"pillow": Image.__version__, "python": platform.python_version(), "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
