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


TINY = dict(block_size=32, vocab_size=97, n_layer=2, n_head=2, n_embd=64)


def _tiny_gpt_pair(device):
    """The same random tiny GPT twice, kernels='torch' (reference) and 'triton', and a (2, 17) batch."""
    torch.manual_seed(0)
    ref = GPT(GPTConfig(**TINY, kernels="torch")).to(device)
    tri = GPT(GPTConfig(**TINY, kernels="triton")).to(device)
    tri.load_state_dict(ref.state_dict())
    idx = torch.randint(0, 97, (2, 17), device=device)
    targets = torch.randint(0, 97, (2, 17), device=device)
    return ref, tri, idx, targets


def test_gpt_routes_layer_norm_and_gelu_to_triton(kernel_device, expect_launch, monkeypatch):
    """kernels='triton' runs every LayerNorm and GELU through the kernels, forward and backward, and
    matches kernels='torch' on the same weights. Attention is pinned to PyTorch here so that this test
    checks only this issue's kernels."""
    monkeypatch.setattr(ops, "attention",
                        lambda q, k, v, mode="auto": F.scaled_dot_product_attention(q, k, v, is_causal=True))
    ref, tri, idx, targets = _tiny_gpt_pair(kernel_device)

    n_ln = 2 * TINY["n_layer"] + 1  # ln_1, ln_2 per block + ln_f
    counts = {k: kernels.launches(k) for k in ("layer_norm_fwd", "layer_norm_bwd", "gelu_fwd", "gelu_bwd")}
    with expect_launch("layer_norm_fwd", "layer_norm_bwd", "layer_norm_dwdb", "gelu_fwd", "gelu_bwd"):
        _, loss = tri(idx, targets)
        loss.backward()
    assert kernels.launches("layer_norm_fwd") - counts["layer_norm_fwd"] == n_ln
    assert kernels.launches("layer_norm_bwd") - counts["layer_norm_bwd"] == n_ln
    assert kernels.launches("gelu_fwd") - counts["gelu_fwd"] == TINY["n_layer"]
    assert kernels.launches("gelu_bwd") - counts["gelu_bwd"] == TINY["n_layer"]

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


# ------------------------------------------------------------------------------------------------
# fp16 autocast (GPUs without bf16 train in fp16 + GradScaler): every op of this file's kernels
# ------------------------------------------------------------------------------------------------
FP16_AMP = dict(dtype=torch.float16)


def _fp16_amp(device):
    return torch.autocast(device, **FP16_AMP)


def test_layer_norm_and_gelu_under_fp16_autocast(kernel_device, expect_launch):
    """The MLP half as the model runs it under fp16 autocast: fp32 residual -> LayerNorm (fp16 out)
    -> fp16 matmul -> GELU (fp16 in and out); the Triton ops give the dtypes and (within 2x PyTorch's own
    fp16 error against fp64) the values and gradients of the PyTorch ops."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 96, generator=g, dtype=torch.float64)
    w = 1 + 0.1 * torch.randn(96, generator=g, dtype=torch.float64)
    b = 0.1 * torch.randn(96, generator=g, dtype=torch.float64)
    fc = torch.randn(96, 192, generator=g, dtype=torch.float64) * 96 ** -0.5

    def run(mode, dtype, amp):
        leaves = [t.to(kernel_device, dtype).clone().requires_grad_() for t in (x, w, b, fc)]
        with (_fp16_amp(kernel_device) if amp else torch.autocast(kernel_device, enabled=False)):
            h = ops.layer_norm(leaves[0], leaves[1], leaves[2], 1e-5, mode)
            ln_dtype = h.dtype
            h = ops.gelu(h @ leaves[3], mode)
        h.float().square().sum().backward()
        return ln_dtype, h, [t.grad for t in leaves]

    ref_dtype, ref_h, ref_grads = run("torch", torch.float64, False)
    torch_dtype, torch_h, torch_grads = run("torch", torch.float32, True)
    with expect_launch("layer_norm_fwd", "layer_norm_bwd", "gelu_fwd", "gelu_bwd"):
        ours_dtype, ours_h, ours_grads = run("triton", torch.float32, True)
    assert ours_dtype == torch_dtype == torch.float16 and ours_h.dtype == torch_h.dtype == torch.float16
    assert [t.dtype for t in ours_grads] == [torch.float32] * 4
    for name, o, t, r in zip(("h", "dx", "dw", "db", "dfc"), [ours_h, *ours_grads], [torch_h, *torch_grads],
                             [ref_h, *ref_grads]):
        err = (o.double().cpu() - r.cpu()).abs().max().item()
        torch_err = (t.double().cpu() - r.cpu()).abs().max().item()
        assert err <= 2 * torch_err + 1e-5 * r.abs().max().item(), f"{name}: {err:.3g} vs torch {torch_err:.3g}"


def test_linear_cross_entropy_under_fp16_autocast(kernel_device, expect_launch):
    """fp32 x and weight under fp16 autocast: fp16 matmuls and logits gradient, fp32 loss and grads, within
    2x the error of F.cross_entropy(F.linear) under the same autocast (against fp64)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 64, generator=g, dtype=torch.float64)
    w = torch.randn(500, 64, generator=g, dtype=torch.float64) * 64 ** -0.5 * 2
    t = torch.randint(0, 500, (9,), generator=g)
    t[::4] = -1

    def run(mode, dtype, amp):
        xs, ws = (a.to(kernel_device, dtype).clone().requires_grad_() for a in (x, w))
        with (_fp16_amp(kernel_device) if amp else torch.autocast(kernel_device, enabled=False)):
            loss = ops.linear_cross_entropy(xs, ws, t.to(kernel_device), mode)
        loss.backward()
        return loss, xs.grad, ws.grad

    ref = run("torch", torch.float64, False)
    torch_out = run("torch", torch.float32, True)
    with expect_launch("cross_entropy"):
        ours = run("triton", torch.float32, True)
    assert [o.dtype for o in ours] == [torch.float32] * 3
    for name, o, tt, r in zip(("loss", "dx", "dw"), ours, torch_out, ref):
        err = (o.double() - r).abs().max().item()
        torch_err = (tt.double() - r).abs().max().item()
        assert torch_err > 1e-6, name  # the reference really ran in fp16
        assert err <= 2 * torch_err + 1e-6, f"{name}: {err:.3g} vs torch {torch_err:.3g}"


def test_gpt_under_fp16_autocast_matches_torch_path(kernel_device, expect_launch):
    """A tiny GPT's loss and gradients under fp16 autocast, kernels='triton' vs kernels='torch'."""
    ref, tri, idx, targets = _tiny_gpt_pair(kernel_device)
    with expect_launch("layer_norm_fwd", "layer_norm_bwd", "gelu_fwd", "gelu_bwd", "cross_entropy"):
        with _fp16_amp(kernel_device):
            _, loss = tri(idx, targets, return_logits=False)  # the fused loss, as training runs it
        loss.backward()
    with _fp16_amp(kernel_device):
        _, loss_ref = ref(idx, targets, return_logits=False)
    loss_ref.backward()
    torch.testing.assert_close(loss, loss_ref, atol=2e-3, rtol=2e-3)
    grads = dict(ref.named_parameters())
    for name, p in tri.named_parameters():
        gr = grads[name].grad
        assert p.grad.dtype == gr.dtype == torch.float32
        torch.testing.assert_close(p.grad, gr, atol=2e-3 * gr.abs().max().item() + 1e-6, rtol=5e-2,
                                   msg=lambda m: f"{name}: {m}")
