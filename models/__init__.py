"""Reference builders of slimmable models (installed as ``slimops.models``)."""

from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import nn

from slimops.models._features import FeatureInfo
from slimops.models._original import (
    Checkpoint,
    CheckpointMismatchError,
    load_original,
    read_original_state_dict,
)
from slimops.models.s_mobilenet_v1 import SMobileNetV1, s_mobilenet_v1
from slimops.models.s_mobilenet_v2 import SMobileNetV2, s_mobilenet_v2
from slimops.models.s_resnet import SResNet, s_resnet50
from slimops.models.s_shufflenet import ShuffleNetV1, s_shufflenet
from slimops.models.slim_cnn import SlimCNN, slim_cnn

# name -> builder, for the command line (`python -m slimops profile NAME`).
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "s_mobilenet_v1": s_mobilenet_v1,
    "s_mobilenet_v2": s_mobilenet_v2,
    "s_resnet50": s_resnet50,
    "s_shufflenet": s_shufflenet,
    "slim_cnn": slim_cnn,
}



def list_models() -> List[str]:
    """The registered model names, sorted (what ``create_model`` and the CLI accept)."""
    return sorted(MODELS)


def create_model(name: str, widths: Optional[Sequence[float]] = None,
                 num_classes: Optional[int] = None,
                 checkpoint: Optional[Checkpoint] = None) -> nn.Module:
    """Build the registered model ``name`` (``list_models()``), optionally with its weights.

    Args:
        widths: the width switches (default: the builder's, the paper's).
        num_classes: classifier outputs (default: the builder's).
        checkpoint: weights to load: a path, a file or a loaded dict holding a slimops
            ``state_dict`` (``model.state_dict()``, or a ``Trainer`` checkpoint's ``'model'``
            entry), or an original-implementation checkpoint (JiahuiYu/slimmable_networks:
            its ``'model'`` entry, ``module.`` prefixes), converted by ``load_original``. Read
            with ``torch.load(weights_only=True)``: no code in the file runs.
    Raises:
        KeyError: an unknown name (the message lists the known ones).
        CheckpointMismatchError: the checkpoint does not fit (names the first offending key).
    """
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    kwargs: Dict[str, Any] = {}
    if widths is not None:
        kwargs["widths"] = widths
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = MODELS[name](**kwargs)
    if checkpoint is not None:
        state = read_original_state_dict(checkpoint)
        if set(state) == set(model.state_dict()):  # slimops' own layout
            try:
                model.load_state_dict(state)
            except RuntimeError as e:  # a shape differs: the same one-line error type
                raise CheckpointMismatchError(str(e).splitlines()[-1].strip()) from None
        elif hasattr(model, "convert_original_state_dict"):
            load_original(model, state)
        else:
            missing = sorted(set(model.state_dict()) - set(state))
            extra = sorted(set(state) - set(model.state_dict()))
            raise CheckpointMismatchError(
                f"{name}: the checkpoint's keys do not match the model's (first missing: "
                f"{missing[:1]}, first unexpected: {extra[:1]})")
    return model


__all__ = [
    "CheckpointMismatchError", "FeatureInfo", "MODELS", "create_model", "list_models",
    "load_original",
    "SMobileNetV1", "SMobileNetV2", "SResNet", "ShuffleNetV1", "SlimCNN",
    "s_mobilenet_v1", "s_mobilenet_v2", "s_resnet50", "s_shufflenet", "slim_cnn",
]
