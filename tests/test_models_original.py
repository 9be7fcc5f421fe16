"""The generic part of loading original-implementation checkpoints (models/_original.py):
unwrapping, the ``module.`` prefix, safe loading, and mismatch messages. The per-model key
conversions are tested with each model."""

import pickle

import pytest
import torch
from torch import nn

from slimops.models._original import (
    CheckpointMismatchError,
    load_original,
    read_original_state_dict,
)


class Identity(nn.Module):
    """A model whose original layout is its own (identity conversion)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def convert_original_state_dict(self, sd):
        return dict(sd)


def _saved(tmp_path, obj):
    path = tmp_path / "ckpt.pt"
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict"])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_unwraps_and_strips_prefix(tmp_path, wrap, prefix):
    src = Identity()
    sd = {prefix + k: v for k, v in src.state_dict().items()}
    obj = sd if wrap == "plain" else {wrap: sd, "epoch": 3}
    dst = load_original(Identity(), _saved(tmp_path, obj))
    for k, v in src.state_dict().items():
        torch.testing.assert_close(dst.state_dict()[k], v)


def test_reads_an_in_memory_dict():
    sd = Identity().state_dict()
    assert set(read_original_state_dict({"model": sd})) == set(sd)


def test_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        read_original_state_dict(path)


def test_wrong_shape_names_key_and_shapes(tmp_path):
    sd = Identity().state_dict()
    sd["conv.weight"] = torch.zeros(3, 5, 1, 1)
    with pytest.raises(CheckpointMismatchError, match=r"conv\.weight.*\(3, 2, 1, 1\).*\(3, 5, 1, 1\)"):
        load_original(Identity(), sd)


def test_missing_and_unexpected_keys():
    sd = Identity().state_dict()
    del sd["bn.running_var"]
    with pytest.raises(CheckpointMismatchError, match=r"bn\.running_var"):
        load_original(Identity(), sd)
    sd = Identity().state_dict()
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key 'extra\.weight'"):
        load_original(Identity(), sd)


def test_non_tensor_entry_and_non_mapping(tmp_path):
    with pytest.raises(CheckpointMismatchError, match="not a tensor"):
        read_original_state_dict({"model": {"a": 1}})
    with pytest.raises(CheckpointMismatchError, match="not a state_dict"):
        read_original_state_dict(_saved(tmp_path, [torch.zeros(1)]))
    with pytest.raises(TypeError, match="a path, a file or a state_dict"):
        read_original_state_dict([torch.zeros(1)])


def test_model_without_conversion():
    with pytest.raises(TypeError, match="cannot load original checkpoints"):
        load_original(nn.Linear(2, 2), {})
