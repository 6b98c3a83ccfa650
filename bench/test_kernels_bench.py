"""Kernel benchmarks: fastgpt's Triton kernels against PyTorch eager and torch.compile.

GPU shapes: GPT-2 widths 768/1024/1280/1600 (head dim 64), batch 16 x T 1024 rows, bf16 activations
(FASTGPT_BENCH_WIDTHS, FASTGPT_BENCH_DTYPE=bf16|fp16|fp32 change them). LayerNorm gets fp32 weights and
bias (autocast's layout; PyTorch gets them in the activation dtype, which F.layer_norm requires); GELU
runs on the MLP's (rows, 4C) hidden activation; each reports bytes moved for the effective bandwidth.
CPU shapes: one small width, fp32 (CPU bf16 speed says nothing about GPUs); Triton and compile skip.
`torch.compile` variants run on CUDA, or on the CPU with FASTGPT_BENCH_COMPILE=1.
No benchmark asserts a time.
"""
from __future__ import annotations

import functools
import math
import os

import pytest
import torch
import torch.nn.functional as F

from bench import harness, roofline
from bench.harness import HAS_CUDA

DEV = harness.DEVICE
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
if HAS_CUDA and os.environ.get("FASTGPT_BENCH_DTYPE", "bf16") not in _DTYPES:
    raise ValueError(f"FASTGPT_BENCH_DTYPE must be one of {', '.join(_DTYPES)}, got {os.environ['FASTGPT_BENCH_DTYPE']!r}")
DTYPE = _DTYPES[os.environ.get("FASTGPT_BENCH_DTYPE", "bf16")] if HAS_CUDA else torch.float32
COMPILE = os.environ.get("FASTGPT_BENCH_COMPILE", "1" if HAS_CUDA else "0") == "1"

if HAS_CUDA:
    WIDTHS = [int(w) for w in os.environ.get("FASTGPT_BENCH_WIDTHS", "768,1024,1280,1600").split(",")]
    BATCH, SEQ = 16, 1024
else:
    WIDTHS = [256]
    BATCH, SEQ = 2, 128
HEAD_DIM = 64
PASSES = ["fwd", "bwd", "fwd+bwd"]


def _skip_unless_compile():
    if not COMPILE:
        pytest.skip("torch.compile benchmarks run on CUDA (set FASTGPT_BENCH_COMPILE=1 to compile on the CPU)")


def _warm_up(fn):
    """One untimed call: autotuning and compilation happen here, not in the timed rounds."""
    fn()


def _make_pass(f, inputs, pass_):
    """fn() that runs forward, backward or both of f(*inputs) (grads via autograd.grad: no accumulation)."""
    needs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                return f(*inputs)
        return fn
    out = f(*inputs)
    dy = torch.randn_like(out)
    if pass_ == "bwd":
        return lambda: torch.autograd.grad(out, needs, dy, retain_graph=True)
    return lambda: torch.autograd.grad(f(*inputs), needs, dy)


def _resolve(impl, torch_fn, triton_attr, triton_ready_fixture):
    if impl == "fastgpt":
        return getattr(triton_ready_fixture(), triton_attr)
    if impl == "torch":
        return torch_fn
    if impl == "torch-compile":
        _skip_unless_compile()
        return torch.compile(torch_fn, dynamic=False)
    raise ValueError(impl)


