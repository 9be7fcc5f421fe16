"""``SlimConvBNAct``: slimmable conv + switchable BN + activation (+ residual), fused."""

from __future__ import annotations

import functools
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as torch_module

from slimops import ops
from slimops.nn._attrs import held, lookup
from slimops.nn._checks import check_layer_input
from slimops.nn.batchnorm import SwitchableBatchNorm2d, bn_tensors
from slimops.nn.conv import Channels, IntPair, SlimmableConv2d
from slimops.ops import conv2d_bn_act as fused_train
from slimops.ops.autocast import dtypes_match
from slimops.ops._common import (
    ACTIVATION_CODES,
    check_residual,
    conv_output_hw,
)
from slimops.reference import ACTIVATIONS
from slimops.width import width as width_scope


class _EvalPlan:
    """What the inference fast path of one width needs: the active channel counts and the
    BN's eval scale/shift, with the identity and state of the tensors they came from."""

    __slots__ = ("sources", "stamp", "affine", "stats", "eps", "cin", "cout", "scale",
                 "shift", "bn_width", "call")

    def __init__(self, sources: List[Optional[Tensor]], affine: nn.BatchNorm2d,
                 stats: Optional[nn.BatchNorm2d], cin: int, cout: int, scale: Tensor,
                 shift: Tensor, bn_width: float) -> None:
        # Held so that no other tensor can take a stamped tensor's address meanwhile.
        self.sources = sources
        # None when a source cannot tell whether it was written since (an inference
        # tensor): such a plan serves one call only.
        self.stamp = ops.state_stamp(*sources)
        self.affine, self.stats = affine, stats
        self.eps = (stats or affine).eps
        self.cin, self.cout, self.scale, self.shift = cin, cout, scale, shift
        # The BN's width when built (a plan's BN modules are that width's) and the plan in
        # the form the compiled check-and-call takes (``ops.eval_plan``; set when cached).
        self.bn_width = bn_width
        self.call: Optional[tuple] = None

    @property
    def cacheable(self) -> bool:
        return self.stamp is not None

    def valid(self, sbn: SwitchableBatchNorm2d, dtype: torch.dtype) -> bool:
        """Still right: same BN modules (not replaced, not re-calibrated), same eps and dtype,
        and each BN tensor the same object, on the same storage, unwritten since. Identity and
        storage catch what version counters miss: ``load_state_dict(..., assign=True)``, a
        reassigned buffer, ``bn.weight.data = ...`` (a new tensor starts at version 0; a
        ``.data`` assignment keeps the old one's version).

        It runs on every eval call of every layer, so it is written for speed: the module
        dicts are read directly (``held``) and the tensors' state is one ``state_stamp``."""
        if self.stamp is None or self.scale.dtype != dtype:
            return False
        affine, stats = sbn.active_modules()
        if affine is not self.affine or stats is not self.stats:
            return False
        if (stats or affine).eps != self.eps:
            return False
        return ops.state_stamp(*bn_tensors(affine, stats)) == self.stamp


