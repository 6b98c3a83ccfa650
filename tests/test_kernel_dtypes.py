"""The kernels' one dtype rule (kernels._launch.DTYPES): fp32, bf16 and fp16 are taken (math in fp32), every
other floating dtype -- float64 included -- is refused by name, by every kernel; fastgpt.ops routes such
tensors to the PyTorch op under kernels="auto" and refuses kernels="triton" for them."""
import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import DtypeError
from kernels.adamw import adamw_step
from fastgpt import ops

REFUSED = [torch.float64, pytest.param(torch.float8_e4m3fn, id="float8")]


def _refused(match):
    # one error type for every kernel: a TypeError that is also a ValueError, naming the kernel and the dtype
    return pytest.raises(DtypeError, match=match)


@pytest.mark.parametrize("dtype", REFUSED)
def test_layer_norm_refuses(dtype, kernel_device):
    x = torch.randn(3, 32, device=kernel_device).to(dtype)
    with _refused(rf"layer_norm: x is {str(dtype)[6:]}"):
        kernels.layer_norm(x, None, None)
    w = torch.ones(32, device=kernel_device, dtype=torch.float64)
    with _refused("layer_norm: weight is float64"):
        kernels.layer_norm(torch.randn(3, 32, device=kernel_device), w, None)


@pytest.mark.parametrize("dtype", REFUSED)
def test_gelu_refuses(dtype, kernel_device):
    with _refused(rf"gelu: x is {str(dtype)[6:]}"):
        kernels.gelu(torch.randn(64, device=kernel_device).to(dtype))


@pytest.mark.parametrize("dtype", REFUSED)
def test_attention_refuses(dtype, kernel_device):
    q = torch.randn(1, 1, 4, 16, device=kernel_device).to(dtype)
    with _refused(rf"attention: q is {str(dtype)[6:]}"):
        kernels.attention(q, q, q)


@pytest.mark.parametrize("dtype", REFUSED)
def test_cross_entropy_refuses(dtype, kernel_device):
    x = torch.randn(4, 16, device=kernel_device)
    w = torch.randn(10, 16, device=kernel_device)
    t = torch.randint(0, 10, (4,), device=kernel_device)
    with _refused(rf"linear_cross_entropy: x is {str(dtype)[6:]}"):
        kernels.linear_cross_entropy(x.to(dtype), w, t)
    with _refused(rf"linear_cross_entropy: weight is {str(dtype)[6:]}"):
        kernels.linear_cross_entropy(x, w.to(dtype), t)


def test_adamw_refuses_float64_params_and_grads(kernel_device):
    p = torch.nn.Parameter(torch.randn(8, device=kernel_device, dtype=torch.float64))
    p.grad = torch.randn_like(p)
    with _refused("FusedAdamW needs fp32 params"):
        kernels.FusedAdamW([p]).step()
    q, m, v = (torch.zeros(8, device=kernel_device) for _ in range(3))
    g = torch.randn(8, device=kernel_device, dtype=torch.float64)  # autograd keeps p.grad in p's dtype: the op
    with _refused("FusedAdamW .*grad is float64"):
        adamw_step([q], [g], [m], [v], [1e-3], [0.0], [0.9], [0.95], [1e-8], [1.0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_three_dtypes_are_taken_by_every_kernel(dtype, kernel_device, expect_launch):
    x = torch.randn(4, 16, device=kernel_device).to(dtype)
    with expect_launch("layer_norm_fwd", "gelu_fwd", "attention_fwd", "cross_entropy"):
        assert kernels.layer_norm(x, None, None).dtype == dtype
        assert kernels.gelu(x).dtype == dtype
        q = x.view(1, 1, 4, 16)
        assert kernels.attention(q, q, q).dtype == dtype
        w = torch.randn(10, 16, device=kernel_device).to(dtype)
        assert kernels.linear_cross_entropy(x, w, torch.randint(0, 10, (4,), device=kernel_device)).dtype == torch.float32


def test_ops_route_float64_to_torch_and_refuse_it_for_triton(kernel_device):
    x = torch.randn(3, 8, device=kernel_device, dtype=torch.float64)
    before = kernels.launches("gelu_fwd")
    torch.testing.assert_close(ops.gelu(x, "auto"), F.gelu(x, approximate="tanh"))
    assert kernels.launches("gelu_fwd") == before  # the torch op ran, not a kernel computing float64 in fp32
    with pytest.raises(ValueError, match="kernels='triton' was requested for torch.float64 tensors"):
        ops.gelu(x, "triton")
