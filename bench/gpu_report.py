"""The GPU run's verdict: its targets against what was measured, and the markdown summary of every step."""

from __future__ import annotations

from .report import dig, md_table

SERVED_MODEL = "resnet50"

# Targets for one H200. The engine references are for that machine type (random-init torchvision models,
# fp16, uint8 NHWC); each other model's engine is judged within 20% of its own.
TARGET_ENGINE_RN50_B128 = 9000.0
TARGET_V2_E2E = 7000.0
TARGET_JPEG_OF_DECODE = 0.90
TARGET_P50_1_CLIENT_MS = 5.0
REFERENCE_ENGINE_B128 = {"resnet50": 9600.0, "se_resnet50": 4900.0, "inception_v3": 6000.0, "googlenet": 16400.0,
                         "resnet34": 17700.0}
REFERENCE_DEVICE_INPUT_B128 = 11800.0  # ResNet-50 with its input already on the GPU
WITHIN_OF_REFERENCE = 0.80


def _batch_row(engine: dict, size: int) -> dict | None:
    return next((b for b in engine.get("batches", []) if b["batch_size"] == size), None)


def summarise(data: dict, args) -> dict:
    engine = data.get("engine", {})
    serve = data.get("serve", {})
    decode = data.get("decode", {})
    multi = f"w{args.workers}"
    rows = []

    def row(name, measured, target, unit, note="", lower_is_better=False):
        met = None if measured is None or target is None else (
            measured <= target if lower_is_better else measured >= target)
        rows.append({"target": name, "measured": measured, "goal": target, "unit": unit, "met": met, "note": note,
                     "lower_is_better": lower_is_better})

    rn50 = _batch_row(engine.get(SERVED_MODEL, {}), 128)
    row("engine ResNet-50 fp16, batch 128, input from host", rn50 and rn50["img_s"], TARGET_ENGINE_RN50_B128, "img/s")
    row(f"engine ResNet-50, batch {dig(data, 'engine_device_input', 'batch_size') or 128}, input already on the GPU",
        dig(data, "engine_device_input", "img_s"), None, "img/s",
        f"reference {REFERENCE_DEVICE_INPUT_B128:,.0f} at batch 128")
    v2 = [dig(serve, c, p, "throughput_img_s") for c in serve for p in (serve.get(c) or {})
          if isinstance(serve.get(c), dict) and p.startswith("v2-")]
    v2 = [v for v in v2 if v is not None]
    row("e2e ResNet-50, uint8 tensors over v2 binary (best config)", max(v2) if v2 else None, TARGET_V2_E2E, "img/s")
    ceiling = dig(decode, "500x375", "all_cores", "img_s")
    jpeg = [dig(serve, c, p, "throughput_img_s") for c in serve for p in (serve.get(c) or {})
            if isinstance(serve.get(c), dict) and p.startswith("jpeg-") and p != "jpeg-c1"]
    jpeg = [v for v in jpeg if v is not None]
    best_jpeg = max(jpeg) if jpeg else None
    row("e2e ResNet-50, 500x375 JPEG clients, CPU decode (best config)", best_jpeg,
        None if ceiling is None else round(TARGET_JPEG_OF_DECODE * ceiling, 1), "img/s",
        f"90% of the decode ceiling measured here ({ceiling} img/s)" if ceiling else "no decode ceiling measured")
    p50_server = dig(serve, "w1", "jpeg-c1", "server", "request_latency_ms", "p50")
    p50_client = dig(serve, "w1", "jpeg-c1", "latency_ms", "p50")
    row("p50 at 1 client, 500x375 JPEG, ResNet-50 (server side; client side in note)", p50_server,
        TARGET_P50_1_CLIENT_MS, "ms", f"client p50 {p50_client} ms over loopback", lower_is_better=True)
    phone = dig(serve, multi, f"phone-c{args.phone_clients}", "throughput_img_s")
    row("e2e phone photos 4032x3024, CPU decode with draft scaling", phone, None, "img/s",
        f"decode ceiling here {dig(decode, '4032x3024', 'all_cores', 'img_s')} img/s")
    row("e2e with GPU decoding (nvImageCodec)", None, 8000.0, "img/s", "not built: see docs/benchmarks.md")
    for name, reference in REFERENCE_ENGINE_B128.items():
        if name == SERVED_MODEL:
            continue
        b128 = _batch_row(engine.get(name, {}), 128)
        row(f"engine {name}, batch 128 (reference {reference:.0f})", b128 and b128["img_s"],
            round(WITHIN_OF_REFERENCE * reference, 1), "img/s", "within 20% of the reference")
    return {"rows": rows}


