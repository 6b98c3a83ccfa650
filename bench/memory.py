"""Peak memory of one bf16 training step, as it would be on a CUDA GPU, computed without one.

    python -m bench.memory --model gpt2 --batch 16 --seq 1024 [--system all] [--json PATH]
    python -m bench.memory --model gpt2 --batch 16 --seq 1024 --measure   # on a GPU: also measure it

How: each system's model, inputs and AdamW are built inside `FakeTensorMode` (tensors carry shape,
dtype and strides but no storage, so gpt2-xl costs nothing). One warm-up step creates the optimizer
state; the second step (zero_grad(set_to_none) -> forward under bf16 autocast -> backward -> AdamW
step) runs under `torch.distributed._tools.mem_tracker.MemTracker`, which follows every storage's life
and reports the peak by category (parameters, gradients, optimizer state, activations, temporaries).
Saved-tensor hooks record, per layer and per sub-module, what autograd keeps for the backward
(unique storages), which gives the per-layer table and the comparison with Korthikanti et al.

The CPU-only torch build cannot run autograd on fake *CUDA* tensors, so the fake tensors are CPU
tensors, and what differs between CPU and CUDA is made to behave as on CUDA:
1. autocast: CPU autocast has a different op policy (on CUDA layer_norm, softmax, log_softmax and the
   losses run in fp32; on CPU they do not). `CudaAutocast` (a TorchFunctionMode) applies the CUDA
   bf16 policy to the functions these models call, including autocast's cache of weight casts.
2. SDPA (nanogpt, hf-sdpa): on CUDA, SDPA with is_causal picks the flash backend, which saves q, k, v,
   the output (allocated (B, T, H, D) and returned transposed) and a fp32 logsumexp (B, H, T), never
   (T, T). SDPA calls are routed to `fgbench::flash_attention`, a custom op whose autograd saves exactly
   that. HF's eager attention is left alone: it really materialises the (T, T) scores and probabilities.
3. fastgpt runs its real kernels' custom ops. On CPU tensors `fastgpt.ops.use_triton` says no (no
   CUDA, no interpreter) and the model would take its PyTorch branch; `fastgpt_kernels_as_on_cuda`
   makes it say yes for the memory run, because these fake CPU tensors stand for CUDA tensors, where
   it says yes. The model then calls kernels.layer_norm / gelu / attention / linear_cross_entropy and
   the optimizer is kernels.FusedAdamW, i.e. the custom ops fastgpt::layer_norm_fwd, gelu_fwd,
   attention_fwd, linear_cross_entropy, adamw_step (and the backward ops). Under FakeTensorMode a
   custom op runs its registered fake implementation (output shapes, dtypes and strides; nothing
   launches), and autograd saves what each op's registered setup_context saves: what the kernels
   keep for the backward on CUDA. `FastgptOps` (a TorchDispatchMode) counts these calls and, because
   a fake implementation allocates only the outputs, holds around each call the workspace the real
   op allocates inside and frees before returning, as each kernel file registers it
   (`kernels._launch.register_workspace`: for the fused loss the vocabulary-padded weight copy and one
   chunk's logits; for attention's backward its fp32 delta (B, H, T)). It also passes each op the
   arguments its public function derives from CUDA autocast (`register_autocast_args`: the fused
   loss's compute dtype, LayerNorm's output dtype), which CudaAutocast cannot set for CPU tensors.

Other assumptions (printed with the results): dropout 0 everywhere (HF configs too); HF's loss shifts
labels (T-1 targets per row); no gradient clipping; CUDA's caching allocator rounds every block to 512
bytes (MemTracker does the same); cuBLAS workspaces and the CUDA context are not counted (they add a
few hundred MB to what NVML shows, but not to torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

BF16 = torch.bfloat16
SYSTEMS = ("fastgpt", "fastgpt-logits", "nanogpt", "hf-eager", "hf-sdpa")
SYSTEM_HELP = {
    "fastgpt": "fastgpt, Triton kernels, fused linear cross-entropy (no logits)",
    "fastgpt-logits": "fastgpt, Triton kernels, full logits + cross-entropy (fused loss off)",
    "nanogpt": "bench/nanogpt.py: PyTorch SDPA (flash), fused AdamW",
    "hf-eager": "transformers GPT2LMHeadModel, attn_implementation='eager'",
    "hf-sdpa": "transformers GPT2LMHeadModel, attn_implementation='sdpa' (flash on CUDA)",
}
MODELS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
}
VOCAB = 50257
CE_CHUNK_ROWS = 0  # rows per chunk of fastgpt's fused loss; 0: the kernel's own choice (see --ce-chunk)


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


# ------------------------------------------------------------------------------------------------
# Systems: model + optimizer + one forward returning the loss.
# ------------------------------------------------------------------------------------------------
def _hf(size: dict, seq: int, attn: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=max(seq, 1024), n_embd=size["n_embd"],
                     n_layer=size["n_layer"], n_head=size["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0, use_cache=False)
    cfg._attn_implementation = attn
    model = GPT2LMHeadModel(cfg)
    model.train()
    return model, lambda idx: model(input_ids=idx, labels=idx).loss


def build(system: str, size: dict, seq: int):
    """(model, forward(idx) -> loss, optimizer factory, context manager that makes the step behave as on CUDA)."""
    if system.startswith("fastgpt"):
        from fastgpt.config import GPTConfig
        from fastgpt.model import GPT

        model = GPT(GPTConfig(vocab_size=VOCAB, block_size=max(seq, 1024), kernels="auto", **size))
        fused = system == "fastgpt"
        # _check_input reads token values (int(idx.max())): fake tensors have none, and it allocates nothing.
        model._check_input = lambda idx: None

        def fwd(idx):
            return model(idx, idx, return_logits=not fused)[1]

        def make_opt():  # the training script's optimizer: kernels.FusedAdamW once ops picks Triton
            with fastgpt_kernels_as_on_cuda():
                return model.configure_optimizers(0.1, 1e-4, device_type="cuda")

        return model, fwd, make_opt, fastgpt_kernels_as_on_cuda
    if system == "nanogpt":
        from bench.nanogpt import NanoConfig, NanoGPT

        model = NanoGPT(NanoConfig(vocab_size=VOCAB, block_size=max(seq, 1024), **size))
        return model, (lambda idx: model(idx, idx)[1]), (lambda: make_adamw(model)), contextlib.nullcontext
    if system in ("hf-eager", "hf-sdpa"):
        model, fwd = _hf(size, seq, system[3:])
        return model, fwd, (lambda: make_adamw(model)), contextlib.nullcontext
    raise ValueError(f"unknown system {system!r}; choose from {SYSTEMS}")


def make_adamw(model) -> torch.optim.Optimizer:
    from bench.nanogpt import decay_groups

    groups = decay_groups(model, 0.1)
    try:
        return torch.optim.AdamW(groups, lr=1e-4, fused=True)  # as on CUDA: no foreach temporaries
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=1e-4, foreach=False)


# ------------------------------------------------------------------------------------------------
# Saved-tensor accounting per layer / sub-module.
# ------------------------------------------------------------------------------------------------
class SavedTensors:
    """Unique storages autograd saves during the forward, attributed to the module scope that saved them."""

    def __init__(self, model, autocast: "CudaAutocast"):
        self.autocast = autocast
        self.cast_bytes = 0
        self.scope = "embed"
        self.sub = ""
        self.seen: dict[int, tuple[str, str, int, str, tuple]] = {}  # storage -> scope, sub, bytes, dtype, shape
        self.param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
        self.handles = []
        blocks = _blocks(model)
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._enter(f"h.{i}")))
            self.handles.append(block.register_forward_hook(self._leave("head")))
            for name, child in block.named_children():
                self.handles.append(child.register_forward_pre_hook(self._enter_sub(name)))
                self.handles.append(child.register_forward_hook(self._leave_sub()))

    def _enter(self, name):
        def hook(mod, args):
            self.scope, self.sub = name, ""
        return hook

    def _leave(self, name):
        def hook(mod, args, out):
            self.scope, self.sub = name, ""
        return hook

    def _enter_sub(self, name):
        def hook(mod, args):
            self.sub = name
        return hook

    def _leave_sub(self):
        def hook(mod, args, out):
            self.sub = "residual"
        return hook

    def pack(self, t):
        st = t.untyped_storage()
        key = st._cdata
        if key in self.seen or key in self.param_storages:
            return t
        if any(c.untyped_storage()._cdata == key for c in self.autocast.cache.values()):
            self.seen[key] = ("weight casts", "", st.nbytes(), str(t.dtype).replace("torch.", ""), tuple(t.shape))
        else:
            self.seen[key] = (self.scope, self.sub, st.nbytes(), str(t.dtype).replace("torch.", ""), tuple(t.shape))
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def close(self):
        for h in self.handles:
            h.remove()

    def by_scope(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for scope, sub, nbytes, *_ in self.seen.values():
            out[scope] = out.get(scope, 0) + nbytes
        return out

    def shapes(self, scopes=("h.0", "head")) -> list[tuple]:
        """(scope, sub-module, dtype, shape of the first tensor saved from that storage), for the given scopes."""
        return [(sc, sub, dt, list(shape)) for sc, sub, _, dt, shape in self.seen.values() if sc in scopes]

    def by_sub(self, scope: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for sc, sub, nbytes, dtype, _ in self.seen.values():
            if sc == scope:
                key = f"{sub or 'block'}:{dtype}"
                out[key] = out.get(key, 0) + nbytes
        return out


def _blocks(model):
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        return list(model.transformer.h)
    raise ValueError("model has no transformer.h")


# ------------------------------------------------------------------------------------------------
# One system, one step.
# ------------------------------------------------------------------------------------------------
@dataclass
class Result:
    system: str
    model: str
    batch: int
    seq: int
    peak_bytes: int
    activation_bytes: int  # saved for backward by the end of the forward (layers + embed + head), no weight casts
    params_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    n_params: int
    per_layer_bytes: int  # saved by one transformer block (layer 0)
    head_bytes: int  # saved after the last block: ln_f, lm_head / logits / loss
    embed_bytes: int
    weight_cast_bytes: int  # bf16 copies of weights that autocast makes and autograd keeps for backward
    logits_bytes: int  # peak bytes of (N, V)-sized tensors alive at once
    peak_phase: str = ""  # forward / backward / optimizer step
    peak_breakdown: dict = field(default_factory=dict)  # MemTracker's categories at the peak
    layer_breakdown: dict = field(default_factory=dict)
    assumptions: list = field(default_factory=list)
    fastgpt_ops: dict = field(default_factory=dict)  # fastgpt:: custom op -> calls in the measured step
    saved_shapes: list = field(default_factory=list)  # (scope, sub-module, dtype, shape) of every saved storage


def _global_peak(tracker_cls):
    """A subclass of one of torch's memory trackers that keeps only the global peak, with the phase it happened
    in (their per-module peaks cost O(modules) per op: minutes at gpt2-xl)."""

    class GlobalPeak(tracker_cls):
        phase = "setup"
        peak_phase = "setup"

        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)
                    self.peak_phase = self.phase

        def peak_by_category(self) -> dict:
            """The first device's memory at the peak, bytes by category name ("Total" included)."""
            peak = self.get_tracker_snapshot("peak")
            return {getattr(k, "value", str(k)): int(v) for k, v in peak[next(iter(peak))].items()}

    return GlobalPeak


