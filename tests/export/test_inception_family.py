"""Inception-v4, Inception-ResNet-v2 and SE-Inception v3.

timm is the oracle for the first two (layout, outputs, counts, preprocessing); the papers'
claims are checked on our own modules. timm and torchvision appear here as test oracles only.
Models that take long on a 2-core CPU are marked ``slow``.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn as nn

from export.complexity import count_gmacs, count_params
from export.models import build_model, get_model_spec
from export.models.inception_resnet_v2 import Block8, Block17, Block35
from export.models.inception_v4 import InceptionB
from export.models.squeeze_excite import SqueezeExcite
from tests.architecture_measures import flops, give_trained_looking_batchnorm, kernel_area, receptive_field

ATOL = 1e-5
TIMM_MODELS = ["inception_v4", "inception_resnet_v2"]  # our name = timm's name


def _timm_model(name: str) -> nn.Module:
    return importlib.import_module("timm").create_model(name, pretrained=False)


def _random_input(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- timm's layout and outputs ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_state_dict_loads_strictly_and_outputs_match(name: str) -> None:
    spec = get_model_spec(name)
    torch.manual_seed(0)
    oracle = _timm_model(name)
    give_trained_looking_batchnorm(oracle, spec.input_size, seed=1)
    ours = spec.build()
    ours.load_state_dict(oracle.state_dict(), strict=True)
    assert list(ours.state_dict()) == list(oracle.state_dict())  # same keys, in the same order

    x = _random_input(2, spec.input_size, seed=2)
    with torch.no_grad():
        expected = oracle.eval()(x)
        actual = ours.eval()(x)
    assert expected.abs().max() > 1e-2, "degenerate comparison: oracle logits are ~0"
    assert (actual - expected).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_parameter_count_matches_timm_and_the_published_figure(name: str) -> None:
    with torch.device("meta"):  # counts need no weights
        ours, oracle = count_params(build_model(name)), count_params(_timm_model(name))
    assert ours == oracle
    published = get_model_spec(name).published[0] * 1e6
    assert abs(ours - published) <= 0.005 * published, ours


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_multiply_accumulates_match_timm_and_the_published_figure(name: str) -> None:
    size = get_model_spec(name).input_size
    with torch.device("meta"):
        ours, oracle = count_gmacs(build_model(name), size), count_gmacs(_timm_model(name), size)
    assert ours == oracle
    published = get_model_spec(name).published[1]
    assert abs(ours - published) <= 0.01 * published, ours


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_preprocessing_is_timms_for_its_checkpoints(name: str) -> None:
    """Resize, crop, interpolation and normalisation as timm's own eval transform does them."""
    timm = importlib.import_module("timm")
    T = importlib.import_module("torchvision.transforms")
    config = timm.data.resolve_data_config(pretrained_cfg=timm.models.get_pretrained_cfg(name).to_dict())
    steps = timm.data.create_transform(**config).transforms
    (resize,) = [t for t in steps if isinstance(t, T.Resize)]
    (crop,) = [t for t in steps if isinstance(t, T.CenterCrop)]
    (normalize,) = [t for t in steps if isinstance(t, T.Normalize)]

    spec = get_model_spec(name)
    assert (spec.input_size, spec.input_size) == tuple(crop.size)
    assert spec.resize_size == resize.size  # the shorter side: floor(299 / crop_pct)
    assert spec.interpolation == resize.interpolation.value == "bicubic"
    assert list(spec.mean) == normalize.mean.tolist() and list(spec.std) == normalize.std.tolist()
    assert (spec.family, spec.state_dict_layout) == (name, "timm")


# --- Inception-ResNet-v2: scaled residuals ----------------------------------------------------


