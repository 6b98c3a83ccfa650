"""kernels.gelu (tanh approximation) against an fp64 reference: forward and dx.

Interpreter on CPU without a GPU; the `gpu`-marked twins run the compiled kernels on CUDA.
fp32 within 1e-5; fp16/bf16 within twice PyTorch's own same-dtype error (plus a tiny floor).
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.gelu import gelu, gelu_reference

SHAPES = [(1, 768), (3, 7, 768), (5, 1000), (2, 3, 1600), (64, 4096)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOW_FLOOR = 1e-5  # absolute floor for the low-precision bounds, relative to the reference's largest value


def _dname(d):
    return str(d).replace("torch.", "")


def _grads(fn, x, dy):
    x = x.detach().requires_grad_()
    y = fn(x)
    y.backward(dy.to(y.dtype))
    return [y, x.grad]


def check_gelu(shape, dtype, device, expect_launch, noncontig=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Scale 3 covers the saturated tails (x < -4: y ~ 0, x > 4: y ~ x) as well as the curved middle.
    x64 = torch.randn(*shape, generator=g, dtype=torch.float64) * 3
    dy64 = torch.randn(*shape, generator=g, dtype=torch.float64)
    if noncontig:
        x64 = x64.transpose(-1, -2)  # last stride != 1: the launcher copies once
        dy64 = dy64.transpose(-1, -2)
    x = x64.to(device=device, dtype=dtype)
    ref = _grads(lambda t: F.gelu(t, approximate="tanh"), x64, dy64)
    with expect_launch("gelu_fwd", "gelu_bwd"):
        ours = _grads(gelu, x, dy64.to(device))
    for name, o in zip(("y", "dx"), ours):
        assert o.dtype == dtype and o.shape == x.shape, f"{name}: {o.dtype} {tuple(o.shape)}"
    if dtype == torch.float32:
        for name, o, r in zip(("y", "dx"), ours, ref):
            torch.testing.assert_close(o.double().cpu(), r, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        return
    torch_same = _grads(gelu_reference, x, dy64.to(device))
    for name, o, t, r in zip(("y", "dx"), ours, torch_same, ref):
        err = (o.double().cpu() - r).abs().max().item()
        torch_err = (t.double().cpu() - r).abs().max().item()
        assert err <= 2 * torch_err + LOW_FLOOR * max(1.0, r.abs().max().item()), (
            f"{name}: max error {err:.3g} > 2 x torch's {torch_err:.3g} ({_dname(dtype)})")


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gelu_matches_fp64(shape, dtype, kernel_device, expect_launch):
    check_gelu(shape, dtype, kernel_device, expect_launch)


@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_gelu_non_contiguous(dtype, kernel_device, expect_launch):
    check_gelu((5, 100, 3), dtype, kernel_device, expect_launch, noncontig=True)


def test_gelu_extremes(kernel_device, expect_launch):
    """Saturated tails give the limits (0 and x; gradients 0 and 1) with no NaN or inf."""
    x = torch.tensor([-1e4, -100.0, -20.0, -5.0, -1e-20, 0.0, 1e-20, 5.0, 20.0, 100.0, 1e4],
                     device=kernel_device).requires_grad_()
    with expect_launch("gelu_fwd", "gelu_bwd"):
        y = gelu(x)
        y.backward(torch.ones_like(y))
    xr = x.detach().double().cpu().requires_grad_()
    yr = F.gelu(xr, approximate="tanh")
    yr.backward(torch.ones_like(yr))
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(y.double().cpu(), yr, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(x.grad.double().cpu(), xr.grad, atol=1e-5, rtol=1e-6)


def test_gelu_empty(kernel_device):
    x = torch.empty(0, 768, device=kernel_device)
    assert gelu(x).shape == (0, 768)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
@pytest.mark.parametrize("shape", SHAPES + [(8, 1024, 3072), (4, 1024, 6400), (7, 333)],
                         ids=lambda s: "x".join(map(str, s)))
def test_gelu_cuda(shape, dtype, expect_launch):
    check_gelu(shape, dtype, "cuda", expect_launch)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=_dname)
def test_gelu_cuda_non_contiguous(dtype, expect_launch):
    check_gelu((16, 3072, 64), dtype, "cuda", expect_launch, noncontig=True)
