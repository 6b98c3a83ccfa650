"""Compile every registered Triton kernel for sm_80 and sm_90a, without a GPU, and report its resources.

    python -m bench.compile_report [--json PATH] [--kernel SUBSTR] [--jobs N]

Each kernel family in `kernels/` registers the builds it may be launched with (`kernels._launch.Build`:
kernel, signature, constexprs, warps, stages, divisibility hints) at GPT-2 shapes. For every build and
both targets this compiles with `triton.compile(ASTSource(...), target=GPUTarget("cuda", 80|90, 32))`,
writes the cubin to a temporary directory and reads it back with the `cuobjdump` shipped in triton's
wheel:
- registers           REG from `cuobjdump --dump-resource-usage`
- spill_bytes         STACK + LOCAL (bytes of per-thread local memory; anything > 0 is a spill)
- shared_bytes        Triton's dynamic shared memory (metadata.shared) + static SHARED from cuobjdump
- mma_instructions    SASS lines with a tensor-core MMA: HMMA (mma.sync; sm_80 and small tiles on
                      sm_90a) or HGMMA (wgmma, sm_90a)
- vector_loads        SASS lines with a 128-bit global load: LDG.E.128 (and its cache-hint variants) and
                      LDGSTS....128 (16-byte cp.async, global -> shared)

The exit status is 1 when any build fails to compile or spills (each is named on stderr), 2 on a usage
error. TRITON_INTERPRET must be off: with it set, `@triton.jit` yields interpreter functions that
cannot be compiled, so this module clears it before importing `kernels` and refuses to run if
`kernels` was already imported in interpreter mode. Triton's on-disk cache (~/.triton/cache or
TRITON_CACHE_DIR) and a cache of the cuobjdump results (keyed by the cubin's hash, in
fastgpt_compile_report/ inside Triton's cache directory) make repeated runs take seconds.
"""
from __future__ import annotations

import argparse
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
from dataclasses import dataclass

ARCHS = {"sm_80": 80, "sm_90a": 90}
KEYS = ("kernel", "arch", "config", "registers", "spill_bytes", "shared_bytes", "mma_instructions", "vector_loads")

_MMA_RE = re.compile(r"\b(HMMA|HGMMA)\.")
_VEC_LOAD_RE = re.compile(r"\bLDG(STS)?(\.[A-Z0-9_]+)*\.128\b")
_RES_RE = re.compile(r"Function\s+(\S+):\s*\n\s*(.*)")


@dataclass
class Row:
    kernel: str
    arch: str
    config: str
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    mma_instructions: int = -1
    vector_loads: int = -1
    error: str = ""

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


def _inspect_cubin(cubin: bytes, name: str) -> dict[str, int]:
    """cuobjdump's resource usage plus SASS instruction counts for one cubin.

    `cuobjdump -sass` costs ~0.5 s a cubin (it starts nvdisasm); the answer depends only on the cubin's
    bytes, so it is cached next to Triton's own cache, keyed by the cubin's sha256.
    """
    key = hashlib.sha256(cubin).hexdigest()
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
        sass = subprocess.run([tool, "-sass", path], check=True, capture_output=True, text=True).stdout
    lines = sass.splitlines()
    res["mma"] = sum(1 for line in lines if _MMA_RE.search(line))
    res["vec"] = sum(1 for line in lines if _VEC_LOAD_RE.search(line))
    try:  # best effort: a read-only cache directory only costs speed
        os.makedirs(_cache_dir(), exist_ok=True)
        tmp_path = f"{cached}.{os.getpid()}.tmp"
        with open(tmp_path, "w") as f:
            json.dump(res, f)
        os.replace(tmp_path, cached)
    except OSError:
        pass
    return res


