"""The paper's figures for its four architectures (Yu et al., ICLR 2019, Table 3), for display
next to what ``slimops.profile`` measures. Tests keep their own copies: they are the oracle.

MACs per 224x224 sample, as the paper prints them (rounded: S-ResNet-50's "1.1G" at 0.5x is
1.052G; S-MobileNet v1's 0.75x is 325M by the architecture, the paper prints 317M).
"""

from typing import Dict

PAPER_MACS: Dict[str, Dict[float, float]] = {
    "s_mobilenet_v1": {1.0: 569e6, 0.75: 317e6, 0.5: 150e6, 0.25: 41e6},
    "s_mobilenet_v2": {1.0: 301e6, 0.75: 209e6, 0.5: 97e6, 0.35: 59e6},
    "s_shufflenet": {2.0: 524e6, 1.0: 138e6, 0.5: 38e6},
    "s_resnet50": {1.0: 4.1e9, 0.75: 2.3e9, 0.5: 1.1e9, 0.25: 278e6},
}

# The four architectures of the paper, in its order.
PAPER_MODELS = ("s_mobilenet_v1", "s_mobilenet_v2", "s_shufflenet", "s_resnet50")
