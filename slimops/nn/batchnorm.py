"""``SwitchableBatchNorm2d``: a private batch norm (γ, β, running stats) per width (S-BN)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

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
    ) -> None:
        super().__init__()
        ws = resolve_widths(widths, num_features)
        self._init_widths(ws)
        self.num_features_list = per_width(num_features, ws, "SwitchableBatchNorm2d num_features")
        self.bn = nn.ModuleList(
            nn.BatchNorm2d(c, eps, momentum, affine, track_running_stats, device, dtype)
            for c in self.num_features_list
        )

    def active_bn(self) -> nn.BatchNorm2d:
        """The active width's batch norm."""
        return self.bn[self.width_index()]

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
        bn = self.active_bn()
        param = bn.running_mean if bn.running_mean is not None else bn.weight
        check_layer_input(self, input, bn.num_features, param if param is not None else input,
                          dims=4, channel_dim=1)
        training = self.uses_batch_stats(bn)
        if self.training and bn.track_running_stats:
            bn.num_batches_tracked.add_(1)
        return ops.batch_norm_act(
            input, bn.weight, bn.bias,
            bn.running_mean if not training or bn.track_running_stats else None,
            bn.running_var if not training or bn.track_running_stats else None,
            training, self._momentum(bn) if training and bn.track_running_stats else 0.0,
            bn.eps, residual, activation,
        )

    def eval_scale_shift(self) -> Tuple[Tensor, Tensor]:
        """The active width's eval-mode BN as a per-channel affine map ``x * scale + shift``.

        O(channels) work per call, no weight is touched: this is what the fused conv block
        hands to the convolution's epilogue, so switching width never re-folds anything.
        """
        bn = self.active_bn()
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return scale, shift

    def extra_repr(self) -> str:
        return f"widths={self.widths}, num_features_list={self.num_features_list}"
