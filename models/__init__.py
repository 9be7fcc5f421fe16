"""Reference builders of slimmable models (installed as ``slimops.models``)."""

from typing import Callable, Dict

from torch import nn

from slimops.models._original import CheckpointMismatchError, load_original
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

__all__ = [
    "CheckpointMismatchError", "MODELS", "load_original", "SMobileNetV1", "SMobileNetV2", "SResNet", "ShuffleNetV1", "SlimCNN",
    "s_mobilenet_v1", "s_mobilenet_v2", "s_resnet50", "s_shufflenet", "slim_cnn",
]
