"""tanh-approximation GELU (GPT-2's `gelu_new`): Triton forward and backward, custom op, reference.

    gelu(x) = 0.5 * x * (1 + tanh(u)),   u = sqrt(2/pi) * (x + 0.044715 * x^3)

Algorithm
---------
Elementwise over the flattened tensor, BLOCK = 2048 elements a program with 4 warps: 16 elements per
thread, i.e. two (bf16) or four (fp32) 128-bit loads and stores per thread. Offsets are int64.
Math is fp32 whatever the storage dtype; the result is stored in x's dtype.

The identity 0.5 * (1 + tanh(u)) = sigmoid(2u) gives
    gelu(x)  = x * s,                              s = 1 / (1 + exp(-2u))
    gelu'(x) = s + x * s * (1 - s) * 2 * du/dx,    du/dx = sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)
one exp and one division per element, no tanh call, and no cancellation near 0 (1 - 2/(e^2u + 1)
would lose digits there). The backward writes s * (1 - s) as e * s^2 with e = exp(-2u), so it does not
lose digits where s is close to 1 either. The exponent is clamped at 80 (exp stays finite, so e * s^2
never becomes inf * 0); there the true values are below 1e-33, so the tails come out as 0 and x for
gelu and 0 and 1 for its gradient.

Saved for backward: only the input x (the backward recomputes s); no extra tensor is stored.

Layout: a contiguous input is used in place; any other layout is copied once to contiguous (the MLP's
c_fc output is always contiguous, so the model never pays it). The output is contiguous with x's shape.

Limits: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Dtypes (the one rule of every kernel,
kernels._launch.DTYPES): x and dy in fp32, bf16 or fp16, math in fp32; any other dtype (float64
included) raises DtypeError (a TypeError and a ValueError) naming it.

Not fused: the c_fc bias. In the forward there is nothing to save: `nn.Linear` on CUDA adds the bias
in the cuBLAS(Lt) GEMM epilogue (addmm), so h = x @ W + b costs no extra pass. In the backward, autograd
computes dbias as a separate sum over the (B*T, 4C) gradient of h; a GELU backward that also wrote
per-program partial bias sums would save that one read of (B*T, 4C) bf16 (16K tokens x 3072 for GPT-2
small), a small share of a step. It would need a bias-less c_fc and a
matching change in model.py and ops.py, so it is left out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._jit import store_cast
from ._launch import (TORCH_TO_TRITON, Build, aligned, can_launch, check_dtypes, count_launch, on_tensor_device,
                      register_builds, signature, why_not)

_BLOCK = 2048
_WARPS = 4


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _gelu_fwd_kernel(X, Y, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    # 2u = 2 * sqrt(2/pi) * (x + 0.044715 x^3) = x * (1.5957691216 + 0.0713548163 x^2)
    two_u = x * (1.5957691216057308 + 0.07135481627159225 * x * x)
    s = 1.0 / (1.0 + tl.exp(tl.minimum(-two_u, 80.0)))  # clamp: exp() stays finite (no inf warnings)
    tl.store(Y + offs, store_cast(x * s, Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(DY, X, DX, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = x * x
    two_u = x * (1.5957691216057308 + 0.07135481627159225 * x2)
    # e = exp(-2u), clamped so that e * s * s below never meets inf * 0 (for 2u < -80 the true
    # gradient is below 1e-33 anyway). s * (1 - s) = e * s^2 avoids the cancellation in 1 - s near s = 1.
    e = tl.exp(tl.minimum(-two_u, 80.0))
    s = 1.0 / (1.0 + e)
    # d(2u)/dx = 2 * sqrt(2/pi) * (1 + 3 * 0.044715 x^2) = 1.5957691216 + 0.2140644488 x^2
    d_two_u = 1.5957691216057308 + 0.21406444881477674 * x2
    grad = s + x * d_two_u * (e * s * s)
    tl.store(DX + offs, store_cast(dy * grad, DX.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _check_launch(*tensors: torch.Tensor) -> None:
    if not can_launch(*tensors):
        raise RuntimeError(f"gelu Triton kernel cannot run: {why_not(*tensors)}")


def _flat(t: torch.Tensor) -> torch.Tensor:
    # A non-contiguous input costs one copy (documented above); contiguous inputs are used in place.
    return t if t.is_contiguous() else t.contiguous()


def _fwd_launch(x: torch.Tensor) -> torch.Tensor:
    check_dtypes("gelu", x=x)
    _check_launch(x)
    xc = _flat(x)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = xc.numel()
    if n:
        count_launch("gelu_fwd")
        _gelu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](xc, y, n, BLOCK=_BLOCK, num_warps=_WARPS, num_stages=1)
    return y


def _bwd_launch(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    check_dtypes("gelu backward", dy=dy, x=x)
    _check_launch(dy, x)
    if dy.shape != x.shape:
        raise ValueError(f"gelu backward: grad shape {tuple(dy.shape)} != input shape {tuple(x.shape)}")
    xc, dyc = _flat(x), _flat(dy)
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = xc.numel()
    if n:
        count_launch("gelu_bwd")
        _gelu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dyc, xc, dx, n, BLOCK=_BLOCK, num_warps=_WARPS,
                                                     num_stages=1)
    return dx


# --------------------------------------------------------------------------------------------
# Custom ops with autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastgpt::gelu_fwd", mutates_args=())
@on_tensor_device
def gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    return _fwd_launch(x)


@gelu_fwd.register_fake
def _(x):
    return x.new_empty(x.shape)


@torch.library.custom_op("fastgpt::gelu_bwd", mutates_args=())
@on_tensor_device
def gelu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _bwd_launch(dy, x)


@gelu_bwd.register_fake
def _(dy, x):
    return x.new_empty(x.shape)


def _setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x)


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return torch.ops.fastgpt.gelu_bwd(dy, x)


gelu_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function and reference
# --------------------------------------------------------------------------------------------
def gelu(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximation GELU, == F.gelu(x, approximate="tanh"), any shape, output in x's dtype."""
    return torch.ops.fastgpt.gelu_fwd(x)


def gelu_reference(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# --------------------------------------------------------------------------------------------
# Builds for the compile report. The kernel is elementwise over the flattened tensor, so one build
# per dtype covers every GPT-2 width (the MLP's 4 * n_embd = 3072 ... 6400 columns).
# --------------------------------------------------------------------------------------------


@register_builds
def _builds() -> list[Build]:
    out: list[Build] = []
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        t = TORCH_TO_TRITON[dt]
        cfg = f"{t} BLOCK={_BLOCK} w{_WARPS} (any shape)"
        out.append(Build(kernel="gelu_fwd", fn=_gelu_fwd_kernel,
                         signature=signature(_gelu_fwd_kernel, {"X": f"*{t}", "Y": f"*{t}"}, default="i32"),
                         constexprs={"BLOCK": _BLOCK}, num_warps=_WARPS, num_stages=1, config=cfg,
                         attrs=aligned(_gelu_fwd_kernel, "X", "Y", "n_elements")))
        out.append(Build(kernel="gelu_bwd", fn=_gelu_bwd_kernel,
                         signature=signature(_gelu_bwd_kernel, dict.fromkeys(("DY", "X", "DX"), f"*{t}"),
                                             default="i32"),
                         constexprs={"BLOCK": _BLOCK}, num_warps=_WARPS, num_stages=1, config=cfg,
                         attrs=aligned(_gelu_bwd_kernel, "DY", "X", "DX", "n_elements")))
    return out