class SlimConvBNAct(nn.Module):
    """The building block of the reference models: ``act(bn(conv(x)) + residual)``.

    In eval mode the active width's BN is a per-channel scale/shift applied, with the
    residual add and the activation, in the convolution's epilogue: one op, one pass over the
    output. In training the convolution is followed by the fused batch-statistics
    BN + residual + activation op (only the active width's running stats update).

    Inference fast path: in eval mode without autograd (``torch.no_grad()`` /
    ``torch.inference_mode()``), each width's scale/shift is kept (two vectors of the width's
    channel count, the size of its BN γ/β; never a weight) and reused while the BN's tensors
    are unchanged (the same tensor objects, on the same storage, with the same version
    counters; tensors made under ``torch.inference_mode()`` have none and are never cached); a missing or stale listed width refreshes
    every listed width's at once, so later switches cost only ``set_width``. The compiled op is
    called directly: no per-call BN arithmetic and no Python-level re-validation of
    arguments the layer already validated. With autograd on, every call recomputes
    scale/shift from the BN parameters so that gradients reach them.

    Args:
        in_channels, out_channels, kernel_size, stride, dilation, groups, widths: as
            ``SlimmableConv2d`` (the conv has no bias; the BN's β plays that role).
        padding: defaults to ``dilation * (kernel_size - 1) // 2`` ("same" at stride 1).
        activation: ``"relu"`` (default), ``"relu6"`` or ``None``.
        eps, momentum: of the switchable BN.
        shared_bn: one BN for all widths instead of switchable BN (the naive baseline the
            paper compares against; see ``SwitchableBatchNorm2d(shared=True)``).
    """

    def __init__(
        self,
        in_channels: Channels,
        out_channels: Channels,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: Optional[IntPair] = None,
        dilation: IntPair = 1,
        groups: int = 1,
        activation: Optional[str] = "relu",
        *,
        widths: Optional[Sequence[float]] = None,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        shared_bn: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
        if padding is None:
            k = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
            d = (dilation, dilation) if isinstance(dilation, int) else dilation
            padding = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
        self.conv = SlimmableConv2d(in_channels, out_channels, kernel_size, stride, padding,
                                    dilation, groups, bias=False, device=device, dtype=dtype,
                                    widths=widths)
        # The conv's out channels: its rule if it has one (then both run at any width).
        out = self.conv.out_channels_rule or self.conv.out_channels_list
        self.bn = SwitchableBatchNorm2d(out, eps, momentum,
                                        device=device, dtype=dtype, widths=self.conv.widths,
                                        shared=shared_bn)
        self.activation = activation
        self._act_code = ACTIVATION_CODES[activation]
        # width -> its inference fast path plan (channel counts, BN scale/shift)
        self._eval_plans: Dict[float, _EvalPlan] = {}

    def _eval_plan(self, w: float, dtype: torch.dtype) -> "_EvalPlan":
        """Width ``w``'s (the active width's) cached plan, rebuilt when a BN tensor it was
        computed from changed (in-place updates bump ``_version``; ``.to()`` changes the
        dtype) or its ``eps`` did."""
        plan = self._eval_plans.get(w)
        if plan is not None and plan.valid(held(self, "_modules", "bn"), dtype):
            return plan
        plan = self._build_plan()
        if not plan.cacheable:
            return plan
        self._eval_plans[w] = plan
        if w in self.conv._width_index:
            # A listed width's plan was missing or stale (first eval, or the BN changed):
            # refresh every listed width's now, so that switching among them later costs
            # only set_width (the vectors are O(channels); no weight is touched).
            for other in self.conv.widths:
                if other != w:
                    with width_scope(self, other):
                        self._eval_plans[other] = self._build_plan()
        return plan

    def _build_plan(self) -> "_EvalPlan":
        """The active width's plan, computed from the BN tensors as they are (with its
        compiled form when it can be cached)."""
        bn = self.bn
        affine, stats = bn.active_modules()
        sources = bn_tensors(affine, stats)
        cin, cout = self.conv.active_channels()
        scale, shift = bn.eval_scale_shift()
        plan = _EvalPlan(sources, affine, stats, cin, cout, scale, shift, bn.active_width())
        if plan.cacheable:
            plan.call = self._compiled_plan(plan)
        return plan

    def _compiled_plan(self, plan: "_EvalPlan") -> Optional[tuple]:
        """``plan`` as ``ops.eval_plan_call`` takes it: the conv op's arguments with every
        module entry the Python path reads them from (this layer's submodules, the conv's
        weight, bias and geometry, the width's BN modules, tensors and eps), so that the
        compiled check sees what ``_EvalPlan.valid`` and ``_fast_eval`` see. None where one
        of them is not held in a module's dicts (a subclass's property).

        Not this layer's own ``__dict__`` (its activation code, fixed at construction): the
        plan is stored there, and holding it would make a reference cycle that keeps the
        layer's tensors alive after the layer is dropped, until the garbage collector runs."""
        conv, bn = self.conv, self.bn
        bn_state = bn.state_lookups(plan.bn_width)
        entries = [lookup(self, "_modules", "conv"), lookup(self, "_modules", "bn"),
                   lookup(conv, "_parameters", "weight"), lookup(conv, "_parameters", "bias")]
        entries += [lookup(conv, "__dict__", name)
                    for name in ("stride", "_op_padding", "dilation", "groups", "depthwise")]
        if bn_state is None or any(entry is None for entry in entries):
            return None
        weight, bias = entries[2][2], entries[3][2]
        return ops.eval_plan(entries + bn_state, plan.sources, plan.stamp, plan.cin,
                             conv.depthwise, weight, bias, plan.cout, conv.stride,
                             conv._op_padding, conv.dilation, conv.groups, plan.scale,
                             plan.shift, self._act_code)

    def _chain_plan(self) -> Optional[tuple]:
        """This layer's compiled plan at its active width for ``EvalChain``, where calling
        the layer as a module would run just that plan (``_fast_eval``'s first branch): in
        eval mode, no hook of its own, ``forward`` not replaced on the instance, the plan
        cached and built for the BN's width. None otherwise (the caller, or the plan's own
        check, then leaves it to the module call). ``EvalChain`` checks the rest (no global
        hooks, no autograd, not tracing, exactly this class)."""
        state = self.__dict__
        if (state["training"] or state["_forward_hooks"] or state["_forward_pre_hooks"]
                or state["_backward_hooks"] or state["_backward_pre_hooks"]
                or "forward" in state):
            return None
        plan = self._compiled_plan_now(state["_modules"])
        return None if plan is None else plan.call

    def _compiled_plan_now(self, modules: Dict[str, nn.Module]) -> Optional["_EvalPlan"]:
        """The cached plan of the active width where it has a compiled form built for the
        BN's active width (``modules``: this layer's ``_modules``), else None."""
        conv, bn = modules.get("conv"), modules.get("bn")
        if conv is None or bn is None:
            return None
        plan = self._eval_plans.get(conv.eager_width())
        if plan is None or plan.call is None or bn.eager_width() != plan.bn_width:
            return None
        return plan

    def _fast_eval(self, input: Tensor, residual: Optional[Tensor]) -> Optional[Tensor]:
        """The conv + BN + activation op at the active width, or None where the checked
        path must run (a bad input gets its error there). Not while torch.compile traces
        or torch.jit traces (the caller checks)."""
        # First the cached plan, checked and run in one compiled call (``ops.eval_plan``);
        # then, where it is missing, stale or the call unusual, the same in Python.
        stale = None
        plan = self._compiled_plan_now(self.__dict__["_modules"])
        if plan is not None:
            out = ops.eval_plan_call(plan.call, input, residual)
            if out is ops.STALE_PLAN:
                stale = plan
            elif out is not None:
                return out
        conv = held(self, "_modules", "conv")
        weight = held(conv, "_parameters", "weight")
        if not (isinstance(input, Tensor) and input.dim() == 4 and dtypes_match(input, weight)
                and ((input.is_cpu and weight.is_cpu) or input.device == weight.device)):
            return None
        plan = self._eval_plan(conv.active_width(), weight.dtype)
        if plan is stale:
            # Its BN state held (not rebuilt), so a conv entry moved (a new weight, conv or
            # geometry): the compiled form reads them again.
            plan.call = self._compiled_plan(plan)
        if input.shape[1] != plan.cin:
            return None
        # The CPU kernel checks the residual, the vectors and the channels against the weight
        # itself; checking them here too (and choosing the backend) cost 2.5 of the ~9 us of
        # Python in a batch-1 layer call (2-core Intel Xeon). None: that kernel does not run
        # here or rejected an argument; the paths below then check, and name what is wrong.
        stride, padding, dilation = conv.stride, conv._op_padding, conv.dilation
        bias = held(conv, "_parameters", "bias")
        if conv.depthwise:
            out = ops.depthwise_conv2d_cpu_kernel(input, weight, bias, stride, padding, dilation,
                                                  plan.scale, plan.shift, residual,
                                                  self._act_code)
        else:
            out = ops.conv2d_cpu_kernel(input, weight, bias, plan.cout, stride, padding,
                                        dilation, conv.groups, plan.scale, plan.shift, residual,
                                        self._act_code)
        if out is not None:
            return out
        if residual is not None and not self._residual_fits(input, residual, plan.cout):
            return None
        return conv.conv_unchecked(input, plan.cout, stride, padding, dilation, plan.scale,
                                   plan.shift, residual, self._act_code)

    def _residual_fits(self, input: Tensor, residual: Tensor, cout: int) -> bool:
        """A residual the fast path can hand on: a tensor of the output's shape, dtype and
        device (anything else takes the checked path, which names what is wrong)."""
        if not (isinstance(residual, Tensor) and residual.dtype == input.dtype
                and residual.device == input.device and residual.dim() == 4):
            return False
        conv = self.conv
        try:
            ho, wo = conv_output_hw(input.shape[2], input.shape[3], conv.kernel_size,
                                    conv.stride, conv._op_padding, conv.dilation, "conv2d")
        except ValueError:  # input too small: the checked path raises it
            return False
        return tuple(residual.shape) == (input.shape[0], cout, ho, wo)

    def _fast_train(self, input: Tensor, residual: Optional[Tensor]) -> Optional[Tensor]:
        """The training forward of the two-op path (the conv op, then the batch-statistics
        BN + residual + activation op and the running statistics' update) at a listed width,
        with the checks that this layer's own state already answers skipped; None where the
        general path must run: a width between the listed ones, a BN without
        running statistics or with cumulative averaging (``momentum=None``), a hook on the conv
        (the general path calls it as a module), the fused op's devices, anything unusual
        about the input or residual (the general path names what is wrong).

        Why: in an Algorithm 1 step on small images the layer's Python (two module calls,
        each sublayer's width lookup and checks, the op entries' backend choice) is a large
        share of a layer call: a 64->64 1x1 layer on 2x2 planes at batch 64 took 193-215 us
        on the general path, 167-183 us here, its two ops alone 125-139 us (2-core AMD EPYC,
        Zen 3, interleaved rounds)."""
        conv, sbn = held(self, "_modules", "conv"), held(self, "_modules", "bn")
        w = conv.active_width()
        i = conv._width_index.get(w)
        if (i is None or not sbn.training or sbn.active_width() != w
                or conv._forward_hooks or conv._forward_pre_hooks):
            return None
        j = sbn._width_index.get(w)
        if j is None:
            return None
        # Shared BN (the paper's naive baseline): one BN whose channel prefix every width uses.
        bn = sbn._modules_at(w, j)[0]
        cin, cout = conv.in_channels_list[i], conv.out_channels_list[i]
        weight = held(conv, "_parameters", "weight")
        if (bn.momentum is None or not bn.track_running_stats
                or held(bn, "_buffers", "running_mean") is None
                or sbn.num_features_list[j] != cout
                or not isinstance(input, Tensor) or input.dim() != 4 or input.shape[1] != cin
                or input.dtype != weight.dtype or input.device != weight.device
                or fused_train.fused_train_available(input, weight)):
            return None
        s, p, d = conv._geometry()
        if residual is not None:
            if not self._residual_fits(input, residual, cout):
                return None
            ho, wo = residual.shape[2:]  # the output's, as _residual_fits checked
        else:
            try:
                ho, wo = conv_output_hw(input.shape[2], input.shape[3], conv.kernel_size, s, p,
                                        d, "conv2d")
            except ValueError:
                return None
        if input.shape[0] * ho * wo <= 1:
            return None
        z = conv.conv_unchecked(input, cout, s, p, d, None, None, None, 0)
        held(bn, "_buffers", "num_batches_tracked").add_(1)
        gamma, beta, mean, var = bn_tensors(bn, bn)
        if sbn.shared:  # prefix views, no copy (num_features_list[j] == cout, checked above)
            mean, var = mean[:cout], var[:cout]
            gamma = None if gamma is None else gamma[:cout]
            beta = None if beta is None else beta[:cout]
        return ops.batch_norm_act_unchecked(z, gamma, beta, mean, var, True, bn.momentum, bn.eps,
                                            residual, self._act_code)

    def _fuses_training_stats(self, input: Tensor) -> bool:
        # Training on the GPU: the conv's epilogue reduces the BN statistics (one read of
        # the conv output saved per layer). Not for the naive shared BN (the baseline).
        return (self.training and isinstance(input, Tensor) and not self.bn.shared
                and fused_train.fused_train_available(input, self.conv.weight))

    def _conv_bn_train(self, input: Tensor, residual: Optional[Tensor]) -> Tensor:
        conv = self.conv
        cin, cout = conv.active_channels()
        check_layer_input(conv, input, cin, conv.weight, dims=4, channel_dim=1)
        gamma, beta, eps = self.bn.training_affine()
        if self.bn.active_features() != cout:
            raise ValueError(f"SlimConvBNAct: at width {conv.active_width()} the conv gives "
                             f"{cout} channels, the batch norm expects "
                             f"{self.bn.active_features()}")
        s, p, d = conv._geometry()
        ho, wo = conv_output_hw(input.shape[2], input.shape[3], conv.weight.shape[2:], s, p, d,
                                "conv2d")
        check_residual(residual, (input.shape[0], cout, ho, wo), input, "conv2d_bn_act_train")
        count = input.shape[0] * ho * wo
        if count <= 1:
            raise ValueError(f"SlimConvBNAct: expected more than 1 value per channel when "
                             f"training, got an output of shape {(input.shape[0], cout, ho, wo)}")
        if conv.depthwise:
            out, mean, var = fused_train.depthwise_conv2d_bn_act_train(
                input, conv.weight, conv.bias, s, p, d, gamma, beta, eps, residual,
                self._act_code)
        else:
            out, mean, var = fused_train.conv2d_bn_act_train(
                input, conv.weight, conv.bias, cout, s, p, d, conv.groups, gamma, beta, eps,
                residual, self._act_code)
        self.bn.record_batch_stats(mean, var, count)
        return out

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        # Not while tracing or compiling: a trace must record the BN arithmetic, not bake
        # in one width's cached scale/shift as constants.
        if not (self.training or torch.is_grad_enabled()
                or torch.compiler.is_compiling() or torch.jit.is_tracing()):
            out = self._fast_eval(input, residual)
            if out is not None:
                return out
        elif self.training and not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
            out = self._fast_train(input, residual)
            if out is not None:
                return out
        if self.bn.uses_batch_stats():
            if self._fuses_training_stats(input):
                return self._conv_bn_train(input, residual)
            return self.bn.normalize(self.conv(input), residual, self.activation)
        scale, shift = self.bn.eval_scale_shift()
        return self.conv.conv(input, scale, shift, residual, self.activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class EvalChain:
    """A block's ``SlimConvBNAct`` layers run as one compiled call in inference.

    A block (a bottleneck, an inverted residual, a depthwise-separable pair) calls its
    layers one by one; in eval mode without autograd each call is one cached plan's C call
    (``SlimConvBNAct``'s inference fast path), and what is left between them is Python: the
    module calls and the interpreter's work on caches the last kernel just streamed. On the
    2-core Intel Xeon here that was 1.4-2.3 ms of a batch-1 S-ResNet-50 forward at 224 over
    its frozen TorchScript (docs/BENCHMARKS.md, the twenty-seventh round). An ``EvalChain``
    runs a block's layers from their plans in one C call (``slimops.ops.eval_chain_call``),
    every plan checked first; ``run_eval_chains`` runs several blocks' chains in one.

    ``steps``: ``(name, source, residual)`` per layer, in order: the layer is the block's
    submodule ``name``; it runs on slot ``source``, with slot ``residual`` (None: none) added
    before its activation; slot 0 is the block's input and slot ``k + 1`` step ``k``'s
    output. The chain's result is the last step's output. A block's ``forward`` starts
    with ``out = chain(self, x)`` and runs its layers as usual where that is None::

        class Bottleneck(nn.Module):
            _chain = EvalChain([("conv1", 0, None), ("conv2", 1, None), ("conv3", 2, 0)])

            def forward(self, x):
                out = self._chain(self, x)
                if out is not None:
                    return out
                return self.conv3(self.conv2(self.conv1(x)), x)

    The chain runs only where the module calls would compute exactly it: no autograd, not
    while torch.compile or torch.jit traces, no global module hooks, and every layer a
    ``SlimConvBNAct`` (not a subclass, its ``forward`` not patched) in eval mode with no hooks
    of its own and a current plan for its width. A stale plan or anything unusual (an input
    of other channels, a residual of another shape) returns None, and the layers' own calls
    then rebuild the plan or raise their usual errors.
    """

    __slots__ = ("names", "links")

    def __init__(self, steps: Sequence[Tuple[str, int, Optional[int]]]) -> None:
        steps = list(steps)
        if not steps:
            raise ValueError("EvalChain: expected at least one step")
        links: List[int] = []
        for k, step in enumerate(steps):
            if not (isinstance(step, tuple) and len(step) == 3 and isinstance(step[0], str)):
                raise TypeError(f"EvalChain: step {k} must be (name, source, residual), got "
                                f"{step!r}")
            _, source, residual = step
            for what, slot in (("source", source), ("residual", residual)):
                if slot is None and what == "residual":
                    continue
                if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot <= k:
                    raise ValueError(f"EvalChain: step {k}'s {what} must be a slot 0..{k} "
                                     f"(0: the input, j + 1: step j's output), got {slot!r}")
            links += [source, -1 if residual is None else residual]
        self.names: Tuple[str, ...] = tuple(step[0] for step in steps)
        self.links: Tuple[int, ...] = tuple(links)

    def __call__(self, block: nn.Module, input: Tensor) -> Optional[Tensor]:
        """The chain's output on ``input``, or None where ``block`` must call its layers."""
        return run_eval_chains(((block, self),), input)

    def __repr__(self) -> str:
        return f"EvalChain({self.names}, links={self.links})"


def runs_eval_chain(forward: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Marks a block class's ``forward`` as computing, in inference, exactly what its
    ``eval_chain()`` (an ``EvalChain``) computes, so that a model may run the chain in place
    of calling the block (``bypassable``). A subclass that overrides ``forward`` without the
    mark, or a ``forward`` patched onto the class, is called as a module."""
    forward.__slimops_eval_chain__ = True  # type: ignore[attr-defined]
    return forward


def bypassable(module: nn.Module) -> bool:
    """True where calling ``module`` runs just its ``eval_chain()``'s layers (or, for a
    plain ``nn.Sequential``, just its children in turn): its class's ``forward`` is marked
    ``runs_eval_chain`` (or it is exactly an ``nn.Sequential`` with torch's ``forward``), it
    has no hooks of its own and no ``forward`` set on the instance. (Global hooks:
    ``chains_can_run``.) A model that runs its blocks' chains in place of calling the blocks
    checks each block, and each container it skips, with it."""
    state = module.__dict__
    kind = type(module)
    if not (getattr(kind.forward, "__slimops_eval_chain__", False)
            or (kind is nn.Sequential and kind.forward is _SEQUENTIAL_FORWARD)):
        return False
    return not (state["_forward_hooks"] or state["_forward_pre_hooks"]
                or state["_backward_hooks"] or state["_backward_pre_hooks"]
                or "forward" in state)


# The forwards the chains stand for, as defined (a forward patched onto the class afterwards
# is not what a chain computes).
_SEQUENTIAL_FORWARD = nn.Sequential.forward
_LAYER_FORWARD = SlimConvBNAct.forward


@functools.lru_cache(maxsize=256)
def _sequence_links(chains: Tuple[EvalChain, ...]) -> Tuple[int, ...]:
    """``chains``' links in one slot numbering: each chain's slot 0 is the previous chain's
    last output (the first's the input), its slot ``j + 1`` its own step ``j``'s output.
    Cached by the chains (a model's are module constants)."""
    out: List[int] = []
    base = 0  # the slot holding this chain's input
    for chain in chains:
        out += [-1 if slot < 0 else base + slot for slot in chain.links]
        base += len(chain.names)
    return tuple(out)


def chains_can_run() -> bool:
    """False where no ``EvalChain`` runs (the modules must be called): autograd on,
    torch.compile or torch.jit tracing, or a global module hook registered (every module
    call runs it)."""
    return not (torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch.jit.is_tracing() or torch_module._global_forward_hooks
                or torch_module._global_forward_pre_hooks or torch_module._global_backward_hooks
                or torch_module._global_backward_pre_hooks)


def block_chains(blocks: Iterable[nn.Module]) -> Optional[List[Tuple[nn.Module, EvalChain]]]:
    """``(block, block.eval_chain())`` for each of ``blocks``, the parts ``run_eval_chains``
    takes, or None where one of them must be called as a module (``bypassable``)."""
    parts = []
    for block in blocks:
        if not bypassable(block):
            return None
        parts.append((block, block.eval_chain()))  # type: ignore[operator]
    return parts


def run_eval_chains(parts: Sequence[Tuple[nn.Module, EvalChain]], input: Tensor
                    ) -> Optional[Tensor]:
    """``(module, chain)`` parts run one after another, each on the previous one's output
    (the first on ``input``), in one compiled call: the last one's output, or None where the
    modules must run (see ``EvalChain``). Each chain's layers are read from its module's
    submodules; the caller has checked that the modules' own calls may be skipped
    (``bypassable``) where it skips them."""
    if not chains_can_run() or SlimConvBNAct.forward is not _LAYER_FORWARD:
        return None
    plans = []
    for module, chain in parts:
        modules = module.__dict__["_modules"]
        for name in chain.names:
            layer = modules.get(name)
            plan = layer._chain_plan() if type(layer) is SlimConvBNAct else None
            if plan is None:
                return None
            plans.append(plan)
    links = (parts[0][1].links if len(parts) == 1
             else _sequence_links(tuple(chain for _, chain in parts)))
    out = ops.eval_chain_call(tuple(plans), links, input)
    return out if isinstance(out, Tensor) else None
