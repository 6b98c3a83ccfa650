"""Compile every registered Triton kernel for every GPU target, without a GPU, and report its resources.

    python -m bench.compile_report [--arch sm_80,sm_89,...] [--json PATH] [--kernel SUBSTR] [--first-fit] [--jobs N]

Targets (`kernels._launch.ARCHS`): sm_75 (T4), sm_80 (A100), sm_86 (RTX 30xx), sm_89 (RTX 40xx, L4),
sm_90a (H100), sm_100a (B200), sm_120 (RTX 50xx); all by default, `--arch` picks some. Each kernel
family in `kernels/` registers the builds it may be launched with (`kernels._launch.Build`: kernel,
signature, constexprs, warps, stages, divisibility hints, and the archs it runs on: attention builds
come from each arch's own config table, and none for sm_75, where attention runs on SDPA) at GPT-2
shapes. Each build is compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`
(ptxas and cuobjdump ship in triton's wheel: CUDA 12.9's below sm_90, 13.x's "ptxas-blackwell" from
sm_90a up) and its cubin read back with cuobjdump:
- registers           REG from `cuobjdump --dump-resource-usage`
- spill_bytes         STACK + LOCAL (bytes of per-thread local memory; anything > 0 is a spill)
- shared_bytes        Triton's dynamic shared memory (metadata.shared) + static SHARED from cuobjdump
- smem_limit          the arch's shared memory per block (what a launch may opt in to)
- fits                shared_bytes <= smem_limit and spill_bytes == 0
- mma_instructions    SASS lines with a tensor-core MMA, under each arch's name: HMMA (mma.sync: sm_75 to
                      sm_89, sm_120, small tiles on sm_90a), HGMMA (wgmma, sm_90a), UTC*MMA (tcgen05.mma,
                      sm_100a: UTCHMMA for fp16/bf16)
- ptx_mma             PTX tensor-core MMA instructions (mma.sync, wgmma.mma_async, tcgen05.mma), read
                      from the PTX triton.compile returns: free, and counted in every run
- vector_loads        SASS lines with a 128-bit global load: LDG.E.128 (and its cache-hint variants) and
                      LDGSTS....128 (16-byte cp.async, global -> shared)

`--first-fit` compiles, per (kernel, arch, group), the builds in the arch's order (`Build.rank`: for
attention, the arch table's order, so the tile FASTGPT_ATTENTION_CONFIGS=fixed launches comes first;
else registration order) only until one fits
(a group is e.g. "bf16 D=128" of an attention kernel, whose builds are autotune alternatives; each
memory-bound build is its own group): the cheap check that every kernel training uses has a config that
fits each arch. It reads no SASS: mma_instructions and vector_loads are -1 (not counted;
`cuobjdump -sass` is about half the cost of a memory-bound build) and ptx_mma says whether the dots
run on tensor cores (the full run checks that ptx_mma and mma_instructions agree on every build).
Without it every build is compiled and counted. Builds that compile to the same kernel (same function, signature, constexprs,
hints, warps, stages and arch: e.g. LayerNorm at widths 768 and 1024 share BLOCK_N=1024) are compiled
once and reported under each name.

The exit status is 1 when any build fails to compile or does not fit, or a group has no fitting build
(each is named on stderr), 2 on a usage error. TRITON_INTERPRET must be off: with it set, `@triton.jit` yields interpreter functions that
cannot be compiled, so this module clears it before importing `kernels` and refuses to run if
`kernels` was already imported in interpreter mode. Triton's on-disk cache (~/.triton/cache or
TRITON_CACHE_DIR) and a cache of the cuobjdump results (keyed by the cubin's hash, in
fastgpt_compile_report/ inside Triton's cache directory) make repeated runs take seconds.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

KEYS = ("kernel", "arch", "config", "group", "registers", "spill_bytes", "shared_bytes", "smem_limit", "fits",
        "mma_instructions", "ptx_mma", "vector_loads")

# HMMA.16816.F32.BF16 (mma.sync), HGMMA.64x64x16.F32.BF16 (wgmma), UTCHMMA / UTCQMMA / UTCIMMA /
# UTCOMMA (tcgen05.mma for fp16-bf16 / fp8 / int8 / mxfp4; no suffix in the SASS of sm_100a).
_MMA_RE = re.compile(r"\b(HMMA|HGMMA|UTC[A-Z]?MMA)\b")
_INSPECT_VERSION = b"2"  # bump when what _inspect_cubin counts changes: old cached answers are then ignored
_PTX_MMA_RE = re.compile(r"\b(mma\.sync|wgmma\.mma_async|tcgen05\.mma)\b")
_VEC_LOAD_RE = re.compile(r"\bLDG(STS)?(\.[A-Z0-9_]+)*\.128\b")
_RES_RE = re.compile(r"Function\s+(\S+):\s*\n\s*(.*)")


@dataclass
class Row:
    kernel: str
    arch: str
    config: str
    group: str
    smem_limit: int
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    mma_instructions: int = -1
    ptx_mma: int = -1
    vector_loads: int = -1
    error: str = ""

    @property
    def fits(self) -> bool:
        return not self.error and self.spill_bytes == 0 and 0 <= self.shared_bytes <= self.smem_limit

    def as_json(self) -> dict:
        return {k: getattr(self, k) for k in KEYS}


def _prepare_environment() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        if "kernels" in sys.modules:
            raise SystemExit("compile_report: `kernels` was imported with TRITON_INTERPRET set; its kernels "
                             "are interpreter functions and cannot be compiled. Run it in a fresh process "
                             "without TRITON_INTERPRET.")
        print("compile_report: ignoring TRITON_INTERPRET (compilation needs @triton.jit kernels)", file=sys.stderr)
        del os.environ["TRITON_INTERPRET"]


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise SystemExit(f"compile_report: cuobjdump not found at {path}")
    return path


def _resource_usage(text: str) -> dict[str, int]:
    """Parse `cuobjdump --dump-resource-usage`: 'REG:40 STACK:0 SHARED:0 LOCAL:0 ...' of the kernel."""
    m = _RES_RE.search(text)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output:\n{text}")
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", m.group(2))}


def _cache_dir() -> str:
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return os.path.join(base, "fastgpt_compile_report")


def _inspect_cubin(cubin: bytes, name: str, sass: bool = True) -> dict[str, int]:
    """cuobjdump's resource usage plus, with `sass`, SASS instruction counts for one cubin.

    `cuobjdump -sass` is slow per cubin (it starts nvdisasm); the answer depends only on the cubin's
    bytes, so it is cached next to Triton's own cache, keyed by the cubin's sha256 (and _INSPECT_VERSION).
    Without `sass` the counts are -1 (not counted).
    """
    key = hashlib.sha256(cubin + _INSPECT_VERSION + (b"" if sass else b"-nosass")).hexdigest()
    cached = os.path.join(_cache_dir(), key + ".json")
    try:
        with open(cached) as f:
            return json.load(f)
    except (OSError, ValueError):
        pass
    tool = _cuobjdump()
    with tempfile.TemporaryDirectory(prefix="compile_report_") as tmp:
        path = os.path.join(tmp, name + ".cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = _resource_usage(subprocess.run([tool, "--dump-resource-usage", path], check=True,
                                             capture_output=True, text=True).stdout)
        lines = subprocess.run([tool, "-sass", path], check=True, capture_output=True,
                               text=True).stdout.splitlines() if sass else None
    res["mma"] = sum(1 for line in lines if _MMA_RE.search(line)) if sass else -1
    res["vec"] = sum(1 for line in lines if _VEC_LOAD_RE.search(line)) if sass else -1
    try:  # best effort: a read-only cache directory only costs speed
        os.makedirs(_cache_dir(), exist_ok=True)
        tmp_path = f"{cached}.{os.getpid()}.tmp"
        with open(tmp_path, "w") as f:
            json.dump(res, f)
        os.replace(tmp_path, cached)
    except OSError:
        pass
    return res


@functools.cache
def _builds():
    """kernels' registered builds, listed once per process (listing them costs about 0.1 s; forked workers
    inherit the parent's list)."""
    from kernels._launch import all_builds

    return all_builds()


