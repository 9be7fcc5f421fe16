"""``feature_info`` / ``feature_channels`` of every registered model, checked against what
``forward_features`` actually returns at every listed width (and one in-between width
where the model runs at any width)."""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Dict, List, Tuple

import pytest
import torch

import slimops.models
from slimops.models import MODELS, FeatureInfo
from slimops.width import normalize_widths, set_width, width, width_range

# The digits CNN is trained on 8x8 images (slimops.apps.demo); the ImageNet models need an input
# of at least 32 for their stride-32 map. 64 keeps every map's side ceil(side / stride) and
# the stride-32 map 2x2, enough values per channel for training-mode BN at batch 1.
INPUT_SIDE = {"slim_cnn": 8}
DEFAULT_SIDE = 64


def _default_widths(name: str) -> Tuple[float, ...]:
    # The builder's default widths, read without building the model at collection time.
    return normalize_widths(inspect.signature(MODELS[name]).parameters["widths"].default)


def _cases() -> List[Tuple[str, float, bool]]:
    cases = []
    for name in sorted(MODELS):
        ws = _default_widths(name)
        cases += [(name, w, True) for w in ws]
        # Between the two smallest switches: the in-between widths the sandwich rule draws.
        cases.append((name, round((ws[0] + ws[1]) / 2, 3), False))
    return cases


CASES = _cases()
_BUILT: Dict[str, torch.nn.Module] = {}


@pytest.fixture(scope="module")
def build():
    def get(name: str) -> torch.nn.Module:
        if name not in _BUILT:
            torch.manual_seed(0)
            _BUILT[name] = MODELS[name]().eval()
        return _BUILT[name]
    yield get
    _BUILT.clear()


def _hooked(model: torch.nn.Module, infos: List[FeatureInfo]):
    """Forward hooks recording the output of each ``info.module``."""
    seen: Dict[str, torch.Tensor] = {}
    handles = []
    for info in infos:
        def hook(_module, _args, output, key=info.name):
            seen[key] = output
        handles.append(model.get_submodule(info.module).register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("name,w,listed", CASES,
                         ids=[f"{n}-{w}{'' if listed else '-between'}" for n, w, listed in CASES])
def test_feature_info_matches_forward_features(build, name, w, listed):
    model = build(name)
    assert model.widths == _default_widths(name)
    if not listed and width_range(model) is None:
        with pytest.raises(ValueError, match="unknown width"):
            model.feature_channels(w)
        return
    infos = model.feature_info
    side = INPUT_SIDE.get(name, DEFAULT_SIDE)
    x = torch.randn(1, 3, side, side)
    seen, handles = _hooked(model, infos)
    # In eval an in-between width needs calibrated BN statistics; training mode uses the
    # batch's (the output shapes are the same).
    model.train(not listed)
    try:
        with torch.no_grad(), width(model, w):
            feats = model.forward_features(x)
            active = model.feature_channels()
    finally:
        model.eval()
        for h in handles:
            h.remove()
    assert list(feats) == [info.name for info in infos]
    expected = model.feature_channels(w)
    assert active == expected
    for k, info in enumerate(infos):
        f = feats[info.name]
        assert f.shape[1] == expected[k], info
        if listed:
            assert f.shape[1] == info.channels[model.widths.index(w)], info
        r = info.reduction
        assert tuple(f.shape[2:]) == (math.ceil(side / r), math.ceil(side / r)), info
        # `module` is the submodule whose output the map is, not merely a valid name.
        assert torch.equal(seen[info.name], f), info


@pytest.mark.parametrize("name", sorted(MODELS))
def test_feature_info_shape(build, name):
    model = build(name)
    infos = model.feature_info
    assert all(isinstance(info, FeatureInfo) for info in infos)
    reductions = [info.reduction for info in infos]
    assert reductions == sorted(reductions) and len(set(reductions)) == len(reductions)
    for info in infos:
        assert info.name == f"stride{info.reduction}"
        assert len(info.channels) == len(model.widths)
        assert list(info.channels) == sorted(info.channels)  # wider never has fewer
        model.get_submodule(info.module)
    with pytest.raises(dataclasses.FrozenInstanceError):
        infos[0].reduction = 2
    hash(infos[0])
    assert [list(c) for c in zip(*(info.channels for info in infos))] == [
        model.feature_channels(w) for w in model.widths]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_feature_channels_follow_the_active_width(build, name):
    model = build(name)
    ws = model.widths
    try:
        set_width(model, ws[0])
        assert model.feature_channels() == model.feature_channels(ws[0])
        with width(model, ws[-1]):
            assert model.feature_channels() == model.feature_channels(ws[-1])
        assert model.feature_channels() == model.feature_channels(ws[0])
    finally:
        set_width(model, ws[-1])


def test_unknown_width_is_a_clear_error(build):
    model = build("s_mobilenet_v1")
    with pytest.raises(ValueError, match=r"unknown width 2\.0.*widths \(0\.25, 0\.5"):
        model.feature_channels(2.0)


def test_slim_cnn_features_and_forward_agree():
    # forward is unchanged; forward_features must describe the same network.
    torch.manual_seed(0)
    model = MODELS["slim_cnn"](in_channels=1, extra_blocks=2).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), width(model, 0.5):
        feats = model.forward_features(x)
        logits = model(x)
        pooled = torch.flatten(model.pool(feats["stride4"]), 1)
        torch.testing.assert_close(model.classifier(pooled), logits)
    assert model.feature_info[-1].module == "blocks.4"


def test_feature_info_is_exported():
    assert "FeatureInfo" in slimops.models.__all__