def _compile_one(task: tuple[int, str]) -> Row:
    """Compile build number `index` of `all_builds()` for `arch` and read its cubin."""
    index, arch = task
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels._launch import all_builds

    b = all_builds()[index]
    row = Row(kernel=b.kernel, arch=arch, config=b.config)
    try:
        if not isinstance(b.fn, triton.runtime.JITFunction):
            raise TypeError(f"{type(b.fn).__name__} is not a JITFunction (was TRITON_INTERPRET set?)")
        # Build.attrs is keyed by argument name; triton wants (argument index,) paths.
        attrs = {(b.fn.arg_names.index(k),) if isinstance(k, str) else k: v for k, v in b.attrs.items()}
        src = ASTSource(fn=b.fn, signature=b.signature, constexprs=b.constexprs, attrs=attrs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # triton 3.9's FP-fusion default notice, once per process
            k = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32),
                               options={"num_warps": b.num_warps, "num_stages": b.num_stages})
        res = _inspect_cubin(k.asm["cubin"], f"{b.kernel}_{arch}")
        row.registers = res.get("REG", 0)
        row.spill_bytes = res.get("STACK", 0) + res.get("LOCAL", 0)
        row.shared_bytes = int(k.metadata.shared) + res.get("SHARED", 0)
        row.mma_instructions = res["mma"]
        row.vector_loads = res["vec"]
    except Exception as e:  # reported per build; the exit status says the run failed
        row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return row


def _table(rows: list[Row]) -> str:
    head = ("kernel", "arch", "config", "regs", "spill", "shared", "mma", "ldg128")
    body = [(r.kernel, r.arch, r.config, *(str(v) for v in (r.registers, r.spill_bytes, r.shared_bytes,
                                                            r.mma_instructions, r.vector_loads)))
            if not r.error else (r.kernel, r.arch, r.config, "ERROR", "", "", "", "") for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda cells: " | ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "-+-".join("-" * w for w in widths), *(fmt(r) for r in body)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list to PATH")
    p.add_argument("--kernel", metavar="SUBSTR", default="", help="only kernels whose name contains SUBSTR")
    p.add_argument("--jobs", type=int, default=0,
                   help="compile in this many processes (default 0: one per idle CPU, i.e. CPUs minus the "
                        "1-minute load average, at least 1; on a busy machine extra processes only slow it down)")
    args = p.parse_args(argv)

    _prepare_environment()
    import kernels  # noqa: F401  (registers every kernel family's builds)
    from kernels._launch import all_builds

    builds = all_builds()
    tasks = [(i, arch) for i, b in enumerate(builds) if args.kernel in b.kernel for arch in ARCHS]
    if not tasks:
        print(f"compile_report: no registered kernel matches {args.kernel!r}", file=sys.stderr)
        return 2
    if args.jobs <= 0:
        cpus = os.cpu_count() or 1
        args.jobs = max(1, min(cpus, cpus - round(os.getloadavg()[0])))
    t0 = time.time()
    if args.jobs > 1 and len(tasks) > 1:
        import multiprocessing as mp

        # fork: workers inherit the imported kernels and their registry; tasks are plain indices.
        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as pool:
            rows = list(pool.map(_compile_one, tasks, chunksize=1))
    else:
        rows = [_compile_one(t) for t in tasks]
    elapsed = time.time() - t0

    print(_table(rows))
    print(f"\n{len(rows)} builds ({len(tasks) // len(ARCHS)} kernels x {len(ARCHS)} archs) in {elapsed:.1f} s, "
          f"{args.jobs} process{'es' if args.jobs > 1 else ''}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.as_json() for r in rows], f, indent=1)
    failed = [r for r in rows if r.error]
    spilled = [r for r in rows if not r.error and r.spill_bytes > 0]
    for r in failed:
        print(f"COMPILE ERROR {r.kernel} {r.arch} [{r.config}]: {r.error}", file=sys.stderr)
    for r in spilled:
        print(f"SPILL {r.kernel} {r.arch} [{r.config}]: {r.spill_bytes} bytes", file=sys.stderr)
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
