"""Sessions, the precision/provider choice, and the checks made before a model is served."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelrepo import load_manifest
from service.models.engine import (
    CPU,
    EngineConfig,
    ModelLoadError,
    OnnxEngine,
    batch_runner,
    cuda_available,
    padded_size,
    verify_files,
)
from service.models.placement import warmup_batch_sizes
from service.metrics import Metrics
from service.models.served import load_model, plan_versions
from service.settings import Settings


@pytest.fixture()
def version_dir(exported_repo, tmp_path):
    target = tmp_path / "resnet18" / "1"
    shutil.copytree(exported_repo / "resnet18" / "1", target)
    return target


def test_cpu_engine_runs_the_fp32_file_and_reports_its_provider(version_dir):
    engine = OnnxEngine(version_dir, load_manifest(version_dir), EngineConfig(device="cpu"))
    assert engine.provider == CPU and engine.precision == "fp32"
    logits = engine.run(np.zeros((3, 224, 224, 3), np.uint8))
    assert logits.shape == (3, 1000) and logits.dtype == np.float32


def test_auto_device_reports_what_actually_runs(version_dir):
    engine = OnnxEngine(version_dir, load_manifest(version_dir), EngineConfig(device="auto"))
    if cuda_available() and engine.provider == "CUDAExecutionProvider":
        assert engine.precision == "fp16"
    else:  # this machine: the CUDA provider is listed but cannot load, so the CPU runs fp32
        assert (engine.provider, engine.precision) == (CPU, "fp32")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "model.onnx").write_bytes((d / "model.onnx").read_bytes()[:1000]), "bytes, the manifest says"),
        (lambda d: (d / "model.fp16.onnx").unlink(), "is missing"),
        (lambda d: _flip_byte(d / "model.onnx"), "does not match its sha256"),
    ],
    ids=["truncated", "missing", "corrupted"],
)
def test_damaged_files_are_refused_before_loading(version_dir, damage, message):
    damage(version_dir)
    with pytest.raises(ModelLoadError, match=message):
        verify_files(version_dir, load_manifest(version_dir))


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_files_outside_the_version_folder_are_refused(version_dir):
    manifest = load_manifest(version_dir)
    evil = manifest.model_copy(update={"files": {"fp32": manifest.files["fp32"].model_copy(update={"path": ".."})}})
    with pytest.raises(ModelLoadError, match="outside the version folder"):
        verify_files(version_dir, evil)


def test_version_selection(tmp_path, exported_repo):
    for version in (1, 2, 5):
        shutil.copytree(exported_repo / "resnet18" / "1", tmp_path / "resnet18" / str(version))
    assert plan_versions(Settings(models_dir=tmp_path)) == [("resnet18", 5)]
    assert plan_versions(Settings(models_dir=tmp_path, version_policy="all")) == [
        ("resnet18", 1), ("resnet18", 2), ("resnet18", 5)]
    assert plan_versions(Settings(models_dir=tmp_path, models=["resnet18@2"])) == [("resnet18", 2)]
    with pytest.raises(ModelLoadError, match="no version 3 .* versions: 1, 2, 5"):
        plan_versions(Settings(models_dir=tmp_path, models=["resnet18@3"]))
    with pytest.raises(ModelLoadError, match="'vgg' is not in .* it holds: resnet18"):
        plan_versions(Settings(models_dir=tmp_path, models=["vgg"]))
    with pytest.raises(ModelLoadError, match="no models in"):
        plan_versions(Settings(models_dir=tmp_path / "empty"))


def test_warmup_covers_the_batch_sizes_batches_take():
    assert warmup_batch_sizes(1) == [1]
    assert warmup_batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert warmup_batch_sizes(24) == [1, 2, 4, 8, 16, 24]


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("ARCHSERVE_MODELS", "resnet50, resnet18@2")
    monkeypatch.setenv("ARCHSERVE_MAX_BATCH_SIZE", "64")
    monkeypatch.setenv("ARCHSERVE_REQUIRE_GPU", "true")
    settings = Settings()
    assert settings.models == ["resnet50", "resnet18@2"] and settings.max_batch_size == 64 and settings.require_gpu
    monkeypatch.setenv("ARCHSERVE_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="max_batch_size"):
        Settings()


def test_padded_size_is_the_smallest_warmed_size_that_holds_the_batch():
    sizes = warmup_batch_sizes(24)
    assert [padded_size(n, sizes) for n in (1, 2, 3, 5, 9, 17, 24)] == [1, 2, 4, 8, 16, 24, 24]
    assert padded_size(7, None) == 7
    assert padded_size(30, sizes) == 30  # larger than every size: unpadded, never truncated


def test_padded_batches_give_each_item_its_own_logits(version_dir):
    """Padding changes the shape the engine sees, never an item's result or the count returned."""
    engine = OnnxEngine(version_dir, load_manifest(version_dir), EngineConfig(device="cpu"))
    seen = []
    real_run = engine.run
    engine.run = lambda batch: (seen.append(batch.shape[0]), real_run(batch))[1]
    rng = np.random.default_rng(3)
    items = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(3)]
    padded = batch_runner(engine, warmup_batch_sizes(8))(items)
    plain = batch_runner(engine)(items)
    assert seen == [4, 3]
    assert len(padded) == 3
    np.testing.assert_allclose(np.stack(padded), np.stack(plain), rtol=1e-4, atol=1e-4)


