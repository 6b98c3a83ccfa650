"""Shared launch helpers for every kernel family in this package.

What lives here and why:
- interpreter detection: `@triton.jit` decides at decoration time whether a kernel is compiled or
  interpreted (TRITON_INTERPRET=1), so the same flag must steer the launchers (CPU tensors are only
  legal under the interpreter) and the bf16-dot workaround (the interpreter's `tl.dot` on two bf16
  operands is wrong, triton issue 11584: kernels upcast their dot operands only when interpreting).
- a launch counter: tests prove the Triton path ran by reading `launches(name)` before and after.
- block / warp choice for row-wise kernels.
- a registry of GPU builds: each kernel file registers the (kernel, signature, constexprs, config)
  combinations it can be launched with, so `python -m bench.compile_report` compiles all of them
  for sm_80 and sm_90a without knowing the kernels itself.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

_LAUNCHES: Counter = Counter()


def interpreting() -> bool:
    """True when triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def can_launch(*tensors: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on these tensors: CUDA, or CPU under the interpreter."""
    if not triton_available():
        return False
    devs = {t.device for t in tensors}
    if len(devs) != 1:
        return False  # one kernel runs on one device
    dev = next(iter(devs))
    return dev.type == "cuda" or (dev.type == "cpu" and interpreting())


def why_not(*tensors: torch.Tensor) -> str:
    """A sentence explaining why `can_launch` is false, for error messages."""
    if not triton_available():
        return "triton is not installed (it ships for Linux x86-64 only)"
    devs = sorted({str(t.device) for t in tensors})
    if devs == ["cpu"]:
        return "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    if len(devs) > 1:
        return f"tensors are on several devices {devs}; a kernel runs on one"
    return f"tensors are on {devs}; Triton kernels need CUDA tensors (or CPU with TRITON_INTERPRET=1)"


def on_tensor_device(fn):
    """Run a custom op's implementation with its tensors' CUDA device current.

    Triton launches on the *current* device, not the tensors' one: without this, tensors on cuda:1
    while cuda:0 is current would be read through the wrong device. The device is the first tensor
    argument's (or the first element of the first tensor-list argument, for the optimizer)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        first = None
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                first = a
            elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
                first = a[0]
            if first is not None:
                break
        ctx = torch.cuda.device(first.device) if first is not None and first.is_cuda else contextlib.nullcontext()
        with ctx:
            return fn(*args, **kwargs)

    # custom_op infers the schema from the signature: give it fn's, with the string annotations of
    # `from __future__ import annotations` resolved in fn's module rather than this one.
    del wrapper.__wrapped__
    wrapper.__signature__ = inspect.signature(fn, eval_str=True)
    return wrapper


def count_launch(name: str, n: int = 1) -> None:
    _LAUNCHES[name] += n


def launches(name: str | None = None) -> int:
    """Number of Triton kernel launches so far, for one kernel name or all of them."""
    return _LAUNCHES[name] if name is not None else sum(_LAUNCHES.values())


def require_last_dim_contiguous(x: torch.Tensor, name: str) -> None:
    if x.stride(-1) != 1:
        raise ValueError(f"{name} must have stride 1 in its last dimension, got strides {tuple(x.stride())}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def row_config(n_cols: int, elem_bytes: int = 4) -> tuple[int, int]:
    """(BLOCK_N, num_warps) for a kernel that keeps one row of n_cols in registers."""
    block = next_pow2(n_cols)
    if block * elem_bytes > 65536:
        raise ValueError(f"rows of {n_cols} elements are too wide for a single-block row kernel")
    # ~8-16 elements per thread keeps 128-bit loads and avoids spills at GPT-2 widths.
    warps = min(max(block // 256, 1), 16)
    return block, warps


# --------------------------------------------------------------------------------------------
# Registry of GPU builds for the compile report.
# --------------------------------------------------------------------------------------------
@dataclass
class Build:
    """One compilation of one @triton.jit kernel: what `triton.compile(ASTSource(...))` needs."""

    kernel: str  # report name, e.g. "layer_norm_fwd"
    fn: Any  # the @triton.jit function (a JITFunction: import without TRITON_INTERPRET)
    signature: dict[str, str]  # every argument: "*fp32", "*bf16", "i32", "i64", "fp32", or "constexpr"
    constexprs: dict[str, Any]  # values for the "constexpr" arguments
    num_warps: int = 4
    num_stages: int = 3
    config: str = ""  # human-readable label, e.g. "bf16 N=768 BLOCK_N=1024 w4"
    attrs: dict = field(default_factory=dict)  # e.g. divisibility hints; may stay empty


_BUILDERS: list[Callable[[], list[Build]]] = []


def register_builds(fn: Callable[[], list[Build]]) -> Callable[[], list[Build]]:
    """Decorator for a zero-argument function returning the `Build`s of one kernel family."""
    _BUILDERS.append(fn)
    return fn


def all_builds() -> list[Build]:
    out: list[Build] = []
    for fn in _BUILDERS:
        out.extend(fn())
    return out


TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
}