def _compile_one(task: tuple[int, str, bool]) -> Row:
    """Compile build number `index` of `all_builds()` for `arch` and read its cubin; `quick`: no SASS
    (see --first-fit)."""
    index, arch, quick = task
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels._launch import ARCHS

    b = _builds()[index]
    row = Row(kernel=b.kernel, arch=arch, config=b.config, group=b.group_key,
              smem_limit=ARCHS[arch].smem_per_block)
    try:
        if not isinstance(b.fn, triton.runtime.JITFunction):
            raise TypeError(f"{type(b.fn).__name__} is not a JITFunction (was TRITON_INTERPRET set?)")
        # Build.attrs is keyed by argument name; triton wants (argument index,) paths.
        attrs = {(b.fn.arg_names.index(k),) if isinstance(k, str) else k: v for k, v in b.attrs.items()}
        src = ASTSource(fn=b.fn, signature=b.signature, constexprs=b.constexprs, attrs=attrs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # triton 3.9's FP-fusion default notice, once per process
            k = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch].capability, 32),
                               options={"num_warps": b.num_warps, "num_stages": b.num_stages})
        res = _inspect_cubin(k.asm["cubin"], f"{b.kernel}_{arch}", sass=not quick)
        row.registers = res.get("REG", 0)
        row.spill_bytes = res.get("STACK", 0) + res.get("LOCAL", 0)
        row.shared_bytes = int(k.metadata.shared) + res.get("SHARED", 0)
        row.mma_instructions = res["mma"]
        row.ptx_mma = len(_PTX_MMA_RE.findall(k.asm["ptx"]))
        row.vector_loads = res["vec"]
    except Exception as e:  # reported per build; the exit status says the run failed
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return row