def test_inception_resnet_v2_residual_scales_are_the_released_models() -> None:
    with torch.device("meta"):
        ours, oracle = build_model("inception_resnet_v2"), _timm_model("inception_resnet_v2")
    stages = ("repeat", "repeat_1", "repeat_2")
    assert [{b.scale for b in getattr(ours, s)} for s in stages] == [{0.17}, {0.10}, {0.20}]
    assert [len(getattr(ours, s)) for s in stages] == [10, 20, 9]
    assert ours.block8.scale == 1.0
    for stage in (*stages, "block8"):
        blocks = [m for m in getattr(ours, stage).modules() if hasattr(m, "scale")]
        expected = [m for m in getattr(oracle, stage).modules() if hasattr(m, "scale")]
        assert [b.scale for b in blocks] == [b.scale for b in expected], stage


def test_inception_resnet_v2_last_block_has_no_relu() -> None:
    """Every residual block ends in a ReLU but the last one, whose output can be negative."""
    torch.manual_seed(0)
    model = build_model("inception_resnet_v2").eval()
    x = torch.rand(2, 2080, 8, 8, generator=torch.Generator().manual_seed(1))  # a ReLU output: >= 0
    with torch.no_grad():
        assert all(block(x).min() >= 0 for block in model.repeat_2)
        assert model.block8(x).min() < 0


@pytest.mark.parametrize(
    "block_type, options, channels",
    [
        (Block35, dict(scale=0.17), 320),
        (Block17, dict(scale=0.10), 1088),
        (Block8, dict(scale=0.20), 2080),
        (Block8, dict(scale=1.0, no_relu=True), 2080),
    ],
    ids=["block35", "block17", "block8", "block8-no-relu"],
)
def test_residual_block_with_scale_zero_is_the_identity(block_type, options: dict, channels: int) -> None:
    torch.manual_seed(0)
    block = block_type(**options).eval()
    gen = torch.Generator().manual_seed(1)
    # A block's input is a ReLU output (>= 0); x + 0 * residual then survives the block's ReLU.
    # Without a ReLU the identity holds for inputs of any sign.
    no_relu = options.get("no_relu", False)
    x = torch.randn(2, channels, 8, 8, generator=gen) if no_relu else torch.rand(2, channels, 8, 8, generator=gen)
    with torch.no_grad():
        assert not torch.equal(block(x), x)
        scale, block.scale = block.scale, 0.0
        try:
            assert torch.equal(block(x), x)
        finally:
            block.scale = scale


