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
rstd = rsqrt(var + eps). Output y = (x - mean) * rstd * w + b; weight and bias are optional (no
affine parameters: y = xhat, as nn.LayerNorm(elementwise_affine=False)) and may be fp32 or x's dtype
(autocast hands us fp32 weights).

Output dtype: the one its consumer wants. Outside autocast y is in x's dtype. Under autocast
(`torch.autocast`, CUDA or CPU) y is written directly in the autocast dtype: the residual stream is
fp32 and every LayerNorm output feeds a matmul that autocast would cast to bf16 anyway, so the kernel
stores 2 bytes an element instead of 4 and no separate cast kernel reads them back (fp32 in, bf16 out:
6 bytes an element instead of 4 + 4 + 2). The statistics stay fp32. The custom op takes the dtype as an
argument (`out_dtype`), so fake tensors and torch.compile see it.

Saved for backward: the input x (as autograd saves it for F.layer_norm too), and per row the fp32
mean and rstd (8 bytes a row). xhat is recomputed in the backward instead of stored.

Backward, two launches, deterministic:
1. `_layer_norm_bwd_kernel`: G programs, each owns a contiguous range of rows and walks it ROWS at a
   time (one row of >= 1024 elements a step, 16 bytes of x per thread, see `_bwd_config`). Per row, with
   xhat = (x - mean) * rstd and g = dy * w,
       dx = rstd * (g - xhat * mean(g * xhat) - mean(g))
   and it accumulates dy * xhat and dy into fp32 registers; at the end it writes its partial sums
   as row `pid` of two (G, N) fp32 buffers. The loop is software-pipelined by hand: the loads of the
   next tile (x, dy, mean, rstd) are issued before this tile's two row reductions, so they are in
   flight while the warps reduce and store. dy may have another dtype than x (bf16 gradients of an
   fp32 input under autocast); dx is in x's dtype.
   G = (blocks of this kernel that fit on one SM) x SMs, so all programs run in one wave. The blocks
   per SM come from the compiled kernel itself (its register count, warps and shared memory, read from
   the CompiledKernel Triton returns; see `blocks_per_sm`), not from an assumption: a build that needs
   more registers gets fewer programs instead of a serial second wave. The small tile keeps the kernel
   far under the 2-blocks-per-SM register edge (48-80 registers at GPT-2 widths, see the compile report).
   The partial buffers are small (G * N * 8 bytes, ~3.4 MB at N=1600 with 2 blocks on 132 SMs) next to
   the activations the kernel streams, and x and dy are read once (PyTorch's CUDA backward reads them
   again for dweight/dbias).
2. `_layer_norm_dwdb_kernel`: column blocks of the (G, N) partials summed over G in a fixed order.
   Same inputs -> bitwise-same dweight and dbias (no atomics). Not launched without affine parameters.
dweight/dbias come out in fp32 and are cast to the parameter dtype (a no-op for fp32 parameters).

Limits: N <= 8192; stride(-1) == 1 (otherwise one copy); CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1. Row offsets are int64, so M * row_stride may exceed 2**31. Dtypes (the one rule of
every kernel, kernels._launch.DTYPES): x, weight, bias and the output in fp32, bf16 or fp16, math in
fp32; any other dtype (float64 included) raises DtypeError (a TypeError and a ValueError) naming it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._jit import store_cast
from ._launch import (
    DTYPES,
    TORCH_TO_TRITON,
    Build,
    DtypeError,
    _cuda_index,
    can_launch,
    check_dtypes,
    count_launch,
    on_tensor_device,
    next_pow2,
    aligned,
    register_autocast_args,
    register_builds,
    signature,
    why_not,
)

