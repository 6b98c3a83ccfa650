"""Fused AdamW: every tensor of every param group updated in one launch per grad dtype.

Semantics are exactly `torch.optim.AdamW` (decoupled weight decay, bias correction, per-group
lr / betas / eps / weight_decay, LR changes between steps honoured, params without a grad skipped,
a step count per param), computed in fp32:

    p  <- p * (1 - lr * wd)
    m  <- m + (1 - beta1) * (g - m)                   (torch's lerp with weight 1 - beta1)
    v  <- v * beta2 + (1 - beta2) * g * g
    p  <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Algorithm: a pointer table. For every tensor to update, one row of 12 int64 values goes into a
table: the addresses of p, g, m, v, numel, then the per-tensor scalars stored as fp64 bit
patterns (1 - lr*wd, lr / bias_correction1, sqrt(bias_correction2), 1 - beta1, beta2, 1 - beta2,
eps). The bias corrections are computed on the host in fp64 from each param's own step count,
as torch does. A second table maps each program to (tensor index, first element): tensor t gets
ceil(numel_t / BLOCK) programs. The kernel casts the int64 addresses to typed pointers and streams
BLOCK elements of p, g, m, v. The block table depends only on the numels, so it is cached; the
pointer table (grads move between steps, LR changes) is rebuilt each step as one small host
tensor copied to the device in one transfer.

Launches per `step()`: one per (device, grad dtype, aligned?) class present -- normally exactly
one -- whatever the number of tensors. "Aligned" means all four addresses are 16-byte aligned
and numel is a multiple of 16, which lets the compiler use 128-bit loads; the rare tensor that is
not (a view at an odd offset, an odd-sized bias) goes into a second launch compiled without the
alignment hints.

Limits: params, m, v fp32 and contiguous; grads fp32, bf16 or fp16 (made contiguous if needed;
sparse grads are rejected). Unsupported torch options (amsgrad, maximize, foreach, capturable,
differentiable, fused) raise ValueError. The Triton interpreter dereferences int64 addresses of
CPU tensors, so the same pointer-table kernel runs in the interpreter (tests) and on CUDA.

The update is the custom op `fastgpt::adamw_step`, declared as mutating params, exp_avgs and
exp_avg_sqs, with a fake implementation, so it can sit inside traced / compiled code.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._launch import Build, can_launch, count_launch, interpreting, on_tensor_device, register_builds, why_not

BLOCK = 2048  # elements per program: 16 per thread at 4 warps (4 x 128-bit fp32 loads per tensor)
# The interpreter pays ~10 ms per program whatever its size and runs each block as numpy arrays:
# larger blocks there cut a tiny model's step from seconds of per-program overhead to a few programs.
INTERPRET_BLOCK = 1 << 16
NUM_WARPS = 4
_COLS = 12  # int64 columns of the pointer table, see the module docstring
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _f64(row_ptr, col: tl.constexpr):
    # a host fp64 stored as its int64 bit pattern -> fp32
    return tl.load(row_ptr + col).to(tl.float64, bitcast=True).to(tl.float32)


@triton.jit
def _adamw_kernel(table_ptr, blocks_ptr, base_ptr, grad_base_ptr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # base_ptr: any fp32 tensor on the device; grad_base_ptr: any tensor of the grads' dtype. The
    # table holds each tensor's element offset from these bases, so addresses keep the pointer
    # arguments' 16-byte divisibility and the loads vectorise (an int64 -> pointer cast would lose it).
    pid = tl.program_id(0)
    t = tl.load(blocks_ptr + 2 * pid)  # tensor index
    start = tl.load(blocks_ptr + 2 * pid + 1)  # first element of this block, a multiple of BLOCK
    row = table_ptr + t * 12
    p_off = tl.load(row + 0)
    g_off = tl.load(row + 1)
    m_off = tl.load(row + 2)
    v_off = tl.load(row + 3)
    n = tl.load(row + 4)
    if ALIGNED:
        # host checked: 16-byte aligned tensors, numel % 16 == 0 -> 128-bit loads, uniform masks
        p_off = tl.multiple_of(p_off, 16)
        g_off = tl.multiple_of(g_off, 16)
        m_off = tl.multiple_of(m_off, 16)
        v_off = tl.multiple_of(v_off, 16)
        n = tl.multiple_of(n, 16)
    start = tl.multiple_of(start, BLOCK)
    keep = _f64(row, 5)
    step_size = _f64(row, 6)
    bc2_sqrt = _f64(row, 7)
    one_minus_beta1 = _f64(row, 8)
    beta2 = _f64(row, 9)
    one_minus_beta2 = _f64(row, 10)
    eps = _f64(row, 11)

    offs = start + tl.arange(0, BLOCK)  # int64: tensors may exceed 2^31 elements
    mask = offs < n
    p = tl.load(base_ptr + p_off + offs, mask=mask, other=0.0)
    g = tl.load(grad_base_ptr + g_off + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(base_ptr + m_off + offs, mask=mask, other=0.0)
    v = tl.load(base_ptr + v_off + offs, mask=mask, other=0.0)

    p = p * keep
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * (g * g)
    # IEEE sqrt / division as torch uses, not the approximate ones
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p - step_size * tl.div_rn(m, denom)

    tl.store(base_ptr + p_off + offs, p, mask=mask)
    tl.store(base_ptr + m_off + offs, m, mask=mask)
    tl.store(base_ptr + v_off + offs, v, mask=mask)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
_BLOCK_TABLES: OrderedDict = OrderedDict()  # (device, numels) -> (blocks int64 (nb, 2), nb)


def _block_table(numels: tuple[int, ...], device: torch.device, block: int) -> tuple[torch.Tensor, int]:
    key = (str(device), numels, block)
    hit = _BLOCK_TABLES.get(key)
    if hit is not None:
        _BLOCK_TABLES.move_to_end(key)
        return hit
    counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
    nb = int(counts.sum())
    tensor_idx = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    first_block = torch.cumsum(counts, 0) - counts  # first global block of each tensor
    start = (torch.arange(nb, dtype=torch.int64) - first_block[tensor_idx]) * block
    table = torch.stack([tensor_idx, start], dim=1).contiguous().to(device)
    _BLOCK_TABLES[key] = (table, nb)
    while len(_BLOCK_TABLES) > 8:
        _BLOCK_TABLES.popitem(last=False)
    return table, nb


def _offsets(tensors: list[torch.Tensor], base: torch.Tensor) -> list[int]:
    """Element offsets of each tensor's data from `base` (same dtype)."""
    size = base.element_size()
    b = base.data_ptr()
    out = []
    for t in tensors:
        d = t.data_ptr() - b
        if d % size:
            raise ValueError(f"FusedAdamW: a {t.dtype} tensor's address is not {size}-byte aligned")
        out.append(d // size)
    return out


def _aligned(*tensors: torch.Tensor) -> bool:
    # 64-byte aligned addresses (offsets from an aligned base divisible by 16 elements) and
    # numel % 16 == 0: what the kernel's ALIGNED hints promise
    return all(t.data_ptr() % 64 == 0 for t in tensors) and tensors[0].numel() % 16 == 0


def _launch(params, grads, exp_avgs, exp_avg_sqs, scalars, aligned: bool) -> None:
    """One launch over the given tensors (same device, same grad dtype, same alignment class)."""
    device = params[0].device
    base, grad_base = params[0], grads[0]
    cols = [_offsets(params, base), _offsets(grads, grad_base), _offsets(exp_avgs, base),
            _offsets(exp_avg_sqs, base), [p.numel() for p in params]]
    ints = torch.tensor(cols, dtype=torch.int64).T
    floats = torch.tensor(scalars, dtype=torch.float64).view(torch.int64)
    table = torch.cat([ints, floats], dim=1).contiguous().to(device)
    block = INTERPRET_BLOCK if interpreting() else BLOCK
    blocks, nb = _block_table(tuple(p.numel() for p in params), device, block)
    count_launch("adamw")
    _adamw_kernel[(nb,)](table, blocks, base, grad_base, ALIGNED=aligned, BLOCK=block, num_warps=NUM_WARPS)


def _check_tensors(params, grads, exp_avgs, exp_avg_sqs) -> None:
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n):
        raise ValueError("adamw_step: params, grads, exp_avgs, exp_avg_sqs must have equal lengths")
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        for name, t in (("param", p), ("exp_avg", m), ("exp_avg_sq", v)):
            if t.dtype != torch.float32:
                raise ValueError(f"FusedAdamW needs fp32 {name}s, tensor {i} is {t.dtype}")
            if not t.is_contiguous():
                raise ValueError(f"FusedAdamW needs contiguous {name}s, tensor {i} has strides {t.stride()}")
        if g.dtype not in _GRAD_DTYPES:
            raise ValueError(f"FusedAdamW supports fp32/bf16/fp16 grads, tensor {i} is {g.dtype}")
        if g.shape != p.shape or m.shape != p.shape or v.shape != p.shape:
            raise ValueError(f"adamw_step: shape mismatch at tensor {i}: param {tuple(p.shape)}, "
                             f"grad {tuple(g.shape)}, exp_avg {tuple(m.shape)}, exp_avg_sq {tuple(v.shape)}")