def test_served_models_report_their_padding(version_dir):
    settings = Settings(models_dir=version_dir.parent.parent, max_batch_size=8, pad_batches="always", warmup=False)
    served = load_model("resnet18", 1, settings, Metrics(CollectorRegistry()))
    assert served.padded_sizes == [1, 2, 4, 8]
    assert served.describe(settings)["batching"]["padded_sizes"] == [1, 2, 4, 8]
    auto = load_model("resnet18", 1, settings.model_copy(update={"pad_batches": "auto"}), Metrics(CollectorRegistry()))
    assert auto.padded_sizes == ([1, 2, 4, 8] if auto.engine.provider == "CUDAExecutionProvider" else None)


@pytest.mark.parametrize("pad_batches, warmed", [("always", [1, 2, 4]), ("auto", [1])])
def test_warmup_runs_in_the_batch_thread_when_the_batcher_starts(version_dir, pad_batches, warmed):
    """Every batch size where batches are padded (on CUDA: a cuDNN search per shape); one on the CPU, where a
    new size's first run costs no more than its next."""
    import asyncio
    import threading

    settings = Settings(models_dir=version_dir.parent.parent, max_batch_size=4, device="cpu", cpu_lanes=1,
                        pad_batches=pad_batches)
    served = load_model("resnet18", 1, settings, Metrics(CollectorRegistry()))
    calls = []
    real_run = served.engine.run
    served.engine.run = lambda batch: (calls.append((batch.shape[0], threading.get_ident())), real_run(batch))[1]
    assert calls == []  # loading alone runs nothing: the warm-up belongs to the threads that serve

    async def start_and_classify():
        await served.batcher.start()
        try:
            return await served.batcher.submit(np.zeros((224, 224, 3), np.uint8))
        finally:
            await served.batcher.close()

    logits = asyncio.run(start_and_classify())
    assert logits.shape == (1000,)
    assert [size for size, _ in calls] == [*warmed, 1]
    assert len({thread for _, thread in calls}) == 1 and calls[0][1] != threading.get_ident()


def _spy_on_session(engine, size: int, ran: list) -> None:
    """Wrap the session of ``size``: each run appends ``size`` to ``ran``, then runs it for real."""
    session = engine.session_for(size)

    class Spy:
        @staticmethod
        def run(*args, **kwargs):
            ran.append(size)
            return session.run(*args, **kwargs)

    engine._by_size[size] = Spy()


def test_a_specialised_engine_runs_each_batch_size_on_its_own_session(version_dir):
    """One session per padded size (the CUDA default): same logits, each size always on the same session."""
    manifest = load_manifest(version_dir)
    plain = OnnxEngine(version_dir, manifest, EngineConfig(device="cpu"))
    engine = OnnxEngine(version_dir, manifest, EngineConfig(device="cpu"))
    first = engine.session
    engine.specialise([1, 2, 4])
    assert engine.sessions == 3
    assert engine.session_for(1) is first  # the session already open serves the first size, not a fourth copy
    assert len({id(engine.session_for(size)) for size in (1, 2, 4)}) == 3
    assert engine.session_for(3) is first  # a size without its own session uses the shared one
    engine.specialise([2, 4])  # idempotent
    assert engine.sessions == 3
    ran = []
    for size in (1, 2, 4):
        _spy_on_session(engine, size, ran)
    rng = np.random.default_rng(5)
    for size in (4, 1, 2):
        batch = rng.integers(0, 256, (size, 224, 224, 3), dtype=np.uint8)
        np.testing.assert_allclose(engine.run(batch), plain.run(batch), rtol=1e-4, atol=1e-4)
    assert ran == [4, 1, 2]


