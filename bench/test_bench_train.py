"""Algorithm 1 training step: S-MobileNet v2, batch 8, 3x224x224 (quick: batch 2, 96x96),
slimops vs the original implementation's style on the same model; time and peak memory.

A step is ``slimops.train.slimmable_step``: ``zero_grad``; for each width, largest to
smallest: forward, cross-entropy, ``backward`` (gradients accumulate); then one SGD
(momentum 0.9) step. Both variants run this same loop; only the layers differ.

Peak memory (``extra_info["peak_mib"]``): the largest total size of tensors *allocated
during one step* that are alive at the same time, reconstructed from the allocation and
free events of ``torch.profiler`` (``profile_memory=True``) in time order. It counts what
the step creates (activations kept for backward, temporaries, the gradients it allocates),
not the parameters and optimizer state that exist before it (the same for both variants;
frees of those blocks have no recorded size and are ignored). It is exact for tensors from
PyTorch's CPU allocator; memory that oneDNN or BLAS allocate on their own is not seen.
"""

import pytest
import torch
from torch import nn

from baselines import reference_style
from benchutil import measure, peak_step_bytes, tag
from slimops.models import s_mobilenet_v2
from slimops.train import slimmable_step

MODEL = "s_mobilenet_v2"


@pytest.mark.parametrize("variant", ["slimops", "reference"])
def test_train_step(benchmark, variant, quick):
    batch, res = (2, 96) if quick else (8, 224)
    torch.manual_seed(0)
    model = s_mobilenet_v2().train()
    net = model if variant == "slimops" else reference_style(model)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 3, res, res)
    y = torch.randint(0, 1000, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    def step():
        slimmable_step(net, x, y, loss_fn, optimizer)

    widths = "+".join(f"{w:g}" for w in reversed(model.widths))
    tag(benchmark, "train", MODEL, batch, 0.0, variant, widths=widths, input=res)
    measure(benchmark, step, suite="train", quick=quick)
    benchmark.extra_info["peak_mib"] = round(peak_step_bytes(step) / 2**20, 1)
