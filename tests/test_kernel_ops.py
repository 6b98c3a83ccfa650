"""LayerNorm and GELU as torch.library custom ops: torch.compile, fake tensors, and model routing.

- `torch.compile(fullgraph=True)` over a block using both ops traces with no graph break (aot_eager
  backend: it runs the same Dynamo + AOTAutograd tracing as inductor through register_fake and
  register_autograd, without a C++ toolchain on the CPU) and matches eager in forward and backward.
- Under FakeTensorMode the ops propagate shapes and dtypes without running a kernel, and
  torch.library.opcheck finds schema, fake and autograd registrations consistent with the kernels.
- A GPT with kernels="triton" launches these kernels in its forward and backward.
"""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import kernels
from fastgpt import GPT, GPTConfig, ops


def _block(x, w, b):
    """LayerNorm -> GELU -> residual, the shape of a GPT-2 MLP half without the matmuls."""
    return x + kernels.gelu(kernels.layer_norm(x, w, b, 1e-5)) * 0.5


def _inputs(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 768, generator=g).to(device, dtype)
    w = (1 + 0.1 * torch.randn(768, generator=g)).to(device)
    b = (0.1 * torch.randn(768, generator=g)).to(device)
    return x, w, b


def _opcheck_cases(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 64, generator=g).to(device).requires_grad_()
    w = torch.randn(64, generator=g).to(device).requires_grad_()
    b = torch.randn(64, generator=g).to(device).requires_grad_()
    dy = torch.randn(3, 5, 64, generator=g).to(device)
    _, mean, rstd = torch.ops.fastgpt.layer_norm_fwd(x.detach(), w.detach(), b.detach(), 1e-5)
    return [
        ("layer_norm_fwd", (x, w, b, 1e-5)),
        ("layer_norm_fwd", (x, w, None, 1e-5)),
        ("layer_norm_fwd", (x, w, b, 1e-5, torch.bfloat16)),  # autocast: fp32 in, bf16 out
        ("layer_norm_fwd", (x, None, None, 1e-5)),  # no affine parameters
        ("layer_norm_bwd", (dy, x.detach(), w.detach(), mean, rstd, True)),
        ("layer_norm_bwd", (dy.bfloat16(), x.detach(), w.detach(), mean, rstd, True)),
        ("layer_norm_bwd", (dy, x.detach(), None, mean, rstd, False)),
        ("gelu_fwd", (x,)),
        ("gelu_bwd", (dy, x.detach())),
    ]


@pytest.mark.parametrize("case", range(9), ids=["ln_fwd", "ln_fwd_nobias", "ln_fwd_bf16_out", "ln_fwd_noaffine",
                                                "ln_bwd", "ln_bwd_bf16_dy", "ln_bwd_noaffine", "gelu_fwd", "gelu_bwd"])
def test_opcheck(case, kernel_device):
    """torch.library.opcheck: schema, fake impl vs real outputs, autograd registration, AOT dispatch."""
    name, args = _opcheck_cases(kernel_device)[case]
    result = torch.library.opcheck(getattr(torch.ops.fastgpt, name).default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_dynamo_sees_no_graph_break(kernel_device):
    x, w, b = _inputs(kernel_device)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_block)(x, w, b)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compile_fullgraph_matches_eager(kernel_device, expect_launch):
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (_block, compiled):
        x, w, b = (t.detach().requires_grad_() for t in _inputs(kernel_device))
        with expect_launch("layer_norm_fwd", "gelu_fwd", "gelu_bwd", "layer_norm_bwd", "layer_norm_dwdb"):
            y = fn(x, w, b)
            y.backward(torch.ones_like(y))
        results.append((y, x.grad, w.grad, b.grad))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=0, rtol=0)


def test_fake_tensors_propagate_through_the_ops():
    """Shapes and dtypes come from register_fake: nothing runs (no device memory, no launch)."""
    before = kernels.launches()
    with FakeTensorMode():
        x = torch.empty(4, 1024, 1600, dtype=torch.bfloat16)
        w = torch.empty(1600)  # fp32 weights with bf16 activations, as under autocast
        y, mean, rstd = torch.ops.fastgpt.layer_norm_fwd(x, w, None, 1e-5)
        assert (y.shape, y.dtype) == ((4, 1024, 1600), torch.bfloat16)
        assert (mean.shape, mean.dtype, rstd.dtype) == ((4, 1024), torch.float32, torch.float32)
        dx, dw, db = torch.ops.fastgpt.layer_norm_bwd(y, x, w, mean, rstd, False)
        assert dx.shape == x.shape and dw.shape == db.shape == (1600,)
        h = torch.ops.fastgpt.gelu_fwd(torch.empty(4, 1024, 6400, dtype=torch.bfloat16))
        assert (h.shape, h.dtype) == ((4, 1024, 6400), torch.bfloat16)
    assert kernels.launches() == before