def _table(rows: list[Row]) -> str:
    head = ("kernel", "arch", "config", "regs", "spill", "shared", "limit", "fits", "mma", "ptx mma", "ldg128")
    body = [(r.kernel, r.arch, r.config, *(str(v) for v in (r.registers, r.spill_bytes, r.shared_bytes, r.smem_limit,
                                                            "yes" if r.fits else "NO", r.mma_instructions,
                                                            r.ptx_mma, r.vector_loads)))
            if not r.error else (r.kernel, r.arch, r.config, "ERROR", "", "", "", "NO", "", "", "") for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: " | ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths), *(fmt(r) for r in body)])


def _same_kernel(task: tuple[int, str, bool]) -> str:
    """What triton.compile sees of a task: tasks with equal keys compile to the same cubin."""
    b = _builds()[task[0]]
    return repr((b.fn.__module__, b.fn.__name__, sorted(b.signature.items()), sorted(b.constexprs.items()),
                 sorted((repr(k), repr(v)) for k, v in b.attrs.items()), b.num_warps, b.num_stages, task[1:]))


def _compile_all(tasks: list[tuple[int, str, bool]], jobs: int) -> list[Row]:
    """One Row per task, in order; each distinct kernel is compiled once (in parallel when jobs > 1)."""
    keys = [_same_kernel(t) for t in tasks]
    first: dict[str, tuple[int, str, bool]] = {}
    for key, t in zip(keys, tasks):
        first.setdefault(key, t)
    unique = list(first.values())
    if jobs > 1 and len(unique) > 1:
        import multiprocessing as mp

        # fork: workers inherit the imported kernels and their registry; tasks are plain indices.
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as pool:
            done = dict(zip(first, pool.map(_compile_one, unique, chunksize=1)))
    else:
        done = dict(zip(first, map(_compile_one, unique)))
    rows = []
    for t, key in zip(tasks, keys):
        b = _builds()[t[0]]
        rows.append(replace(done[key], kernel=b.kernel, config=b.config, group=b.group_key))
    return rows


def _first_fit(groups: dict[tuple, list[tuple[int, str, bool]]], jobs: int) -> list[Row]:
    """Per group, compile its builds in order until one fits; rounds run every unresolved group in parallel."""
    rows: list[Row] = []
    pending = {g: list(ts) for g, ts in groups.items()}
    while pending:
        batch = {g: ts.pop(0) for g, ts in pending.items()}
        done = dict(zip(batch, _compile_all(list(batch.values()), jobs)))
        rows.extend(done.values())
        pending = {g: ts for g, ts in pending.items() if ts and not done[g].fits}
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="", metavar="LIST",
                   help="comma-separated targets among sm_75, sm_80, sm_86, sm_89, sm_90a, sm_100a, sm_120 (default: all)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list to PATH")
    p.add_argument("--kernel", metavar="SUBSTR", default="", help="only kernels whose name contains SUBSTR")
    p.add_argument("--first-fit", action="store_true",
                   help="per (kernel, arch, group) stop at the first build that fits, and read no SASS "
                        "(a quick check: tensor-core use from the PTX)")
    p.add_argument("--jobs", type=int, default=0,
                   help="compile in this many processes (default 0: one per idle CPU, i.e. CPUs minus the "
                        "1-minute load average, at least 1; on a busy machine extra processes only slow it down)")
    args = p.parse_args(argv)

    _prepare_environment()
    import kernels  # noqa: F401  (registers every kernel family's builds)
    from kernels._launch import ARCHS

    archs = [a.strip() for a in args.arch.split(",") if a.strip()] or list(ARCHS)
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        print(f"compile_report: unknown --arch {', '.join(unknown)}; known: {', '.join(ARCHS)}", file=sys.stderr)
        return 2
    builds = _builds()
    tasks = [(i, arch, args.first_fit) for arch in archs for i, b in enumerate(builds)
             if args.kernel in b.kernel and (not b.archs or arch in b.archs)]
    if not tasks:
        print(f"compile_report: no registered kernel matches {args.kernel!r}", file=sys.stderr)
        return 2
    if args.jobs <= 0:
        cpus = os.cpu_count() or 1
        args.jobs = max(1, min(cpus, cpus - round(os.getloadavg()[0])))
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for i, arch, quick in tasks:
        groups.setdefault((builds[i].kernel, arch, builds[i].group_key), []).append((i, arch, quick))
    for ts in groups.values():  # first the build the arch launches first (Build.rank); stable otherwise
        ts.sort(key=lambda t: builds[t[0]].rank.get(t[1], 0))
    t0 = time.time()
    rows = _first_fit(groups, args.jobs) if args.first_fit else _compile_all(tasks, args.jobs)
    elapsed = time.time() - t0
    rows.sort(key=lambda r: (archs.index(r.arch), r.kernel, r.config))

    print(_table(rows))
    print(f"\n{len(rows)} builds of {len(tasks)} registered for {', '.join(archs)} in {elapsed:.1f} s, "
          f"{args.jobs} process{'es' if args.jobs > 1 else ''}{' (first fit per group)' if args.first_fit else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_json() for r in rows], f, indent=1)
    failed = [r for r in rows if r.error]
    unfit = [r for r in rows if not r.error and not r.fits]
    for r in failed:
        print(f"COMPILE ERROR {r.kernel} {r.arch} [{r.config}]: {r.error}", file=sys.stderr)
    for r in unfit:
        print(f"DOES NOT FIT {r.kernel} {r.arch} [{r.config}]: {r.spill_bytes} spill bytes, "
              f"{r.shared_bytes} of {r.smem_limit} bytes shared memory", file=sys.stderr)
    fitting = {(r.kernel, r.arch, r.group) for r in rows if r.fits}
    lost = sorted(g for g in groups if g not in fitting)
    for kernel, arch, group in lost:
        print(f"NO FITTING CONFIG {kernel} {arch} [{group}]", file=sys.stderr)
    if args.first_fit:  # alternatives that were tried and did not fit are expected; only a lost group fails
        return 1 if lost or failed else 0
    return 1 if failed or unfit or lost else 0


if __name__ == "__main__":
    sys.exit(main())
