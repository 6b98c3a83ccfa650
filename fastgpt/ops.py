"""The one dispatch point between fastgpt's model and its kernels.

Rule (see docs/architecture.md): with `kernels="auto"`, CUDA tensors and an importable `kernels` package
run the Triton kernels; CPU tensors run them through the interpreter when TRITON_INTERPRET=1; anything
else runs the PyTorch reference written here. `kernels="triton"` where Triton cannot run raises,
never falls back; `kernels="torch"` always takes the reference.

`fastgpt/model.py` calls only these functions and never imports triton.
"""
from __future__ import annotations

import importlib
import os
from typing import Iterable

import torch
import torch.nn.functional as F

from . import loss
from .config import KERNEL_CHOICES

# What the kernels take (kernels._launch.DTYPES, spelled out here so that dispatch never imports triton).
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_kernels_module = None
_kernels_error: Exception | None = None


def _kernels():
    """The `kernels` package, or None if it cannot be imported (no triton on this platform)."""
    global _kernels_module, _kernels_error
    if _kernels_module is None and _kernels_error is None:
        try:
            _kernels_module = importlib.import_module("kernels")
        except Exception as e:  # ImportError without triton; anything else is reported on demand
            _kernels_error = e
    return _kernels_module


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_can_run(devices: tuple[str, ...]) -> bool:
    """Whether the kernels can run on tensors on `devices` (sorted device strings).

    Only one CUDA device, or the CPU under TRITON_INTERPRET=1, can; only then is `kernels` (and with it
    triton, a large and slow import) imported, so a CPU run never loads it. torch.compile calls
    this while tracing and bakes the answer into the graph, so the lazy import never lands inside a
    compiled region as a graph break.
    """
    if len(devices) != 1:
        return False  # one kernel runs on one device
    dev = devices[0]
    if not (dev.startswith("cuda") or (dev == "cpu" and _interpreting())):
        return False
    return _kernels() is not None


# What torch.compiler.assume_constant_result(fn) does, minus its `import torch._dynamo`: importing dynamo
# pulls in triton, the very import this function exists to avoid on CPU. tests/test_ops_lazy.py proves
# the marker still works (no graph breaks).
_triton_can_run._dynamo_marked_constant = True


def use_triton(mode: str, *tensors: torch.Tensor) -> bool:
    """Decide Triton or PyTorch for one call. Raises where `mode == "triton"` cannot be honoured."""
    if mode == "torch":
        return False
    if mode not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {mode!r}")
    bad = next((t.dtype for t in tensors if t.is_floating_point() and t.dtype not in KERNEL_DTYPES), None)
    if bad is not None:  # the kernels' one dtype rule (kernels._launch.DTYPES): float64 & co. take torch's op
        if mode == "triton":
            raise ValueError(f"kernels='triton' was requested for {bad} tensors; the Triton kernels take float32, "
                             f"bfloat16 or float16. Use kernels='auto' or 'torch'.")
        return False
    if _triton_can_run(tuple(sorted({str(t.device) for t in tensors}))):
        return True
    if mode == "triton":
        k = _kernels()
        if k is None:
            raise RuntimeError(f"kernels='triton' was requested but the kernels package cannot be imported: "
                               f"{_kernels_error!r}")
        raise RuntimeError(f"kernels='triton' was requested but Triton cannot run here: {k.why_not(*tensors)}. "
                           f"Use kernels='auto' or 'torch'.")
    return False


def attention_plan(device: torch.device | str):
    """Where attention runs on this CUDA device and why (`kernels.device_plan`: route, table, dtype, a one-line
    reason), or None where the Triton kernels cannot run (CPU without the interpreter, no triton)."""
    device = torch.device(device)
    if device.type != "cuda" or not _triton_can_run((str(device),)):
        return None
    return _kernels().device_plan(device)


def backend_name(mode: str, device: torch.device | str) -> str:
    """'triton' or 'torch': what `mode` resolves to for tensors on `device` (for logs)."""
    probe = torch.empty(0, device=device)
    return "triton" if use_triton(mode, probe) else "torch"


# --------------------------------------------------------------------------------------------
# Ops. Each takes the mode last; the torch branch is the reference the kernels are tested against.
# --------------------------------------------------------------------------------------------
def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
               mode: str = "auto") -> torch.Tensor:
    """LayerNorm over the last dim. Output dtype, both branches: the autocast dtype under autocast (every
    consumer in the model is a matmul that would cast to it; the kernel writes it directly), else x's."""
    if use_triton(mode, x, *(t for t in (weight, bias) if t is not None)):
        return _kernels().layer_norm(x, weight, bias, eps)
    y = F.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
        y = y.to(torch.get_autocast_dtype(x.device.type))
    return y


