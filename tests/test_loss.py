"""The PyTorch fused linear cross-entropy (fastgpt/loss.py), the CPU path of `return_logits=False`:
exact against fp64, chunking and ignored targets included, and no (N, V) tensor kept for backward."""
import pytest
import torch
import torch.nn.functional as F

from fastgpt import GPT, GPTConfig, ops
from fastgpt.loss import linear_cross_entropy


def _reference64(x, w, t, ignore_index=-1):
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    loss = F.cross_entropy(x64 @ w64.T, t, ignore_index=ignore_index)
    loss.backward()
    return loss, x64.grad, w64.grad


@pytest.mark.parametrize("N, C, V, chunk_rows", [
    (1, 8, 5, None), (37, 24, 1001, 5), (130, 32, 333, None), (64, 16, 50257, 17), (9, 8, 7, 1)])
@pytest.mark.parametrize("ignore", [False, True])
def test_parity_with_fp64(N, C, V, chunk_rows, ignore):
    torch.manual_seed(N + V)
    x = torch.randn(N, C, requires_grad=True)
    w = (torch.randn(V, C) * 0.5).requires_grad_()
    t = torch.randint(0, V, (N,))
    if ignore and N > 1:
        t[::3] = -1
    loss = linear_cross_entropy(x, w, t, chunk_rows=chunk_rows)
    (loss * 0.75).backward()  # a grad_output other than 1 is scaled into both gradients
    ref, gx, gw = _reference64(x, w, t)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-5
    torch.testing.assert_close(x.grad.double(), 0.75 * gx, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), 0.75 * gw, atol=1e-6, rtol=1e-5)


def test_nothing_of_size_n_by_v_is_saved_for_backward():
    N, C, V = 48, 16, 1000
    x = torch.randn(N, C, requires_grad=True)
    w = torch.randn(V, C, requires_grad=True)
    t = torch.randint(0, V, (N,))
    saved = []

    def pack(tensor):
        saved.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(x, w, t, chunk_rows=7)
        ref = F.cross_entropy(F.linear(x, w).float(), t)
    fused_saved, ref_saved = saved[:2], saved[2:]
    assert sorted(fused_saved) == sorted([(N, C), (V, C)])  # dx and dweight, already computed
    assert (N, V) in ref_saved  # the unfused path keeps the logits' softmax: what the fused one avoids
    loss.backward()
    assert x.grad.shape == (N, C) and w.grad.shape == (V, C)


def test_no_grad_and_partial_grads():
    x, w, t = torch.randn(10, 8), torch.randn(30, 8), torch.randint(0, 30, (10,))
    ref = F.cross_entropy(x @ w.T, t)
    with torch.no_grad():
        assert torch.allclose(linear_cross_entropy(x.requires_grad_(), w, t), ref, atol=1e-5)
    x.grad = None
    linear_cross_entropy(x, w, t, chunk_rows=3).backward()  # weight frozen: only dx
    gx = torch.autograd.grad(F.cross_entropy(x @ w.T, t), x)[0]
    torch.testing.assert_close(x.grad, gx, atol=1e-6, rtol=1e-5)


def test_all_targets_ignored_is_nan_like_pytorch():
    x, w = torch.randn(4, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    t = torch.full((4,), -1)
    loss = linear_cross_entropy(x, w, t)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(x @ w.T, t, ignore_index=-1))


def test_second_backward_is_refused_not_wrong():
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    t = torch.randint(0, 11, (6,))
    loss = linear_cross_entropy(x, w, t) * 2
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_bf16_autocast_matmuls_in_bf16_statistics_in_fp32():
    torch.manual_seed(0)
    x, w = torch.randn(40, 32, requires_grad=True), (torch.randn(300, 32) * 0.2).requires_grad_()
    t = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, t, chunk_rows=16)
        ref = F.cross_entropy(F.linear(x, w).float(), t)
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-2
    _, gx, gw = _reference64(x, w, t)
    torch.testing.assert_close(x.grad.double(), gx, atol=2e-3, rtol=5e-2)
    torch.testing.assert_close(w.grad.double(), gw, atol=2e-3, rtol=5e-2)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"x \(N, C\) and weight \(V, C\)"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 9), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="integer targets"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4))


@pytest.mark.parametrize("mode", ["torch", "auto"])
def test_model_uses_it_on_cpu_and_matches_full_logits(mode, monkeypatch):
    """kernels='torch' (and 'auto' on CPU) take the fused loss for return_logits=False: same loss and
    gradients as the full-logits path."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    calls = []
    real = ops.loss.linear_cross_entropy
    monkeypatch.setattr(ops.loss, "linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=1, n_head=2, n_embd=16, kernels=mode))
    x, y = torch.randint(0, 97, (3, 16)), torch.randint(0, 97, (3, 16))
    y[0, :5] = -1
    _, fused = model(x, y, return_logits=False)
    fused.backward()
    g_fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, full = model(x, y)
    full.backward()
    assert calls == [1]
    assert abs(fused.item() - full.item()) < 1e-5
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_fused[n], p.grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_fp16_activations_take_a_loss_scale_above_fp16_max(path):
    """GradScaler's first scale, 65536, exceeds fp16's largest value (65504): the gradient of fp16
    activations must still be 65536 x the unscaled one, not inf."""
    torch.manual_seed(0)
    if path == "triton":  # the interpreter (conftest sets TRITON_INTERPRET=1 without a GPU)
        import kernels

        fn, before = kernels.linear_cross_entropy, kernels.launches("cross_entropy")
    else:
        from fastgpt.loss import linear_cross_entropy as fn
    x = (torch.randn(24, 16) * 0.5).half().requires_grad_()
    w = (torch.randn(50, 16) * 0.1).requires_grad_()
    t = torch.randint(0, 50, (24,))
    grads = []
    for scale in (1.0, 65536.0):
        x.grad = w.grad = None
        (fn(x, w, t) * scale).backward()
        grads.append((x.grad.float(), w.grad))
    assert torch.isfinite(grads[1][0]).all() and torch.isfinite(grads[1][1]).all()
    torch.testing.assert_close(grads[1][0], grads[0][0] * 65536, rtol=2e-3, atol=0)
    torch.testing.assert_close(grads[1][1], grads[0][1] * 65536, rtol=1e-5, atol=0)
    if path == "triton":
        assert kernels.launches("cross_entropy") > before