def _tracker():
    from torch.distributed._tools.mem_tracker import MemTracker

    return _global_peak(MemTracker)()


def _step(fwd, idx, opt, patch, ac: CudaAutocast, kops: FastgptOps, mt=None,
          saved: SavedTensors | None = None) -> None:
    """One optimizer step of a measured system: zero_grad, forward under `ac` (and `saved`'s hooks), backward,
    AdamW step, all inside `patch()` and `kops`; `mt.phase` names the phase a tracker's peak falls in. kops is
    entered inside the tracker (mt), so the op workspace it allocates is tracked."""
    with patch(), kops:
        opt.zero_grad(set_to_none=True)
        if mt is not None:
            mt.phase = "forward"
        with saved.hooks() if saved else contextlib.nullcontext():
            with ac:
                loss = fwd(idx)
        if mt is not None:
            mt.phase = "backward"
        loss.backward()
        if mt is not None:
            mt.phase = "optimizer step"
        opt.step()


def run_one(system: str, model_name: str, batch: int, seq: int, activation_checkpointing: bool = False) -> Result:
    from torch._subclasses.fake_tensor import FakeTensorMode

    size = MODELS[model_name]
    with FakeTensorMode(allow_non_fake_inputs=False):
        torch.manual_seed(0)
        model, fwd, make_opt, patch = build(system, size, seq)
        if activation_checkpointing:  # fastgpt only: train.py --activation_checkpointing
            model.activation_checkpointing = True
            patch = _with_recompute_autocast(patch)
        opt = make_opt()
        idx = torch.randint(0, VOCAB, (batch, seq))

        # optimizer state now exists, as in every step after the first
        _step(fwd, idx, opt, patch, CudaAutocast(), FastgptOps(ce_chunk_rows=CE_CHUNK_ROWS))
        ac = CudaAutocast()
        saved = SavedTensors(model, ac)
        kops = FastgptOps(ce_chunk_rows=CE_CHUNK_ROWS)
        mt = _tracker()
        mt.track_external(model, opt)
        with mt:
            _step(fwd, idx, opt, patch, ac, kops, mt, saved)
        saved.close()
        peak = mt.peak_by_category()
        peak_phase = mt.peak_phase

        n_params = sum(p.numel() for p in model.parameters())
        params_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        grads_bytes = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
        opt_bytes = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                        if isinstance(t, torch.Tensor) and t.dim() > 0)
        scopes = saved.by_scope()
        cast_bytes = scopes.pop("weight casts", 0)
        assumptions = list(ASSUMPTIONS_COMMON)
        assumptions.append(f"{system}: " + SYSTEM_HELP[system])
        if ac.sdpa_masks:
            assumptions.append(f"{system}: SDPA got an explicit mask ({ac.sdpa_masks[0]}); CUDA would use the "
                               "memory-efficient backend, modelled like flash")
        assumptions.append(f"{system}: optimizer {type(opt).__module__}.{type(opt).__name__}")
        if system.startswith("fastgpt"):
            assumptions.append(
                f"{system}: fastgpt's real custom ops under FakeTensorMode (fake implementations, registered "
                "autograd decides what is saved); fastgpt.ops forced to the Triton path because the fake CPU "
                "tensors stand for CUDA ones; op calls in the measured step: "
                + ", ".join(f"{k} x{v}" for k, v in sorted(kops.calls.items())))
            work = ", ".join(f"{op} {fmt_bytes(n)}" for op, n in sorted(kops.workspace.items()) if n)
            assumptions.append(f"{system}: workspace held around each op, as its kernel file registers it "
                               f"(kernels._launch.register_workspace): {work or 'none'}")
        # (N, V) tensors: the logits in every dtype; their size tells the logits' share of the peak.
        N = batch * seq
        logits_bytes = sum(nb for sc, sub, nb, dt, shape in saved.seen.values()
                           if sc == "head" and shape[-1:] == (VOCAB,) and nb >= N * VOCAB)
    return Result(system=system, model=model_name, batch=batch, seq=seq,
                  peak_bytes=peak.get("Total", sum(peak.values())),
                  activation_bytes=sum(scopes.values()), params_bytes=params_bytes, grads_bytes=grads_bytes,
                  optimizer_bytes=opt_bytes, n_params=n_params, per_layer_bytes=scopes.get("h.0", 0),
                  head_bytes=scopes.get("head", 0), embed_bytes=scopes.get("embed", 0),
                  weight_cast_bytes=cast_bytes, logits_bytes=logits_bytes, peak_phase=peak_phase,
                  peak_breakdown=peak, layer_breakdown=saved.by_sub("h.0"), assumptions=assumptions,
                  fastgpt_ops=dict(sorted(kops.calls.items())), saved_shapes=saved.shapes())