def test_make_fx_traces_forward_and_backward():
    """A fake-mode trace of forward + backward records the custom ops, forward and backward."""
    def step(x, w, b):
        x = x.detach().requires_grad_()
        w = w.detach().requires_grad_()
        y = _block(x, w, b)
        return torch.autograd.grad(y.sum(), (x, w))

    x, w, b = _inputs("cpu", torch.bfloat16)
    gm = make_fx(step, tracing_mode="fake")(x, w, b)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    for op in ("fastgpt.layer_norm_fwd.default", "fastgpt.layer_norm_bwd.default",
               "fastgpt.gelu_fwd.default", "fastgpt.gelu_bwd.default"):
        assert op in targets, sorted(targets)


def test_gpt_routes_layer_norm_and_gelu_to_triton(kernel_device, expect_launch, monkeypatch):
    """kernels='triton' runs every LayerNorm and GELU through the kernels, forward and backward, and
    matches kernels='torch' on the same weights. Attention is pinned to PyTorch here so that this test
    checks only this issue's kernels."""
    monkeypatch.setattr(ops, "attention",
                        lambda q, k, v, mode="auto": F.scaled_dot_product_attention(q, k, v, is_causal=True))
    cfg = dict(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=64)
    torch.manual_seed(0)
    ref = GPT(GPTConfig(**cfg, kernels="torch")).to(kernel_device)
    tri = GPT(GPTConfig(**cfg, kernels="triton")).to(kernel_device)
    tri.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 97, (2, 17), device=kernel_device)
    targets = torch.randint(0, 97, (2, 17), device=kernel_device)

    n_ln = 2 * cfg["n_layer"] + 1  # ln_1, ln_2 per block + ln_f
    counts = {k: kernels.launches(k) for k in ("layer_norm_fwd", "layer_norm_bwd", "gelu_fwd", "gelu_bwd")}
    with expect_launch("layer_norm_fwd", "layer_norm_bwd", "layer_norm_dwdb", "gelu_fwd", "gelu_bwd"):
        _, loss = tri(idx, targets)
        loss.backward()
    assert kernels.launches("layer_norm_fwd") - counts["layer_norm_fwd"] == n_ln
    assert kernels.launches("layer_norm_bwd") - counts["layer_norm_bwd"] == n_ln
    assert kernels.launches("gelu_fwd") - counts["gelu_fwd"] == cfg["n_layer"]
    assert kernels.launches("gelu_bwd") - counts["gelu_bwd"] == cfg["n_layer"]

    _, loss_ref = ref(idx, targets)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5)
    grads = dict(ref.named_parameters())
    for name, p in tri.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_gpt_triton_without_triton_runtime_is_an_error(monkeypatch):
    """kernels='triton' on CPU tensors without the interpreter raises instead of falling back."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine CPU tensors are simply not Triton's; covered by ops tests")
    monkeypatch.delenv("TRITON_INTERPRET")
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=16, kernels="triton"))
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_attention_head_dim_without_kernel_tiles(expect_launch):
    """auto sends a head size the kernel has no tiles for (8) to SDPA; triton refuses it by name."""
    import kernels
    from fastgpt import ops

    q = torch.randn(1, 2, 5, 8)
    before = kernels.launches("attention_fwd")
    out = ops.attention(q, q, q, "auto")
    assert kernels.launches("attention_fwd") == before
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
    with pytest.raises(ValueError, match="head dim 8"):
        ops.attention(q, q, q, "triton")
    q = torch.randn(1, 2, 5, 16)
    with expect_launch("attention_fwd"):
        ops.attention(q, q, q, "auto")


def test_can_launch_needs_one_device():
    """A kernel runs on one device: tensors split across devices are refused (and explained)."""
    a = torch.empty(1)
    b = torch.empty(1, device="meta")
    assert not kernels.can_launch(a, b)
    assert "several devices" in kernels.why_not(a, b)
    assert kernels.can_launch(a, a)  # CPU under the interpreter (this session)


def test_attention_refuses_a_grid_cuda_cannot_launch():
    q = torch.empty(1, 65536, 1, 16)  # B*H on the grid's second axis: CUDA allows 65535
    with pytest.raises(ValueError, match="65536 exceeds 65535"):
        kernels.attention(q, q, q)
