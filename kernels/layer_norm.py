"""LayerNorm over the last dimension: Triton forward and backward, custom op, PyTorch reference.

Algorithm
---------
The input is viewed as M rows of N features, X (M, N), with unit stride along N and any row stride
(a slice such as `big[:, :N]` works without a copy; only a tensor whose last stride is not 1 is copied
once). One row fits in registers: BLOCK_N = next_pow2(N) <= MAX_N (8192).

Forward (`_layer_norm_fwd_kernel`): each program normalises a tile of ROWS x BLOCK_N (several rows per
program at GPT-2 widths so the weight and bias loads and the launch overhead are shared, 16 elements
per thread so every load is 128 bits wide; see `_row_config`). Statistics are fp32:
mean = sum(x)/N, var = sum((x-mean)^2)/N (two passes over registers, no catastrophic cancellation),
rstd = rsqrt(var + eps). Output
y = (x - mean) * rstd * w + b is written in x's dtype; the weight may be fp32 or x's dtype (autocast
hands us fp32 weights with bf16 activations).

Saved for backward: the input x (as autograd saves it for F.layer_norm too), and per row the fp32
mean and rstd (8 bytes a row). xhat is recomputed in the backward instead of stored.

Backward, two launches, deterministic:
1. `_layer_norm_bwd_kernel`: G programs, each owns a contiguous range of rows and walks it ROWS at a
   time (the same tile shape as the forward). Per row, with xhat = (x - mean) * rstd and g = dy * w,
       dx = rstd * (g - xhat * mean(g * xhat) - mean(g))
   and it accumulates dy * xhat and dy into fp32 registers; at the end it writes its partial sums
   as row `pid` of two (G, N) fp32 buffers. G is 2 programs per SM, so the partial buffers are
   small (G * N * 8 bytes, ~3.4 MB at N=1600 on 132 SMs) next to the activations the kernel streams,
   and x and dy are read once (PyTorch's CUDA backward reads them again for dweight/dbias).
2. `_layer_norm_dwdb_kernel`: column blocks of the (G, N) partials summed over G in a fixed order.
   Same inputs -> bitwise-same dweight and dbias (no atomics).
dweight/dbias come out in fp32 and are cast to the parameter dtype (a no-op for fp32 parameters).

Limits: N <= 8192; stride(-1) == 1 (otherwise one copy); CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1. Row offsets are int64, so M * row_stride may exceed 2**31.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._jit import store_cast
from ._launch import (
    TORCH_TO_TRITON,
    Build,
    can_launch,
    count_launch,
    on_tensor_device,
    next_pow2,
    register_builds,
    why_not,
)

MAX_N = 8192  # at 16384 the backward spills (x, dy and two accumulators of 32 fp32 a thread)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_fwd_kernel(
    X, W, B, Y, Mean, Rstd,  # X, Y: (M, N) rows; W, B: (N,); Mean, Rstd: (M,) fp32
    stride_x, stride_y,  # row strides in elements (column stride is 1)
    M, N, eps,
    HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < M
    col_ok = cols < N
    mask = row_ok[:, None] & col_ok[None, :]  # (ROWS, BLOCK_N)
    rows64 = rows.to(tl.int64)

    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N  # (ROWS,)
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / N
    rstd = tl.rsqrt(var + eps)

    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        y += b[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], store_cast(y, Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, Mean, Rstd, DX, PartW, PartB,  # DY, X, DX: (M, N); PartW, PartB: (G, N) fp32
    stride_dy, stride_x, stride_dx,
    M, N, rows_per_prog,  # program pid owns rows [pid * rows_per_prog, (pid + 1) * rows_per_prog)
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_w = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # sum over rows of dy * xhat
    acc_b = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # sum over rows of dy
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        # Masked lanes: x = dy = 0 there, and the where() keeps xhat (and so every sum) clean.
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / N  # (ROWS,)
        c2 = tl.sum(g, axis=1) / N
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], store_cast(dx, DX.dtype.element_ty), mask=mask)
        acc_w += dy * xhat
        acc_b += dy
    part = pid.to(tl.int64) * N + cols
    tl.store(PartW + part, tl.sum(acc_w, axis=0), mask=col_ok)
    tl.store(PartB + part, tl.sum(acc_b, axis=0), mask=col_ok)


@triton.jit
def _layer_norm_dwdb_kernel(
    PartW, PartB, DW, DB,  # PartW, PartB: (G, N) fp32; DW, DB: (N,) fp32
    G, N,
    HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < N
    acc_w = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_G, BLOCK_C), dtype=tl.float32)
    # Fixed traversal order over the G partial rows: the result does not depend on scheduling.
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        mask = (g < G)[:, None] & col_ok[None, :]
        offs = g.to(tl.int64)[:, None] * N + cols[None, :]
        acc_w += tl.load(PartW + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc_b += tl.load(PartB + offs, mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(acc_w, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB + cols, tl.sum(acc_b, axis=0), mask=col_ok)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
def _row_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) of a ROWS x BLOCK_N tile, for the forward (one tile a program) and
    the backward (one tile an iteration of its row loop): ~4096 elements, 16 per thread, so each
    thread issues two (bf16) or four (fp32) 128-bit loads per tensor before the row reductions.
    GPT-2 widths: 768/1024 -> 4 rows x 1024, 1280/1600 -> 2 rows x 2048, all 8 warps; 4096 -> 1 x 4096
    with 8 warps, 8192 -> 1 x 8192 with 16. The backward holds x, dy and two accumulators per element
    and lands at <= 128 registers (two 8-warp programs per SM, see _num_groups); the compile report
    checks it does not spill."""
    block_n = next_pow2(n)
    if block_n > MAX_N:
        raise ValueError(f"layer_norm supports up to {MAX_N} features per row, got {n}")
    rows = min(max(4096 // block_n, 1), 16)
    warps = min(max(block_n * rows // 512, 2), 16)
    return block_n, rows, warps


_DWDB_BLOCK_G, _DWDB_BLOCK_C, _DWDB_WARPS = 32, 64, 4
_SM_COUNT: dict[int, int] = {}


def _num_groups(blocks: int, device: torch.device) -> int:
    """How many programs share the backward: 2 per SM on a GPU, so that they all run in one wave (an
    8-warp program of <= 128 registers a thread fits twice in an SM's 64K registers: no tail wave of
    stragglers); 8 under the interpreter (it runs programs one after the other; more than one still
    exercises the partial-sum reduction)."""
    if device.type != "cuda":
        return max(1, min(blocks, 8))
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return max(1, min(blocks, 2 * _SM_COUNT[idx]))


def _rows_view(t: torch.Tensor, n: int) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride; a view whenever the layout allows one."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t.reshape(-1, n)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _check_launch(*tensors: torch.Tensor) -> None:
    if not can_launch(*tensors):
        raise RuntimeError(f"layer_norm Triton kernel cannot run: {why_not(*tensors)}")


def _fwd_launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float):
    n = x.shape[-1]
    if weight.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"layer_norm weight/bias must have shape ({n},)")
    _check_launch(x, weight, *([bias] if bias is not None else []))
    x2 = _rows_view(x, n)
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if m == 0:
        return y, mean, rstd
    block_n, rows, warps = _row_config(n)
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w  # unused pointer when HAS_BIAS is False
    count_launch("layer_norm_fwd")
    _layer_norm_fwd_kernel[(triton.cdiv(m, rows),)](
        x2, w, b, y, mean, rstd, x2.stride(0), n, m, n, eps,
        HAS_BIAS=bias is not None, BLOCK_N=block_n, ROWS=rows, num_warps=warps, num_stages=1,
    )
    return y, mean, rstd


def _bwd_launch(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                rstd: torch.Tensor, has_bias: bool):
    n = x.shape[-1]
    _check_launch(dy, x, weight)
    x2 = _rows_view(x, n)
    dy2 = _rows_view(dy, n)
    m = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.zeros(n, dtype=torch.float32, device=x.device)
    db = torch.zeros(n, dtype=torch.float32, device=x.device)
    if m == 0:
        return dx, dw, db
    block_n, rows, warps = _row_config(n)
    blocks = triton.cdiv(m, rows)
    groups = _num_groups(blocks, x.device)
    rows_per_prog = triton.cdiv(blocks, groups) * rows
    groups = triton.cdiv(m, rows_per_prog)  # no empty programs
    part_w = torch.empty((groups, n), dtype=torch.float32, device=x.device)
    part_b = torch.empty((groups, n), dtype=torch.float32, device=x.device)
    count_launch("layer_norm_bwd")
    _layer_norm_bwd_kernel[(groups,)](
        dy2, x2, weight.contiguous(), mean.reshape(-1), rstd.reshape(-1), dx, part_w, part_b,
        dy2.stride(0), x2.stride(0), n, m, n, rows_per_prog,
        BLOCK_N=block_n, ROWS=rows, num_warps=warps, num_stages=1,
    )
    count_launch("layer_norm_dwdb")
    _layer_norm_dwdb_kernel[(triton.cdiv(n, _DWDB_BLOCK_C),)](
        part_w, part_b, dw, db, groups, n,
        HAS_BIAS=has_bias, BLOCK_G=_DWDB_BLOCK_G, BLOCK_C=_DWDB_BLOCK_C, num_warps=_DWDB_WARPS, num_stages=1,
    )
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# Custom ops with autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastgpt::layer_norm_fwd", mutates_args=())
@on_tensor_device
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y in x's dtype and shape, mean and rstd fp32 of shape x.shape[:-1])."""
    return _fwd_launch(x, weight, bias, eps)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    stats = x.shape[:-1]
    return (x.new_empty(x.shape), x.new_empty(stats, dtype=torch.float32),
            x.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("fastgpt::layer_norm_bwd", mutates_args=())
@on_tensor_device
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dweight fp32 (N,), dbias fp32 (N,); dbias is zeros when has_bias is False)."""
    return _bwd_launch(dy, x, weight, mean, rstd, has_bias)


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, has_bias):
    n = x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty((n,), dtype=torch.float32),
            x.new_empty((n,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.fastgpt.layer_norm_bwd(dy, x, weight, mean, rstd, ctx.has_bias)
    db = db.to(ctx.bias_dtype) if ctx.has_bias else None
    return dx, dw.to(weight.dtype), db, None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function and reference
# --------------------------------------------------------------------------------------------
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension, == F.layer_norm(x, (N,), weight, bias, eps), in x's dtype."""
    y, _mean, _rstd = torch.ops.fastgpt.layer_norm_fwd(x, weight, bias, float(eps))
    return y


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         eps: float = 1e-5) -> torch.Tensor:
    """PyTorch LayerNorm with the kernel's dtype rule: output in x's dtype whatever weight's dtype."""
    w = weight.to(x.dtype)
    b = bias.to(x.dtype) if bias is not None else None
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


# --------------------------------------------------------------------------------------------
# Builds for the compile report: GPT-2 widths, the dtype pairs training uses
# --------------------------------------------------------------------------------------------
_WIDTHS = (768, 1024, 1280, 1600, MAX_N)  # GPT-2's four widths, and the widest row we accept
# (x dtype, weight dtype): fp32 throughout, bf16 under autocast (fp32 weights), pure bf16.
_DTYPES = ((torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16))
_ALIGNED = [["tt.divisibility", 16]]  # what the JIT infers for 16-byte aligned pointers / ints % 16 == 0


def _aligned(*names: str) -> dict:
    return {name: _ALIGNED for name in names}


@register_builds
def _builds() -> list[Build]:
    out: list[Build] = []
    for n in _WIDTHS:
        for xd, wd in _DTYPES if n != MAX_N else _DTYPES[:2]:
            xt, wt = TORCH_TO_TRITON[xd], TORCH_TO_TRITON[wd]
            # Bias-less LayerNorm (GPTConfig(bias=False)) only changes a constexpr: built at 768.
            for has_bias in ((True, False) if n == 768 and xd == wd == torch.float32 else (True,)):
                block_n, rows, warps = _row_config(n)
                out.append(Build(
                    kernel="layer_norm_fwd", fn=_layer_norm_fwd_kernel,
                    signature={"X": f"*{xt}", "W": f"*{wt}", "B": f"*{wt}", "Y": f"*{xt}", "Mean": "*fp32",
                               "Rstd": "*fp32", "stride_x": "i32", "stride_y": "i32", "M": "i32", "N": "i32",
                               "eps": "fp32", "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr", "ROWS": "constexpr"},
                    constexprs={"HAS_BIAS": has_bias, "BLOCK_N": block_n, "ROWS": rows},
                    num_warps=warps, num_stages=1,
                    config=f"x={xt} w={wt} N={n} ROWS={rows} BLOCK_N={block_n} w{warps}"
                           + ("" if has_bias else " no-bias"),
                    attrs=_aligned("X", "W", "B", "Y", "Mean", "Rstd", "stride_x", "stride_y", "N"),
                ))
            block_n, rows, warps = _row_config(n)
            out.append(Build(
                kernel="layer_norm_bwd", fn=_layer_norm_bwd_kernel,
                signature={"DY": f"*{xt}", "X": f"*{xt}", "W": f"*{wt}", "Mean": "*fp32", "Rstd": "*fp32",
                           "DX": f"*{xt}", "PartW": "*fp32", "PartB": "*fp32", "stride_dy": "i32",
                           "stride_x": "i32", "stride_dx": "i32", "M": "i32", "N": "i32",
                           "rows_per_prog": "i32", "BLOCK_N": "constexpr", "ROWS": "constexpr"},
                constexprs={"BLOCK_N": block_n, "ROWS": rows},
                num_warps=warps, num_stages=1,
                config=f"x={xt} w={wt} N={n} ROWS={rows} BLOCK_N={block_n} w{warps}",
                attrs=_aligned("DY", "X", "W", "Mean", "Rstd", "DX", "PartW", "PartB",
                               "stride_dy", "stride_x", "stride_dx", "N"),
            ))
    for has_bias in (True, False):
        out.append(Build(
            kernel="layer_norm_dwdb", fn=_layer_norm_dwdb_kernel,
            signature={"PartW": "*fp32", "PartB": "*fp32", "DW": "*fp32", "DB": "*fp32", "G": "i32", "N": "i32",
                       "HAS_BIAS": "constexpr", "BLOCK_G": "constexpr", "BLOCK_C": "constexpr"},
            constexprs={"HAS_BIAS": has_bias, "BLOCK_G": _DWDB_BLOCK_G, "BLOCK_C": _DWDB_BLOCK_C},
            num_warps=_DWDB_WARPS, num_stages=1,
            config=f"fp32 BLOCK_G={_DWDB_BLOCK_G} BLOCK_C={_DWDB_BLOCK_C} w{_DWDB_WARPS} (any N % 16 == 0)"
                   + ("" if has_bias else " no-bias"),
            attrs=_aligned("PartW", "PartB", "DW", "DB", "N"),
        ))
    return out