ASSUMPTIONS_COMMON = [
    "bf16 autocast with CUDA's op policy (layer_norm/softmax/losses in fp32, matmuls in bf16, weight casts cached)",
    "fp32 parameters, fp32 gradients (set_to_none between steps), AdamW with two fp32 moments per parameter",
    "SDPA(is_causal) = flash backend: saves q, k, v, output and fp32 logsumexp (B, H, T); no (T, T)",
    "dropout 0, vocabulary 50257 for every system, no gradient clipping, allocations rounded to 512 B",
    "not counted: CUDA context, cuBLAS workspace, allocator fragmentation (NVML shows these on top)",
]


# ------------------------------------------------------------------------------------------------
# Arithmetic checks.
# ------------------------------------------------------------------------------------------------
def gpt2_params(n_layer: int, n_embd: int, vocab: int = VOCAB, block: int = 1024) -> int:
    """Parameters of GPT-2 with tied embeddings and biases everywhere."""
    C = n_embd
    per_layer = 2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    return vocab * C + block * C + n_layer * per_layer + 2 * C


def korthikanti(batch: int, seq: int, n_embd: int, n_head: int) -> dict[str, int]:
    """Per-layer activation bytes of Korthikanti et al. (2022), 16-bit activations, with dropout."""
    s, b, h, a = seq, batch, n_embd, n_head
    return {
        "eager, dropout (34sbh + 5as^2b)": 34 * s * b * h + 5 * a * s * s * b,
        "eager, no dropout (32sbh + 2as^2b)": 32 * s * b * h + 2 * a * s * s * b,
        "flash, no dropout (32sbh)": 32 * s * b * h,
    }


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"


