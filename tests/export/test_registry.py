import pytest

from export.models import ModelSpec, UnknownModelError, build_model, get_model_spec, list_models, register_model
from export.models._registry import add_model


def test_registry_lists_the_seed_architectures():
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "googlenet", "inception_v3",
            "se_resnet50"} <= set(list_models())


def test_duplicate_names_are_refused_and_the_original_is_kept():
    original = get_model_spec("resnet50")
    with pytest.raises(ValueError, match="'resnet50' is already registered"):

        @register_model(family="resnet")
        def resnet50(num_classes: int = 1000):  # noqa: F811
            raise AssertionError("never built")

    assert get_model_spec("resnet50") is original


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UnknownModelError) as err:
        get_model_spec("resnet5O")
    message = str(err.value)
    assert message.startswith("unknown model 'resnet5O'") and "resnet50" in message and "googlenet" in message


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(interpolation="lanczos"), "interpolation 'lanczos'"),
        (dict(state_dict_layout="keras"), "state_dict_layout"),
        (dict(input_size=300, resize_size=256), "smaller than the crop"),
    ],
)
def test_inconsistent_metadata_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        add_model(ModelSpec(name="never_registered", builder=lambda num_classes: None, family="x", **fields))
    assert "never_registered" not in list_models()


def test_build_checks_the_class_count():
    assert build_model("resnet18", num_classes=3).fc.out_features == 3
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        build_model("resnet18", num_classes=0)
