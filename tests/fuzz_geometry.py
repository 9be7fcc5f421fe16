"""Random extreme convolution geometry against the compiled ops, run as a script in a
subprocess by tests/test_fuzz_geometry.py (a crash must fail that test, not kill pytest).

Every call either raises a Python exception or returns what ``slimops.reference`` returns
for the same arguments. Prints one JSON line: {"calls", "raised", "matched", "mismatched",
"failures"}. Usage: ``python fuzz_geometry.py SEED CALLS``.
"""
from __future__ import annotations

import json
import random
import resource
import sys

import torch

import slimops
from slimops import reference

# Values around the limits that wrapped before: 2^31 (32-bit indices), 2^62 (doubling
# overflows), 2^63 - 1 (the largest int64), next to ordinary ones.
ADDRESS_SPACE_LIMIT = 2 << 30  # bytes; importing torch and slimops maps about 0.8 GiB

EXTREME = [2 ** 31 - 1, 2 ** 31, 2 ** 32 + 1, 2 ** 40, 2 ** 62, 2 ** 63 - 1]


def pick(rng: random.Random, ordinary, extreme_share: float = 0.3) -> int:
    return rng.choice(EXTREME) if rng.random() < extreme_share else rng.choice(ordinary)


def geometry(rng: random.Random):
    stride = [pick(rng, [1, 2, 3]) for _ in range(2)]
    padding = [pick(rng, [0, 1, 2, 5], 0.2) for _ in range(2)]
    dilation = [pick(rng, [1, 2, 3], 0.2) for _ in range(2)]
    return stride, padding, dilation


def naive_conv(x, w, out_channels, stride, padding, dilation, depthwise=False):
    """The convolution by its definition, one output position and tap at a time with Python
    integers (any geometry, no library limits): the oracle where PyTorch's own conv refuses
    a geometry slimops computes (oneDNN cannot build a primitive for a padding near 2^31).
    Differentiable, so it also gives the gradients. Only for small outputs."""
    n, c, h, wd = x.shape
    kh, kw = w.shape[2], w.shape[3]
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    assert ho * wo <= 4096, "the naive oracle is for small outputs"
    o = c if depthwise else out_channels
    cols = []
    for oh in range(ho):
        for ow in range(wo):
            acc = x.new_zeros(n, o)
            for i in range(kh):
                ih = oh * stride[0] - padding[0] + i * dilation[0]
                if not 0 <= ih < h:
                    continue
                for j in range(kw):
                    iw = ow * stride[1] - padding[1] + j * dilation[1]
                    if not 0 <= iw < wd:
                        continue
                    if depthwise:
                        acc = acc + x[:, :, ih, iw] * w[:c, 0, i, j]
                    else:
                        acc = acc + x[:, :, ih, iw] @ w[:o, :c, i, j].T
            cols.append(acc)
    return torch.stack(cols, dim=-1).view(n, o, ho, wo)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)