def render(results: list[Result]) -> str:
    lines = []
    if not results:
        return ""
    r0 = results[0]
    size = MODELS[r0.model]
    lines.append(f"## Memory model: {r0.model}, batch {r0.batch}, seq {r0.seq}, bf16 autocast, AdamW\n")
    lines.append("| system | peak | params | grads | AdamW | activations (saved) | per layer | head (ln_f, logits, loss) "
                 "| bf16 weight casts | peak in | peak vs hf-sdpa |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    ref = next((r.peak_bytes for r in results if r.system == "hf-sdpa"), None)
    for r in results:
        rel = f"{r.peak_bytes / ref:.2f}x" if ref else "-"
        lines.append(f"| {r.system} | {fmt_bytes(r.peak_bytes)} | {fmt_bytes(r.params_bytes)} | {fmt_bytes(r.grads_bytes)} "
                     f"| {fmt_bytes(r.optimizer_bytes)} | {fmt_bytes(r.activation_bytes)} | {fmt_bytes(r.per_layer_bytes)} "
                     f"| {fmt_bytes(r.head_bytes)} | {fmt_bytes(r.weight_cast_bytes)} | {r.peak_phase} | {rel} |")
    lines.append("")
    # Arithmetic: parameters, gradients, AdamW.
    n = gpt2_params(size["n_layer"], size["n_embd"])
    lines.append(f"Arithmetic check: {r0.model} has {n:,} parameters (tied wte/lm_head) -> params {4 * n:,} B, "
                 f"grads {4 * n:,} B, AdamW {8 * n:,} B.")
    for r in results:
        ok = r.n_params == n and r.params_bytes == 4 * n and r.grads_bytes == 4 * n and r.optimizer_bytes == 8 * n
        lines.append(f"- {r.system}: {r.n_params:,} params, {r.params_bytes:,} / {r.grads_bytes:,} / "
                     f"{r.optimizer_bytes:,} B -> {'exact' if ok else 'MISMATCH'}")
    lines.append("")
    k = korthikanti(r0.batch, r0.seq, size["n_embd"], size["n_head"])
    lines.append("Per-layer activations vs Korthikanti et al. (16-bit activations; s=seq, b=batch, h=width, a=heads):")
    for name, v in k.items():
        lines.append(f"- {name}: {fmt_bytes(v)}")
    sbh = r0.seq * r0.batch * size["n_embd"]
    as2b = size["n_head"] * r0.seq * r0.seq * r0.batch
    flash_like = {r.system: r.per_layer_bytes for r in results if r.system != "hf-eager"}
    for r in results:
        line = f"- measured {r.system}: {fmt_bytes(r.per_layer_bytes)} = {r.per_layer_bytes / sbh:.2f} sbh"
        if r.system == "hf-eager" and "hf-sdpa" in flash_like:
            extra = r.per_layer_bytes - flash_like["hf-sdpa"]
            line += (f"; minus hf-sdpa's layer = {extra / as2b:.2f} as^2b (the (T, T) scores/probabilities; "
                     f"the paper has 5 with dropout, 2 without)")
        lines.append(line)
    lines.append("  Expected with flash attention and bf16 autocast (no dropout): 36 sbh = ln_1 and ln_2 inputs in "
                 "fp32 (2 x 4 sbh) + bf16 LN outputs for c_attn and c_fc (2 x 2 sbh) + qkv (6 sbh) + attention output "
                 "(2 sbh) + gelu input (8 sbh) + gelu output (8 sbh), plus fp32 row statistics (LN mean/rstd, attention "
                 "logsumexp); flash and fastgpt's attention kernel allocate their output (B, T, H, D), so merging "
                 "heads is a view, not a copy; HF's python gelu_new keeps 3 more (B, T, 4h) intermediates (+24 sbh).")
    lines.append("  Mixed precision differs from the paper's all-16-bit count: under CUDA autocast layer_norm runs in "
                 "fp32, so each LN saves its fp32 input (+4sbh over the paper for two LNs); eager softmax saves "
                 "fp32 probabilities plus their bf16 copy (6as^2b, not 5as^2b with dropout).")
    lines.append("")
    N = r0.batch * r0.seq
    lines.append(f"Logits: one (N, V) = ({N:,}, {VOCAB:,}) tensor is {fmt_bytes(N * VOCAB * 4)} in fp32, "
                 f"{fmt_bytes(N * VOCAB * 2)} in bf16. Saved for backward (N x V tensors): " + ", ".join(
                     f"{r.system} {fmt_bytes(r.logits_bytes)}" for r in results)
                 + ". Without the fused loss the backward also holds fp32 gradients of the logits (the Temp "
                 "category at the peak below).")
    lines.append("")
    lines.append("Where one layer's saved bytes go (layer 0, sub-module:dtype):")
    for r in results:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(r.layer_breakdown.items(), key=lambda kv: -kv[1]))
        lines.append(f"- {r.system}: {parts}")
    lines.append("")
    lines.append("Peak by category (MemTracker at the peak):")
    for r in results:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in r.peak_breakdown.items() if k != "Total" and v)
        lines.append(f"- {r.system} (peak in the {r.peak_phase}): {parts}")
    lines.append("")
    lines.append("Assumptions:")
    seen = []
    for r in results:
        for a in r.assumptions:
            if a not in seen:
                seen.append(a)
                lines.append(f"- {a}")
    return "\n".join(lines)


