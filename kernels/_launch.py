"""Shared launch helpers for every kernel family in this package.

What lives here and why:
- interpreter detection: `@triton.jit` decides at decoration time whether a kernel is compiled or
  interpreted (TRITON_INTERPRET=1), so the same flag must steer the launchers (CPU tensors are only
  legal under the interpreter) and the bf16-dot workaround (the interpreter's `tl.dot` on two bf16
  operands is wrong, triton issue 11584: kernels upcast their dot operands only when interpreting).
- a launch counter: tests prove the Triton path ran by reading `launches(name)` before and after.
- block / warp choice for row-wise kernels.
- per-architecture choices: the GPU targets fastgpt compiles for (`ARCHS`, with each one's shared
  memory per block), which attention config table a compute capability gets, and `arch_plan`: the
  default training dtype and the attention route (Triton or PyTorch SDPA) of a capability. Pure
  functions of the capability, so they are tested without a GPU.
- a registry of GPU builds: each kernel file registers the (kernel, signature, constexprs, config)
  combinations it can be launched with, and on which archs, so `python -m bench.compile_report`
  compiles all of them for every target in `ARCHS` without knowing the kernels itself.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

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


# The one dtype rule of every kernel: tensors are stored in fp32, bf16 or fp16 and the math runs in fp32
# (fp32 accumulation, fp32 statistics). Any other dtype -- float64 included -- is refused by name: computing
# float64 in fp32 would quietly drop the precision its caller asked for. fastgpt.ops routes such tensors to
# the PyTorch reference under kernels="auto".
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class DtypeError(TypeError, ValueError):
    """A tensor in a dtype the kernels do not take (a TypeError; also a ValueError, as the kernels' other
    refusals of bad input are)."""


def check_dtypes(kernel: str, allowed: tuple[torch.dtype, ...] = DTYPES, **tensors: torch.Tensor | None) -> None:
    """Raise DtypeError naming `kernel`, the argument and its dtype for a tensor outside `allowed`."""
    for name, t in tensors.items():
        if t is not None and t.dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            raise DtypeError(f"{kernel}: {name} is {str(t.dtype).replace('torch.', '')}; the Triton kernels take "
                             f"{names} (computed in fp32); use the PyTorch op for other dtypes")


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
# Per-architecture choices.
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """One GPU target: its name for ptxas, compute capability, and limits that decide which configs fit."""

    name: str  # ptxas target, e.g. "sm_90a"
    capability: int  # 10 * major + minor, what triton's GPUTarget takes
    smem_per_block: int  # bytes of shared memory one block may opt in to (CUDA programming guide)
    gpus: str  # examples, for tables and messages


# The seven targets the compile report builds for. Triton compiles capability >= 90 as the "a"
# variant (sm_90a, sm_100a, sm_120a) with the ptxas-blackwell it bundles (CUDA 13.x), and < 90 with
# its CUDA 12.x ptxas; both ship in triton's wheel, so no CUDA toolkit is needed.
ARCHS = {
    a.name: a
    for a in (
        Arch("sm_75", 75, 64 * 1024, "T4, RTX 20xx"),
        Arch("sm_80", 80, 163 * 1024, "A100, A30"),
        Arch("sm_86", 86, 99 * 1024, "RTX 30xx, A10, A40"),
        Arch("sm_89", 89, 99 * 1024, "RTX 40xx, L4, L40"),
        Arch("sm_90a", 90, 227 * 1024, "H100, H200, GH200"),
        Arch("sm_100a", 100, 227 * 1024, "B200, GB200"),
        Arch("sm_120", 120, 99 * 1024, "RTX 50xx, RTX PRO 6000 Blackwell"),
    )
}


def config_table(capability: tuple[int, int]) -> str | None:
    """Name of the attention config table for a compute capability, or None below 8.0 (no Triton attention).

    Each table is sized for its arch's shared memory per block and its tensor-core instruction:
    mma.sync per warp on 8.x and 12.x (163 KB on 8.0/8.7, 99 KB on 8.6/8.9/12.x), wgmma per warpgroup on
    9.0, tcgen05 on 10.x. Consumer Blackwell (12.x) has mma.sync and 99 KB, so it must not take the
    Hopper or B200 tables (their tiles need up to 227 KB). An unknown newer major gets the 99 KB mma.sync
    table: the smallest tiles, the safest guess.
    """
    major, minor = capability
    if major < 8:
        return None
    if major == 8:
        return "sm86" if minor == 6 else "sm89" if minor >= 8 else "sm80"  # 8.7 (Orin): 163 KB like 8.0
    if major == 9:
        return "sm90"
    if major in (10, 11):
        return "sm100"
    return "sm120"


def table_arch(table: str) -> Arch:
    """The compile target a config table is checked on (sm_100a for "sm100", ...)."""
    return next(a for a in ARCHS.values() if a.name.replace("_", "").rstrip("a") == table)


class ArchPlan(NamedTuple):
    """What fastgpt runs on one compute capability (see `arch_plan`)."""

    table: str | None  # attention config table, None where attention does not run on Triton
    dtype: str  # default training dtype: "bf16" (>= 8.0) or "fp16" with loss scaling (no bf16 before 8.0)
    attention: str  # "triton" or "sdpa"
    reason: str  # one line for the startup log


def arch_plan(capability: tuple[int, int]) -> ArchPlan:
    """Training dtype and attention route for a GPU of this compute capability (pure: no GPU needed)."""
    major, minor = capability
    sm = f"sm_{major}{minor}"
    table = config_table(capability)
    if table is None:
        return ArchPlan(None, "fp16", "sdpa",
                        f"compute capability {major}.{minor} ({sm}) is below 8.0: Triton emits no tensor-core "
                        f"instructions for the attention kernels there and they spill, so attention runs on "
                        f"PyTorch SDPA; the memory-bound kernels stay on Triton; no bf16, so fp16 with loss scaling")
    smem = table_arch(table).smem_per_block // 1024
    return ArchPlan(table, "bf16", "triton",
                    f"compute capability {major}.{minor} ({sm}): Triton attention with the {table} config table "
                    f"({smem} KB shared memory per block), bf16")


@functools.lru_cache(maxsize=None)
def _device_plan(index: int) -> tuple[str, ArchPlan]:
    return torch.cuda.get_device_name(index), arch_plan(torch.cuda.get_device_capability(index))


def _cuda_index(device: torch.device | str | int | None) -> int:
    if device is None:
        return torch.cuda.current_device()
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return torch.cuda.current_device() if device.index is None else device.index


def device_plan(device: torch.device | str | int | None = None) -> ArchPlan:
    """`arch_plan` of a CUDA device (the current one by default); the reason names the GPU."""
    name, plan = _device_plan(_cuda_index(device))
    return plan._replace(reason=f"{name}: {plan.reason}")


@torch.compiler.assume_constant_result  # torch.compile: evaluated while tracing, a constant in the graph
def attention_route(device: torch.device | str) -> str:
    """'triton' or 'sdpa' for attention on tensors of `device` (CPU, i.e. the interpreter: 'triton')."""
    device = torch.device(device)
    return _device_plan(_cuda_index(device))[1].attention if device.type == "cuda" else "triton"


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
    archs: tuple[str, ...] = ()  # names in ARCHS this build is launched on; empty: every arch
    group: str = ""  # builds of one kernel with one group are alternatives (autotune configs); "" = config
    # arch -> this build's position among its group's alternatives on that arch (attention: the tile's
    # index in the arch's table, 0 = the tile FASTGPT_ATTENTION_CONFIGS=fixed launches); --first-fit
    # tries a group's builds in this order, registration order where it is missing.
    rank: dict[str, int] = field(default_factory=dict)

    @property
    def group_key(self) -> str:
        """The group this build belongs to: `group`, or its own `config` when it has none."""
        return self.group or self.config


_BUILDERS: list[Callable[[], list[Build]]] = []


def register_builds(fn: Callable[[], list[Build]]) -> Callable[[], list[Build]]:
    """Decorator for a zero-argument function returning the `Build`s of one kernel family."""
    _BUILDERS.append(fn)
    return fn


def constexpr_flags(fn) -> list[bool]:
    """Per argument of the @triton.jit `fn`: is it `tl.constexpr`? (A compiled JITFunction has `params`;
    under TRITON_INTERPRET=1 the wrapper has none, so the Python function's annotations are read.)"""
    if hasattr(fn, "params"):
        return [bool(p.is_constexpr) for p in fn.params]
    import triton.language as tl

    params = inspect.signature(fn.fn).parameters.values()
    return [p.annotation is tl.constexpr or "constexpr" in str(p.annotation) for p in params]


def signature(fn, types: dict[str, str], default: str | None = None) -> dict[str, str]:
    """The compile signature of the @triton.jit `fn`, in its argument order, derived from the kernel.

    Argument names and which of them are `tl.constexpr` come from `fn` itself (`arg_names`, `params`);
    `types` gives the Triton type of the other arguments by name ("*bf16", "fp32", ...), `default` the
    type of any not named (the kernels' ints: "i32"). A name in `types` the kernel does not have, or an
    argument with no type, raises: renaming a kernel argument cannot leave a stale signature behind."""
    unknown = set(types) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__} has no argument(s) {sorted(unknown)}; its arguments: {fn.arg_names}")
    sig = {}
    for name, is_constexpr in zip(fn.arg_names, constexpr_flags(fn)):
        if is_constexpr:
            sig[name] = "constexpr"
        elif name in types or default is not None:
            sig[name] = types.get(name, default)
        else:
            raise ValueError(f"{fn.__name__}: no type for argument {name!r}")
    return sig


