"""kernels.layer_norm against an fp64 reference: forward, dx, dweight, dbias.

Without a GPU the kernels run through the Triton interpreter on CPU tensors; the `gpu`-marked twins
run the compiled kernels on CUDA at training shapes. fp32 must agree within 1e-5; fp16/bf16 within
twice PyTorch's own same-dtype error against the same fp64 reference (plus a tiny floor).
"""
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.layer_norm import MAX_N, blocks_per_sm, layer_norm, layer_norm_reference

ln_mod = sys.modules["kernels.layer_norm"]  # the module (kernels.layer_norm is also the function's name)

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


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops dispatched (a custom op is seen as itself, not what its kernel launcher does)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=_dname)
@pytest.mark.parametrize("shape", [(3, 7, 768), (5, 1000)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_writes_the_autocast_dtype(shape, amp_dtype, kernel_device, expect_launch):
    """fp32 input under autocast -> output in the autocast dtype from the one kernel launch (no cast op),
    fp32 statistics, and forward/backward parity; the backward takes the 16-bit gradient."""
    x64, w64, b64, dy64, x, w, b = _inputs(shape, torch.float32, torch.float32, kernel_device)
    x, w, b = (t.detach().requires_grad_() for t in (x, w, b))
    before = kernels.launches()
    rec = _AtenOps()
    with torch.autocast(kernel_device, dtype=amp_dtype), rec:
        y = layer_norm(x, w, b, EPS)
    assert y.dtype == amp_dtype
    assert kernels.launches() - before == 1 and kernels.launches("layer_norm_fwd") > 0
    # autograd's detach of the saved tensors aside, the kernel is the only op: no cast after it
    assert [op for op in rec.ops if op != "aten.detach.default"] == ["fastgpt.layer_norm_fwd.default"], rec.ops
    dy = dy64.to(kernel_device, amp_dtype)
    with expect_launch("layer_norm_bwd", "layer_norm_dwdb"):
        y.backward(dy)
    assert (x.grad.dtype, w.grad.dtype, b.grad.dtype) == (torch.float32,) * 3

    # Reference: fp64 LayerNorm, its output rounded once to the autocast dtype; the backward of the
    # same 16-bit dy. The kernel's output may differ from it by one rounding of the fp32 math.
    x_r, w_r, b_r = (t.detach().clone().requires_grad_() for t in (x64, w64, b64))
    y_r = F.layer_norm(x_r, (shape[-1],), w_r, b_r, EPS)
    y_r.backward(dy.double().cpu())
    ulp = torch.finfo(amp_dtype).eps
    torch.testing.assert_close(y.double().cpu(), y_r.detach().to(amp_dtype).double(), rtol=ulp, atol=ulp)
    for name, o, r in (("dx", x.grad, x_r.grad), ("dweight", w.grad, w_r.grad), ("dbias", b.grad, b_r.grad)):
        torch.testing.assert_close(o.double().cpu(), r, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")

    # The PyTorch branch of fastgpt.ops gives the same dtype (and, but for rounding, values).
    from fastgpt import ops
    with torch.autocast(kernel_device, dtype=amp_dtype):
        y_t = ops.layer_norm(x.detach(), w.detach(), b.detach(), EPS, "torch")
        y_k = ops.layer_norm(x.detach(), w.detach(), b.detach(), EPS, "triton")
    assert y_t.dtype == y_k.dtype == amp_dtype
    torch.testing.assert_close(y_k.double(), y_t.double(), rtol=ulp, atol=ulp)


def test_layer_norm_out_dtype_in_fake_mode():
    """register_fake gives the custom op's out_dtype: torch.compile and the memory model see it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 16, 1600)
        y, mean, rstd = torch.ops.fastgpt.layer_norm_fwd(x, torch.empty(1600), None, 1e-5, torch.bfloat16)
        assert (y.dtype, mean.dtype, rstd.dtype) == (torch.bfloat16, torch.float32, torch.float32)
        y, _, _ = torch.ops.fastgpt.layer_norm_fwd(x, None, None, 1e-5)
        assert y.dtype == torch.float32


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16], ids=_dname)
@pytest.mark.parametrize("shape", [(3, 7, 768), (4, 100)], ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_without_affine(shape, xdtype, kernel_device, expect_launch):
    """layer_norm(x, None, None) == nn.LayerNorm(elementwise_affine=False): values and dx."""
    x64, _, _, dy64, x, _, _ = _inputs(shape, xdtype, xdtype, kernel_device)
    x = x.detach().requires_grad_()
    before = kernels.launches("layer_norm_dwdb")
    with expect_launch("layer_norm_fwd", "layer_norm_bwd"):
        y = layer_norm(x, None, None, EPS)
        y.backward(dy64.to(kernel_device, xdtype))
    assert kernels.launches("layer_norm_dwdb") == before  # nothing to reduce without parameters
    assert y.dtype == x.grad.dtype == xdtype
    x_r = x64.clone().requires_grad_()
    y_r = torch.nn.LayerNorm(shape[-1], eps=EPS, elementwise_affine=False, dtype=torch.float64)(x_r)
    y_r.backward(dy64.to(xdtype).double())
    tol = 1e-5 if xdtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double().cpu(), y_r.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.double().cpu(), x_r.grad, atol=tol * 4, rtol=tol)


def test_ops_layer_norm_without_affine(kernel_device):
    """fastgpt.ops.layer_norm accepts weight=None too (both branches agree)."""
    from fastgpt import ops

    x = torch.randn(2, 3, 64, device=kernel_device)
    ours, ref = ops.layer_norm(x, None, None, EPS, "triton"), ops.layer_norm(x, None, None, EPS, "torch")
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_blocks_per_sm_rule():
    """CUDA's occupancy arithmetic the backward's grid is sized with (64K registers, 2048 threads)."""
    assert blocks_per_sm(128, 8, 0) == 2  # the old build: exactly two 8-warp blocks
    assert blocks_per_sm(129, 8, 0) == 1  # one register more (rounded up to 136): one block, not two
    assert blocks_per_sm(96, 8, 0) == 2
    assert blocks_per_sm(80, 8, 0) == 3
    assert blocks_per_sm(57, 8, 0) == 4  # 57 -> 64 registers a thread: 4 x 256 threads x 64 = 64K
    assert blocks_per_sm(32, 8, 0) == 8  # thread limit: 8 x 256 = 2048
    assert blocks_per_sm(40, 4, 0) == 12  # 40 x 128 x 12 = 60K registers, 1536 threads
    assert blocks_per_sm(56, 8, 100 * 1024) == 2  # shared memory (228 KiB an SM) binds first
    assert blocks_per_sm(255, 32, 0) == 1  # never 0: a kernel that launched fits once
    assert blocks_per_sm(128, 8, 0, regs_per_sm=32768) == 1


def test_backward_grid_uses_the_compiled_occupancy(monkeypatch):
    """On CUDA the backward runs blocks_per_sm(compiled kernel) x SMs programs (one wave), read once
    per configuration from the CompiledKernel that Triton returns: a stand-in checks the wiring."""

    class Meta:
        num_warps, shared = 8, 1056

    class Compiled:
        n_regs, metadata = 100, Meta()

        def _init_handles(self):
            pass

    monkeypatch.setattr(ln_mod, "_sm_props", lambda device: (132, 65536, 2048, 228 * 1024))
    assert ln_mod._compiled_blocks_per_sm(Compiled(), torch.device("cuda")) == 2
    Compiled.n_regs = 64
    assert ln_mod._compiled_blocks_per_sm(Compiled(), torch.device("cuda")) == 4


def test_backward_config_stays_clear_of_the_register_edge():
    """Per thread: 16 bytes of x (128-bit loads), next tile prefetched, at every GPT-2 width."""
    for n in (768, 1024, 1280, 1600):
        for x_bytes, per_thread in ((4, 4), (2, 8)):
            block_n, rows, warps, prefetch = ln_mod._bwd_config(n, x_bytes)
            assert prefetch and block_n * rows // (warps * 32) == per_thread, (n, x_bytes)
    assert ln_mod._bwd_config(8192, 4) == (8192, 1, 16, False)


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


@pytest.mark.gpu
def test_layer_norm_cuda_grid_is_one_wave(expect_launch):
    """The backward sizes its grid from the compiled kernel's registers (read once per config)."""
    ln_mod._BWD_BLOCKS_PER_SM.clear()
    check_layer_norm((64, 1024, 768), torch.float32, torch.float32, "cuda", expect_launch)
    ((key, per_sm),) = ln_mod._BWD_BLOCKS_PER_SM.items()
    assert per_sm >= 2, key  # <= 96 registers at 8 warps: at least two blocks an SM


@pytest.mark.gpu
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=_dname)
def test_layer_norm_cuda_autocast(amp_dtype, expect_launch):
    test_layer_norm_writes_the_autocast_dtype((8, 1024, 768), amp_dtype, "cuda", expect_launch)
