"""kernels.layer_norm against an fp64 reference: forward, dx, dweight, dbias.

Without a GPU the kernels run through the Triton interpreter on CPU tensors; the `gpu`-marked twins
run the compiled kernels on CUDA at training shapes. fp32 must agree within 1e-5; fp16/bf16 within
twice PyTorch's own same-dtype error against the same fp64 reference (plus a tiny floor).
"""
import pytest
import torch
import torch.nn.functional as F

from kernels.layer_norm import MAX_N, layer_norm, layer_norm_reference

EPS = 1e-5
SHAPES = [(1, 768), (3, 7, 768), (5, 1000), (2, 3, 1600), (64, 4096)]
# (x dtype, weight dtype): same dtype, and autocast's fp32 weights with bf16 activations.
DTYPES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
]
LOW_FLOOR = 1e-5  # absolute floor for the low-precision bounds, relative to the reference's largest value


def _dname(d):
    return str(d).replace("torch.", "")


def _inputs(shape, xdtype, wdtype, device, bias=True, noncontig=False, seed=0):
    """fp64 master copies (x, w, b, dy) on the CPU; x is a strided view when `noncontig`."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    if noncontig:
        # Row stride n + 37 > n: a slice of a wider buffer, as a column split of a fused projection gives.
        big = torch.randn(*shape[:-1], n + 37, generator=g, dtype=torch.float64) * 2 + 0.5
        x64 = big[..., 5:5 + n]
    else:
        x64 = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 0.5
    w64 = 1 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    b64 = 0.5 * torch.randn(n, generator=g, dtype=torch.float64) if bias else None
    dy64 = torch.randn(*shape, generator=g, dtype=torch.float64)

    def cast(t, dt):
        if t is None:
            return None
        if noncontig and t is x64:
            out = big.to(device=device, dtype=dt)[..., 5:5 + n]  # keep the strided layout on the device
            assert out.stride(-2) == n + 37
            return out
        return t.to(device=device, dtype=dt)

    return x64, w64, b64, dy64, cast(x64, xdtype), cast(w64, wdtype), cast(b64, wdtype)


def _grads(fn, x, w, b, dy):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    y = fn(x, w, b)
    y.backward(dy.to(y.dtype))
    return [y, x.grad, w.grad] + ([b.grad] if b is not None else [])


def check_layer_norm(shape, xdtype, wdtype, device, expect_launch, bias=True, noncontig=False):
    x64, w64, b64, dy64, x, w, b = _inputs(shape, xdtype, wdtype, device, bias, noncontig)
    ref = _grads(lambda x, w, b: F.layer_norm(x, (shape[-1],), w, b, EPS), x64, w64, b64, dy64)

    with expect_launch("layer_norm_fwd", "layer_norm_bwd", "layer_norm_dwdb"):
        ours = _grads(lambda x, w, b: layer_norm(x, w, b, EPS), x, w, b, dy64.to(device))
    names = ["y", "dx", "dweight", "dbias"][: len(ref)]
    expected_dtypes = [xdtype, xdtype, wdtype, wdtype]
    for name, o, dt in zip(names, ours, expected_dtypes):
        assert o.dtype == dt, f"{name}: dtype {o.dtype}, expected {dt}"
    assert ours[0].shape == x.shape and ours[1].shape == x.shape

    if xdtype == torch.float32:
        for name, o, r in zip(names, ours, ref):
            torch.testing.assert_close(o.double().cpu(), r, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")
        return
    # PyTorch's own error in the same dtype (weights cast to x's dtype, as F.layer_norm requires).
    torch_same = _grads(lambda x, w, b: layer_norm_reference(x, w, b, EPS),
                        x64.to(device=device, dtype=xdtype), w64.to(device=device, dtype=xdtype),
                        b64.to(device=device, dtype=xdtype) if b64 is not None else None, dy64.to(device))
    for name, o, t, r in zip(names, ours, torch_same, ref):
        err = (o.double().cpu() - r).abs().max().item()
        torch_err = (t.double().cpu() - r).abs().max().item()
        assert err <= 2 * torch_err + LOW_FLOOR * max(1.0, r.abs().max().item()), (
            f"{name}: max error {err:.3g} > 2 x torch's {torch_err:.3g} ({_dname(xdtype)})")


# ------------------------------------------------------------------------------------------------
# Interpreter (or, on a GPU machine, the compiled kernels at the same small shapes)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"x{_dname(d[0])}-w{_dname(d[1])}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_matches_fp64(shape, dtypes, kernel_device, expect_launch):
    check_layer_norm(shape, *dtypes, kernel_device, expect_launch)


@pytest.mark.parametrize("dtypes", DTYPES[:2] + DTYPES[3:], ids=lambda d: f"x{_dname(d[0])}-w{_dname(d[1])}")
@pytest.mark.parametrize("shape", [(6, 768), (2, 5, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_strided_rows(shape, dtypes, kernel_device, expect_launch):
    """A view with row stride > N runs without a copy and gives the same results."""
    check_layer_norm(shape, *dtypes, kernel_device, expect_launch, noncontig=True)


@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[3]], ids=lambda d: f"x{_dname(d[0])}-w{_dname(d[1])}")
@pytest.mark.parametrize("shape", [(1, 768), (3, 7, 1600)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_without_bias(shape, dtypes, kernel_device, expect_launch):
    check_layer_norm(shape, *dtypes, kernel_device, expect_launch, bias=False)


def test_layer_norm_weight_grad_is_deterministic(kernel_device, expect_launch):
    """Partial sums per row group + a fixed-order reduction: repeated backwards agree bit for bit."""
    _, _, _, dy64, x, w, b = _inputs((120, 1024), torch.float32, torch.float32, kernel_device)
    dy = dy64.to(kernel_device, torch.float32)
    with expect_launch("layer_norm_dwdb"):
        first = _grads(lambda x, w, b: layer_norm(x, w, b), x, w, b, dy)
        second = _grads(lambda x, w, b: layer_norm(x, w, b), x, w, b, dy)
    for a, c in zip(first, second):
        assert torch.equal(a, c)


def test_layer_norm_stats_are_fp32(kernel_device):
    x = torch.randn(4, 3, 768, device=kernel_device, dtype=torch.bfloat16)
    w = torch.ones(768, device=kernel_device)
    y, mean, rstd = torch.ops.fastgpt.layer_norm_fwd(x, w, None, 1e-5)
    assert y.dtype == torch.bfloat16 and mean.dtype == rstd.dtype == torch.float32
    assert mean.shape == rstd.shape == (4, 3)
    torch.testing.assert_close(mean, x.float().mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd, torch.rsqrt(x.float().var(-1, unbiased=False) + 1e-5), atol=1e-4, rtol=1e-4)


def test_layer_norm_errors(kernel_device, monkeypatch):
    w = torch.ones(MAX_N * 2, device=kernel_device)
    with pytest.raises(ValueError, match="features per row"):
        layer_norm(torch.randn(2, MAX_N * 2, device=kernel_device), w, None)
    with pytest.raises(ValueError, match="shape"):
        layer_norm(torch.randn(2, 8, device=kernel_device), torch.ones(9, device=kernel_device), None)
    if kernel_device == "cpu":  # CPU tensors without the interpreter: an error, never a silent fallback
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            layer_norm(torch.randn(2, 8), torch.ones(8), None)


# ------------------------------------------------------------------------------------------------
# CUDA twins: the compiled kernels at training shapes, bf16 included
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"x{_dname(d[0])}-w{_dname(d[1])}")
@pytest.mark.parametrize("shape", SHAPES + [(8, 1024, 768), (4, 1024, 1280), (4096, 1600), (3, 8192)],
                         ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_cuda(shape, dtypes, expect_launch):
    check_layer_norm(shape, *dtypes, "cuda", expect_launch)


@pytest.mark.gpu
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_cuda_strided(bias, expect_launch):
    check_layer_norm((16, 64, 1600), torch.bfloat16, torch.float32, "cuda", expect_launch, bias=bias, noncontig=True)


@pytest.mark.gpu
def test_layer_norm_cuda_deterministic(expect_launch):
    test_layer_norm_weight_grad_is_deterministic("cuda", expect_launch)
