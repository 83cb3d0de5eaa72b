"""Architecture tests for export/models.

torchvision and timm appear here as test oracles only; export/ never imports them.
Models that take long on a 2-core CPU are marked ``slow``.
"""

from __future__ import annotations

import importlib

import ast
from pathlib import Path
from typing import Callable, Iterable

import pytest
import torch
import torch.nn as nn

from export.models import build_model, get_model_spec, list_models
from export.models.inception_v3 import InceptionA, InceptionC
from export.models.resnet import BasicBlock, Bottleneck, resnet18, resnet50, se_resnet18, se_resnet50
from export.models.squeeze_excite import SqueezeExcite
from tests.architecture_measures import flops, give_trained_looking_batchnorm, kernel_area, receptive_field

EXPORT_DIR = Path(__file__).resolve().parents[2] / "export"
SLOW = {"resnet101", "resnet152", "se_resnet101", "se_resnet152"}
ATOL = 1e-5


def _params(names: Iterable[str]) -> list:
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _torchvision(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        tv = importlib.import_module("torchvision")
        return getattr(tv.models, name)(weights=None, **kwargs)

    return build


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        timm = importlib.import_module("timm")
        return timm.create_model(name, pretrained=False)

    return build


_INCEPTION_ORACLE_ARGS = dict(aux_logits=False, init_weights=True, transform_input=False)
ORACLES: dict[str, Callable[[], nn.Module]] = {
    **{n: _torchvision(n) for n in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
    **{f"se_resnet{d}": _timm(f"seresnet{d}") for d in (18, 34, 50, 101, 152)},
    "googlenet": _torchvision("googlenet", **_INCEPTION_ORACLE_ARGS),
    "inception_v3": _torchvision("inception_v3", **_INCEPTION_ORACLE_ARGS),
}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _random_input(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- every registered model -------------------------------------------------------


def test_registry_lists_the_seed_models() -> None:
    assert set(ORACLES) <= set(list_models())


def test_export_package_never_imports_the_oracles() -> None:
    offenders = []
    for path in EXPORT_DIR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in ("torchvision", "timm")]
    assert not offenders


@pytest.mark.parametrize("name", _params(list_models()))
def test_forward_returns_logits_in_eval_and_train(name: str) -> None:
    spec = get_model_spec(name)
    torch.manual_seed(0)
    model = spec.build()
    x = _random_input(2, spec.input_size, seed=1)
    with torch.no_grad():
        for train in (False, True):
            out = model.train(train)(x)
            assert type(out) is torch.Tensor, f"{name} (train={train}) returned {type(out).__name__}"
            assert out.shape == (2, spec.num_classes)
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", _params(list_models()))
def test_num_classes(name: str) -> None:
    spec = get_model_spec(name)
    with torch.device("meta"):  # shapes only: the values are tested above
        model = build_model(name, num_classes=10).eval()
        assert model(torch.zeros(1, 3, spec.input_size, spec.input_size)).shape == (1, 10)


@pytest.mark.parametrize("name", ["resnet18", "googlenet"])
def test_build_is_deterministic_under_manual_seed(name: str) -> None:
    torch.manual_seed(123)
    a = build_model(name).state_dict()
    torch.manual_seed(123)
    b = build_model(name).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- compatibility with the oracles -------------------------------------------------


@pytest.mark.parametrize("name", _params(sorted(ORACLES)))
def test_oracle_state_dict_loads_strictly_and_outputs_match(name: str) -> None:
    spec = get_model_spec(name)
    torch.manual_seed(0)
    oracle = ORACLES[name]()
    give_trained_looking_batchnorm(oracle, spec.input_size, seed=1)
    ours = spec.build()
    ours.load_state_dict(oracle.state_dict(), strict=True)

    x = _random_input(1, spec.input_size, seed=2)
    with torch.no_grad():
        expected = oracle.eval()(x)
        actual = ours.eval()(x)
    assert expected.abs().max() > 1e-2, "degenerate comparison: oracle logits are ~0"
    assert (actual - expected).abs().max().item() <= ATOL


# The oracles with their training-only heads, as in torchvision's checkpoints.
FULL_ORACLES: dict[str, Callable[[], nn.Module]] = {
    "googlenet": _torchvision("googlenet", aux_logits=True, init_weights=True),
    "inception_v3": _torchvision("inception_v3", aux_logits=True, init_weights=True),
}


@pytest.mark.parametrize("name", [n for n in list_models() if get_model_spec(n).training_only_prefixes])
def test_training_only_prefixes_cover_exactly_the_aux_heads(name: str) -> None:
    spec = get_model_spec(name)
    checkpoint = FULL_ORACLES[name]().state_dict()
    kept = {k: v for k, v in checkpoint.items() if not k.startswith(spec.training_only_prefixes)}
    assert len(kept) < len(checkpoint)
    spec.build().load_state_dict(kept, strict=True)


@pytest.mark.parametrize("name", ["googlenet", "inception_v3"])
def test_half_mean_std_equals_torchvision_transform_input(name: str) -> None:
    """ImageNet normalisation + torchvision's transform_input == normalising with 0.5 / 0.5."""
    tv = importlib.import_module("torchvision")
    spec = get_model_spec(name)
    oracle = getattr(tv.models, name)(
        weights=None, aux_logits=False, init_weights=False, transform_input=True
    )
    pixels = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def normalise(mean, std) -> torch.Tensor:
        return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    imagenet = normalise((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    torch.testing.assert_close(oracle._transform_input(imagenet), normalise(spec.mean, spec.std))


def test_preprocessing_metadata_matches_the_checkpoints_it_serves() -> None:
    tv = importlib.import_module("torchvision")
    timm = importlib.import_module("timm")
    weights = {
        "resnet18": tv.models.ResNet18_Weights.IMAGENET1K_V1,
        "resnet34": tv.models.ResNet34_Weights.IMAGENET1K_V1,
        "resnet50": tv.models.ResNet50_Weights.IMAGENET1K_V1,
        "resnet101": tv.models.ResNet101_Weights.IMAGENET1K_V1,
        "resnet152": tv.models.ResNet152_Weights.IMAGENET1K_V1,
        "googlenet": tv.models.GoogLeNet_Weights.IMAGENET1K_V1,
        "inception_v3": tv.models.Inception_V3_Weights.IMAGENET1K_V1,
    }
    for name, w in weights.items():
        spec, t = get_model_spec(name), w.transforms()
        assert (spec.input_size, spec.resize_size) == (t.crop_size[0], t.resize_size[0]), name
        assert spec.interpolation == t.interpolation.value, name
    cfg = timm.create_model("seresnet50", pretrained=False).pretrained_cfg
    spec = get_model_spec("se_resnet50")
    assert (spec.interpolation, spec.mean, spec.std) == (cfg["interpolation"], cfg["mean"], cfg["std"])
    assert spec.state_dict_layout == "timm"


# --- parameter counts -----------------------------------------------------------------


def _inception_v3_aux_params(num_classes: int = 1000) -> int:
    conv0 = 768 * 128 + 2 * 128  # 1x1 conv + BN
    conv1 = 128 * 768 * 5 * 5 + 2 * 768  # 5x5 conv + BN
    fc = 768 * num_classes + num_classes
    return conv0 + conv1 + fc


EXPECTED_PARAMS = {
    "resnet50": 25.56e6,
    "googlenet": 6.62e6,  # torchvision's published count, already without aux heads
    "inception_v3": 27.16e6 - _inception_v3_aux_params(),  # 27.16M published includes AuxLogits
    "se_resnet50": 28.09e6,
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_count(name: str) -> None:
    with torch.device("meta"):  # counts need no weights
        count, oracle = _n_params(build_model(name)), _n_params(ORACLES[name]())
    assert abs(count - EXPECTED_PARAMS[name]) <= 0.005 * EXPECTED_PARAMS[name], count
    assert count == oracle


def test_inception_v3_published_count_includes_aux_logits() -> None:
    tv = importlib.import_module("torchvision")
    with_aux = _n_params(tv.models.inception_v3(weights=None, aux_logits=True, init_weights=False))
    assert with_aux == 27_161_264
    assert _n_params(build_model("inception_v3")) == with_aux - _inception_v3_aux_params()


# --- claims from the seed notes, checked on our modules ---------------------------------


def test_two_stacked_3x3_replace_5x5_with_28_percent_fewer_weights() -> None:
    torch.manual_seed(0)
    block = InceptionA(192, pool_features=32)
    five = [block.branch5x5_2.conv]
    two_threes = [block.branch3x3dbl_2.conv, block.branch3x3dbl_3.conv]

    assert kernel_area(five[0]) == 25
    assert sum(kernel_area(c) for c in two_threes) == 18
    assert round(1 - 18 / 25, 2) == 0.28
    assert receptive_field(five) == receptive_field(two_threes) == (5, 5)


def test_1x3_then_3x1_replaces_3x3_with_33_percent_fewer_weights() -> None:
    torch.manual_seed(0)
    c = 8
    square = [nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False)]
    asymmetric = [
        nn.Conv2d(c, c, kernel_size=(1, 3), padding=(0, 1), bias=False),
        nn.Conv2d(c, c, kernel_size=(3, 1), padding=(1, 0), bias=False),
    ]
    assert kernel_area(square[0]) == 9
    assert sum(kernel_area(conv) for conv in asymmetric) == 6
    assert round(1 - 6 / 9, 2) == 0.33
    assert receptive_field(square) == receptive_field(asymmetric) == (3, 3)


def test_inception_c_factorises_7x7_as_1x7_then_7x1() -> None:
    torch.manual_seed(0)
    block = InceptionC(768, channels_7x7=128)
    pair = [block.branch7x7_2.conv, block.branch7x7_3.conv]
    assert [tuple(c.kernel_size) for c in pair] == [(1, 7), (7, 1)]
    assert sum(kernel_area(c) for c in pair) == 14  # instead of 49
    assert receptive_field(pair) == (7, 7)


def test_squeeze_excite_adds_under_10_percent_params_to_resnet50() -> None:
    base, se = _n_params(resnet50()), _n_params(se_resnet50())
    assert 0 < (se - base) / base < 0.10, (base, se)


def test_squeeze_excite_adds_under_1_percent_flops_to_resnet50() -> None:
    torch.manual_seed(0)
    base, se = flops(resnet50()), flops(se_resnet50())
    assert 0 < (se - base) / base < 0.01, (base, se)


def test_squeeze_excite_reduction_matches_timm_rounding() -> None:
    assert SqueezeExcite(2048).fc1.out_channels == 128  # 2048 / 16
    assert SqueezeExcite(64).fc1.out_channels == 8  # 64 / 16 = 4, rounded up to a multiple of 8


@pytest.mark.parametrize(
    "builder, block_type, channels",
    [
        (resnet18, BasicBlock, 64),
        (resnet50, Bottleneck, 256),
        (se_resnet18, BasicBlock, 64),
        (se_resnet50, Bottleneck, 256),
    ],
)
def test_zero_init_residual_block_is_identity_at_init(builder, block_type, channels: int) -> None:
    torch.manual_seed(0)
    model = builder(zero_init_residual=True).eval()
    block = model.layer1[1]
    assert isinstance(block, block_type) and block.downsample is None
    x = torch.rand(2, channels, 8, 8, generator=torch.Generator().manual_seed(1))  # non-negative
    with torch.no_grad():
        assert torch.equal(block(x), x)

    torch.manual_seed(0)
    plain = builder().eval().layer1[1]
    with torch.no_grad():
        assert not torch.equal(plain(x), x)