def measure_cuda(system: str, model_name: str, batch: int, seq: int) -> int:
    """On a GPU: the real torch.cuda.max_memory_allocated of the third training step."""
    size = MODELS[model_name]
    dev = "cuda"
    torch.cuda.empty_cache()
    if system.startswith("fastgpt"):
        from fastgpt.config import GPTConfig
        from fastgpt.model import GPT

        model = GPT(GPTConfig(vocab_size=VOCAB, **size)).to(dev)
        fused = system == "fastgpt"
        fwd = lambda idx: model(idx, idx, return_logits=not fused)[1]  # noqa: E731
        opt = model.configure_optimizers(0.1, 1e-4, device_type="cuda")
    else:
        if system == "nanogpt":
            from bench.nanogpt import NanoConfig, NanoGPT

            model = NanoGPT(NanoConfig(vocab_size=VOCAB, **size)).to(dev)
            fwd = lambda idx: model(idx, idx)[1]  # noqa: E731
        else:
            model, fwd = _hf(size, seq, system[3:])
            model.to(dev)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    idx = torch.randint(0, VOCAB, (batch, seq), device=dev)
    for i in range(3):
        if i == 2:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=BF16):
            loss = fwd(idx)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del model, opt, idx, loss
    torch.cuda.empty_cache()
    return peak


