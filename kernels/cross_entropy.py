"""Fused linear cross-entropy: the loss of `x @ weight.T` without ever holding the full logits.

    linear_cross_entropy(x (N, C), weight (V, C), targets (N,)) ==
        F.cross_entropy(x @ weight.T, targets, ignore_index=ignore_index, reduction=reduction)

Algorithm (all in the forward):
    for each chunk of `rows` rows of x:
        logits = x_chunk @ w.T                        (rows, V_pad) in the compute dtype (torch matmul)
        one Triton launch, one program per row:       reads the row twice, writes it once
            pass 1: online max / sum-exp over vocab blocks in fp32 -> lse; loss_row = lse - logit[target]
            pass 2: logits <- (softmax - onehot(target)) * scale   in place, in the compute dtype
                    scale = 1/n_valid ("mean") or 1 ("sum"); 0 for ignored rows (target == ignore_index)
        dx[chunk]  = grad_logits @ w                  (rows, C)
        dw        += grad_logits.T @ x_chunk          (V, C), accumulated in fp32 across chunks
    loss = sum(loss_rows) / n_valid   (or the sum)

Saved for backward: dx (N, C) in x's dtype and dweight (V, C) in weight's dtype, already
d(loss)/d(.); the backward only multiplies them by grad_output. Nothing of size N x V survives the
forward: the peak extra memory is one chunk of logits (`rows` x V_pad) plus the fp32 dweight
accumulator (V x C). The chunk is sized so rows x V_pad is about `CHUNK_ELEMENTS` (2^25: 64 MiB
in bf16); tests pass `chunk_rows` to force several chunks.

Vocabulary padding: the weight is copied (in the compute dtype) into V_pad = ceil(V / 64) * 64
rows, the extra rows zero, so every logits row starts 16-byte aligned (128-bit loads in the
kernel) and cuBLAS sees an aligned leading dimension. The kernel treats columns >= V as -inf in
the softmax and writes 0 into them, so they add nothing to dx or dweight. (GPT-2's 50257 -> 50304.)

Dtypes and autocast: under `torch.autocast` the public function computes both matmuls in the
autocast dtype (as `F.linear` would: the model calls it with fp32 x and fp32 weight under bf16
autocast); otherwise in the promoted dtype of x and weight. The custom op itself runs with autocast
disabled and gets the compute dtype as an argument. Statistics (max, sum-exp, lse, loss) are fp32;
the gradient written in place is rounded once to the compute dtype (as PyTorch's own bf16 logits
gradient is); dweight accumulates in fp32 and is returned in weight's dtype, dx in x's dtype. The
loss is always fp32.

Targets outside [0, V) that are not ignore_index: on CPU tensors (the interpreter) the op raises a
ValueError naming the first such target and its position; the check reads the targets on the host,
which costs nothing there. On CUDA that read would be a device -> host sync every step, so it is
opt-in: `linear_cross_entropy(..., check_targets=True)` raises the same error; and with Triton's debug
mode on (TRITON_DEBUG=1) the kernel's `tl.device_assert` stops at the first bad row. Without either,
such a row's loss is NaN (never an out-of-bounds read), so the mean loss is NaN too.

Limits: CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Dtypes (the one rule of every kernel,
kernels._launch.DTYPES): x and weight in fp32, bf16 or fp16, statistics in fp32; any other dtype
(float64 included) raises DtypeError (a TypeError and a ValueError) naming it. Targets: any integer dtype.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._launch import (Build, can_launch, check_dtypes, count_launch, interpreting, on_tensor_device, register_autocast_args,
                      register_builds, register_workspace, signature, why_not)

CHUNK_ELEMENTS = 1 << 25  # logits elements per chunk (rows x V_pad)
VOCAB_ALIGN = 64
BLOCK_V = 4096  # vocab columns per loop iteration: 16 per thread at 8 warps
# The interpreter's cost is per operation, not per element: wider blocks there (GPT-2's vocab is
# still 4 loop iterations with a masked tail, so the online logsumexp stays exercised).
BLOCK_V_INTERPRETER = 16384
NUM_WARPS = 8


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _round_bf16_rne(x):
    # fp32 -> nearest-even bf16 value, still in fp32. Only for the interpreter, whose fp32 -> bf16
    # cast truncates (the compiled cast rounds to nearest even); after this its cast is exact.
    u = x.to(tl.uint32, bitcast=True)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _ce_loss_grad_kernel(logits_ptr, stride_row, targets_ptr, loss_ptr, scale_ptr, n_cols, ignore_index,
                         WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, ROUND_BF16: tl.constexpr):
    # logits: (rows, stride_row) with stride_row = V_pad >= n_cols = V; one program per row
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    target = tl.load(targets_ptr + row)
    cols = tl.arange(0, BLOCK_V)

    # pass 1: running max and sum of exp(x - max), fp32
    m = -float("inf")
    s = 0.0
    for start in range(0, stride_row, BLOCK_V):
        c = start + cols
        x = tl.load(base + c, mask=c < stride_row, other=0.0).to(tl.float32)
        x = tl.where(c < n_cols, x, -float("inf"))
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)

    valid = target != ignore_index
    in_range = (target >= 0) & (target < n_cols)
    tl.device_assert(in_range | ~valid, "linear_cross_entropy: a target is outside [0, V) and not ignore_index")
    x_t = tl.load(base + tl.where(in_range, target, 0)).to(tl.float32)
    loss = tl.where(valid, tl.where(in_range, lse - x_t, float("nan")), 0.0)
    tl.store(loss_ptr + row, loss)

    if WRITE_GRAD:
        # pass 2: d(loss)/d(logits) = (softmax - onehot) * scale, in place; 0 past V and for ignored rows
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        for start in range(0, stride_row, BLOCK_V):
            c = start + cols
            mem = c < stride_row
            x = tl.load(base + c, mask=mem, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0)
            g = tl.where(c < n_cols, g * scale, 0.0)
            if ROUND_BF16:
                g = _round_bf16_rne(g)
            tl.store(base + c, g.to(logits_ptr.dtype.element_ty), mask=mem)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _launch_loss_grad(logits: torch.Tensor, targets: torch.Tensor, loss_rows: torch.Tensor,
                      scale: torch.Tensor, n_cols: int, ignore_index: int, write_grad: bool) -> None:
    rows = logits.shape[0]
    if rows == 0:
        return
    count_launch("cross_entropy")
    _ce_loss_grad_kernel[(rows,)](logits, logits.stride(0), targets, loss_rows, scale, n_cols, ignore_index,
                                  WRITE_GRAD=write_grad,
                                  BLOCK_V=BLOCK_V_INTERPRETER if interpreting() else BLOCK_V,
                                  ROUND_BF16=interpreting() and logits.dtype == torch.bfloat16, num_warps=NUM_WARPS)


_OUT_DTYPE_ADDMM = [True]  # cleared if this torch build lacks addmm(..., out_dtype) for the device


def _addmm_fp32_out(dw: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """dw (fp32) += a @ b for bf16/fp16 a, b: fp32 accumulation, output straight into dw (torch >= 2.8)."""
    torch.ops.aten.addmm.dtype_out(dw, a, b, torch.float32, out=dw)


def _fast_path_device(dw: torch.Tensor) -> bool:
    return dw.is_cuda


def _accumulate_dw(dw: torch.Tensor, grad_logits: torch.Tensor, xc: torch.Tensor) -> None:
    """dw (V_pad, C) fp32 += grad_logits.T @ xc, with fp32 accumulation across chunks."""
    if grad_logits.dtype == torch.float32:
        dw.addmm_(grad_logits.T, xc)
        return
    if _fast_path_device(dw) and _OUT_DTYPE_ADDMM[0]:
        try:
            _addmm_fp32_out(dw, grad_logits.T, xc)
            return
        except torch.OutOfMemoryError:
            raise  # out of memory says nothing about whether the op exists
        except (RuntimeError, NotImplementedError) as e:
            _OUT_DTYPE_ADDMM[0] = False  # for the rest of the process: said once, here
            warnings.warn(f"kernels.linear_cross_entropy: torch.ops.aten.addmm.dtype_out failed on this torch "
                          f"build ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); dweight now "
                          f"accumulates through a {grad_logits.dtype} product and a separate fp32 add (one more "
                          f"(V, C) temporary and pass per chunk, slower) for the rest of this process",
                          RuntimeWarning, stacklevel=2)
    if _fast_path_device(dw):
        dw.add_(grad_logits.T @ xc)  # product rounded once to the compute dtype, sum in fp32
    else:
        dw.addmm_(grad_logits.T.float(), xc.float())


def _chunk_rows(n: int, v_pad: int, chunk_rows: int) -> int:
    if chunk_rows > 0:
        return chunk_rows
    n_chunks = max(1, math.ceil(n * v_pad / CHUNK_ELEMENTS))
    rows = math.ceil(n / n_chunks)
    return max(1, min(n, -(-rows // 8) * 8))


def _forward(x, weight, targets, ignore_index, reduction, compute_dtype, chunk_rows, need_dx, need_dw):
    N, C = x.shape
    V = weight.shape[0]
    v_pad = -(-V // VOCAB_ALIGN) * VOCAB_ALIGN
    if v_pad == V:
        w = weight.to(compute_dtype)
    else:
        w = weight.new_zeros((v_pad, C), dtype=compute_dtype)
        w[:V].copy_(weight)
    targets = targets.to(torch.int64).contiguous()
    n_valid = (targets != ignore_index).sum()
    if reduction == "mean":
        scale = (1.0 / n_valid.to(torch.float32)).reshape(1)
    else:
        scale = torch.ones(1, dtype=torch.float32, device=x.device)
    loss_rows = torch.empty(N, dtype=torch.float32, device=x.device)
    write_grad = need_dx or need_dw
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    dw = torch.zeros((v_pad, C), dtype=torch.float32, device=x.device) if need_dw else None
    rows = _chunk_rows(N, v_pad, chunk_rows)
    for s in range(0, N, rows):
        e = min(N, s + rows)
        xc = x[s:e].to(compute_dtype)
        logits = xc @ w.T  # (rows, V_pad), contiguous
        _launch_loss_grad(logits, targets[s:e], loss_rows[s:e], scale, V, ignore_index, write_grad)
        if need_dx:
            dx[s:e] = logits @ w
        if need_dw:
            _accumulate_dw(dw, logits, xc)
        del logits, xc  # else the next chunk's logits are computed while this chunk's are still held
    total = loss_rows.sum()
    loss = total / n_valid.to(torch.float32) if reduction == "mean" else total
    if need_dw:
        dweight = dw[:V] if weight.dtype == torch.float32 else dw[:V].to(weight.dtype)
    else:
        dweight = weight.new_empty(0)
    return loss, dx, dweight


@register_workspace("linear_cross_entropy")
def _workspace(x, weight, targets, ignore_index, reduction, compute_dtype, chunk_rows, need_dx, need_dw,
               check_targets=False):
    """What `_forward` allocates on CUDA besides its outputs (loss, dx, dweight) and the fp32 dweight
    accumulator's final cast, at its largest: inside one chunk."""
    N, C = x.shape
    V = weight.shape[0]
    v_pad = -(-V // VOCAB_ALIGN) * VOCAB_ALIGN
    rows = _chunk_rows(N, v_pad, chunk_rows)
    work = [((N,), torch.float32)]  # per-row losses
    if v_pad != V or weight.dtype != compute_dtype:  # the weight, zero-padded to v_pad rows
        work.append(((v_pad, C), compute_dtype))
    if x.dtype != compute_dtype:  # one chunk of x in the compute dtype
        work.append(((rows, C), compute_dtype))
    work.append(((rows, v_pad), compute_dtype))  # the chunk's logits, then their gradient
    temps = []  # one at a time within a chunk: the larger counts
    if need_dx:  # grad_logits @ w (rows, C), copied into dx
        temps.append((rows, C))
    if need_dw and compute_dtype != torch.float32 and not _OUT_DTYPE_ADDMM[0]:
        # _accumulate_dw's fallback: a (v_pad, C) product in the compute dtype, then an fp32 add (fp32
        # logits and addmm.dtype_out write into the accumulator directly: no temporary)
        temps.append((v_pad, C))
    if temps:
        work.append((max(temps, key=lambda s: s[0] * s[1]), compute_dtype))
    return work


@register_autocast_args("linear_cross_entropy")
def _autocast_args(args: dict, dtype: torch.dtype) -> dict:
    # linear_cross_entropy computes in the autocast dtype under autocast
    return dict(args, compute_dtype=dtype)


# --------------------------------------------------------------------------------------------
# Custom op
# --------------------------------------------------------------------------------------------
def _check_targets(targets: torch.Tensor, n_classes: int, ignore_index: int) -> None:
    """ValueError for the first target outside [0, n_classes) that is not ignore_index (a host read)."""
    bad = ((targets < 0) | (targets >= n_classes)) & (targets != ignore_index)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"linear_cross_entropy: target {int(targets[i])} at position {i} is outside "
                         f"[0, {n_classes}) and is not ignore_index ({ignore_index})")


