"""The memory model: each system built on fake tensors, one step under MemTracker, saved tensors per layer,
the arithmetic checks, and the real measurement on a GPU."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint

from . import common
from .common import BF16, MODELS, SYSTEM_HELP, SYSTEMS, VOCAB, fmt_bytes
from .policy import CudaAutocast, FastgptOps, _with_recompute_autocast, fastgpt_kernels_as_on_cuda


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
        _step(fwd, idx, opt, patch, CudaAutocast(), FastgptOps(ce_chunk_rows=common.CE_CHUNK_ROWS))
        ac = CudaAutocast()
        saved = SavedTensors(model, ac)
        kops = FastgptOps(ce_chunk_rows=common.CE_CHUNK_ROWS)
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
