"""``SwitchableBatchNorm2d``: a private batch norm (γ, β, running stats) per width (S-BN)."""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from slimops import ops
from slimops.nn._attrs import held, lookup
from slimops.nn._checks import channel_rule, check_layer_input, per_width, resolve_widths
from slimops.ops._common import activation_code, check_residual
from slimops.width import ChannelSpec, Slimmable


def width_key(w: float) -> str:
    """The ``calibrated`` key of a width: ``0.6`` -> ``"0_6"`` (module names hold no dot)."""
    return repr(float(w)).replace(".", "_")


def bn_tensors(affine: nn.BatchNorm2d, stats: Optional[nn.BatchNorm2d]
               ) -> List[Optional[Tensor]]:
    """``[γ, β, running mean, running var]`` of a width: γ/β from ``affine``, the statistics
    from ``stats`` (None without), the tensors as the modules hold them now (read through
    ``held``: the layers' per-call paths read these on every forward)."""
    if stats is None:
        return [held(affine, "_parameters", "weight"), held(affine, "_parameters", "bias"),
                None, None]
    return [held(affine, "_parameters", "weight"), held(affine, "_parameters", "bias"),
            held(stats, "_buffers", "running_mean"), held(stats, "_buffers", "running_var")]


class SwitchableBatchNorm2d(Slimmable, nn.Module):
    """Switchable batch norm: one ``nn.BatchNorm2d`` per width, selected by the active width.

    Feature statistics differ by width, so sharing one BN across widths ruins accuracy (the
    paper's central finding); each width keeps its own γ, β, running mean and variance, and
    only the active width's statistics update in training. Parameters live in ``self.bn[i]``
    for the ``i``-th width (ascending), the layout of the original implementation.

    **Widths between the listed ones** (when ``num_features`` is an int or a channel rule,
    see ``slimops.width.ChannelRule``): such a width ``w`` with ``c`` channels uses the
    prefix ``[:c]`` of γ and β of the next larger listed width (its gradient goes there). In training it normalises with batch statistics, as the
    sandwich rule of universally slimmable networks does. In eval it needs statistics of its
    own: ``slimops.train.calibrate_bn(model, loader, widths=[w])`` computes them into
    ``self.calibrated[width_key(w)]`` (an ``nn.BatchNorm2d(c, affine=False)``; it is part
    of the ``state_dict`` and loads back), and they then also track in training like a listed
    width's. Eval at a width without statistics raises an error that says so.

    Args:
        num_features: an int (the same at every width), one count per width, or a rule.
        eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.
        widths: the width switches; defaults to ``(1.0,)`` with an int.
        shared: one batch norm for all widths (``self.bn[0]``, sized for the largest), each
            width using the prefix of its γ, β and running statistics. Everywhere in a
            network this is the *naive* baseline the paper shows failing at test time; on a
            layer whose channel count never changes with the width it is what the original
            implementation does (S-MobileNet v2's 1280-channel tail).
    """

    # Its submodules are its own per-width ``nn.BatchNorm2d`` (``bn``, ``calibrated``): a
    # width switch need not look inside (``slimops.width.slimmable_layers``).
    walk_submodules = False

    def __init__(
        self,
        num_features: ChannelSpec,
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
        self.num_features_rule = channel_rule(num_features)
        self._init_widths(ws, any_width=self.num_features_rule is not None)
        self.num_features_list = per_width(num_features, ws, "SwitchableBatchNorm2d num_features")
        self.shared = shared
        sizes = [max(self.num_features_list)] if shared else self.num_features_list
        self.bn = nn.ModuleList(
            nn.BatchNorm2d(c, eps, momentum, affine, track_running_stats, device, dtype)
            for c in sizes
        )
        # Statistics of calibrated widths between the listed ones, keyed by width_key(w).
        self.calibrated = nn.ModuleDict()

    # ------------------------------------------------------------------ which BN is active

    def active_features(self) -> int:
        """The channel count at the active width."""
        return self._active_count(self.num_features_list, self.num_features_rule)

    def _affine_index(self, w: float) -> int:
        """The listed width whose γ/β prefix width ``w`` (between the listed ones) uses: the
        next larger one (it has at least as many channels)."""
        return next(i for i, listed in enumerate(self.widths) if listed > w)

    def _modules_at(self, w: float, i: Optional[int]
                    ) -> Tuple[nn.BatchNorm2d, Optional[nn.BatchNorm2d]]:
        """``(active_bn(), stats_bn())`` at width ``w`` (``i`` its listed index or None)."""
        # ModuleList keys its children by str(index); indexing through __getitem__ costs
        # ~1.4 us per call (index normalisation), a tenth of a batch-1 7x7 BN's forward.
        bns = held(self, "_modules", "bn")._modules
        if self.shared:
            bn = bns["0"]
            return bn, bn
        if i is not None:
            bn = bns[str(i)]
            return bn, bn
        # Between listed widths: γ/β of the next larger listed width, calibrated statistics.
        key = width_key(w)
        return self.bn[self._affine_index(w)], self.calibrated[key] \
            if key in self.calibrated else None

    def state_lookups(self, w: float) -> Optional[List[Tuple[dict, str, Any]]]:
        """``(dict, key, value)`` triples that all still hold (``dict[key] is value``) exactly
        while width ``w``'s ``_modules_at`` and ``bn_tensors`` would find the modules and
        tensors they find now, with the same ``eps``: what a cached plan of this width
        depends on (``slimops.nn.SlimConvBNAct``'s inference plan). None where something is
        not held in a module's dicts (a subclass's property) or the width has no statistics."""
        i = self._width_index.get(w)
        affine, stats = self._modules_at(w, i)
        if stats is None:
            return None
        bns = held(self, "_modules", "bn")
        if self.shared:
            where = [lookup(bns, "_modules", "0")]
        elif i is not None:
            where = [lookup(bns, "_modules", str(i))]
        else:
            calibrated = held(self, "_modules", "calibrated")
            where = [lookup(bns, "_modules", str(self._affine_index(w))),
                     lookup(self, "_modules", "calibrated"),
                     lookup(calibrated, "_modules", width_key(w))]
        where += [lookup(self, "_modules", "bn"),
                  lookup(affine, "_parameters", "weight"), lookup(affine, "_parameters", "bias"),
                  lookup(stats, "_buffers", "running_mean"),
                  lookup(stats, "_buffers", "running_var"), lookup(stats, "__dict__", "eps")]
        if any(triple is None for triple in where):
            return None
        return where  # type: ignore[return-value]

    def active_modules(self) -> Tuple[nn.BatchNorm2d, Optional[nn.BatchNorm2d]]:
        """``(active_bn(), stats_bn())`` with one width lookup (the inference fast path
        checks them on every call)."""
        w = self.active_width()
        return self._modules_at(w, self._width_index.get(w))

    def active_bn(self) -> nn.BatchNorm2d:
        """The batch norm whose γ, β the active width uses: its own (the one shared BN when
        ``shared``); between listed widths, the next larger listed width's."""
        return self.active_modules()[0]

    def stats_bn(self) -> Optional[nn.BatchNorm2d]:
        """The module holding the active width's running statistics: its BN at a listed
        width (the shared BN when ``shared``), its calibrated statistics between them
        (``None`` if not calibrated)."""
        return self.active_modules()[1]

    def new_calibration(self, w: float) -> nn.BatchNorm2d:
        """Fresh statistics for width ``w`` between the listed ones, stored in
        ``self.calibrated`` (replacing any earlier ones); what ``calibrate_bn`` fills."""
        w = self.canonical_width(w)
        if w in self._width_index:
            raise ValueError(f"SwitchableBatchNorm2d: width {w} is listed; it has its own BN")
        if self.shared:
            raise ValueError("SwitchableBatchNorm2d(shared=True) has no per-width statistics")
        ref = self.bn[-1]
        if not ref.track_running_stats:
            raise ValueError("SwitchableBatchNorm2d: track_running_stats=False, no statistics "
                             "to calibrate")
        stats = nn.BatchNorm2d(self.num_features_rule(w), ref.eps, ref.momentum, affine=False,
                               device=ref.running_mean.device, dtype=ref.running_mean.dtype)
        self.calibrated[width_key(w)] = stats
        return stats

    def calibration_target(self, w: float) -> Optional[nn.BatchNorm2d]:
        """The batch norm whose running statistics calibrating width ``w`` recomputes
        (``slimops.train.calibrate_bn``): a listed width's own, fresh statistics for a width
        between the listed ones (``new_calibration``); ``None`` when there are none to
        recompute (the BN tracks no statistics, or one BN is ``shared`` by every width)."""
        w = self.canonical_width(w)
        if self.shared:
            return None
        i = self._width_index.get(w)
        if i is not None:
            return self.bn[i]
        if not self.bn[-1].track_running_stats:
            return None
        return self.new_calibration(w)

    def _active(self) -> Tuple[nn.BatchNorm2d, Optional[nn.BatchNorm2d], int,
                               List[Optional[Tensor]]]:
        """The BN giving γ/β, the one holding running stats (or None), the active channel
        count, and its (γ, β, mean, var) for those channels: the tensors themselves, or
        prefix views (no copy). One width lookup: it runs on every forward."""
        w = self.active_width()
        i = self._width_index.get(w)
        affine, stats = self._modules_at(w, i)
        c = (self.num_features_list[i] if i is not None
             else self._active_count(self.num_features_list, self.num_features_rule))
        tensors = bn_tensors(affine, stats)
        if self.shared or i is None:
            tensors = [None if t is None else t[:c] for t in tensors]
        return affine, stats, c, tensors

    # ------------------------------------------------------------------ forward

    def forward(self, input: Tensor) -> Tensor:
        return self.normalize(input)

    @staticmethod
    def _momentum(bn: nn.BatchNorm2d) -> float:
        # nn.BatchNorm2d's rule: momentum=None means a cumulative moving average.
        if bn.momentum is not None:
            return bn.momentum
        return 1.0 / float(bn.num_batches_tracked)

    def uses_batch_stats(self) -> bool:
        """Whether the active width normalises with batch statistics: in training, or when
        its BN tracks none. Raises in eval at an uncalibrated width between the listed ones."""
        return self._uses_batch_stats(*self.active_modules())

    def _uses_batch_stats(self, affine: nn.BatchNorm2d, stats: Optional[nn.BatchNorm2d]) -> bool:
        if self.training:
            return True
        if stats is None:
            if not affine.track_running_stats:
                return True
            w = self.active_width()
            raise RuntimeError(
                f"SwitchableBatchNorm2d: width {w} lies between the listed widths "
                f"{self.widths} and has no BN statistics for eval; calibrate it first: "
                f"slimops.train.calibrate_bn(model, loader, widths=[{w}])"
            )
        return stats.running_mean is None

    def normalize(
        self, input: Tensor, residual: Optional[Tensor] = None, activation: Optional[str] = None
    ) -> Tensor:
        """``act(bn(input) + residual)`` with the active width's batch norm, fused."""
        affine, stats, c, (weight, bias, mean, var) = self._active()
        training = self._uses_batch_stats(affine, stats)
        param = held(affine, "_buffers", "running_mean")
        if param is None:
            param = held(affine, "_parameters", "weight")
        check_layer_input(self, input, c, param if param is not None else input,
                          dims=4, channel_dim=1)
        check_residual(residual, input.shape, input, "batch_norm_act")
        act = activation_code(activation, "batch_norm_act")
        if training and input.numel() // c <= 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel "
                             f"when training, got input of shape {tuple(input.shape)}")
        tracking = stats is not None and stats.track_running_stats
        if self.training and tracking:
            held(stats, "_buffers", "num_batches_tracked").add_(1)
        # Eval passes the running stats; training passes them only to update them.
        track = stats is not None and (not training or tracking)
        # Everything the op needs is checked above against this layer's own tensors and
        # width: the op need not re-validate (a third of the call at batch 1 on a 7x7 plane).
        return ops.batch_norm_act_unchecked(
            input, weight, bias, mean if track else None, var if track else None,
            training, self._momentum(stats) if training and track else 0.0,
            (stats or affine).eps, residual, act,
        )

    def training_affine(self) -> Tuple[Optional[Tensor], Optional[Tensor], float]:
        """``(γ, β, eps)`` of the active width, for an op that normalises with batch
        statistics it computes itself (``slimops.ops.conv2d_bn_act_train``); it then hands
        them to ``record_batch_stats``."""
        affine, stats, _, (weight, bias, _, _) = self._active()
        return weight, bias, (stats or affine).eps

    def record_batch_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        """Fold a training batch's statistics (``var`` biased, ``count`` values per channel)
        into the active width's running statistics, as ``normalize`` does in training."""
        _, stats, _, (_, _, running_mean, running_var) = self._active()
        if not (self.training and stats is not None and stats.track_running_stats):
            return
        stats.num_batches_tracked.add_(1)
        ops.update_running_stats(running_mean, running_var, mean, var, count,
                                 self._momentum(stats))

    def eval_scale_shift(self) -> Tuple[Tensor, Tensor]:
        """The active width's eval-mode BN as a per-channel affine map ``x * scale + shift``.

        O(channels) work per call, no weight is touched: this is what the fused conv block
        hands to the convolution's epilogue, so switching width never re-folds anything.
        """
        self.uses_batch_stats()  # the error for an uncalibrated in-between width
        affine, stats, _, (weight, bias, mean, var) = self._active()
        scale = torch.rsqrt(var + (stats or affine).eps)
        if weight is not None:
            scale = scale * weight
        # shift = bias - mean * scale, in one op
        shift = (torch.addcmul(bias, mean, scale, value=-1) if bias is not None
                 else -mean * scale)
        return scale, shift

    # ------------------------------------------------------------------ state_dict

    def _load_from_state_dict(self, state_dict: Dict[str, Tensor], prefix: str, *args) -> None:
        # Calibrated statistics are created on demand, so a state_dict saved after
        # calibration loads into a freshly built model (the children load after this).
        head = prefix + "calibrated."
        for key, value in state_dict.items():
            if key.startswith(head) and key.endswith(".running_mean"):
                name = key[len(head):-len(".running_mean")]
                if "." not in name and name not in self.calibrated:
                    try:
                        w = float(name.replace("_", "."))
                    except ValueError:
                        continue  # left for the strict check to report as unexpected
                    if w not in self._width_index and self.any_width \
                            and self.widths[0] < w < self.widths[-1] and value.dim() == 1:
                        stats = self.new_calibration(w)
                        if stats.num_features != value.numel():
                            del self.calibrated[name]  # wrong size: let loading report it
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        extra = ", shared=True" if self.shared else ""
        if self.any_width:
            extra += ", any_width=True"
        if len(self.calibrated):
            extra += f", calibrated={sorted(float(k.replace('_', '.')) for k in self.calibrated)}"
        return f"widths={self.widths}, num_features_list={self.num_features_list}{extra}"


