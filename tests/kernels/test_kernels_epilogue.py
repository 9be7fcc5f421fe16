"""The epilogue's Triton kernels (``slimops.kernels.epilogue``) against ``slimops.reference``.

Without a GPU they run under the Triton interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1). bf16 runs too, as storage (these kernels compute in fp32 and use no
tl.dot, whose bf16 interpreter result is wrong), at a tolerance that allows for the
interpreter's bf16 conversions, which need not round like the GPU's; bf16 is also compiled.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

import torch  # noqa: E402

from slimops import reference  # noqa: E402
from slimops.ops import _backend  # noqa: E402
from slimops.kernels import _aot  # noqa: E402
from slimops.kernels import epilogue as K  # noqa: E402
from slimops.ops._common import ACTIVATION_NAMES  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 runs in the interpreter here: these kernels use no tl.dot (only its dot is wrong).
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}
SHAPES = [(2, 3, 5, 7), (7, 13), (1, 1, 1, 1), (2, 16, 9, 9), (2, 7, 3)]


def _vec(c: int, dtype: torch.dtype, stride: int = 1) -> torch.Tensor:
    # A length-c view into a longer buffer (with `stride`): the kernels must read vectors
    # through their strides, as the ops pass prefixes of full-width parameters.
    return torch.randn(c * stride + 3, dtype=dtype, device=DEVICE)[: c * stride : stride]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize("terms", ["none", "bias", "scale_shift", "all"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_epilogue_matches_reference(shape, terms, activation, dtype):
    c = shape[1]
    z = (torch.randn(shape, device=DEVICE) * 4).to(dtype)
    bias = _vec(c, dtype) if terms in ("bias", "all") else None
    scale = _vec(c, dtype, stride=2) if terms in ("scale_shift", "all") else None
    shift = _vec(c, dtype) if terms in ("scale_shift", "all") else None
    residual = torch.randn(shape, device=DEVICE).to(dtype) if terms == "all" else None
    out = K.epilogue(z, bias, scale, shift, residual, activation)
    f = lambda t: None if t is None else t.float()  # noqa: E731
    expected = reference.epilogue(f(z), f(bias), f(scale), f(shift), f(residual),
                                  ACTIVATION_NAMES[activation]).to(dtype)
    assert out.dtype == dtype and out.shape == z.shape
    torch.testing.assert_close(out.float(), expected.float(), **TOL[dtype])


def test_epilogue_writes_out_in_place():
    z = torch.randn(2, 3, 4, 4, device=DEVICE)
    expected = reference.epilogue(z, None, None, None, None, "relu")
    out = K.epilogue(z, None, None, None, None, 1, out=z)
    assert out.data_ptr() == z.data_ptr()
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_epilogue_backward_matches_autograd(shape, with_scale, activation, dtype):
    c = shape[1]
    z = (torch.randn(shape, device=DEVICE) * 4).to(dtype).float().requires_grad_()
    scale = _vec(c, dtype, stride=3) if with_scale else None
    shift = _vec(c, dtype)
    out = reference.epilogue(z, None, None if scale is None else scale.float(), shift.float(),
                             None, ACTIVATION_NAMES[activation])
    grad_out = torch.randn(shape, device=DEVICE).to(dtype)
    out.backward(grad_out.float())
    out_k = out.detach().to(dtype)
    result = K.epilogue_backward(grad_out, out_k, scale, activation)
    assert result.dtype == dtype and result.is_contiguous()
    expected = z.grad
    if dtype != torch.float32:
        # Rounding `out` to fp16 can move it onto a clamp edge (5.999 -> 6.0) and flip the
        # mask; the op's contract is the mask of the output it is given.
        o = out_k.float()
        keep = {0: torch.ones_like(o), 1: o > 0, 2: (o > 0) & (o < 6)}[activation]
        sc = 1.0 if scale is None else scale.float().view(1, -1, *([1] * (len(shape) - 2)))
        expected = grad_out.float() * keep * sc
    torch.testing.assert_close(result.float(), expected.to(dtype).float(), **TOL[dtype])
    if _backend.HAS_C and dtype == torch.float32 and DEVICE == "cpu":
        cpu = torch.ops.slimops.epilogue_backward(grad_out, out.detach(), scale, activation)
        torch.testing.assert_close(result, cpu, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("activation", [1, 2])
def test_epilogue_backward_mask_at_the_edges(activation):
    # relu' uses out > 0, relu6' 0 < out < 6 (csrc/cpu/common.h): the clamped values 0 and 6
    # themselves pass no gradient, and a masked gradient is exactly 0 even when it is inf.
    out = torch.tensor([0.0, 1e-6, 3.0, 6.0, 5.99, 7.0, -1.0], device=DEVICE).view(1, 7)
    grad = torch.tensor([1.0, 2.0, 3.0, float("inf"), 5.0, 6.0, float("nan")],
                        device=DEVICE).view(1, 7)
    result = K.epilogue_backward(grad, out, None, activation)
    if activation == 1:
        expected = [0.0, 2.0, 3.0, float("inf"), 5.0, 6.0, 0.0]
    else:
        expected = [0.0, 2.0, 3.0, 0.0, 5.0, 0.0, 0.0]
    torch.testing.assert_close(result, torch.tensor(expected, device=DEVICE).view(1, 7))


def test_bad_arguments_raise():
    z = torch.randn(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError):
        K.epilogue(z, torch.randn(4, device=DEVICE), None, None, None, 0)
    with pytest.raises(ValueError):
        K.epilogue(z, None, None, None, None, 3)
    with pytest.raises(ValueError):
        K.epilogue_backward(z, z[:1], None, 1)


def test_aot_representative_case_has_no_spills():
    case = next(c for c in K.aot_cases() if c.name == "epilogue_float32_b1024_w4_full")
    r = _aot.compile_case(case, 90)
    assert r.registers > 0
    assert r.spill_bytes == 0 and r.stack_bytes == 0


def test_bf16_compiles():
    # Compile-only: the interpreter's bf16 arithmetic is not the GPU's.
    for name in ("epilogue_bfloat16_b1024_w4_full", "epilogue_backward_bfloat16_b1024_w4_scale_relu6"):
        case = next(c for c in K.aot_cases() if c.name == name)
        r = _aot.compile_case(case, 80)
        assert r.registers > 0 and r.spill_bytes == 0