MAX_N = 8192  # at 16384 the backward spills (x, dy and two accumulators of 32 fp32 a thread)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_fwd_kernel(
    X, W, B, Y, Mean, Rstd,  # X, Y: (M, N) rows (Y in the output dtype); W, B: (N,); Mean, Rstd: (M,) fp32
    stride_x, stride_y,  # row strides in elements (column stride is 1)
    M, N, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
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

    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        y += b[None, :]
    tl.store(Y + rows64[:, None] * stride_y + cols[None, :], store_cast(y, Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit(do_not_specialize=["rows_per_prog"])  # the grid-sizing warmup compiles the launched variant
def _layer_norm_bwd_kernel(
    DY, X, W, Mean, Rstd, DX, PartW, PartB,  # DY, X, DX: (M, N) (DY may differ in dtype); PartW, PartB: (G, N) fp32
    stride_dy, stride_x, stride_dx,
    M, N, rows_per_prog,  # program pid owns rows [pid * rows_per_prog, (pid + 1) * rows_per_prog)
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_w = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # sum over rows of dy * xhat
    acc_b = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)  # sum over rows of dy
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)

    # First tile's loads; every iteration then issues the next tile's before it reduces this one.
    rows = row_start + tl.arange(0, ROWS)
    row_ok = rows < row_end
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    x = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0)
    mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
    rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
    for _ in range(row_start, row_end, ROWS):
        n_rows = rows + ROWS
        n_row_ok = n_rows < row_end
        n_mask = n_row_ok[:, None] & col_ok[None, :]
        n_rows64 = n_rows.to(tl.int64)
        if PREFETCH:
            # The next tile's loads (masked off past row_end), in flight during the reductions below.
            n_x = tl.load(X + n_rows64[:, None] * stride_x + cols[None, :], mask=n_mask, other=0.0)
            n_dy = tl.load(DY + n_rows64[:, None] * stride_dy + cols[None, :], mask=n_mask, other=0.0)
            n_mean = tl.load(Mean + n_rows, mask=n_row_ok, other=0.0)
            n_rstd = tl.load(Rstd + n_rows, mask=n_row_ok, other=0.0)

        # Masked lanes: x = dy = 0 there, and the where() keeps xhat (and so every sum) clean.
        dyf = dy.to(tl.float32)
        xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            g = dyf * w[None, :]
        else:
            g = dyf
        c1 = tl.sum(g * xhat, axis=1) / N  # (ROWS,)
        c2 = tl.sum(g, axis=1) / N
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + rows64[:, None] * stride_dx + cols[None, :], store_cast(dx, DX.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            acc_w += dyf * xhat
        if HAS_BIAS:
            acc_b += dyf

        if not PREFETCH:  # rows too wide for two tiles in registers: load after the reduction
            n_x = tl.load(X + n_rows64[:, None] * stride_x + cols[None, :], mask=n_mask, other=0.0)
            n_dy = tl.load(DY + n_rows64[:, None] * stride_dy + cols[None, :], mask=n_mask, other=0.0)
            n_mean = tl.load(Mean + n_rows, mask=n_row_ok, other=0.0)
            n_rstd = tl.load(Rstd + n_rows, mask=n_row_ok, other=0.0)
        rows, row_ok, mask, rows64 = n_rows, n_row_ok, n_mask, n_rows64
        x, dy, mean, rstd = n_x, n_dy, n_mean, n_rstd
    part = pid.to(tl.int64) * N + cols
    if HAS_WEIGHT:
        tl.store(PartW + part, tl.sum(acc_w, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(PartB + part, tl.sum(acc_b, axis=0), mask=col_ok)


@triton.jit
def _layer_norm_dwdb_kernel(
    PartW, PartB, DW, DB,  # PartW, PartB: (G, N) fp32; DW, DB: (N,) fp32
    G, N,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
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
        if HAS_WEIGHT:
            acc_w += tl.load(PartW + offs, mask=mask, other=0.0)
        if HAS_BIAS:
            acc_b += tl.load(PartB + offs, mask=mask, other=0.0)
    if HAS_WEIGHT:
        tl.store(DW + cols, tl.sum(acc_w, axis=0), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB + cols, tl.sum(acc_b, axis=0), mask=col_ok)


# --------------------------------------------------------------------------------------------
# Launch configuration
# --------------------------------------------------------------------------------------------
def _block_n(n: int) -> int:
    """BLOCK_N of a row of `n` features: the next power of two, at most MAX_N."""
    block_n = next_pow2(n)
    if block_n > MAX_N:
        raise ValueError(f"layer_norm supports up to {MAX_N} features per row, got {n}")
    return block_n


def _row_config(n: int) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) of the forward's ROWS x BLOCK_N tile, one tile a program: ~4096
    elements, 16 per thread, so each thread issues two (bf16) or four (fp32) 128-bit loads before the
    row reductions. GPT-2 widths: 768/1024 -> 4 rows x 1024, 1280/1600 -> 2 rows x 2048, all 8 warps;
    4096 -> 1 x 4096 with 8 warps, 8192 -> 1 x 8192 with 16."""
    block_n = _block_n(n)
    rows = min(max(4096 // block_n, 1), 16)
    warps = min(max(block_n * rows // 512, 2), 16)
    return block_n, rows, warps


def _bwd_config(n: int, x_bytes: int, fp16: bool = False) -> tuple[int, int, int, bool]:
    """(BLOCK_N, ROWS, num_warps, PREFETCH) of one iteration of the backward's row loop, for x of
    `x_bytes` per element: one row of >= 1024 elements (several short rows), 16 bytes of x a thread
    (4 fp32 or 8 bf16/fp16 elements: 128-bit loads of x). The kernel holds x, dy, the prefetched next
    x and dy, the weight and two accumulators per element, so more elements a thread would cross the
    2-blocks-per-SM register edge (register counts of this and the variants tried: docs/kernels.md,
    "LayerNorm backward configs"). GPT-2 widths, fp32 x: 768/1024 -> 1 x 1024 with 8 warps,
    1280/1600 -> 1 x 2048 with 16; bf16 x: half the warps. Rows over 2048 take 4 elements a thread
    whatever the dtype. 8192 -> 16 warps, 16 a thread, without the prefetch (with it two tiles spill;
    at 32 warps a block may use only 64 registers a thread): one block per SM, which the
    occupancy-sized grid accounts for. An fp16 x (`fp16`) takes 4 elements a thread like fp32 (at 8,
    fp16 x and weight spill on sm_80)."""
    block_n = _block_n(n)
    rows = min(max(1024 // block_n, 1), 16)
    tile = block_n * rows
    if tile > 4096:
        per_thread = tile // 512
    elif x_bytes == 2 and tile <= 2048 and not fp16:
        per_thread = 8
    else:
        per_thread = 4
    warps = max(tile // (32 * per_thread), 1)
    return block_n, rows, warps, per_thread <= 8


_DWDB_BLOCK_G, _DWDB_BLOCK_C, _DWDB_WARPS = 32, 64, 4
_INTERPRETER_GROUPS = 8  # the interpreter runs programs one after another; > 1 exercises the partial sums
_SM_PROPS: dict[int, tuple[int, int, int, int]] = {}
_BWD_BLOCKS_PER_SM: dict[tuple, int] = {}


def blocks_per_sm(n_regs: int, num_warps: int, shared_bytes: int, regs_per_sm: int = 65536,
                  threads_per_sm: int = 2048, shared_per_sm: int = 228 * 1024, max_blocks: int = 32) -> int:
    """How many blocks of a compiled kernel fit on one SM at once (CUDA's occupancy rule for sm_80 /
    sm_90: registers are allocated per warp in units of 256, i.e. per thread rounded up to 8; shared
    memory per block; threads per SM). At least 1: a kernel that launched at all fits once."""
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = (regs_per_sm // regs_per_warp) // num_warps
    by_threads = threads_per_sm // (num_warps * 32)
    by_shared = shared_per_sm // shared_bytes if shared_bytes > 0 else max_blocks
    return max(1, min(by_regs, by_threads, by_shared, max_blocks))


def _sm_props(device: torch.device) -> tuple[int, int, int, int]:
    """(SMs, registers per SM, threads per SM, shared bytes per SM) of a CUDA device."""
    idx = _cuda_index(device)
    if idx not in _SM_PROPS:
        p = torch.cuda.get_device_properties(idx)
        _SM_PROPS[idx] = (p.multi_processor_count, getattr(p, "regs_per_multiprocessor", 65536),
                          getattr(p, "max_threads_per_multi_processor", 2048),
                          getattr(p, "shared_memory_per_multiprocessor", 228 * 1024))
    return _SM_PROPS[idx]


def _compiled_blocks_per_sm(compiled, device: torch.device) -> int:
    """blocks_per_sm of a triton CompiledKernel on `device`, from its own metadata."""
    compiled._init_handles()  # loads the binary: n_regs is known from then on
    _, regs, threads, shared = _sm_props(device)
    return blocks_per_sm(compiled.n_regs, compiled.metadata.num_warps, compiled.metadata.shared,
                         regs_per_sm=regs, threads_per_sm=threads, shared_per_sm=shared)


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


def _present(*tensors: Optional[torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in tensors if t is not None]


def _fwd_launch(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                out_dtype: Optional[torch.dtype] = None):
    n = x.shape[-1]
    if (weight is not None and weight.shape != (n,)) or (bias is not None and bias.shape != (n,)):
        raise ValueError(f"layer_norm weight/bias must have shape ({n},)")
    check_dtypes("layer_norm", x=x, weight=weight, bias=bias)
    out_dtype = x.dtype if out_dtype is None else out_dtype
    if out_dtype not in DTYPES:
        raise DtypeError(f"layer_norm writes float32, bfloat16 or float16, not {out_dtype}")
    _check_launch(x, *_present(weight, bias))
    x2 = _rows_view(x, n)
    m = x2.shape[0]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if m == 0:
        return y, mean, rstd
    block_n, rows, warps = _row_config(n)
    w = weight.contiguous() if weight is not None else mean  # unused pointer when HAS_WEIGHT is False
    b = bias.contiguous() if bias is not None else w  # unused pointer when HAS_BIAS is False
    count_launch("layer_norm_fwd")
    _layer_norm_fwd_kernel[(triton.cdiv(m, rows),)](
        x2, w, b, y, mean, rstd, x2.stride(0), n, m, n, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_N=block_n, ROWS=rows,
        num_warps=warps, num_stages=1,
    )
    return y, mean, rstd


def _bwd_launch(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                rstd: torch.Tensor, has_bias: bool):
    n = x.shape[-1]
    if dy.shape != x.shape:
        raise ValueError(f"layer_norm backward: grad shape {tuple(dy.shape)} != input shape {tuple(x.shape)}")
    _check_launch(dy, x, *_present(weight))
    x2 = _rows_view(x, n)
    dy2 = _rows_view(dy, n)
    m = x2.shape[0]
    has_weight = weight is not None
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dw = torch.zeros(n, dtype=torch.float32, device=x.device)
    db = torch.zeros(n, dtype=torch.float32, device=x.device)
    if m == 0:
        return dx, dw, db
    block_n, rows, warps, prefetch = _bwd_config(n, x.element_size(), x.dtype == torch.float16)
    blocks = triton.cdiv(m, rows)
    w = weight.contiguous() if has_weight else rstd  # unused pointer when HAS_WEIGHT is False
    const = dict(HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, BLOCK_N=block_n, ROWS=rows, PREFETCH=prefetch,
                 num_warps=warps, num_stages=1)

    def args(rows_per_prog, part_w, part_b):
        return (dy2, x2, w, mean.reshape(-1), rstd.reshape(-1), dx, part_w, part_b,
                dy2.stride(0), x2.stride(0), n, m, n, rows_per_prog)

    if x.device.type == "cuda":
        # One wave: as many programs as the compiled kernel fits on every SM at once.
        key = (x.device, dy.dtype, x.dtype, w.dtype, has_weight, has_bias, block_n, rows, warps)
        per_sm = _BWD_BLOCKS_PER_SM.get(key)
        if per_sm is None:
            compiled = _layer_norm_bwd_kernel.warmup(*args(m, dw, db), grid=(1,), **const)
            per_sm = _BWD_BLOCKS_PER_SM[key] = _compiled_blocks_per_sm(compiled, x.device)
        groups = min(blocks, per_sm * _sm_props(x.device)[0])
    else:
        groups = min(blocks, _INTERPRETER_GROUPS)
    rows_per_prog = triton.cdiv(blocks, groups) * rows
    groups = triton.cdiv(m, rows_per_prog)  # no empty programs
    part_w = torch.empty((groups if has_weight else 1, n), dtype=torch.float32, device=x.device)
    part_b = torch.empty((groups if has_bias else 1, n), dtype=torch.float32, device=x.device)
    count_launch("layer_norm_bwd")
    _layer_norm_bwd_kernel[(groups,)](*args(rows_per_prog, part_w, part_b), **const)
    if has_weight or has_bias:
        count_launch("layer_norm_dwdb")
        _layer_norm_dwdb_kernel[(triton.cdiv(n, _DWDB_BLOCK_C),)](
            part_w, part_b, dw, db, groups, n,
            HAS_WEIGHT=has_weight, HAS_BIAS=has_bias, BLOCK_G=_DWDB_BLOCK_G, BLOCK_C=_DWDB_BLOCK_C,
            num_warps=_DWDB_WARPS, num_stages=1,
        )
    return dx, dw, db


# --------------------------------------------------------------------------------------------
# Custom ops with autograd
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastgpt::layer_norm_fwd", mutates_args=())
@on_tensor_device
def layer_norm_fwd(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                   out_dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y of x's shape in out_dtype (default x's dtype), mean and rstd fp32 of shape x.shape[:-1])."""
    return _fwd_launch(x, weight, bias, eps, out_dtype)


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype=None):
    stats = x.shape[:-1]
    return (x.new_empty(x.shape, dtype=x.dtype if out_dtype is None else out_dtype),
            x.new_empty(stats, dtype=torch.float32), x.new_empty(stats, dtype=torch.float32))


@torch.library.custom_op("fastgpt::layer_norm_bwd", mutates_args=())
@on_tensor_device
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor,
                   rstd: torch.Tensor, has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dweight fp32 (N,), dbias fp32 (N,)); dweight / dbias are zeros without a
    weight / bias. dy may be in another dtype than x (the forward's out_dtype)."""
    return _bwd_launch(dy, x, weight, mean, rstd, has_bias)


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, has_bias):
    n = x.shape[-1]
    return (x.new_empty(x.shape), x.new_empty((n,), dtype=torch.float32),
            x.new_empty((n,), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps, _out_dtype = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.fastgpt.layer_norm_bwd(dy, x, weight, mean, rstd, ctx.has_bias)
    dw = dw.to(weight.dtype) if weight is not None else None
    db = db.to(ctx.bias_dtype) if ctx.has_bias else None
    return dx, dw, db, None, None


layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function and reference
# --------------------------------------------------------------------------------------------
def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype LayerNorm hands its consumer: the autocast dtype when autocast is on for x's device
    (the consumer is a matmul that would cast to it anyway), x's dtype otherwise."""
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@register_autocast_args("layer_norm_fwd")
def _autocast_args(args: dict, dtype: torch.dtype) -> dict:
    # layer_norm writes its output in the autocast dtype (fp32 in, bf16 out); out_dtype None = x's dtype
    return args if args["x"].dtype == dtype else dict(args, out_dtype=dtype)


# layer_norm_bwd's workspace (per-program partial sums of dweight / dbias, 2 x G x C fp32 with G about
# blocks per SM x SMs, a few MB) depends on the GPU's SM count and is not registered.


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension, == F.layer_norm(x, (N,), weight, bias, eps); weight and bias may
    be None (no affine parameters). Output in x's dtype, or in the autocast dtype under autocast (one
    kernel writes it, no separate cast)."""
    out_dtype = output_dtype(x)
    y, _mean, _rstd = torch.ops.fastgpt.layer_norm_fwd(x, weight, bias, float(eps),
                                                       None if out_dtype == x.dtype else out_dtype)
    return y


def layer_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                         eps: float = 1e-5) -> torch.Tensor:
    """PyTorch LayerNorm with the kernel's dtype rule: computed in x's dtype whatever weight's dtype,
    output in `output_dtype(x)` (the autocast dtype under autocast)."""
    out_dtype = output_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        w = weight.to(x.dtype) if weight is not None else None
        b = bias.to(x.dtype) if bias is not None else None
        return F.layer_norm(x, (x.shape[-1],), w, b, eps).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Builds for the compile report: GPT-2 widths, the dtypes training uses
# --------------------------------------------------------------------------------------------
# Every n_embd of fastgpt.config.PRESETS (tiny 128, mini 384, GPT-2's four) and the widest row we accept;
# tests/test_compile_report.py checks the presets are all here.
_WIDTHS = (128, 384, 768, 1024, 1280, 1600, MAX_N)
# (x dtype, weight dtype, output dtype = backward's dy dtype): fp32 throughout; bf16 autocast on the
# fp32 residual stream (fp32 in, bf16 out: the model's LayerNorms); bf16 activations with fp32 weights;
# pure bf16.
# The same three for fp16 (the sm_75 training path: fp16 autocast with loss scaling). At MAX_N (not a
# model width) only fp32 and bf16.
_DTYPES = ((torch.float32, torch.float32, torch.float32), (torch.float32, torch.float32, torch.bfloat16),
           (torch.bfloat16, torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16, torch.bfloat16),
           (torch.float32, torch.float32, torch.float16), (torch.float16, torch.float32, torch.float16),
           (torch.float16, torch.float16, torch.float16))


@register_builds
def _builds() -> list[Build]:
    out: list[Build] = []
    for n in _WIDTHS:
        for xd, wd, yd in _DTYPES if n != MAX_N else _DTYPES[:4]:
            xt, wt, yt = TORCH_TO_TRITON[xd], TORCH_TO_TRITON[wd], TORCH_TO_TRITON[yd]
            # Bias-less (GPTConfig(bias=False)) and affine-free LayerNorm only change constexprs: built at 768.
            variants = [(True, True)]
            if n == 768 and xd == wd == yd == torch.float32:
                variants += [(True, False), (False, False)]
            for has_weight, has_bias in variants:
                label = f"x={xt} w={wt} y={yt} N={n}" + ("" if has_bias else " no-bias") + \
                        ("" if has_weight else " no-affine")
                block_n, rows, warps = _row_config(n)
                out.append(Build(
                    kernel="layer_norm_fwd", fn=_layer_norm_fwd_kernel,
                    signature=signature(_layer_norm_fwd_kernel, {
                        "X": f"*{xt}", "W": f"*{wt}", "B": f"*{wt}", "Y": f"*{yt}", "Mean": "*fp32", "Rstd": "*fp32",
                        "eps": "fp32"}, default="i32"),
                    constexprs={"HAS_WEIGHT": has_weight, "HAS_BIAS": has_bias, "BLOCK_N": block_n, "ROWS": rows},
                    num_warps=warps, num_stages=1, config=f"{label} ROWS={rows} BLOCK_N={block_n} w{warps}",
                    attrs=aligned(_layer_norm_fwd_kernel, "X", "W", "B", "Y", "Mean", "Rstd", "stride_x", "stride_y", "N"),
                ))
                block_n, rows, warps, prefetch = _bwd_config(n, xd.itemsize, xd == torch.float16)
                out.append(Build(
                    kernel="layer_norm_bwd", fn=_layer_norm_bwd_kernel,
                    signature=signature(_layer_norm_bwd_kernel, {
                        "DY": f"*{yt}", "X": f"*{xt}", "W": f"*{wt}", "Mean": "*fp32", "Rstd": "*fp32",
                        "DX": f"*{xt}", "PartW": "*fp32", "PartB": "*fp32"}, default="i32"),
                    constexprs={"HAS_WEIGHT": has_weight, "HAS_BIAS": has_bias, "BLOCK_N": block_n, "ROWS": rows,
                                "PREFETCH": prefetch},
                    num_warps=warps, num_stages=1,
                    config=f"{label} ROWS={rows} BLOCK_N={block_n} w{warps}" + ("" if prefetch else " no-prefetch"),
                    attrs=aligned(_layer_norm_bwd_kernel, "DY", "X", "W", "Mean", "Rstd", "DX", "PartW", "PartB",
                                   "stride_dy", "stride_x", "stride_dx", "N"),
                ))
    for has_weight, has_bias in ((True, True), (True, False)):
        out.append(Build(
            kernel="layer_norm_dwdb", fn=_layer_norm_dwdb_kernel,
            signature=signature(_layer_norm_dwdb_kernel, dict.fromkeys(("PartW", "PartB", "DW", "DB"), "*fp32"),
                                default="i32"),
            constexprs={"HAS_WEIGHT": has_weight, "HAS_BIAS": has_bias, "BLOCK_G": _DWDB_BLOCK_G,
                        "BLOCK_C": _DWDB_BLOCK_C},
            num_warps=_DWDB_WARPS, num_stages=1,
            config=f"fp32 BLOCK_G={_DWDB_BLOCK_G} BLOCK_C={_DWDB_BLOCK_C} w{_DWDB_WARPS} (any N % 16 == 0)"
                   + ("" if has_bias else " no-bias"),
            attrs=aligned(_layer_norm_dwdb_kernel, "PartW", "PartB", "DW", "DB", "N"),
        ))
    return out
