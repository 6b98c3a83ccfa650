"""Making fake CPU tensors behave as on CUDA: bf16 autocast policy, flash SDPA, fastgpt's custom ops and
their workspace (see bench/memory/__init__.py, points 1-3)."""
from __future__ import annotations

import contextlib
from collections import Counter

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .common import BF16


# ------------------------------------------------------------------------------------------------
# 1. CUDA's bf16 autocast policy, applied on CPU (fake) tensors.
# ------------------------------------------------------------------------------------------------
_LOWER = {  # CUDA autocast runs these in bf16 (casting every floating input)
    F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm, torch.Tensor.mm,
    torch.bmm, torch.Tensor.bmm, torch.addmm, torch.Tensor.addmm, torch.baddbmm, torch.Tensor.baddbmm,
    F.scaled_dot_product_attention,
}
_FP32 = {  # ... and these in fp32 (casting 16-bit inputs up)
    F.layer_norm, torch.layer_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax,
    torch.log_softmax, torch.Tensor.log_softmax, F.cross_entropy, F.nll_loss,
}


class CudaAutocast(TorchFunctionMode):
    """bf16 autocast with CUDA's op lists and weight-cast cache, for tensors on any device."""

    def __init__(self, route_sdpa: bool = True):
        super().__init__()
        self.cache: dict[int, torch.Tensor] = {}
        self.route_sdpa = route_sdpa
        self.sdpa_masks: list[str] = []

    def _cast(self, x, dtype, from_dtypes):
        if isinstance(x, (list, tuple)):
            return type(x)(self._cast(y, dtype, from_dtypes) for y in x)
        if not isinstance(x, torch.Tensor) or x.dtype not in from_dtypes:
            return x
        if x.is_leaf and x.requires_grad:  # autocast caches casts of parameters for the region
            got = self.cache.get(id(x))
            if got is None:
                got = self.cache[id(x)] = x.to(dtype)
            return got
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOWER:
            args = self._cast(args, BF16, (torch.float32, torch.float16))
            kwargs = {k: self._cast(v, BF16, (torch.float32, torch.float16)) for k, v in kwargs.items()}
            if func is F.scaled_dot_product_attention and self.route_sdpa:
                return _sdpa_as_on_cuda(self, *args, **kwargs)
        elif func in _FP32:
            args = self._cast(args, torch.float32, (BF16, torch.float16))
        return func(*args, **kwargs)

    def __exit__(self, *exc):
        self.cache.clear()
        return super().__exit__(*exc)


