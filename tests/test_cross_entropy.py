"""Fused linear cross-entropy against the fp64 `F.cross_entropy(x @ w.T)`: loss, dx, dweight.

Interpreter on CPU tensors here (rows kept small: every row streams the whole vocabulary through
the interpreter); the `cuda` variants run the compiled kernel (`pytest -m gpu`).
"""
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
from _train_util import train_losses
from kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from fastgpt import GPTConfig
from fastgpt import model as model_mod

DEVICES = ["kernel", pytest.param("cuda", marks=pytest.mark.gpu)]

# (N, C, V, chunk_rows): odd row counts, GPT-2's vocabulary, several chunks (chunk_rows) and one
SHAPES = [(1, 64, 1000, None), (7, 96, 1000, 3), (100, 64, 1000, 32), (7, 64, 50257, None), (9, 96, 50257, 4)]


def _dev(device, kernel_device):
    return kernel_device if device == "kernel" else device


def _inputs(N, C, V, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=gen)
    w = torch.randn(V, C, generator=gen) * C ** -0.5 * 2  # logits of O(1..3), a peaked softmax
    t = torch.randint(0, V, (N,), generator=gen)
    t[1::3] = -1  # ignored rows
    return x.to(device, dtype), w.to(device, dtype), t.to(device)


def _grads(fn, x, w, t, upstream):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    loss = fn(x, w, t)
    (loss * upstream).backward()
    return loss.detach().double(), x.grad.double(), w.grad.double()


def _fp64_reference(x, w, t, upstream, reduction="mean"):
    return _grads(lambda a, b, c: F.cross_entropy(a @ b.T, c, ignore_index=-1, reduction=reduction),
                  x.double(), w.double(), t, upstream)