def test_served_models_open_a_session_per_padded_size_when_asked(version_dir):
    base = Settings(models_dir=version_dir.parent.parent, max_batch_size=4, pad_batches="always", warmup=False,
                    device="cpu", cpu_lanes=1)  # sessions per size only, not the lanes' session
    always = load_model("resnet18", 1, base.model_copy(update={"session_per_batch_size": "always"}),
                        Metrics(CollectorRegistry()))
    assert always.engine.sessions == 3
    assert always.describe(base)["batching"]["sessions"] == 3
    auto = load_model("resnet18", 1, base, Metrics(CollectorRegistry()))  # auto: CUDA only; this is the CPU
    assert auto.engine.sessions == 1 and auto.describe(base)["batching"]["sessions"] == 1
    unpadded = load_model("resnet18", 1, base.model_copy(update={"pad_batches": "never",
                                                                  "session_per_batch_size": "always"}),
                          Metrics(CollectorRegistry()))
    assert unpadded.engine.sessions == 1  # without padding there is no fixed set of sizes to specialise for
    ran = []
    _spy_on_session(always.engine, 4, ran)
    items = [np.zeros((224, 224, 3), np.uint8)] * 3  # a batch of 3, padded to 4, runs on the size-4 session
    assert len(batch_runner(always.engine, always.padded_sizes)(items)) == 3
    assert ran == [4]


def test_always_without_padding_says_it_has_no_sizes_to_specialise_for(version_dir, caplog):
    settings = Settings(models_dir=version_dir.parent.parent, max_batch_size=4, pad_batches="never", warmup=False,
                        device="cpu", session_per_batch_size="always", cpu_lanes=1)
    with caplog.at_level("WARNING", logger="service.models.served"):
        served = load_model("resnet18", 1, settings, Metrics(CollectorRegistry()))
    assert served.engine.sessions == 1
    assert "session_per_batch_size=always needs padded batches" in caplog.text


def test_a_per_size_session_that_fails_to_open_names_its_size_and_the_way_out(version_dir, monkeypatch):
    engine = OnnxEngine(version_dir, load_manifest(version_dir), EngineConfig(device="cpu"))

    def out_of_memory(*args):
        raise ModelLoadError("onnxruntime could not load model.onnx: Failed to allocate memory")

    monkeypatch.setattr(OnnxEngine, "open_session", staticmethod(out_of_memory))
    with pytest.raises(ModelLoadError, match="batch size 2") as caught:
        engine.specialise([1, 2, 4])
    assert "ARCHSERVE_SESSION_PER_BATCH_SIZE=never" in str(caught.value)
    assert "Failed to allocate memory" in str(caught.value)