def gelu(x: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """tanh-approximation GELU, GPT-2's `gelu_new`."""
    if use_triton(mode, x):
        return _kernels().gelu(x)
    return F.gelu(x, approximate="tanh")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """Causal self-attention on (B, nh, T, hs) views; returns (B, nh, T, hs)."""
    if use_triton(mode, q, k, v):
        # "auto" routes head sizes the kernel has no tiles for, and GPUs below compute capability 8.0
        # (kernels.device_plan says why), to SDPA; "triton" lets the kernel raise, naming GPU and reason.
        kern = _kernels()
        if mode == "triton" or (q.shape[-1] in kern.ATTENTION_HEAD_DIMS and kern.attention_route(q.device) == "triton"):
            return kern.attention(q, k, v, causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class _TiedEmbedding(torch.autograd.Function):
    """GPT-2's wte read twice: rows for the token embedding and, whole, as the lm_head weight.

    Autograd alone gives the embedding its own dense (V, C) gradient (zero-filled, then the token rows
    added) and sums it with the head's (V, C) gradient: two (V, C) buffers at the end of the backward, the
    top of a CPU step's memory (2 x 147 MiB at GPT-2 small in fp32). Here both uses hang off one node, so
    its backward gets the head's gradient and adds the B*T token rows into it: in place when that gradient
    is the fused loss's dweight (marked by loss.hand_off: made there, held by nobody else), into a copy
    otherwise (a gradient the caller passed to backward, or one autograd summed from several uses).
    """

    @staticmethod
    def forward(ctx, idx, weight):
        ctx.save_for_backward(idx)
        ctx.weight_shape = weight.shape
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not zeros
        return F.embedding(idx, weight), weight.view_as(weight)  # (B, T, C), (V, C) alias for the head

    @staticmethod
    def backward(ctx, g_emb, g_head):
        (idx,) = ctx.saved_tensors
        if g_emb is None:
            return None, g_head
        rows, flat = g_emb.reshape(-1, ctx.weight_shape[1]), idx.reshape(-1)  # (B*T, C), (B*T,)
        if g_head is None:  # the head was not used (set_materialize_grads(False) in forward)
            g_head = rows.new_zeros(ctx.weight_shape)
        if torch.compiler.is_compiling() or not g_head.is_contiguous() or not loss.handed_off(g_head):
            return None, g_head.index_add(0, flat, rows.to(g_head.dtype))
        # In place: the fused loss handed over its saved dweight, this node's alone (its version bump makes
        # a retain_graph second backward raise instead of reusing it).
        return None, g_head.index_add_(0, flat, rows.to(g_head.dtype))


def tied_embedding(idx: torch.Tensor, weight: torch.Tensor, mode: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding rows (B, T, C), the head's weight (V, C)) for a wte that is also the lm_head.

    With gradients on the PyTorch path on CPU the two uses share one gradient buffer (_TiedEmbedding).
    Where the kernels run (CUDA, the interpreter, bench.memory's model of a CUDA step) the plain embedding
    stays: its CUDA backward is deterministic, an index_add_ would not be, and at the end of a GPU backward
    the activations it would compete with are gone.
    """
    if (torch.is_grad_enabled() and weight.requires_grad and weight.device.type == "cpu"
            and not use_triton(mode, weight)):
        return _TiedEmbedding.apply(idx, weight)
    return F.embedding(idx, weight), weight


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """Mean cross-entropy of (N, V) logits against (N,) targets; target -1 is ignored."""
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         mode: str = "auto") -> torch.Tensor:
    """cross_entropy(x @ weight.T, targets) for (N, C) x and (V, C) weight; target -1 is ignored."""
    if use_triton(mode, x, weight):
        return _kernels().linear_cross_entropy(x, weight, targets, ignore_index=-1)
    return loss.linear_cross_entropy(x, weight, targets, ignore_index=-1)


def make_optimizer(param_groups: Iterable[dict], lr: float, betas: tuple[float, float] = (0.9, 0.95),
                   eps: float = 1e-8, device_type: str = "cpu", mode: str = "auto") -> torch.optim.Optimizer:
    """AdamW: the fused Triton optimizer on CUDA (or the interpreter), torch's AdamW otherwise."""
    param_groups = list(param_groups)
    first = next((p for g in param_groups for p in g["params"]), None)
    probe = first if first is not None else torch.empty(0, device=device_type)
    if use_triton(mode, probe):
        return _kernels().FusedAdamW(param_groups, lr=lr, betas=betas, eps=eps)
    # torch's fused AdamW: one kernel per tensor instead of ~10 passes, on CPU too (faster than the default
    # for-loop: docs/cpu.md, "Optimizer on the CPU"). The fused kernel also
    # honours AMP's `found_inf`: the trainer's device-side skip of a non-finite step (train.apply_update).
    extra = {"fused": True} if device_type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, **extra)