# ------------------------------------------------------------------------------------------------
# 4. Per rank: train.py --shard ddp|zero1|fsdp at a world size, with or without activation checkpointing.
# ------------------------------------------------------------------------------------------------
def _shard_modes() -> tuple[str, ...]:
    """train.py's --shard modes, from fastgpt.parallel.STRATEGIES (one file per mode)."""
    from fastgpt.parallel import STRATEGIES

    return tuple(STRATEGIES)


SHARD_MODES = _shard_modes()
CARDS_GB = (8, 12, 16, 24, 40, 80)
# A card of G GB fits a run whose modelled peak is <= G GiB - this: the CUDA context, cuBLAS and NCCL
# workspaces and allocator fragmentation are not modelled (they are what NVML shows on top).
CARD_MARGIN = 2 * 2**30


@dataclass
class RankResult:
    mode: str
    model: str
    batch: int
    seq: int
    world: int
    activation_checkpointing: bool
    peak_bytes: int  # one rank's peak
    peak_phase: str
    breakdown: dict  # MemTracker's categories at the peak, bytes
    how: str


def _fsdp_tracker(model, opt):
    """FSDPMemTracker keeping only the global peak, with the phase it happened in."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    return _global_peak(FSDPMemTracker)(model, opt)


def run_fsdp(model_name: str, batch: int, seq: int, world: int, activation_checkpointing: bool = False) -> RankResult:
    """One rank of train.py --shard fsdp at `world` ranks: fastgpt.distributed.fully_shard_gpt (FSDP2 per block
    and root, bf16 gathers, fp32 reduce-scatter) on fake tensors, over a fake process group whose collectives
    move nothing, and kernels.FusedAdamW stepping the DTensor shards; FSDPMemTracker follows every storage."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fastgpt.parallel import fully_shard_gpt

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))  # outside FakeTensorMode: the mesh reads real rank ids
        with FakeTensorMode(allow_non_fake_inputs=False):
            torch.manual_seed(0)
            model, fwd, make_opt, patch = build("fastgpt", MODELS[model_name], seq)
            model.activation_checkpointing = activation_checkpointing
            patch = _with_recompute_autocast(patch)
            fully_shard_gpt(model, mesh, BF16)  # as train.py does on CUDA
            opt = make_opt()
            idx = torch.randint(0, VOCAB, (batch, seq))

            # optimizer state now exists, as in every step after the first
            _step(fwd, idx, opt, patch, CudaAutocast(), FastgptOps(ce_chunk_rows=CE_CHUNK_ROWS))
            mt = _fsdp_tracker(model, opt)
            with mt:
                _step(fwd, idx, opt, patch, CudaAutocast(), FastgptOps(ce_chunk_rows=CE_CHUNK_ROWS), mt)
            peak = mt.peak_by_category()
    finally:
        dist.destroy_process_group()
    return RankResult("fsdp", model_name, batch, seq, world, activation_checkpointing, peak["Total"], mt.peak_phase,
                      peak, "an FSDP2 step on fake tensors over a fake process group of that many ranks")