def _target_rows(data: dict) -> list[list[str]]:
    out = []
    for r in data.get("summary", {}).get("rows", []):
        measured = "—" if r["measured"] is None else f"{r['measured']:,} {r['unit']}"
        goal = "—" if r["goal"] is None else f"{'≤' if r.get('lower_is_better') else '≥'} {r['goal']:,} {r['unit']}"
        note = f" ({r['note']})" if r["note"] else ""
        out.append([f"{r['target']}{note}", measured, goal, {True: "yes", False: "**no**", None: "—"}[r["met"]]])
    return out


def _engine_rows(engines: dict, sizes: list[int]) -> list[list[str]]:
    out = []
    for name, e in engines.items():
        if "batches" not in e:
            out.append([name, f"error: {e.get('error', '?')[:80]}"])
            continue
        cells = []
        for b in sizes:
            r = _batch_row(e, b)
            cells.append("—" if r is None else (f"{r['ms_per_batch']:.2f} ms" if b == 1 else f"{r['img_s']:,.0f}"))
        out.append([name, e["provider"], e["precision"], *cells])
    return out


def _session_rows(variants: dict) -> list[list[str]]:
    out = []
    for label, row in variants.items():
        if "error" in row:
            out.append([label, f"error: {row['error'][:80]}", "", ""])
        else:
            first = ", ".join(f"{k} {v} ms" for k, v in row["first run in a new thread, ms"].items())
            out.append([label, f"{row['1 thread']:,}", f"{row['2 threads']:,}", f"{row['alternating sizes']:,}", first])
    return out


def _serving_rows(serve: dict) -> list[list[str]]:
    out = []
    for config, result in serve.items():
        if not isinstance(result, dict):
            continue
        for point, r in result.items():
            if not isinstance(r, dict) or not point.startswith(("jpeg", "v2", "phone")):
                continue
            if "throughput_img_s" not in r:
                out.append([config, point, r.get("error") or r.get("skipped"), "", "", "", "", ""])
                continue
            lat, server = r.get("latency_ms", {}), r.get("server") or {}
            out.append([config, point, f"{r['throughput_img_s']:,}", lat.get("p50"), lat.get("p99"),
                        (server.get("request_latency_ms") or {}).get("p50"), server.get("mean_batch_size"),
                        r.get("errors") or 0])
    return out


def markdown(data: dict) -> str:
    f = data.get("facts", {})
    gpus = ", ".join(g.get("name", "?") for g in f.get("gpus", [])) or "no GPU"
    lines = [f"# archserve GPU run, {f.get('date', '?')}", "",
             f"{gpus}; {f.get('cores')} cores; onnxruntime {f.get('onnxruntime')} "
             f"({', '.join(f.get('providers_available', []))}); git {str(f.get('git_commit', ''))[:10]}", "",
             *md_table(["target", "measured", "goal", "met"], _target_rows(data))]
    engines = data.get("engine", {})
    sizes = sorted({b["batch_size"] for e in engines.values() for b in e.get("batches", [])})
    lines += ["", "Engine, img/s by batch size (batch 1: ms per batch):", "",
              *md_table(["model", "provider", "precision", *(f"b{b}" for b in sizes)], _engine_rows(engines, sizes))]
    sessions = data.get("sessions") or {}
    if sessions.get("variants"):
        lines += ["", f"Sessions of {sessions['model']} ({sessions['precision']}), batch {sessions['batch']}, img/s:", "",
                  *md_table(["options", "1 thread", "2 threads on the session", "alternating batch sizes",
                             "first run per size in a new thread"], _session_rows(sessions["variants"]))]
    lines += ["", "Serving, per load point:", "",
              *md_table(["server", "point", "img/s", "p50 ms", "p99 ms", "server p50 ms", "mean batch", "errors"],
                        _serving_rows(data.get("serve", {})))]
    servers = {k: v for k, v in data.get("serve", {}).items() if isinstance(v, dict) and "ready_s" in v}
    if servers:
        lines += ["", "Servers:", "", *md_table(
            ["server", "provider", "sessions per model", "ready s", "GPU memory MiB: before, ready"],
            ([config, f"{r.get('provider')} {r.get('precision')}", (r.get("batching") or {}).get("sessions"),
              r["ready_s"], f"{r.get('gpu_memory_before_mib')}, {r.get('gpu_memory_used_mib')}"]
             for config, r in servers.items()))]
    return "\n".join(lines) + "\n"