def test_residual_block_attention_option_adds_only_se_keys_and_acts() -> None:
    torch.manual_seed(0)
    plain = Block35(scale=0.17).eval()
    attended = Block35(scale=0.17, attn_layer=SqueezeExcite).eval()
    extra = set(attended.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(attended.state_dict())
    assert extra == {"se.fc1.weight", "se.fc1.bias", "se.fc2.weight", "se.fc2.bias"}

    attended.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(2, 320, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(attended(x), plain(x))
        attended.se = None
        assert torch.equal(attended(x), plain(x))


# --- Inception-v4: factorised 7 x 7 ------------------------------------------------------------


def test_inception_v4_has_seven_17x17_modules_and_no_square_kernel_over_3x3() -> None:
    with torch.device("meta"):
        model = build_model("inception_v4")
    blocks = [m for m in model.modules() if isinstance(m, InceptionB)]
    assert len(blocks) == 7
    for block in blocks:
        pair = [block.branch1[1].conv, block.branch1[2].conv]
        assert [tuple(c.kernel_size) for c in pair] == [(1, 7), (7, 1)]
        assert sum(kernel_area(c) for c in pair) == 14  # instead of 49 for a 7 x 7
    # Every 5 x 5 and 7 x 7 is factorised: no square kernel is larger than 3 x 3.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert {c.kernel_size[0] for c in convs if c.kernel_size[0] == c.kernel_size[1]} == {1, 3}


def test_inception_v4_1x7_then_7x1_sees_a_7x7_window_with_71_percent_fewer_weights() -> None:
    torch.manual_seed(0)
    block = InceptionB()
    pair = [block.branch1[1].conv, block.branch1[2].conv]
    # 192 -> 224 -> 256 channels: the pair's weights against one 7 x 7 conv from 192 to 256.
    pair_weights = sum(c.weight.numel() for c in pair)
    assert pair_weights == 192 * 224 * 7 + 224 * 256 * 7
    assert pair_weights / (192 * 256 * 49) < 0.3
    assert round(1 - 14 / 49, 2) == 0.71  # per channel pair
    assert receptive_field(pair) == (7, 7)
    # The double branch stacks two such pairs: a 13 x 13 window.
    double = [block.branch2[i].conv for i in (1, 2, 3, 4)]
    assert receptive_field(double) == (13, 13)


# --- SE-Inception v3: SE as configuration ------------------------------------------------------


def test_se_inception_v3_is_inception_v3_plus_se_keys() -> None:
    with torch.device("meta"):
        base, se = build_model("inception_v3").state_dict(), build_model("se_inception_v3").state_dict()
    assert set(base) <= set(se)
    extra = set(se) - set(base)
    modules = {k.split(".")[0] for k in extra}
    assert modules == {k.split(".")[0] for k in base if k.startswith("Mixed_")} and len(modules) == 11
    assert {k.split(".", 1)[1] for k in extra} == {f"se.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")}


def test_se_inception_v3_adds_a_small_share_of_parameters() -> None:
    with torch.device("meta"):
        base, se = count_params(build_model("inception_v3")), count_params(build_model("se_inception_v3"))
    share = (se - base) / base
    assert 0.005 < share < 0.15, (base, se, share)


def test_se_inception_v3_adds_under_1_percent_flops() -> None:
    size = get_model_spec("se_inception_v3").input_size
    with torch.device("meta"):
        base, se = flops(build_model("inception_v3"), size), flops(build_model("se_inception_v3"), size)
    assert 0 < (se - base) / base < 0.01, (base, se)


def test_se_inception_v3_preprocessing_is_inception_v3s_and_says_it_has_no_checkpoint() -> None:
    base, se = get_model_spec("inception_v3"), get_model_spec("se_inception_v3")
    fields = ("input_size", "resize_size", "interpolation", "mean", "std", "state_dict_layout")
    assert [getattr(se, f) for f in fields] == [getattr(base, f) for f in fields]
    assert se.family == "se_inception_v3" and se.training_only_prefixes == ()
    assert "no public checkpoint" in se.description


def test_se_inception_v3_changes_the_output_and_without_se_is_inception_v3() -> None:
    size = get_model_spec("inception_v3").input_size
    torch.manual_seed(0)
    base = build_model("inception_v3")
    give_trained_looking_batchnorm(base, size, seed=1)
    se = build_model("se_inception_v3")
    missing, unexpected = se.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".se." in k for k in missing)

    x = _random_input(1, size, seed=2)
    with torch.no_grad():
        expected = base.eval()(x)
        assert (se.eval()(x) - expected).abs().max() > 1e-3, "SE changed nothing"
        for module in se.modules():
            if isinstance(getattr(module, "se", None), SqueezeExcite):
                module.se = None
        assert (se(x) - expected).abs().max().item() <= ATOL


def test_a_random_inception_gets_active_batchnorm_biases_and_a_resnet_keeps_its_own():
    # Random-init export (export/calibrate.py): without it Inception-v4's fp16 top-1 fails the gate
    # (test_pipeline exports it through the gate).
    from export.calibrate import ACTIVE_BIAS, activate_plain_networks

    with torch.device("meta"):
        v4, resnet = get_model_spec("inception_v4").build(), get_model_spec("resnet18").build()
    norms = [m for m in v4.modules() if isinstance(m, nn.BatchNorm2d)]
    v4 = v4.to_empty(device="cpu")
    assert activate_plain_networks(v4) == len(norms) > 100
    assert all(torch.equal(m.bias, torch.full_like(m.bias, ACTIVE_BIAS)) for m in norms)
    assert activate_plain_networks(resnet) == 0