def _zero1_from(ddp: RankResult, world: int) -> RankResult:
    # ZeroRedundancyOptimizer: a rank keeps the AdamW moments of its 1/world of the parameters; they are
    # resident all step long, so the peak drops by exactly the moments it no longer holds.
    opt = ddp.breakdown.get("Optstate", 0)
    dropped = opt * (world - 1) // world
    breakdown = dict(ddp.breakdown, Optstate=opt - dropped, Total=ddp.peak_bytes - dropped)
    return RankResult("zero1", ddp.model, ddp.batch, ddp.seq, world, ddp.activation_checkpointing,
                      ddp.peak_bytes - dropped, ddp.peak_phase, breakdown,
                      "the one-process step less (world-1)/world of the AdamW state (weights, gradients replicated)")


def run_rank(mode: str, model_name: str, batch: int, seq: int, world: int,
             activation_checkpointing: bool = False) -> RankResult:
    """One rank's peak under train.py --shard `mode` at `world` ranks (one process for world 1)."""
    if mode not in SHARD_MODES:
        raise ValueError(f"unknown --shard {mode!r}; choose from {SHARD_MODES}")
    if mode not in ("ddp", "zero1", "fsdp"):
        raise NotImplementedError(f"bench.memory has no per-rank model for --shard {mode} yet (fastgpt/parallel/"
                                  f"{mode}.py): add one to run_rank")
    if mode == "fsdp" and world > 1:
        return run_fsdp(model_name, batch, seq, world, activation_checkpointing)
    r = run_one("fastgpt", model_name, batch, seq, activation_checkpointing)
    ddp = RankResult("ddp", model_name, batch, seq, world, activation_checkpointing, r.peak_bytes, r.peak_phase,
                     dict(r.peak_breakdown), "the one-process step (DDP with gradient_as_bucket_view keeps the "
                     "gradients in its buckets: no second copy)")
    return _zero1_from(ddp, world) if mode == "zero1" and world > 1 else ddp


def _card_holds(g: int, peak: int) -> bool:
    """A card of `g` GB holds a modelled peak of `peak` bytes (with CARD_MARGIN to spare)."""
    return peak <= g * 2**30 - CARD_MARGIN


def _fits(peak: int) -> str:
    return next((f"{g} GB" for g in CARDS_GB if _card_holds(g, peak)), "none listed")


