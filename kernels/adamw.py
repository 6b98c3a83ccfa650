"""Fused AdamW: every tensor of every param group updated in one launch per grad dtype.

Semantics are exactly `torch.optim.AdamW` (decoupled weight decay, bias correction, per-group
lr / betas / eps / weight_decay, LR changes between steps honoured, params without a grad skipped,
a step count per param), computed in fp32:

    p  <- p * (1 - lr * wd)
    m  <- m + (1 - beta1) * (g - m)                   (torch's lerp with weight 1 - beta1)
    v  <- v * beta2 + (1 - beta2) * g * g
    p  <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Algorithm: a pointer table that lives on the device. For every tensor to update, one row of 7 int64
values: the element offsets of p, m, v from one base pointer, numel, the row of its hyperparameters
in a small fp64 table (lr, weight_decay, beta1, beta2, eps; one row per distinct set, i.e. per param
group) and the tensor's step count when the table was built (fp64 bits); the grads' offsets from a
second base pointer sit in their own small array. A third table maps each program to (tensor index,
first element): tensor t gets ceil(numel_t / BLOCK) programs. The kernel reads its tensor's row,
computes the step's scalars in fp64 (step = built step + the launch's `step_delta`; bias corrections
1 - beta^step as exp(step * log(beta))), and streams BLOCK elements of p, g, m, v.

No host -> device copy per step. The tables are built (one copy each) when the set of tensors changes:
other params or optimizer-state addresses (new params, a param without a grad this step), numels,
grad dtypes or alignment, groups, or step counts that no longer advance together (a loaded
state_dict). Otherwise a step reuses them: the steps enter as the kernel's integer `step_delta`
argument, and a changed hyperparameter (the LR schedule) is written into its cell of the device table
with `fill_`, a kernel launch that carries the value as an argument (one small launch per group whose
values changed; no copy, no sync). Grads are autograd's to place: the kernel takes the first grad as
its base pointer, so grads that keep their layout relative to each other (the steady state of the
caching allocator, DDP's bucket views) cost nothing; if they moved apart, their offsets (8 bytes a
tensor) go up in one asynchronous copy from pinned memory, still without a sync. The plans are cached
per set of tensors, 8 at most.

Launches per `step()`: one per (device, grad dtype, aligned?) class present -- normally exactly
one -- whatever the number of tensors. "Aligned" means all four addresses are 16-byte aligned
and numel is a multiple of 16, which lets the compiler use 128-bit loads; the rare tensor that is
not (a view at an odd offset, an odd-sized bias) goes into a second launch compiled without the
alignment hints.

Skipping an update on the device: `found_inf` (a 0-d fp32 device tensor, torch's AMP protocol, so
`torch.amp.GradScaler` and the trainer use it as they use torch's fused AdamW) is read by every program;
where it is nonzero each tensor counts as empty: every load and store is masked off and p, m and v stay
untouched. The step counts live on the host and a skipped step's counts are taken back, as torch's fused
AdamW takes them back on the device, so with or without `GradScaler.unscale_` params, moments and
`state['step']` equal torch's. A flag in host memory is read at once. A device flag is never waited for:
it is copied to pinned memory behind the update, and the counts settle at the next `step()`,
`state_dict()` or `undo_step_count()` (which the trainer calls after its one read per step); until then a
skipped step's `state['step']` reads one high on a GPU. `grad_scale` (set by
`GradScaler.step` when the grads are still scaled) divides the grads before the update; unlike torch's
fused kernel, the unscaled values are not written back into `p.grad`.

Limits: params, m, v fp32 and contiguous; grads fp32, bf16 or fp16 (made contiguous if needed;
sparse grads are rejected). Dtypes follow the one rule of every kernel (kernels._launch.DTYPES: fp32,
bf16 or fp16 storage, fp32 math, anything else -- float64 included -- refused by name with DtypeError,
a TypeError and a ValueError), narrowed to fp32 for what the optimizer owns (params and moments). Unsupported torch options (amsgrad, maximize, foreach, capturable,
differentiable, fused) raise ValueError. The Triton interpreter dereferences int64 addresses of
CPU tensors, so the same pointer-table kernel runs in the interpreter (tests) and on CUDA.

The update is the custom op `fastgpt::adamw_step`, declared as mutating params, exp_avgs and
exp_avg_sqs, with a fake implementation, so it can sit inside traced / compiled code.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import (Build, DtypeError, can_launch, check_dtypes, count_launch, interpreting, on_tensor_device,
                      register_builds, signature, why_not)

BLOCK = 2048  # elements per program: 16 per thread at 4 warps (4 x 128-bit fp32 loads per tensor)
# The interpreter pays a fixed cost per program whatever its size and runs each block as numpy arrays:
# larger blocks there turn a tiny model's thousands of programs into a few.
INTERPRET_BLOCK = 1 << 16
NUM_WARPS = 4


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------
_COLS = 7  # int64 columns of the pointer table: p, (unused), m, v offsets, numel, hyper row, step (fp64 bits)
_HYPER = 5  # fp64 columns of the hyperparameter table: lr, weight_decay, beta1, beta2, eps


@triton.jit(do_not_specialize=["step_delta"])  # one compiled kernel for every step count
def _adamw_kernel(table_ptr, goffs_ptr, blocks_ptr, hyper_ptr, base_ptr, grad_base_ptr, found_inf_ptr, step_delta,
                  ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # base_ptr: any fp32 tensor on the device; grad_base_ptr: any tensor of the grads' dtype. The
    # table holds each tensor's element offset from these bases, so addresses keep the pointer
    # arguments' 16-byte divisibility and the loads vectorise (an int64 -> pointer cast would lose it).
    pid = tl.program_id(0)
    t = tl.load(blocks_ptr + 2 * pid)  # tensor index
    start = tl.load(blocks_ptr + 2 * pid + 1)  # first element of this block, a multiple of BLOCK
    row = table_ptr + t * 7
    p_off = tl.load(row + 0)
    g_off = tl.load(goffs_ptr + t)  # grads may move between steps: their offsets live apart
    m_off = tl.load(row + 2)
    v_off = tl.load(row + 3)
    n = tl.load(row + 4)
    n = n * (tl.load(found_inf_ptr) == 0).to(tl.int64)  # a skipped step: no elements, nothing read or written
    hyper = hyper_ptr + tl.load(row + 5) * 5
    if ALIGNED:
        # host checked: 16-byte aligned tensors, numel % 16 == 0 -> 128-bit loads, uniform masks
        p_off = tl.multiple_of(p_off, 16)
        g_off = tl.multiple_of(g_off, 16)
        m_off = tl.multiple_of(m_off, 16)
        v_off = tl.multiple_of(v_off, 16)
        n = tl.multiple_of(n, 16)
    start = tl.multiple_of(start, BLOCK)

    # This tensor's scalars, in fp64 as torch computes them on the host, then fp32 for the update.
    step = tl.load(row + 6).to(tl.float64, bitcast=True) + step_delta.to(tl.float64)
    lr = tl.load(hyper + 0)
    wd = tl.load(hyper + 1)
    beta1 = tl.load(hyper + 2)
    beta2 = tl.load(hyper + 3)
    eps = tl.load(hyper + 4).to(tl.float32)
    bc1 = 1.0 - tl.exp(step * tl.log(beta1))  # beta1 = 0: log -> -inf, exp -> 0, bc1 = 1
    bc2 = 1.0 - tl.exp(step * tl.log(beta2))
    keep = (1.0 - lr * wd).to(tl.float32)
    step_size = (lr / bc1).to(tl.float32)
    bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
    one_minus_beta1 = (1.0 - beta1).to(tl.float32)
    one_minus_beta2 = (1.0 - beta2).to(tl.float32)
    beta2 = beta2.to(tl.float32)

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


@dataclass
class _Class:
    """One launch: tensors with the same grad dtype and alignment."""

    aligned: bool
    idx: list[int]  # the tensors' positions in the step's lists
    table: torch.Tensor  # (n, 7) int64 on the device
    goffs: torch.Tensor  # (n,) int64 on the device: grad offsets from the first grad
    goffs_host: list[int]  # what `goffs` holds
    blocks: torch.Tensor  # (nb, 2) int64 on the device
    nb: int


@dataclass
class _Plan:
    """The device tables of one set of tensors (see the module docstring), reused while the set holds."""

    classes: list[_Class]
    hyper: torch.Tensor  # (rows, 5) fp64 on the device
    hyper_host: list[tuple[float, ...]]  # what `hyper` holds, to write only the cells that change
    steps: list[float]  # each tensor's step count the tables were built with


_PLANS: OrderedDict = OrderedDict()  # key (device, addresses, numels, dtypes, groups) -> _Plan
_STATS = {"builds": 0, "grad_moves": 0}  # plans built, grad-offset uploads (tests count them)
_MAX_PLANS = 8


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on the device; from pinned memory without a sync on CUDA."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)  # the caching host allocator keeps it until copied


def _build_plan(params, grads, exp_avgs, exp_avg_sqs, classes, rows, hyper_values, steps, block) -> _Plan:
    """Tables for these tensors: one host -> device copy per table, only when the set changes."""
    _STATS["builds"] += 1
    device = params[0].device
    out = []
    for (_, aligned), idx in classes.items():
        ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
        ms, vs = [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]
        cols = [_offsets(ps, ps[0]), [0] * len(ps), _offsets(ms, ps[0]), _offsets(vs, ps[0]),
                [p.numel() for p in ps], [rows[i] for i in idx]]
        ints = torch.tensor(cols, dtype=torch.int64).T  # (n, 6)
        step_bits = torch.tensor([steps[i] for i in idx], dtype=torch.float64).view(torch.int64)[:, None]
        table = torch.cat([ints, step_bits], dim=1).contiguous().to(device)  # (n, 7)
        goffs = _offsets(gs, gs[0])
        blocks, nb = _block_table(tuple(p.numel() for p in ps), device, block)
        out.append(_Class(aligned, idx, table, _to_device(goffs, torch.int64, device), goffs, blocks, nb))
    hyper = torch.tensor(hyper_values, dtype=torch.float64).reshape(-1, _HYPER).to(device)
    return _Plan(out, hyper, list(hyper_values), list(steps))


def _step_delta(plan: _Plan, steps: list[float]) -> int | None:
    """The integer d with steps[i] == plan.steps[i] + d for every tensor, or None (the tables' step
    counts no longer apply: rebuild)."""
    d = steps[0] - plan.steps[0]
    if d != int(d) or not 0 <= d < 2**31 or any(s - s0 != d for s, s0 in zip(steps, plan.steps)):
        return None
    return int(d)


def _run(params, grads, exp_avgs, exp_avg_sqs, lrs, weight_decays, beta1s, beta2s, epss, steps,
         found_inf: torch.Tensor | None = None) -> None:
    """Find (or build) the plan of these tensors, refresh what changed, launch once per class."""
    device = params[0].device
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    # Hyperparameter rows: one per distinct (lr, wd, beta1, beta2, eps), i.e. per param group.
    rows, hyper_values, seen = [], [], {}
    for vals in zip(lrs, weight_decays, beta1s, beta2s, epss):
        if vals not in seen:
            seen[vals] = len(hyper_values)
            hyper_values.append(vals)
        rows.append(seen[vals])
    classes: dict = {}
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        classes.setdefault((g.dtype, _aligned(p, g, m, v)), []).append(i)
    # The key: what the tables encode. Not the hyperparameter values (written below), not where the
    # grads are (autograd may allocate them anew each step: their offsets are refreshed below).
    key = (str(device), tuple(rows), tuple((k, tuple(idx)) for k, idx in classes.items()),
           tuple((p.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel())
                 for p, m, v in zip(params, exp_avgs, exp_avg_sqs)))
    plan = _PLANS.get(key)
    delta = _step_delta(plan, steps) if plan is not None else None
    block = INTERPRET_BLOCK if interpreting() else BLOCK
    if delta is None:
        plan = _PLANS[key] = _build_plan(params, grads, exp_avgs, exp_avg_sqs, classes, rows, hyper_values,
                                         steps, block)
        delta = 0
        while len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
        for r, vals in enumerate(hyper_values):
            if vals != plan.hyper_host[r]:  # e.g. the LR schedule: write the changed cells on the device
                for c, (new, old) in enumerate(zip(vals, plan.hyper_host[r])):
                    if new != old:
                        plan.hyper[r, c].fill_(new)
                plan.hyper_host[r] = vals
        for cls in plan.classes:
            goffs = _offsets([grads[i] for i in cls.idx], grads[cls.idx[0]])
            if goffs != cls.goffs_host:  # grads moved relative to each other: one small async upload
                _STATS["grad_moves"] += 1
                cls.goffs = _to_device(goffs, torch.int64, device)
                cls.goffs_host = goffs
    skip = _no_skip(device) if found_inf is None else found_inf.to(device=device, dtype=torch.float32)
    for cls in plan.classes:
        # Offsets are from the class's first param and grad: those of this call (the key's addresses).
        count_launch("adamw")
        _adamw_kernel[(cls.nb,)](cls.table, cls.goffs, cls.blocks, plan.hyper, params[cls.idx[0]],
                                 grads[cls.idx[0]], skip, delta, ALIGNED=cls.aligned, BLOCK=block,
                                 num_warps=NUM_WARPS)


_NO_SKIP: dict = {}


def _no_skip(device: torch.device) -> torch.Tensor:
    """A zero found_inf flag per device, allocated once."""
    if device not in _NO_SKIP:
        _NO_SKIP[device] = torch.zeros((), dtype=torch.float32, device=device)
    return _NO_SKIP[device]


def _check_tensors(params, grads, exp_avgs, exp_avg_sqs) -> None:
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n):
        raise ValueError("adamw_step: params, grads, exp_avgs, exp_avg_sqs must have equal lengths")
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        _check_one(p, g, f"tensor {i}", m, v)


def _check_one(p: torch.Tensor, g: torch.Tensor, where: str, m=None, v=None) -> None:
    """Raise ValueError naming `where` for what the kernel cannot update."""
    if g.is_sparse:
        raise ValueError(f"FusedAdamW does not support sparse gradients ({where})")
    for name, t in (("param", p), ("exp_avg", m), ("exp_avg_sq", v)):
        if t is None:
            continue
        if t.dtype != torch.float32:
            raise DtypeError(f"FusedAdamW needs fp32 {name}s, {where} is {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"FusedAdamW needs contiguous {name}s, {where} has strides {t.stride()}")
        if t.shape != p.shape:
            raise ValueError(f"FusedAdamW: {name} of shape {tuple(t.shape)} for a param of shape "
                             f"{tuple(p.shape)} ({where})")
    check_dtypes(f"FusedAdamW ({where})", grad=g)
    if g.shape != p.shape:
        raise ValueError(f"FusedAdamW: grad of shape {tuple(g.shape)} for a param of shape {tuple(p.shape)} "
                         f"({where})")


def _per_tensor_scalars(lr, wd, beta1, beta2, eps, step) -> list[float]:
    """Host-side fp64 scalars of one tensor (the reference's; the kernel computes the same on the device)."""
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
               beta1s: list[float], beta2s: list[float], epss: list[float], steps: list[float],
               found_inf: torch.Tensor | None = None) -> None:
    """One AdamW step over tensor lists; `steps` are the step counts after this step's increment. Where
    `found_inf` (0-d, on the params' device) is nonzero the kernel changes nothing."""
    if not params:
        return
    _check_tensors(params, grads, exp_avgs, exp_avg_sqs)
    if not can_launch(*params, *grads, *exp_avgs, *exp_avg_sqs):
        raise RuntimeError(f"FusedAdamW cannot launch its Triton kernel: "
                           f"{why_not(*params, *grads, *exp_avgs, *exp_avg_sqs)}")
    if len({p.device for p in params}) != 1:
        raise ValueError("FusedAdamW: all params of one step must be on one device")
    _run(params, grads, exp_avgs, exp_avg_sqs, lrs, weight_decays, beta1s, beta2s, epss, steps, found_inf)