def test_on_the_cpu_a_lone_request_runs_on_every_core_and_batches_run_side_by_side(version_dir):
    import asyncio

    from service.models.placement import available_cores

    settings = Settings(models_dir=version_dir.parent.parent, max_batch_size=4, device="cpu", cpu_lanes=2)
    metrics = Metrics(CollectorRegistry())
    served = load_model("resnet18", 1, settings, metrics)
    assert served.instances == 2 and served.engine.lane_threads == max(1, available_cores() // 2)
    assert served.engine.sessions == 3  # the one on every core, and one per lane
    batching = served.describe(settings)["batching"]
    assert batching["cpu_lanes"] == 2 and batching["lane_threads"] == served.engine.lane_threads
    ran = []
    real_run, real_alone = served.engine.run, served.engine.run_alone
    served.engine.run = lambda batch: (ran.append(("lane", len(batch))), real_run(batch))[1]
    served.engine.run_alone = lambda batch: (ran.append(("alone", len(batch))), real_alone(batch))[1]

    async def classify():
        await served.batcher.start()
        ran.clear()  # the warm-up
        try:
            one = await served.batcher.submit(np.zeros((224, 224, 3), np.uint8))
            # Three requests at once: one batch, in a lane.
            three = await asyncio.gather(*(served.batcher.submit(np.zeros((224, 224, 3), np.uint8))
                                           for _ in range(3)))
            return one, three
        finally:
            await served.batcher.close()

    one, three = asyncio.run(classify())
    assert ran == [("alone", 1), ("lane", 3)]
    labels = {"model": "resnet18", "version": "1"}
    assert metrics.registry.get_sample_value("archserve_batch_size_count", labels) == 2
    assert metrics.registry.get_sample_value("archserve_alone_batches_total", labels) == 1
    # Both sessions compute the same model.
    np.testing.assert_allclose(one, three[0], rtol=1e-4, atol=1e-4)


def test_cpu_lanes_default_to_two_on_a_multi_core_cpu_unless_instances_are_set_or_workers_load_their_own(version_dir):
    from service.models.placement import available_cores, cpu_lanes

    base = Settings(models_dir=version_dir.parent.parent)
    auto = 2 if available_cores() >= 2 else 1
    assert cpu_lanes(base, CPU, None) == auto
    assert cpu_lanes(base.model_copy(update={"instances": 1}), CPU, None) == 1
    assert cpu_lanes(base.model_copy(update={"intra_op_threads": 4}), CPU, None) == 2  # 4 cores: 2 x 2 threads
    assert cpu_lanes(base.model_copy(update={"intra_op_threads": 1}), CPU, None) == 1
    assert cpu_lanes(base.model_copy(update={"cpu_lanes": 1}), CPU, None) == 1
    # Workers that each load the models would each count every core; one engine process for all does not.
    assert cpu_lanes(base.model_copy(update={"workers": 2, "engine_process": "off"}), CPU, None) == 1
    assert cpu_lanes(base.model_copy(update={"workers": 2}), CPU, None) == auto
    assert cpu_lanes(base.model_copy(update={"cpu_lanes": 3, "instances": 1}), CPU, None) == 3  # explicit wins
    assert cpu_lanes(base.model_copy(update={"cpu_lanes": 2}), "CUDAExecutionProvider", None) == 1
    assert cpu_lanes(base.model_copy(update={"cpu_lanes": 2}), CPU, [1, 2, 4]) == 1  # padded: one session per size
    quota = load_model("resnet18", 1, base.model_copy(update={"device": "cpu", "intra_op_threads": 4,
                                                              "warmup": False}), Metrics(CollectorRegistry()))
    assert quota.instances == 2 and quota.engine.lane_threads == 2  # intra_op_threads is the core budget
    off = load_model("resnet18", 1, base.model_copy(update={"device": "cpu", "cpu_lanes": 1, "warmup": False}),
                     Metrics(CollectorRegistry()))
    assert off.instances == 1 and off.engine.lane_threads is None
    assert off.describe(base)["batching"]["cpu_lanes"] == 1


def test_an_engine_with_a_session_per_size_is_not_split(version_dir):
    engine = OnnxEngine(version_dir, load_manifest(version_dir), EngineConfig(device="cpu"))
    engine.specialise([1, 2])
    with pytest.raises(ValueError, match="lanes are for one CPU session"):
        engine.split(2, 1)


def test_each_lane_thread_runs_a_session_of_its_own(version_dir):
    import threading

    engine = OnnxEngine(version_dir, load_manifest(version_dir), EngineConfig(device="cpu"))
    engine.split(2, 1)
    assert engine.sessions == 3 and engine.lane_threads == 1
    # Concurrent runs of one session would share its intra-op pool: each lane thread gets its own session.
    seen = []

    def lane():
        seen.append((engine._lane_session(), engine._lane_session()))

    threads = [threading.Thread(target=lane) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (a1, a2), (b1, b2) = seen
    assert a1 is a2 and b1 is b2, "a thread keeps its lane"
    assert a1 is not b1 and {a1, b1} == set(engine._lanes) and engine.session not in (a1, b1)


def test_lane_sessions_stop_their_threads_spinning_and_the_session_on_every_core_does_not(version_dir):
    # Lanes run beside decoding and each other: spinning threads would hold cores those need. The session a
    # lone request runs on keeps onnxruntime's default, its threads still awake when the next run starts.
    engine = OnnxEngine(version_dir, load_manifest(version_dir), EngineConfig(device="cpu"))
    engine.split(2, 1)
    assert len({id(s) for s in (engine.session, *engine._lanes)}) == 3

    def stops(session) -> bool:
        try:
            return session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"
        except RuntimeError:  # onnxruntime's way of saying the entry is not set
            return False

    assert [stops(s) for s in engine._lanes] == [True, True]
    assert not stops(engine.session)
    path = version_dir / load_manifest(version_dir).files["fp32"].path
    assert stops(OnnxEngine.open_session(path, True, EngineConfig()))  # CUDA's CPU threads stay quiet too