def render_ranks(results: list[RankResult]) -> str:
    r0 = results[0]
    lines = [f"## Per-rank memory model: {r0.model}, micro-batch {r0.batch} x {r0.seq}, bf16 autocast, AdamW\n",
             "| mode | world | activation checkpointing | peak per rank | smallest card | peak in | at the peak |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in r.breakdown.items() if k != "Total" and v > 0)
        lines.append(f"| {r.mode} | {r.world} | {'yes' if r.activation_checkpointing else 'no'} | "
                     f"{fmt_bytes(r.peak_bytes)} | {_fits(r.peak_bytes)} | {r.peak_phase} | {parts} |")
    lines.append("")
    lines.append(f"smallest card: of {', '.join(map(str, CARDS_GB))} GB, the smallest whose capacity (GiB) less "
                 f"{fmt_bytes(CARD_MARGIN)} holds the peak (the CUDA context, cuBLAS/NCCL workspaces and "
                 "fragmentation are not modelled).")
    for how in dict.fromkeys(f"{r.mode}: {r.how}" for r in results):
        lines.append(f"- {how}")
    return "\n".join(lines)


def fit_table(batch: int, seq: int, models=("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"),
              worlds=(2, 4, 8), log=None) -> tuple[str, list[RankResult]]:
    """Which GPT-2 fits which card: per model and mode, the fewest GPUs of each size that hold a rank's peak."""
    rows, results = [], []
    for m in models:
        ddp = {}
        for mode, ac in (("ddp", False), ("ddp", True), ("zero1", False), ("fsdp", False), ("fsdp", True)):
            if mode == "ddp":
                rs = [run_rank("ddp", m, batch, seq, 1, ac)]
                ddp[ac] = rs[0]
            elif mode == "zero1":
                rs = [_zero1_from(ddp[ac], w) for w in worlds]
            else:
                rs = [run_rank(mode, m, batch, seq, w, ac) for w in worlds]
            for r in rs:
                if log:
                    log(f"{m} {mode}{' + AC' if ac else ''} x{r.world}: {fmt_bytes(r.peak_bytes)}")
            results += rs
            cells = []
            for g in CARDS_GB:
                w = next((r.world for r in rs if _card_holds(g, r.peak_bytes)), None)
                cells.append("-" if w is None else ("any" if mode == "ddp" else f"{w}+"))
            peaks = " / ".join(fmt_bytes(r.peak_bytes) for r in rs)
            rows.append(f"| {m} | {mode}{' + AC' if ac else ''} | {peaks} | " + " | ".join(cells) + " |")
    head = [f"| model | --shard | peak per rank at {' / '.join(map(str, worlds))} GPUs (ddp: any number) | "
            + " | ".join(f"{g} GB" for g in CARDS_GB) + " |",
            "|---|---|---|" + "---|" * len(CARDS_GB)]
    return "\n".join(head + rows), results


def main(argv=None) -> int:
    global CE_CHUNK_ROWS
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2", choices=list(MODELS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--system", default="all", help="|".join(SYSTEMS) + "|all, or a comma-separated list")
    p.add_argument("--ce-chunk", type=int, default=CE_CHUNK_ROWS, help="rows per chunk of fastgpt's fused loss")
    p.add_argument("--json", help="write the results as a JSON list here")
    p.add_argument("--measure", action="store_true", help="on a GPU, also measure max_memory_allocated")
    p.add_argument("--shard", choices=SHARD_MODES,
                   help="per rank, as train.py --shard runs fastgpt (with --world; no --system)")
    p.add_argument("--world", default="2", help="ranks for --shard: one number or a comma-separated list [2]")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="with --shard: each row also with train.py --activation_checkpointing")
    p.add_argument("--fit", action="store_true",
                   help="which GPT-2 size fits which card (8-80 GB) at which world size and mode, at --batch x --seq")
    a = p.parse_args(argv)
    CE_CHUNK_ROWS = a.ce_chunk
    if a.shard or a.fit:
        return main_ranks(a, p)
    systems = list(SYSTEMS) if a.system == "all" else a.system.split(",")
    results = []
    for s in systems:
        r = run_one(s, a.model, a.batch, a.seq)
        results.append(r)
        print(f"{s}: peak {fmt_bytes(r.peak_bytes)}", file=sys.stderr, flush=True)
    print(render(results))
    rows = [asdict(r) for r in results]
    if a.measure:
        if not torch.cuda.is_available():
            print("--measure needs a CUDA GPU; skipped", file=sys.stderr)
        else:
            print("\nMeasured on " + torch.cuda.get_device_name() + " (torch.cuda.max_memory_allocated):")
            for row in rows:
                try:
                    row["measured_peak_bytes"] = measure_cuda(row["system"], a.model, a.batch, a.seq)
                    print(f"- {row['system']}: model {fmt_bytes(row['peak_bytes'])}, measured "
                          f"{fmt_bytes(row['measured_peak_bytes'])} "
                          f"({row['peak_bytes'] / row['measured_peak_bytes']:.3f}x)")
                except Exception as e:  # e.g. fastgpt kernels missing, OOM: report and go on
                    row["measured_error"] = repr(e)
                    print(f"- {row['system']}: could not measure: {e!r}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def main_ranks(a, p) -> int:
    if a.fit:
        table, results = fit_table(a.batch, a.seq, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(table)
    else:
        try:
            worlds = [int(w) for w in a.world.split(",")]
        except ValueError:
            p.error(f"--world must be a number or a comma-separated list of numbers, got {a.world!r}")
        if any(w < 1 for w in worlds):
            p.error(f"--world must be >= 1, got {a.world!r}")
        results = []
        for w in worlds:
            for ac in (False, True) if a.activation_checkpointing else (False,):
                r = run_rank(a.shard, a.model, a.batch, a.seq, w, ac)
                results.append(r)
                print(f"{r.mode} x{w}{' + AC' if ac else ''}: peak per rank {fmt_bytes(r.peak_bytes)}",
                      file=sys.stderr, flush=True)
        print(render_ranks(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