@torch.library.custom_op("fastgpt::linear_cross_entropy", mutates_args=())
@on_tensor_device
def linear_cross_entropy_op(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                            reduction: str, compute_dtype: torch.dtype, chunk_rows: int, need_dx: bool,
                            need_dw: bool, check_targets: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss fp32 0-d, d loss/dx or empty, d loss/d weight or empty). Targets are checked on the CPU,
    and on CUDA when `check_targets` (a sync)."""
    if not can_launch(x, weight, targets):
        raise RuntimeError(f"linear_cross_entropy cannot launch its Triton kernel: {why_not(x, weight, targets)}")
    if check_targets or targets.device.type == "cpu":
        _check_targets(targets, weight.shape[0], ignore_index)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _forward(x, weight, targets, ignore_index, reduction, compute_dtype, chunk_rows, need_dx, need_dw)


@linear_cross_entropy_op.register_fake
def _(x, weight, targets, ignore_index, reduction, compute_dtype, chunk_rows, need_dx, need_dw, check_targets=False):
    loss = x.new_empty((), dtype=torch.float32)
    dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else x.new_empty(0)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_dw else weight.new_empty(0)
    return loss, dx, dw


def _setup_context(ctx, inputs, output):
    _, dx, dw = output
    ctx.save_for_backward(dx, dw)
    ctx.mark_non_differentiable(dx, dw)
    ctx.need = (inputs[7], inputs[8])


def _backward(ctx, grad_loss, _grad_dx, _grad_dw):
    dx, dw = ctx.saved_tensors
    need_dx, need_dw = ctx.need
    # Scaled in fp32, then cast: GradScaler's grad_loss (65536 at first) is not representable in fp16.
    gx = (dx.float() * grad_loss).to(dx.dtype) if need_dx else None
    gw = (dw.float() * grad_loss).to(dw.dtype) if need_dw else None
    return gx, gw, None, None, None, None, None, None, None, None


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# Public function and reference
# --------------------------------------------------------------------------------------------
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                         reduction: str = "mean", chunk_rows: int | None = None,
                         check_targets: bool = False) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets) for x (N, C), weight (V, C), targets (N,); fp32 loss.

    `chunk_rows` overrides the automatic chunk size (rows of x per logits chunk). Targets outside
    [0, V) other than ignore_index raise a ValueError on CPU tensors always, on CUDA only with
    `check_targets=True` (one device -> host sync) or TRITON_DEBUG=1 (a device assert); see the module doc.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x (N, C) and weight (V, C), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if targets.shape != (x.shape[0],) or targets.dtype.is_floating_point:
        raise ValueError(f"expected integer targets of shape ({x.shape[0]},), got {targets.dtype} {tuple(targets.shape)}")
    check_dtypes("linear_cross_entropy", x=x, weight=weight)
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        compute_dtype = torch.get_autocast_dtype(dev)
    else:
        compute_dtype = torch.promote_types(x.dtype, weight.dtype)
    grad = torch.is_grad_enabled()
    need_dx = grad and x.requires_grad
    need_dw = grad and weight.requires_grad
    loss, _, _ = linear_cross_entropy_op(x, weight, targets, int(ignore_index), reduction, compute_dtype,
                                         int(chunk_rows or 0), need_dx, need_dw, bool(check_targets))
    return loss


def linear_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -1, reduction: str = "mean") -> torch.Tensor:
    """The unfused PyTorch computation: full logits, then cross-entropy in fp32."""
    return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index, reduction=reduction)


# --------------------------------------------------------------------------------------------
# Compile report builds
# --------------------------------------------------------------------------------------------
@register_builds
def _builds() -> list[Build]:
    out = []
    for dt in ("bf16", "fp32", "fp16"):
        sig = signature(_ce_loss_grad_kernel, {"logits_ptr": f"*{dt}", "targets_ptr": "*i64", "loss_ptr": "*fp32",
                                               "scale_ptr": "*fp32"}, default="i32")
        # what runtime specialisation gives at GPT-2's vocab: aligned pointers, row stride
        # V_pad = 50304 divisible by 16; n_cols = 50257 carries no hint
        attrs = {(i,): [["tt.divisibility", 16]] for i in range(5)}
        for write_grad in (True, False):  # False: loss only (no_grad / eval)
            out.append(Build(kernel="cross_entropy", fn=_ce_loss_grad_kernel, signature=dict(sig),
                             constexprs={"WRITE_GRAD": write_grad, "BLOCK_V": BLOCK_V, "ROUND_BF16": False},
                             num_warps=NUM_WARPS, num_stages=3,
                             config=f"{dt} {'loss+grad' if write_grad else 'loss only'} V=50257 "
                                    f"(row stride 50304) BLOCK_V={BLOCK_V} w{NUM_WARPS}",
                             attrs=dict(attrs)))
    return out