def input_and_weight_grads(conv, x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """The gradients of conv(x, wt).sum() for x and wt, flattened into one tensor (zeros
    where the output has no path to an input: every tap in the padding)."""
    xr, wr = x.clone().requires_grad_(), wt.clone().requires_grad_()
    out = conv(xr, wr)
    if not out.requires_grad:
        return torch.zeros(x.numel() + wt.numel())
    gx, gw = torch.autograd.grad(out, [xr, wr], torch.ones_like(out), allow_unused=True)
    gx = torch.zeros_like(x) if gx is None else gx
    gw = torch.zeros_like(wt) if gw is None else gw
    return torch.cat([gx.flatten(), gw.flatten()])


def naive_agrees(naive, got: torch.Tensor) -> bool:
    """Whether the naive oracle computes `got` (False when the output is too large for it)."""
    try:
        return close(got, naive())
    except AssertionError:
        return False


def one_call(rng: random.Random):
    """Returns (name, slimops thunk, reference thunk, naive-oracle thunk)."""
    family = rng.choice(["conv2d", "conv2d_backward", "depthwise", "depthwise_backward",
                         "public"])
    stride, padding, dilation = geometry(rng)
    n, h, w = rng.randint(1, 2), rng.randint(1, 9), rng.randint(1, 9)
    k = (rng.choice([1, 3, 5]), rng.choice([1, 3]))
    if family == "public":  # the Python entry point, with autograd
        c_full, o_full = rng.choice([2, 4]), rng.choice([3, 6])
        c, o = rng.randint(1, c_full), rng.randint(1, o_full)
        x = torch.randn(n, c, h, w)
        wt = torch.randn(o_full, c_full, *k)

        def run(op):
            xr, wr = x.clone().requires_grad_(), wt.clone().requires_grad_()
            out = op(xr, wr, None, o, tuple(stride), tuple(padding), tuple(dilation))
            if not out.requires_grad:  # the naive oracle, every tap in the padding
                gx, gw = torch.zeros_like(x), torch.zeros_like(wt)
            else:
                gx, gw = torch.autograd.grad(out.sum(), [xr, wr], allow_unused=True)
                gx = torch.zeros_like(x) if gx is None else gx
                gw = torch.zeros_like(wt) if gw is None else gw
            return torch.cat([out.flatten(), gx.flatten(), gw.flatten()])

        return (f"slimops.ops.conv2d {stride} {padding} {dilation} k{k}",
                lambda: run(slimops.ops.conv2d), lambda: run(reference.conv2d),
                lambda: run(lambda xr, wr, _b, o_, s_, p_, d_: naive_conv(xr, wr, o_, s_, p_,
                                                                          d_)))
    if family.startswith("conv2d"):
        c_full, o_full = rng.choice([2, 4]), rng.choice([3, 6])
        c, o = rng.randint(1, c_full), rng.randint(1, o_full)
        x = torch.randn(n, c, h, w)
        wt = torch.randn(o_full, c_full, *k)
        if family == "conv2d":
            return (f"conv2d {stride} {padding} {dilation} k{k} x{tuple(x.shape)}",
                    lambda: torch.ops.slimops.conv2d(x, wt, None, o, stride, padding, dilation,
                                                     1, None, None, None, 1),
                    lambda: reference.conv2d(x, wt, None, o, stride, padding, dilation, 1,
                                             None, None, None, "relu"),
                lambda: naive_conv(x, wt, o, stride, padding, dilation).relu())

        def ref_grads(conv=lambda xr, wr: reference.conv2d(xr, wr, None, o, stride, padding,
                                                           dilation)):
            return input_and_weight_grads(conv, x, wt)

        def ours():
            out_shape = torch.ops.slimops.conv2d(x, wt, None, o, stride, padding, dilation, 1,
                                                 None, None, None, 0).shape
            gz = torch.ones(out_shape)
            gx = torch.ops.slimops.conv2d_backward_input(gz, wt, list(x.shape), stride, padding,
                                                         dilation, 1)
            gw = torch.ops.slimops.conv2d_backward_weight(gz, x, wt, stride, padding, dilation, 1)
            return torch.cat([gx.flatten(), gw.flatten()])

        return (f"conv2d_backward {stride} {padding} {dilation} k{k}", ours, ref_grads,
                lambda: ref_grads(lambda xr, wr: naive_conv(xr, wr, o, stride, padding,
                                                            dilation)))
    c_full = rng.choice([3, 8])
    c = rng.randint(1, c_full)
    x = torch.randn(n, c, h, w)
    wt = torch.randn(c_full, 1, *k)
    if family == "depthwise":
        return (f"depthwise {stride} {padding} {dilation} k{k} x{tuple(x.shape)}",
                lambda: torch.ops.slimops.depthwise_conv2d(x, wt, None, stride, padding,
                                                           dilation, None, None, None, 2),
                lambda: reference.depthwise_conv2d(x, wt, None, stride, padding, dilation,
                                                   None, None, None, "relu6"),
                lambda: naive_conv(x, wt, c, stride, padding, dilation, True).clamp(0, 6))

    def ref_dw(conv=lambda xr, wr: reference.depthwise_conv2d(xr, wr, None, stride, padding,
                                                              dilation)):
        return input_and_weight_grads(conv, x, wt)

    def ours_dw():
        out_shape = torch.ops.slimops.depthwise_conv2d(x, wt, None, stride, padding, dilation,
                                                       None, None, None, 0).shape
        gz = torch.ones(out_shape)
        gx = torch.ops.slimops.depthwise_conv2d_backward_input(gz, wt, list(x.shape), stride,
                                                               padding, dilation)
        gw = torch.ops.slimops.depthwise_conv2d_backward_weight(gz, x, wt, stride, padding,
                                                                dilation)
        return torch.cat([gx.flatten(), gw.flatten()])

    return (f"depthwise_backward {stride} {padding} {dilation} k{k}", ours_dw, ref_dw,
            lambda: ref_dw(lambda xr, wr: naive_conv(xr, wr, c, stride, padding, dilation,
                                                     True)))


def main() -> int:
    seed, calls = int(sys.argv[1]), int(sys.argv[2])
    # A padding near 2^31 legitimately asks for outputs of tens of GiB; on a machine that
    # overcommits memory such an allocation succeeds and the call then runs for hours. Capping
    # the address space makes it raise (the op's own error) in milliseconds.
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    assert slimops.backend_info()["cpu"] == "C++", "needs the compiled extension"
    rng = random.Random(seed)
    torch.manual_seed(seed)
    counts = {"calls": 0, "raised": 0, "matched": 0, "mismatched": 0, "naive_oracle": 0,
              "reference_wrong": 0, "failures": []}
    for _ in range(calls):
        name, ours, ref, naive = one_call(rng)
        counts["calls"] += 1
        try:
            got = ours()
        except (RuntimeError, ValueError, IndexError, OverflowError, MemoryError):
            counts["raised"] += 1
            continue
        try:
            expected = ref()
        except (RuntimeError, ValueError, IndexError, OverflowError, MemoryError) as e:
            # PyTorch's conv refused a geometry slimops computed: check against the definition.
            try:
                expected = naive()
                counts["naive_oracle"] += 1
            except AssertionError:
                counts["mismatched"] += 1
                counts["failures"].append(
                    f"{name}: slimops returned, the reference raised {e!r}, and the output is "
                    f"too large for the naive oracle"[:400])
                continue
        if close(got, expected):
            counts["matched"] += 1
        elif naive_agrees(naive, got):
            # PyTorch's conv is wrong for this geometry and the definition agrees with
            # slimops. Seen: stride 2^40 with padding 2^31 - 1 sized the output with 0 rows
            # where the formula gives 1; stride 2^31 - 1 with padding 2^31 - 1 gave a wrong
            # input gradient.
            counts["matched"] += 1
            counts["reference_wrong"] += 1
        else:
            naive_says = "neither"
            try:
                naive_says = "the reference" if close(expected, naive()) else naive_says
            except AssertionError:
                naive_says = "unknown (output too large)"
            counts["mismatched"] += 1
            counts["failures"].append(f"{name}: got {tuple(got.shape)}, expected "
                                      f"{tuple(expected.shape)}, max difference "
                                      f"{(got - expected).abs().max().item() if got.shape == expected.shape else 'n/a'}"
                                      f", the naive oracle agrees with {naive_says}")
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