# ------------------------------------------------------------------------------------------------
# 2. SDPA (nanogpt, HF sdpa) that saves what CUDA's flash backend saves.
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("fgbench::flash_attention", mutates_args=())
def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    bthd_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, T, D) q, k, v -> (output, fp32 logsumexp (B, H, T)). Real math for real tensors."""
    scale = q.shape[-1] ** -0.5
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    T, S = s.shape[-2:]
    s = s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = (torch.exp(s - lse[..., None]) @ v.float()).to(q.dtype)
    if bthd_out:
        o = o.transpose(1, 2).contiguous().transpose(1, 2)
    return o, lse


@flash_attention.register_fake
def _(q, k, v, bthd_out):
    B, H, T, D = q.shape
    if bthd_out:  # flash allocates (B, T, H, D) and hands back a transposed view
        o = q.new_empty(B, T, H, D).transpose(1, 2)
    else:
        o = q.new_empty(B, H, T, D)
    return o, q.new_empty(B, H, T, dtype=torch.float32)


@torch.library.custom_op("fgbench::flash_attention_bwd", mutates_args=())
def flash_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Analytic flash backward (autograd does not record inside a custom op's implementation).
    scale = q.shape[-1] ** -0.5
    qf, kf, vf, of, dof = (t.float() for t in (q, k, v, o, do))
    s = (qf @ kf.transpose(-1, -2)) * scale
    T, S = s.shape[-2:]
    s = s.masked_fill(torch.ones(T, S, dtype=torch.bool, device=q.device).triu(S - T + 1), float("-inf"))
    p = torch.exp(s - lse[..., None])
    dv = p.transpose(-1, -2) @ dof
    dp = dof @ vf.transpose(-1, -2)
    ds = p * (dp - (dof * of).sum(-1, keepdim=True)) * scale
    dq, dk = ds @ kf, ds.transpose(-1, -2) @ qf
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


@flash_attention_bwd.register_fake
def _(do, q, k, v, o, lse):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fa_setup(ctx, inputs, output):
    q, k, v, _ = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)


def _fa_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse)
    return dq, dk, dv, None


flash_attention.register_autograd(_fa_backward, setup_context=_fa_setup)


def _sdpa_as_on_cuda(mode, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    if attn_mask is not None:
        # CUDA would pick the memory-efficient backend: it also saves out + lse, plus the mask.
        mode.sdpa_masks.append(f"mask {tuple(attn_mask.shape)} {attn_mask.dtype}")
    o, _ = flash_attention(q, k, v, True)
    return o


# ------------------------------------------------------------------------------------------------
# 3. fastgpt: its real custom ops (fake implementations + registered autograd), plus their workspace.
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def fastgpt_kernels_as_on_cuda():
    """Make `fastgpt.ops` pick the Triton kernels for the fake CPU tensors, as it does for CUDA ones.

    `ops.use_triton` asks `kernels.can_launch`, which accepts CUDA tensors (or CPU ones under the
    interpreter). The memory run's fake tensors are CPU only because this torch build cannot record
    autograd on fake CUDA tensors; they stand for CUDA tensors, so the answer CUDA would get is forced.
    Nothing launches: under FakeTensorMode every fastgpt:: custom op runs its fake implementation.
    """
    from fastgpt import ops

    if ops._kernels() is None:
        raise RuntimeError(f"the fastgpt systems need the kernels package (triton): {ops._kernels_error!r}")
    old = ops.use_triton
    ops.use_triton = lambda mode, *tensors: old(mode) if mode == "torch" else True
    try:
        yield
    finally:
        ops.use_triton = old


class FastgptOps(TorchDispatchMode):
    """Counts fastgpt:: custom-op calls and holds, around each, the workspace its real implementation
    allocates inside and frees before returning (a fake implementation allocates only the outputs).

    Entered inside MemTracker, so the workspace tensors (fake, allocated below this mode) are tracked.
    """

    def __init__(self, compute_dtype: torch.dtype = BF16, ce_chunk_rows: int = 0):
        super().__init__()
        self.compute_dtype = compute_dtype
        self.ce_chunk_rows = ce_chunk_rows
        self.calls: Counter = Counter()
        self.workspace: dict[str, int] = {}  # op -> largest workspace bytes held around one call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) != "fastgpt":
            return func(*args, **kwargs)
        from kernels import _launch

        name = func.name().split("::", 1)[1]
        self.calls[name] += 1
        schema = func._schema.arguments
        bound = {a.name: a.default_value for a in schema if a.has_default_value()}
        bound.update(zip((a.name for a in schema), args), **kwargs)
        # what the public function passes under CUDA autocast (CudaAutocast cannot set torch's autocast
        # state for CPU tensors), and the memory run's chunk size for any op that takes one
        bound = _launch.autocast_args(name, bound, self.compute_dtype)
        if self.ce_chunk_rows and "chunk_rows" in bound:
            bound["chunk_rows"] = self.ce_chunk_rows
        work = [torch.empty(shape, dtype=dtype) for shape, dtype in _launch.workspace(name, bound)]
        nbytes = sum(t.untyped_storage().nbytes() for t in work)
        self.workspace[name] = max(self.workspace.get(name, 0), nbytes)
        out = func(*(bound[a.name] for a in schema))
        del work  # freed after the outputs exist: the op's peak is outputs + workspace
        return out


def _with_recompute_autocast(patch):
    """`patch` plus: activation checkpointing recomputes each block under CudaAutocast.

    torch.utils.checkpoint recomputes a block in the backward under the autocast state its forward had. CudaAutocast
    is a TorchFunctionMode, which the autograd engine does not carry into the backward, so the recompute would
    run in fp32 and differ from the forward: fastgpt.model's checkpoint gets it as the recompute context.
    """
    import functools

    import fastgpt.model as fm

    @contextlib.contextmanager
    def both():
        old = fm.checkpoint
        fm.checkpoint = functools.partial(torch.utils.checkpoint.checkpoint,
                                          context_fn=lambda: (contextlib.nullcontext(), CudaAutocast()))
        try:
            with patch():
                yield
        finally:
            fm.checkpoint = old

    return both
