"""On a machine with a CUDA GPU: the slimmable models on CUDA tensors (the ops' CUDA kernels:
Triton, or the extension's own CUDA C++ kernels where it was built with them) match the
same models on the CPU, forward and backward, at every width.

Skipped here (no machine of this project has a GPU); the kernels are verified here under
the Triton interpreter and by ahead-of-time compilation instead (the other tests of this
folder, and tests/test_cuda_*.py for csrc/cuda).
"""

import copy

import pytest
import torch

import slimops
from slimops.ops import _backend
from slimops.models import MODELS

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _backend.CUDA_READY),
    reason="needs a CUDA GPU and the ops' CUDA kernels (triton installed)",
)


@pytest.fixture(autouse=True)
def _no_tf32():
    # compare float32 against the CPU at float32 precision, not TF32's
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@pytest.mark.parametrize("name", ["slim_cnn", "s_mobilenet_v2"])
def test_model_on_cuda_matches_cpu_every_width(name):
    from conftest import randomize_bn

    cpu = randomize_bn(MODELS[name]())
    gpu = copy.deepcopy(cpu).cuda()
    x = torch.randn(2, 3, 32, 32)
    for w in slimops.model_widths(cpu):
        for m in (cpu, gpu):
            m.zero_grad()
            m.train()
        with slimops.width(cpu, w), slimops.width(gpu, w):
            out_c = cpu(x)
            out_g = gpu(x.cuda())
            out_c.square().mean().backward()
            out_g.square().mean().backward()
        torch.testing.assert_close(out_g.cpu(), out_c, rtol=1e-4, atol=1e-4)
        for (n, p_c), p_g in zip(cpu.named_parameters(), gpu.parameters()):
            if p_c.grad is not None:
                torch.testing.assert_close(p_g.grad.cpu(), p_c.grad, rtol=1e-3, atol=1e-4,
                                           msg=lambda m: f"{name} width {w} {n}: {m}")
        cpu.eval()
        gpu.eval()
        with torch.no_grad(), slimops.width(cpu, w), slimops.width(gpu, w):
            torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_runs_on_cuda(dtype):
    from conftest import randomize_bn

    model = randomize_bn(MODELS["s_mobilenet_v2"]()).eval()
    x = torch.randn(2, 3, 64, 64)
    gpu = copy.deepcopy(model).to("cuda", dtype)
    for w in slimops.model_widths(model):
        with torch.no_grad(), slimops.width(model, w), slimops.width(gpu, w):
            expected = model(x)
            got = gpu(x.to("cuda", dtype)).float().cpu()
        scale = float(expected.abs().max())
        tol = 2e-2 if dtype == torch.float16 else 8e-2
        assert float((got - expected).abs().max()) <= tol * max(1.0, scale)
