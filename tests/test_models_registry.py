"""The model registry (models/__init__.py): ``list_models``, ``create_model`` with widths,
classes and a checkpoint in slimops' or the original implementation's layout (issue 16,
item 2, first part), reachable as ``slimops.create_model`` after ``import slimops``."""
from __future__ import annotations

import pytest
import torch

import slimops
from slimops.models import MODELS, CheckpointMismatchError, create_model, list_models


def test_list_models_and_the_package_attribute():
    assert list_models() == sorted(MODELS)
    assert slimops.models.MODELS is MODELS  # `import slimops` is enough (was AttributeError)
    assert slimops.create_model is create_model


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="s_mobilenet_v2"):
        create_model("resnet18")


def test_widths_and_classes_reach_the_builder():
    model = create_model("slim_cnn", widths=(0.5, 1.0), num_classes=7)
    assert slimops.model_widths(model) == (0.5, 1.0)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 8, 8)).shape == (2, 7)


@pytest.mark.parametrize("layout", ["state_dict", "trainer", "ddp_prefix", "loaded_dict"])
def test_checkpoint_in_slimops_layout(layout, tmp_path):
    source = create_model("slim_cnn", num_classes=5).eval()
    state = source.state_dict()
    if layout == "trainer":
        state = {"format": 1, "model": state, "epoch": 3}
    elif layout == "ddp_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    model = create_model("slim_cnn", num_classes=5,
                         checkpoint=state if layout == "loaded_dict" else path).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        for w in slimops.model_widths(model):
            slimops.set_width(model, w)
            slimops.set_width(source, w)
            torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_checkpoint_that_does_not_fit_names_the_problem(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save(create_model("slim_cnn", num_classes=5).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="size mismatch|shape"):
        create_model("slim_cnn", num_classes=10, checkpoint=path)
    with pytest.raises(CheckpointMismatchError):  # another model's weights
        create_model("s_mobilenet_v1", checkpoint=path)
