"""Training slimmable networks: Algorithm 1, the sandwich rule, in-place distillation, BN
calibration, the original recipe's weight decay, per-width evaluation and a small trainer.

Algorithm 1 of *Slimmable Neural Networks* (Yu et al., ICLR 2019) trains every width on
every batch: clear the gradients, then for each width (largest first) switch, forward,
compute the loss and back-propagate, so the shared weights accumulate the sum of the
per-width gradients; then take one optimizer step. ``slimmable_step`` is exactly that, with
two options from *Universally Slimmable Networks* (Yu & Huang, ICCV 2019):

* the **sandwich rule** (train the largest, the smallest and ``n`` widths between them),
* **in-place distillation** (every smaller width learns from the largest width's detached
  soft prediction instead of the labels).

The building blocks are plain functions (``slimmable_step``, ``calibrate_bn``,
``param_groups``, ``evaluate``); ``Trainer`` strings them into epochs, with a progress bar
(``tqdm``, optional) and checkpoints that resume exactly.

One module per concern: ``step`` (Algorithm 1, the sandwich rule, distillation),
``calibration`` (BN calibration), ``distributed`` (DistributedDataParallel helpers),
``trainer`` (the ``Trainer`` and its checkpoints), ``optim`` (parameter groups) and
``evaluation``. The package imports ``torch``, ``slimops.width`` and ``slimops.nn`` only
(never ``slimops.models``): it trains any ``nn.Module`` built from slimmable layers.
Distributed training, what runs where and why it is right: docs/TRAINING.md.
"""

from slimops.train.calibration import calibrate_bn
from slimops.train.distributed import average_buffers, wrap_distributed
from slimops.train.evaluation import evaluate
from slimops.train.optim import param_groups
from slimops.train.step import sandwich_widths, slimmable_step, soft_cross_entropy
from slimops.train.trainer import CHECKPOINT_FORMAT, RANDOM_WIDTHS, Trainer

__all__ = [
    "CHECKPOINT_FORMAT",
    "RANDOM_WIDTHS",
    "Trainer",
    "average_buffers",
    "calibrate_bn",
    "evaluate",
    "param_groups",
    "sandwich_widths",
    "slimmable_step",
    "soft_cross_entropy",
    "wrap_distributed",
]