def aligned(fn, *names: str) -> dict:
    """Divisibility-by-16 hints (what runtime specialisation gives 16-byte aligned pointers and
    multiples of 16) for the named arguments of `fn`, keyed as `Build.attrs` wants."""
    unknown = set(names) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__} has no argument(s) {sorted(unknown)}")
    return {name: [["tt.divisibility", 16]] for name in names}


def all_builds() -> list[Build]:
    out: list[Build] = []
    for fn in _BUILDERS:
        out.extend(fn())
    return out


# --------------------------------------------------------------------------------------------
# Registry of what a custom op holds besides its outputs, for the memory model (bench.memory).
# --------------------------------------------------------------------------------------------
Block = tuple[tuple[int, ...], torch.dtype]  # one allocation: shape, dtype
_WORKSPACES: dict[str, Callable[..., list[Block]]] = {}
_AUTOCAST_ARGS: dict[str, Callable[..., dict]] = {}


def register_workspace(op: str):
    """Decorator: `fn(**args) -> [(shape, dtype), ...]`, the blocks the fastgpt::`op` implementation
    allocates inside and frees before returning, at its largest, for the op's arguments by schema name
    (tensors carry shape and dtype only: the memory model calls it on fake tensors). A fake
    implementation allocates only the outputs, so this is what a memory model must add around a call."""
    def deco(fn):
        _WORKSPACES[op] = fn
        return fn
    return deco


def register_autocast_args(op: str):
    """Decorator: `fn(args: dict, dtype) -> dict`, the arguments the public function passes fastgpt::`op`
    under CUDA autocast to `dtype` (it reads torch's autocast state, which a memory model running CPU
    fake tensors cannot set for CUDA)."""
    def deco(fn):
        _AUTOCAST_ARGS[op] = fn
        return fn
    return deco


def workspace(op: str, args: dict) -> list[Block]:
    """The registered workspace blocks of fastgpt::`op` for `args` (none registered: none)."""
    fn = _WORKSPACES.get(op)
    return fn(**args) if fn is not None else []


def autocast_args(op: str, args: dict, dtype: torch.dtype) -> dict:
    """`args` as the public function would pass them under CUDA autocast to `dtype`."""
    fn = _AUTOCAST_ARGS.get(op)
    return fn(dict(args), dtype) if fn is not None else args


TORCH_TO_TRITON = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
}