# ---------------------------------------------------------------------- loading a model


def missing_bn_widths(model: nn.Module, state_dict: Mapping[str, Any]) -> Dict[str, List[float]]:
    """The listed widths whose switchable batch norm ``state_dict`` lacks, per layer.

    Returns ``{qualified layer name: [widths]}`` for every ``SwitchableBatchNorm2d`` of
    ``model`` with at least one key of a width's ``nn.BatchNorm2d`` (``<name>.bn.<i>.*``)
    missing from ``state_dict`` (empty when every width is complete). Typical cause: the
    state_dict was saved from a model built with fewer widths.
    """
    keys = set(state_dict.keys())
    out: Dict[str, List[float]] = {}
    for name, m in model.named_modules():
        if not isinstance(m, SwitchableBatchNorm2d) or m.shared:
            continue  # (a shared BN has no per-width entries: the usual missing-key error)
        head = f"{name}.bn." if name else "bn."
        lacking = [
            w for i, w in zip(range(len(m.bn)), m.widths)
            if any(f"{head}{i}.{k}" not in keys for k in m.bn[i].state_dict())
        ]
        if lacking:
            out[name] = lacking
    return out


def describe_missing_bn_widths(model: nn.Module, missing: Dict[str, List[float]]) -> str:
    """One message for ``missing_bn_widths``'s result: the widths, a layer, what to do."""
    widths = sorted({w for ws in missing.values() for w in ws})
    first = next(iter(missing))
    return (
        f"{type(model).__name__}: the state_dict has no switchable batch norm for width(s) "
        f"{', '.join(f'{w:g}' for w in widths)} in {len(missing)} layer(s) (first: "
        f"{first or '<model>'!r}, its widths {list(model.get_submodule(first).widths)}); it was "
        "probably saved from a model built with other widths. Build the model with the "
        "state_dict's widths, or load with strict=False and compute the missing widths' "
        "statistics with slimops.train.calibrate_bn (their γ, β keep their initial values)."
    )


class ChecksBNWidthsOnLoad:
    """Mixin for a model class (before ``nn.Module`` in the bases): ``load_state_dict`` of a
    state_dict lacking a width's switchable batch norm fails (``strict=True``) or warns
    (``strict=False``) with a message naming the widths, instead of a list of missing keys
    or, worse, a model that silently runs those widths with initial statistics."""

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False):
        missing = missing_bn_widths(self, state_dict)  # type: ignore[arg-type]
        if missing:
            message = describe_missing_bn_widths(self, missing)  # type: ignore[arg-type]
            if strict:
                raise RuntimeError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)  # type: ignore[misc]