@pytest.fixture
def triton_kernels(request):
    return lambda: request.getfixturevalue("triton_ready")


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["fastgpt", "torch", "torch-compile"])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("C", WIDTHS)
def test_layer_norm(benchmark, triton_kernels, impl, pass_, C):
    rows = BATCH * SEQ
    cost = roofline.layer_norm_cost(rows, C, pass_, torch.finfo(DTYPE).bits // 8)
    benchmark.group = f"{cost.kernel} {cost.shape}"

    def torch_ln(x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b, 1e-5)

    f = _resolve(impl, torch_ln, "layer_norm", triton_kernels)
    x = torch.randn(rows, C, device=DEV, dtype=DTYPE, requires_grad=True)
    w = torch.randn(C, device=DEV, requires_grad=True)  # fp32 parameters, as in the model
    b = torch.randn(C, device=DEV, requires_grad=True)
    if DTYPE != torch.float32 and impl != "fastgpt":
        w16, b16 = w.detach().to(DTYPE).requires_grad_(), b.detach().to(DTYPE).requires_grad_()
        inputs = (x, w16, b16)  # torch's layer_norm wants one dtype
    else:
        inputs = (x, w, b)
    _warm_up(lambda: f(*inputs))
    fn = _make_pass(f, inputs, pass_)
    harness.run(benchmark, fn, impl=impl, op=cost.kernel, shape=cost.shape, bytes_moved=cost.bytes,
                tokens=rows, dtype=str(DTYPE))


@pytest.mark.parametrize("impl", ["fastgpt", "torch", "torch-compile"])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("C", WIDTHS)
def test_gelu(benchmark, triton_kernels, impl, pass_, C):
    rows = BATCH * SEQ
    cost = roofline.gelu_cost(rows, C, pass_, torch.finfo(DTYPE).bits // 8)
    benchmark.group = f"{cost.kernel} {cost.shape}"
    f = _resolve(impl, functools.partial(F.gelu, approximate="tanh"), "gelu", triton_kernels)
    x = torch.randn(rows, 4 * C, device=DEV, dtype=DTYPE, requires_grad=True)
    _warm_up(lambda: f(x))
    fn = _make_pass(f, (x,), pass_)
    harness.run(benchmark, fn, impl=impl, op=cost.kernel, shape=cost.shape, bytes_moved=cost.bytes,
                tokens=rows, dtype=str(DTYPE))


# --------------------------------------------------------------------------------------------
def eager_attention(q, k, v):
    """What HF's eager GPT-2 attention does: scores, causal mask, fp32 softmax, weighted sum."""
    T = q.shape[-2]
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("impl", ["fastgpt", "torch-sdpa", "torch-eager", "torch-compile"])
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("C", WIDTHS)
def test_attention(benchmark, triton_kernels, impl, pass_, C):
    H = C // HEAD_DIM
    cost = roofline.attention_cost(BATCH, H, SEQ, HEAD_DIM, pass_)
    benchmark.group = f"{cost.kernel} {cost.shape}"
    if impl == "fastgpt":
        f = triton_kernels().attention
    elif impl == "torch-sdpa":
        f = sdpa
    elif impl == "torch-eager":
        f = eager_attention
    else:
        _skip_unless_compile()
        f = torch.compile(eager_attention, dynamic=False)
    q, k, v = (torch.randn(BATCH, H, SEQ, HEAD_DIM, device=DEV, dtype=DTYPE, requires_grad=True)
               for _ in range(3))
    _warm_up(lambda: f(q, k, v))
    fn = _make_pass(f, (q, k, v), pass_)
    harness.run(benchmark, fn, impl=impl, op=cost.kernel, shape=cost.shape, flops=cost.flops,
                bytes_moved=cost.bytes, tokens=BATCH * SEQ, dtype=str(DTYPE))


# --------------------------------------------------------------------------------------------
def gpt2_param_shapes(C: int, n_layer: int, vocab: int = 50257, block: int = 1024) -> list[tuple[int, ...]]:
    """Shapes of GPT-2's parameters (tied wte/lm_head), in model order."""
    shapes: list[tuple[int, ...]] = [(vocab, C), (block, C)]
    for _ in range(n_layer):
        shapes += [(C,), (C,), (3 * C, C), (3 * C,), (C, C), (C,), (C,), (C,), (4 * C, C), (4 * C,), (C, 4 * C), (C,)]
    return shapes + [(C,), (C,)]


@pytest.mark.parametrize("impl", ["fastgpt", "torch-fused", "torch-foreach", "torch-compile"])
@pytest.mark.parametrize("C", WIDTHS)
def test_adamw_step(benchmark, triton_kernels, impl, C):
    n_layer = roofline.LAYERS.get(C, 2) if HAS_CUDA else 2
    shapes = gpt2_param_shapes(C, n_layer)
    params = [torch.randn(s, device=DEV) * 0.02 for s in shapes]
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.randn_like(p) * 1e-3
    n = sum(p.numel() for p in params)
    cost = roofline.adamw_cost(n)
    benchmark.group = f"{cost.kernel} {cost.shape}"
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    kw = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
    if impl == "fastgpt":
        opt = triton_kernels().FusedAdamW(groups, **kw)
        step = opt.step
    elif impl == "torch-fused":
        try:
            opt = torch.optim.AdamW(groups, fused=True, **kw)
            opt.step()
        except RuntimeError as e:
            pytest.skip(f"fused AdamW unavailable here: {e}")
        step = opt.step
    elif impl == "torch-foreach":
        opt = torch.optim.AdamW(groups, foreach=True, **kw)
        step = opt.step
    else:
        _skip_unless_compile()
        opt = torch.optim.AdamW(groups, foreach=True, **kw)
        step = torch.compile(opt.step, dynamic=False)
    _warm_up(step)
    harness.run(benchmark, step, impl=impl, op=cost.kernel, shape=cost.shape, bytes_moved=cost.bytes,
                n_params=n)