def _err(a, b):
    return [(p - q).abs().max().item() for p, q in zip(a, b)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N,C,V,chunk_rows", SHAPES)
def test_fp32_matches_fp64_reference(device, N, C, V, chunk_rows, kernel_device, expect_launch):
    dev = _dev(device, kernel_device)
    x, w, t = _inputs(N, C, V, torch.float32, dev)
    upstream = 1.7  # a non-unit grad_output: the backward scales the saved gradients
    ref = _fp64_reference(x, w, t, upstream)
    with expect_launch("cross_entropy"):
        ours = _grads(lambda a, b, c: linear_cross_entropy(a, b, c, chunk_rows=chunk_rows), x, w, t, upstream)
    for name, o, r in zip(("loss", "dx", "dweight"), ours, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("N,C,V,chunk_rows", [(7, 96, 1000, 3), (5, 64, 50257, None)])
def test_low_precision_within_2x_torch(device, dtype, N, C, V, chunk_rows, kernel_device, expect_launch):
    dev = _dev(device, kernel_device)
    x, w, t = _inputs(N, C, V, dtype, dev, seed=1)
    ref = _fp64_reference(x, w, t, 1.0)
    torch_err = _err(_grads(linear_cross_entropy_reference, x, w, t, 1.0), ref)
    with expect_launch("cross_entropy"):
        out = _grads(lambda a, b, c: linear_cross_entropy(a, b, c, chunk_rows=chunk_rows), x, w, t, 1.0)
    our_err = _err(out, ref)
    for name, e_ours, e_torch in zip(("loss", "dx", "dweight"), our_err, torch_err):
        assert e_ours <= 2 * e_torch + 1e-5, f"{name}: ours {e_ours:.3g} vs torch {e_torch:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_fp32_inputs_compute_in_bf16(device, kernel_device, expect_launch):
    """The model's case: fp32 x and weight under bf16 autocast -> bf16 matmuls, fp32 grads out."""
    dev = _dev(device, kernel_device)
    x, w, t = _inputs(9, 64, 1000, torch.float32, dev, seed=2)
    ref = _fp64_reference(x, w, t, 1.0)
    with torch.autocast(device_type=dev, dtype=torch.bfloat16):
        torch_out = _grads(linear_cross_entropy_reference, x, w, t, 1.0)
        with expect_launch("cross_entropy"):
            xg = x.detach().clone().requires_grad_()
            wg = w.detach().clone().requires_grad_()
            loss = linear_cross_entropy(xg, wg, t, chunk_rows=4)
    loss.backward()
    assert loss.dtype == xg.grad.dtype == wg.grad.dtype == torch.float32
    our_err = _err((loss.detach().double(), xg.grad.double(), wg.grad.double()), ref)
    torch_err = _err(torch_out, ref)
    assert torch_err[1] > 1e-5  # autocast really ran bf16 in the reference ...
    for name, e_ours, e_torch in zip(("loss", "dx", "dweight"), our_err, torch_err):
        assert e_ours <= 2 * e_torch + 1e-5, f"{name}: ours {e_ours:.3g} vs torch {e_torch:.3g}"
    assert our_err[1] > 1e-6  # ... and in ours (fp32 math would be ~1e-8 off)


def test_sum_reduction_no_grad_and_all_ignored(kernel_device, expect_launch):
    x, w, t = _inputs(7, 64, 1000, torch.float32, kernel_device, seed=3)
    ref = _fp64_reference(x, w, t, 1.0, reduction="sum")
    with expect_launch("cross_entropy"):
        ours = _grads(lambda a, b, c: linear_cross_entropy(a, b, c, reduction="sum"), x, w, t, 1.0)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        loss = linear_cross_entropy(x.requires_grad_(), w, t)
    torch.testing.assert_close(loss.double(), ref[0] / (t != -1).sum(), atol=1e-6, rtol=1e-6)
    # every target ignored: torch's mean is nan (0/0), sum is 0
    t_ign = torch.full_like(t, -1)
    assert torch.isnan(linear_cross_entropy(x, w, t_ign))
    assert linear_cross_entropy(x, w, t_ign, reduction="sum").item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, t, reduction="none")


@pytest.mark.parametrize("bad", [1000, 5000, -2])
def test_targets_out_of_range_are_refused_on_cpu(bad, kernel_device):
    """A target outside [0, V) that is not ignore_index: a clear error (CPU/interpreter: the check reads
    the targets on the host, which costs nothing there), not a NaN loss."""
    x, w, t = _inputs(7, 64, 1000, torch.float32, kernel_device, seed=6)
    t[4] = bad
    if kernel_device == "cpu":
        with pytest.raises(ValueError, match=rf"target {bad} at position 4 is outside \[0, 1000\)"):
            linear_cross_entropy(x, w, t)
    with pytest.raises(ValueError, match="outside"):  # on CUDA: opt-in (a device -> host sync)
        linear_cross_entropy(x, w, t, check_targets=True)
    t[4] = 7
    t[1::3] = -100  # another ignore_index is fine
    loss = linear_cross_entropy(x, w, t, ignore_index=-100)
    ref = F.cross_entropy(x.double() @ w.double().T, t, ignore_index=-100)
    torch.testing.assert_close(loss.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_targets_out_of_range_on_cuda_are_opt_in():
    """On CUDA the default does not sync: a bad target gives a NaN loss; check_targets=True raises."""
    x, w, t = _inputs(7, 64, 1000, torch.float32, "cuda", seed=6)
    t[4] = 1000
    assert torch.isnan(linear_cross_entropy(x, w, t))
    with pytest.raises(ValueError, match="position 4"):
        linear_cross_entropy(x, w, t, check_targets=True)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(16, 32, requires_grad=True)
        w = torch.empty(50257, 32, requires_grad=True)
        t = torch.zeros(16, dtype=torch.long)
        loss, dx, dw = torch.ops.fastgpt.linear_cross_entropy(x, w, t, -1, "mean", torch.bfloat16, 0, True, True)
        assert loss.shape == () and loss.dtype == torch.float32
        assert dx.shape == x.shape and dw.shape == w.shape


def test_opcheck(kernel_device):
    """torch.library's own checks of the schema, fake and autograd registrations."""
    x, w, t = _inputs(3, 32, 200, torch.float32, kernel_device, seed=5)
    args = (x.requires_grad_(), w.requires_grad_(), t, -1, "mean", torch.float32, 2, True, True)
    torch.library.opcheck(torch.ops.fastgpt.linear_cross_entropy.default, args)


def test_compiles_without_graph_breaks(kernel_device, expect_launch):
    x, w, t = _inputs(6, 64, 1000, torch.float32, kernel_device, seed=4)
    x.requires_grad_()
    w.requires_grad_()
    fn = torch.compile(lambda a, b, c: linear_cross_entropy(a, b, c), fullgraph=True, backend="aot_eager")
    with expect_launch("cross_entropy"):
        loss = fn(x, w, t)
    loss.backward()
    ref = _fp64_reference(x.detach(), w.detach(), t, 1.0)
    for o, r in zip((loss.detach().double(), x.grad.double(), w.grad.double()), ref):
        torch.testing.assert_close(o, r, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Training with the fused loss
# --------------------------------------------------------------------------------------------
def _train_losses(cfg, return_logits, device, steps=5, B=2, T=16):
    """One fixed batch with some ignored targets, trained `steps` times: the loss must fall."""
    gen = torch.Generator().manual_seed(123)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=gen)
    x, y = idx[:, :-1], idx[:, 1:].clone()
    y[0, :3] = -1
    return train_losses(cfg, [(x, y)] * steps, device, return_logits=return_logits)


def test_tiny_trains_same_with_fused_loss(kernel_device, expect_launch, monkeypatch):
    """The tiny preset (full 50257 vocabulary), T=16, B=2, 5 AdamW steps: the fused kernel's loss
    path vs the logits path, everything else in PyTorch (so only the loss differs)."""
    cfg = GPTConfig.preset("tiny", kernels="torch")
    ref = _train_losses(cfg, True, kernel_device)
    monkeypatch.setattr(model_mod.ops, "linear_cross_entropy",
                        lambda x, w, t, mode="auto": kernels.linear_cross_entropy(x, w, t, ignore_index=-1))
    with expect_launch("cross_entropy"):
        fused = _train_losses(cfg, False, kernel_device)
    assert ref[-1] < ref[0]
    for i, (a, b) in enumerate(zip(ref, fused)):
        assert abs(a - b) <= 1e-4, f"step {i}: logits path {a:.6f} vs fused {b:.6f}"


def test_reduced_model_all_triton_fused_loss(kernel_device, expect_launch):
    """kernels="triton" throughout (LayerNorm, GELU, attention, FusedAdamW, fused loss), reduced
    config: return_logits=False vs True per-step losses."""
    cfg = GPTConfig(block_size=32, vocab_size=1000, n_layer=2, n_head=2, n_embd=64, kernels="triton")
    ref = _train_losses(cfg, True, kernel_device)
    with expect_launch("cross_entropy", "adamw"):
        fused = _train_losses(cfg, False, kernel_device)
    for i, (a, b) in enumerate(zip(ref, fused)):
        assert abs(a - b) <= 1e-4, f"step {i}: logits path {a:.6f} vs fused {b:.6f}"


def test_fallback_from_the_dtype_out_matmul_is_warned_once_with_its_reason(monkeypatch, recwarn):
    """If aten.addmm.dtype_out raises on this torch build, the dweight accumulation switches (for the process)
    to the slower product + add: said once, with the reason, and the result is still right."""
    import warnings

    ce = sys.modules["kernels.cross_entropy"]

    def broken(dw, a, b):
        raise RuntimeError("addmm.dtype_out: not implemented for this device\nsecond line")

    monkeypatch.setattr(ce, "_OUT_DTYPE_ADDMM", [True])
    monkeypatch.setattr(ce, "_addmm_fp32_out", broken)
    monkeypatch.setattr(ce, "_fast_path_device", lambda dw: True)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g).bfloat16(), torch.randn(6, 3, generator=g).bfloat16()
    want = a.float().T @ b.float()
    warnings.simplefilter("always")
    for _ in range(3):
        dw = torch.zeros(5, 3)
        ce._accumulate_dw(dw, a, b)
        torch.testing.assert_close(dw, want, atol=2e-2, rtol=1e-2)
    said = [w for w in recwarn.list if issubclass(w.category, RuntimeWarning)]
    assert len(said) == 1
    msg = str(said[0].message)
    assert "addmm.dtype_out failed" in msg and "RuntimeError: addmm.dtype_out: not implemented" in msg
    assert "second line" not in msg and "slower" in msg
