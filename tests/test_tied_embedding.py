"""ops.tied_embedding: GPT-2's wte read as the token embedding and as the lm_head, both gradients in one
(V, C) buffer on CPU. Same gradients as autograd's plain embedding + head, and no second (V, C) tensor
made in the backward (the plain path makes one: the test would catch a fall back to it)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastgpt import GPT, GPTConfig, ops


def _plain(idx, weight, mode="auto"):
    return F.embedding(idx, weight), weight


@pytest.mark.parametrize("use", ["both", "embedding", "head"])
def test_gradients_match_the_plain_embedding(use):
    torch.manual_seed(0)
    V, C = 101, 12
    idx = torch.randint(0, V, (3, 7))
    idx[0, :3] = 5  # a repeated token: its rows add up
    g_emb, x = torch.randn(3, 7, C), torch.randn(9, C)
    grads = []
    for fn in (ops.tied_embedding, _plain):
        w = torch.randn(V, C, generator=torch.Generator().manual_seed(1)).requires_grad_()
        emb, head = fn(idx, w, "torch")
        loss = 0
        if use in ("both", "embedding"):
            loss = loss + (emb * g_emb).sum()
        if use in ("both", "head"):
            loss = loss + F.cross_entropy(x @ head.T, torch.arange(9))
        loss.backward()
        grads.append(w.grad)
        if fn is ops.tied_embedding:
            assert type(emb.grad_fn).__name__ == "_TiedEmbeddingBackward"
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-6)


class _NewVC(TorchDispatchMode):
    """Counts ops that return a new tensor of the weight's shape (not an in-place result or a view)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.made = tuple(shape), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        aliases = any(r.alias_info is not None for r in func._schema.returns)
        if not aliases and isinstance(out, torch.Tensor) and tuple(out.shape) == self.shape:
            self.made.append(str(func))
        return out


@pytest.mark.parametrize("tied", [True, False])
def test_model_backward_makes_no_second_vocab_by_width_tensor(tied, monkeypatch):
    """The fused loss hands its dweight (V, C) to the backward; the tied embedding adds the token rows into
    it. With the plain embedding the backward makes a dense (V, C) gradient and a sum."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not tied:
        monkeypatch.setattr(ops, "tied_embedding", _plain)
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=16, vocab_size=97, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    model = GPT(cfg)
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    _, loss = model(x, y, return_logits=False)
    counter = _NewVC((cfg.vocab_size, cfg.n_embd))
    with counter:
        loss.backward()
    if tied:
        assert counter.made == []
    else:
        assert counter.made  # what the tied path avoids (embedding_dense_backward)


@pytest.mark.parametrize("return_logits", [False, True])
def test_model_gradients_equal_the_plain_path(return_logits, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=203, n_layer=2, n_head=2, n_embd=16, kernels="torch"))
    x, y = torch.randint(0, 203, (3, 31)), torch.randint(0, 203, (3, 31))
    y[1, :4] = -1
    grads = []
    for fn in (ops.tied_embedding, _plain):
        monkeypatch.setattr(ops, "tied_embedding", fn)
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y, return_logits=return_logits)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=lambda m: f"{n}: {m}")


def test_second_backward_through_the_fused_loss_is_refused():
    """The in-place add bumps dweight's version: a retain_graph second backward raises, never reuses it."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=1, n_head=2, n_embd=16, kernels="torch"))
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    _, loss = model(x, y, return_logits=False)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_without_gradients_the_plain_embedding_runs():
    w = torch.randn(10, 4, requires_grad=True)
    with torch.no_grad():
        emb, head = ops.tied_embedding(torch.tensor([[1, 2]]), w, "torch")
    assert head is w and emb.grad_fn is None
    emb, head = ops.tied_embedding(torch.tensor([[1, 2]]), w.detach(), "torch")
    assert head.grad_fn is None


def test_where_the_kernels_run_the_plain_embedding_stays(monkeypatch):
    """The interpreter (conftest sets TRITON_INTERPRET=1) stands for CUDA, as bench.memory's forced route does:
    there the embedding keeps autograd's own backward."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w = torch.randn(10, 4, requires_grad=True)
    emb, head = ops.tied_embedding(torch.tensor([[1, 2]]), w, "auto")
    assert head is w and type(emb.grad_fn).__name__ == "EmbeddingBackward0"
    emb, head = ops.tied_embedding(torch.tensor([[1, 2]]), w, "torch")
    assert type(emb.grad_fn).__name__ == "_TiedEmbeddingBackward"


def test_compiled_model_gives_the_same_gradients(monkeypatch):
    """torch.compile traces the tied embedding in one graph (its backward adds out of place there)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=1, n_head=2, n_embd=16, kernels="torch"))
    x, y = torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))
    grads = []
    for m in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad(set_to_none=True)
        _, loss = m(x, y, return_logits=False)
        loss.backward()
        grads.append(model.transformer.wte.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_a_gradient_the_caller_owns_is_never_modified():
    """The caller hands its own tensor to backward through the head (`head + 0.0` passes it on as it is):
    the tied backward must add the token rows into a copy, and the gradients stay right."""
    torch.manual_seed(0)
    V, C = 11, 4
    idx = torch.tensor([[1, 2, 2, 7]])
    g_emb, g_head = torch.randn(1, 4, C), torch.randn(V, C)
    kept = g_head.clone()
    grads = []
    for fn in (ops.tied_embedding, _plain):
        w = torch.randn(V, C, generator=torch.Generator().manual_seed(1)).requires_grad_()
        emb, head = fn(idx, w, "torch")
        torch.autograd.backward([emb, head + 0.0], [g_emb, g_head])
        torch.testing.assert_close(g_head, kept, rtol=0, atol=0)
        grads.append(w.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-6)