@adamw_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, lrs, weight_decays, beta1s, beta2s, epss, steps, found_inf=None) -> None:
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
    # torch.amp.GradScaler (and the trainer) hand over `found_inf` / `grad_scale` instead of syncing
    _step_supports_amp_scaling = True

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
        # torch.optim.AdamW's checks, in its order and with its messages
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
                or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, b in enumerate(betas):
            if isinstance(b, torch.Tensor) and b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() else b for b in betas)
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
        # Everything the kernel cannot take is refused before any state is created or stepped.
        todo = []
        for gi, group in enumerate(self.param_groups):
            self._check_group(group)
            hyper = (float(group["lr"]), float(group["weight_decay"]), *(float(b) for b in group["betas"]),
                     float(group["eps"]))
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                state = self.state.get(p, {})
                m, v = state.get("exp_avg"), state.get("exp_avg_sq")
                _check_one(_local(p), _local(p.grad), f"param {pi} of group {gi}",
                           None if m is None else _local(m), None if v is None else _local(v))
                todo.append((p, hyper))
        self._settle()  # the previous step's count, before this step reads it
        if not todo:
            return loss
        params, grads, ms, vs, step_ts, hypers = [], [], [], [], [], []
        for p, hyper in todo:
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
            hypers.append(hyper)
        grad_scale = getattr(self, "grad_scale", None)
        if grad_scale is not None:  # GradScaler.step without unscale_: the grads are still scaled
            grads = torch._foreach_div(grads, grad_scale.to(grads[0].device))
        torch._foreach_add_(step_ts, 1.0)  # CPU tensors: no device work
        steps = [float(s) for s in step_ts]
        lrs, wds, b1s, b2s, epss = (list(col) for col in zip(*hypers))
        found_inf = getattr(self, "found_inf", None)
        adamw_step(params, grads, ms, vs, lrs, wds, b1s, b2s, epss, steps, found_inf)
        # The kernel skipped everything where found_inf is set: so does the count (torch's fused AdamW
        # subtracts found_inf from its device-side counts). A host flag is read now (host memory, no device
        # to wait for); a device flag is copied into pinned memory behind the update and settled later
        # (_settle), so the step never waits for the device.
        if found_inf is not None:
            if found_inf.device.type == "cpu":
                if found_inf.detach().numpy() != 0:
                    torch._foreach_sub_(step_ts, 1.0)
            else:
                flag = torch.empty((), dtype=torch.float32, pin_memory=True)
                flag.copy_(found_inf.detach().float(), non_blocking=True)
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(found_inf.device))
                self._pending = (flag, done, step_ts)
        return loss

    def _settle(self) -> None:
        """Take back the counts of the last step if its device flag said skip. The flag's copy finished long
        ago when this runs (the next step, after the caller's own read of the step's results)."""
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None:
            flag, done, step_ts = pending
            done.synchronize()
            if flag.numpy() != 0:  # pinned host memory, already written
                torch._foreach_sub_(step_ts, 1.0)

    def state_dict(self) -> dict:
        self._settle()
        return super().state_dict()

    def undo_step_count(self) -> None:
        """For a caller that has learnt the last step was skipped (train.py, after its one host read of the
        step): settles the step's count without reading the flag. Optional: `step()`, `state_dict()` and the
        next `step()` take the count of a `found_inf`-skipped step back on their own."""
        pending, self._pending = getattr(self, "_pending", None), None
        if pending is not None:
            torch._foreach_sub_(pending[2], 1.0)


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
    types = {"table_ptr": "*i64", "goffs_ptr": "*i64", "blocks_ptr": "*i64", "hyper_ptr": "*fp64", "base_ptr": "*fp32",
             "found_inf_ptr": "*fp32"}
    # every pointer argument is a torch allocation: 16-byte aligned (the launcher only passes
    # aligned bases with ALIGNED=True)
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(7)}
    out = []
    for gdt in ("fp32", "bf16", "fp16"):  # _GRAD_DTYPES
        for aligned in (True, False):
            s = signature(_adamw_kernel, dict(types, grad_base_ptr=f"*{gdt}"), default="i32")
            out.append(Build(kernel="adamw", fn=_adamw_kernel, signature=s,
                             constexprs={"ALIGNED": aligned, "BLOCK": BLOCK}, num_warps=NUM_WARPS, num_stages=1,
                             config=f"grad {gdt} {'aligned' if aligned else 'unaligned-fallback'} "
                                    f"BLOCK={BLOCK} w{NUM_WARPS}",
                             attrs=dict(attrs)))
    return out
