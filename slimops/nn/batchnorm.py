"""``SwitchableBatchNorm2d``: a private batch norm (γ, β, running stats) per width (S-BN)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from slimops import ops
from slimops.nn._checks import check_layer_input, per_width, resolve_widths
from slimops.width import Slimmable


class SwitchableBatchNorm2d(Slimmable, nn.Module):
    """Switchable batch norm: one ``nn.BatchNorm2d`` per width, selected by the active width.

    Feature statistics differ by width, so sharing one BN across widths ruins accuracy (the
    paper's central finding); each width keeps its own γ, β, running mean and variance, and
    only the active width's statistics update in training. Parameters live in ``self.bn[i]``
    for the ``i``-th width (ascending), the layout of the original implementation.

    Args:
        num_features: an int (the same at every width) or one count per width.
        eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.
        widths: the width switches; defaults to ``(1.0,)`` with an int.
        shared: the *naive* baseline, for comparison only: one batch norm for all widths
            (``self.bn[0]``, sized for the largest), each width using the prefix of its γ, β
            and running statistics. This is what the paper shows fails at test time.
    """

    def __init__(
        self,
        num_features: Union[int, Sequence[int]],
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        widths: Optional[Sequence[float]] = None,
        shared: bool = False,
    ) -> None:
        super().__init__()
        ws = resolve_widths(widths, num_features)
        self._init_widths(ws)
        self.num_features_list = per_width(num_features, ws, "SwitchableBatchNorm2d num_features")
        self.shared = shared
        sizes = [max(self.num_features_list)] if shared else self.num_features_list
        self.bn = nn.ModuleList(
            nn.BatchNorm2d(c, eps, momentum, affine, track_running_stats, device, dtype)
            for c in sizes
        )

    def active_bn(self) -> nn.BatchNorm2d:
        """The active width's batch norm (the one shared BN when ``shared``)."""
        return self.bn[0] if self.shared else self.bn[self.width_index()]

    def _active(self) -> Tuple[nn.BatchNorm2d, int, List[Optional[Tensor]]]:
        """The active BN, the active channel count, and its (γ, β, mean, var) for those
        channels: the tensors themselves, or prefix views of the shared BN's (no copy)."""
        i = self.width_index()
        bn = self.bn[0] if self.shared else self.bn[i]
        c = self.num_features_list[i]
        tensors = [bn.weight, bn.bias, bn.running_mean, bn.running_var]
        if self.shared:
            tensors = [None if t is None else t[:c] for t in tensors]
        return bn, c, tensors

    def forward(self, input: Tensor) -> Tensor:
        return self.normalize(input)

    def _momentum(self, bn: nn.BatchNorm2d) -> float:
        # nn.BatchNorm2d's rule: momentum=None means a cumulative moving average.
        if bn.momentum is not None:
            return bn.momentum
        return 1.0 / float(bn.num_batches_tracked)

    def uses_batch_stats(self, bn: Optional[nn.BatchNorm2d] = None) -> bool:
        bn = self.active_bn() if bn is None else bn
        return self.training or bn.running_mean is None

    def normalize(
        self, input: Tensor, residual: Optional[Tensor] = None, activation: Optional[str] = None
    ) -> Tensor:
        """``act(bn(input) + residual)`` with the active width's batch norm, fused."""
        bn, c, (weight, bias, mean, var) = self._active()
        param = mean if mean is not None else weight
        check_layer_input(self, input, c, param if param is not None else input,
                          dims=4, channel_dim=1)
        training = self.uses_batch_stats(bn)
        if self.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
        track = not training or bn.track_running_stats
        return ops.batch_norm_act(
            input, weight, bias, mean if track else None, var if track else None,
            training, self._momentum(bn) if training and bn.track_running_stats else 0.0,
            bn.eps, residual, activation,
        )

    def eval_scale_shift(self) -> Tuple[Tensor, Tensor]:
        """The active width's eval-mode BN as a per-channel affine map ``x * scale + shift``.

        O(channels) work per call, no weight is touched: this is what the fused conv block
        hands to the convolution's epilogue, so switching width never re-folds anything.
        """
        bn, _, (weight, bias, mean, var) = self._active()
        scale = torch.rsqrt(var + bn.eps)
        if weight is not None:
            scale = scale * weight
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
        return scale, shift

    def extra_repr(self) -> str:
        return (f"widths={self.widths}, num_features_list={self.num_features_list}"
                + (", shared=True" if self.shared else ""))