def _per_tensor_scalars(lr, wd, beta1, beta2, eps, step) -> list[float]:
    """Host-side fp64 scalars of one tensor, in the table's column order (columns 5..11)."""
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    return [1.0 - lr * wd, lr / bc1, math.sqrt(bc2), 1.0 - beta1, beta2, 1.0 - beta2, eps]


# --------------------------------------------------------------------------------------------
# Custom op
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("fastgpt::adamw_step", mutates_args=("params", "exp_avgs", "exp_avg_sqs"))
@on_tensor_device
def adamw_step(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
               exp_avg_sqs: list[torch.Tensor], lrs: list[float], weight_decays: list[float],
               beta1s: list[float], beta2s: list[float], epss: list[float], steps: list[float]) -> None:
    """One AdamW step over tensor lists; `steps` are the step counts after this step's increment."""
    if not params:
        return
    _check_tensors(params, grads, exp_avgs, exp_avg_sqs)
    if not can_launch(*params, *grads, *exp_avgs, *exp_avg_sqs):
        raise RuntimeError(f"FusedAdamW cannot launch its Triton kernel: "
                           f"{why_not(*params, *grads, *exp_avgs, *exp_avg_sqs)}")
    classes: dict = {}
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        g = g if g.is_contiguous() else g.contiguous()
        key = (p.device, g.dtype, _aligned(p, g, m, v))
        cls = classes.setdefault(key, ([], [], [], [], []))
        cls[0].append(p)
        cls[1].append(g)
        cls[2].append(m)
        cls[3].append(v)
        cls[4].append(_per_tensor_scalars(lrs[i], weight_decays[i], beta1s[i], beta2s[i], epss[i], steps[i]))
    for (_, _, aligned), (ps, gs, ms, vs, sc) in classes.items():
        _launch(ps, gs, ms, vs, sc, aligned)


@adamw_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, lrs, weight_decays, beta1s, beta2s, epss, steps) -> None:
    return None


# --------------------------------------------------------------------------------------------
# Public optimizer
# --------------------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view: the kernel's writes land in it), any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


class FusedAdamW(torch.optim.Optimizer):
    """`torch.optim.AdamW` with the whole update in one Triton launch per step (see module doc).

    State per param uses torch's keys: `step` (0-d fp32 CPU tensor), `exp_avg`, `exp_avg_sq`, so
    state_dicts load into and from `torch.optim.AdamW`.
    """

    _UNSUPPORTED = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused")

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, capturable: bool = False,
                 differentiable: bool = False, fused: bool | None = None):
        given = dict(amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
                     differentiable=differentiable, fused=fused)
        for name in self._UNSUPPORTED:
            if given[name]:
                raise ValueError(f"FusedAdamW does not support {name}={given[name]!r}; "
                                 f"use torch.optim.AdamW for it")
        lr_f = float(lr)
        if lr_f < 0.0:
            raise ValueError(f"invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"invalid eps: {eps}")
        if not (0.0 <= float(betas[0]) < 1.0 and 0.0 <= float(betas[1]) < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @classmethod
    def _check_group(cls, group: dict) -> None:
        # a state_dict saved by torch.optim.AdamW carries these keys; foreach/fused only choose
        # torch's implementation (same math), the others change the math and are refused.
        for name in ("amsgrad", "maximize", "capturable", "differentiable"):
            if group.get(name):
                raise ValueError(f"FusedAdamW does not support {name}={group[name]!r} (param group)")
        if group.get("decoupled_weight_decay", True) is False:
            raise ValueError("FusedAdamW does not support decoupled_weight_decay=False (that is Adam)")

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # torch's fused/capturable AdamW keeps `step` on the param's device; ours lives on the CPU
        for st in self.state.values():
            if "step" in st:
                st["step"] = torch.as_tensor(st["step"], dtype=_scalar_dtype()).detach().to("cpu").clone()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params, grads, ms, vs, step_ts = [], [], [], [], []
        lrs, wds, b1s, b2s, epss = [], [], [], [], []
        for group in self.param_groups:
            self._check_group(group)
            lr = float(group["lr"])
            beta1, beta2 = (float(b) for b in group["betas"])
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("FusedAdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # FSDP2's parameters, gradients and (zeros_like) moments are DTensors: step each rank's shard
                params.append(_local(p))
                grads.append(_local(p.grad))
                ms.append(_local(state["exp_avg"]))
                vs.append(_local(state["exp_avg_sq"]))
                step_ts.append(state["step"])
                lrs.append(lr)
                wds.append(float(group["weight_decay"]))
                b1s.append(beta1)
                b2s.append(beta2)
                epss.append(float(group["eps"]))
        if not params:
            return loss
        torch._foreach_add_(step_ts, 1.0)
        steps = [float(s) for s in step_ts]
        adamw_step(params, grads, ms, vs, lrs, wds, b1s, b2s, epss, steps)
        return loss


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------
def adamw_step_reference(params, grads, exp_avgs, exp_avg_sqs, lrs, weight_decays, beta1s, beta2s,
                         epss, steps) -> None:
    """The same update in plain PyTorch, tensor by tensor (torch.optim.AdamW's single-tensor math)."""
    with torch.no_grad():
        for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
            keep, step_size, bc2_sqrt, omb1, beta2, omb2, eps = _per_tensor_scalars(
                lrs[i], weight_decays[i], beta1s[i], beta2s[i], epss[i], steps[i])
            g = g.float()
            p.mul_(keep)
            m.lerp_(g, omb1)
            v.mul_(beta2).addcmul_(g, g, value=omb2)
            p.addcdiv_(m, (v.sqrt() / bc2_sqrt).add_(eps), value=-step_size)


# --------------------------------------------------------------------------------------------
# Compile report builds
# --------------------------------------------------------------------------------------------
@register_builds
def _builds() -> list[Build]:
    sig = {"table_ptr": "*i64", "blocks_ptr": "*i64", "base_ptr": "*fp32", "grad_base_ptr": "*fp32",
           "ALIGNED": "constexpr", "BLOCK": "constexpr"}
    # every pointer argument is a torch allocation: 16-byte aligned (the launcher only passes
    # aligned bases with ALIGNED=True)
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(4)}
    out = []
    for gdt in ("fp32", "bf16"):
        for aligned in (True, False):
            s = dict(sig, grad_base_ptr=f"*{gdt}")
            out.append(Build(kernel="adamw", fn=_adamw_kernel, signature=s,
                             constexprs={"ALIGNED": aligned, "BLOCK": BLOCK}, num_warps=NUM_WARPS, num_stages=1,
                             config=f"grad {gdt} {'aligned' if aligned else 'unaligned-fallback'} "
                                    f"BLOCK={BLOCK} w{NUM_WARPS}",
                             attrs=dict(attrs)))
    return out
