"""The budgeted first-contact GPU check: decisive numbers in one command of <= 8 minutes.

    bash bench/run_gpu.sh --quick              # or: python -m bench.gpu_check [--out DIR] [--budget S]
    python -m bench.gpu_check --dry-run        # the plan and each part's limit; needs no GPU

Parts run in order, each in its own subprocess (own process group) under its own wall-clock limit, so a
hang or crash in one cannot take the others down: a part past its limit is killed with its children and
recorded as "killed". A part is skipped when the budget left is below its limit; the required parts'
limits add up to less than the default budget, so only the optional last part can be skipped.

    env          GPU, driver, torch/triton/CUDA versions, kernels.device_plan()
    correctness  gpt2-width training step vs the PyTorch path, qkv-split attention vs SDPA (bf16, fp16),
                 deterministic backward: the existing gpu tests, autotuner on; the tiles it chose
    step         gpt2-124M training step, B=16 T=1024 bf16: fastgpt, nanoGPT recipe, HF sdpa
    kernels      C=768, B*T=16384: attention vs SDPA, LayerNorm/GELU vs torch, fused linear CE vs
                 F.cross_entropy over full logits, FusedAdamW vs torch fused AdamW (time, 3-step parity)
    tests        the rest of `pytest -m gpu` with FASTGPT_ATTENTION_CONFIGS=fixed
    extra        (only if time is left) the memory model vs measured peak, compiled training steps

What it writes (few files: the device tool brings back at most eight): OUT/summary.json and
OUT/summary.md, rewritten after every part (every figure with unit, shape, dtype; every failure by
name), and OUT/log.txt, every part's output as it runs. A part's own results go to OUT/parts/NAME.json
while it runs (the pytest parts after every test) and are folded into the summary when it ends, so a
killed part keeps what it had measured. Exit status 0 whenever the summary was written, failures or
not; 2 without a CUDA GPU ("no GPU", nothing run).

Figures come from bench/harness.py (do_bench with L2 flush for kernels, CUDA events for steps) through
the existing benchmarks in bench/test_kernels_bench.py and bench/test_model_bench.py; MFU is
roofline.train_step_flops (fastgpt.model.FLOP_CONVENTION) over the GPU's dense bf16 peak.
Random token ids and random-weight models only: no tokenizer, no network, no HF hub.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULT_ENV = "FASTGPT_GPU_CHECK_RESULT"  # where a part's subprocess writes its JSON
DEFAULT_BUDGET_S = 480.0


@dataclass
class Part:
    name: str
    limit_s: float
    what: str
    argv: list[str] | None = None  # None: this module's own part (python -m bench.gpu_check --part NAME)
    env: dict[str, str] = field(default_factory=dict)
    optional: bool = False  # "only if time is left"


# The real plan. Limits are wall-clock seconds including the subprocess's torch import and a cold
# Triton cache (attention autotunes 4 tiles x 3 kernels x 2 dtypes in `correctness`).
PARTS = [
    Part("env", 30, "GPU, driver, torch/triton/CUDA versions, kernels.device_plan()"),
    Part("correctness", 120, "gpt2-width step vs PyTorch path (all kernels, fused CE, FusedAdamW), "
         "qkv-split attention vs SDPA bf16/fp16, deterministic backward; autotuner on, tiles chosen",
         env={"FASTGPT_ATTENTION_CONFIGS": "autotune"}),
    Part("step", 90, "gpt2-124M train step B=16 T=1024 bf16: fastgpt vs nanoGPT recipe vs HF sdpa",
         env={"FASTGPT_BENCH_COMPILE": "0", "FASTGPT_BENCH_STEPS": "10", "FASTGPT_BENCH_WARMUP": "3"}),
    Part("kernels", 100, "C=768 B*T=16384: attention vs SDPA, LayerNorm/GELU vs torch, fused linear CE "
         "vs full logits, FusedAdamW vs torch fused", env={"FASTGPT_BENCH_COMPILE": "0",
                                                          "FASTGPT_BENCH_WIDTHS": "768",
                                                          "FASTGPT_BENCH_REP_MS": "100"}),
    Part("tests", 120, "the rest of `pytest -m gpu`, fixed tiles", env={"FASTGPT_ATTENTION_CONFIGS": "fixed"}),
    Part("extra", 90, "memory model vs measured peak; compiled training steps", optional=True,
         env={"FASTGPT_BENCH_COMPILE": "1"}),
]

# gpu tests that `correctness` runs (autotuner on) and `extra` runs; `tests` runs every other one.
CORRECTNESS_TESTS = [
    "tests/test_model_kernels.py::test_gpt2_shaped_bf16_training_step_matches_torch_on_cuda",
    "tests/test_attention.py::test_gpu_qkv_split_gpt2_shape",
    "tests/test_attention.py::test_gpu_backward_is_deterministic",
]
MEMORY_TEST = "tests/test_bench.py::test_memory_model_matches_cuda"
STEP_SYSTEMS = ["fastgpt", "nanogpt", "hf-sdpa"]
COMPILED_SYSTEMS = ["fastgpt-compile", "nanogpt-compile"]


# --------------------------------------------------------------------------------------------
# The runner: budget, per-part limits, summary. Clock and launcher are injectable (tests).
# --------------------------------------------------------------------------------------------
def launch_subprocess(part: Part, out: Path, log, timeout: float) -> tuple[str, int | None]:
    """Run one part in its own process group; ('ok' | 'failed' | 'killed', returncode)."""
    argv = part.argv or [sys.executable, "-m", "bench.gpu_check", "--part", part.name, "--out", str(out)]
    env = {**os.environ, **part.env, RESULT_ENV: str(out / "parts" / f"{part.name}.json"),
           "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)  # compiled kernels: interpreted ones would be measured otherwise
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return "killed", None
    except BaseException:  # the runner itself is being stopped: take the part down with it
        _kill_group(proc)
        raise
    return ("ok" if rc == 0 else "failed"), rc


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class Runner:
    def __init__(self, parts: list[Part], out: Path, budget_s: float = DEFAULT_BUDGET_S,
                 clock: Callable[[], float] = time.monotonic, launch=launch_subprocess, echo=print):
        self.parts, self.out, self.budget_s = parts, Path(out), budget_s
        self.clock, self.launch, self.echo = clock, launch, echo
        self.records: list[dict] = []
        self.meta = {"started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                     "budget_s": budget_s, "command": " ".join(sys.argv)}

    def run(self) -> list[dict]:
        (self.out / "parts").mkdir(parents=True, exist_ok=True)
        t0 = self.clock()
        with open(self.out / "log.txt", "a", buffering=1) as log:
            try:
                for part in self.parts:
                    left = self.budget_s - (self.clock() - t0)
                    rec = {"part": part.name, "what": part.what, "limit_s": part.limit_s}
                    if left < part.limit_s:
                        rec.update(status="skipped", reason=f"{left:.0f} s of budget left, under its {part.limit_s:.0f} s limit")
                    else:
                        log.write(f"\n===== part {part.name} (limit {part.limit_s:.0f} s) =====\n")
                        log.flush()
                        start = self.clock()
                        try:
                            status, rc = self.launch(part, self.out, log, part.limit_s)
                        except BaseException:  # the runner is stopped mid-part: say so, then stop
                            rec.update(status="interrupted", reason="the runner was stopped during this part",
                                       wall_s=round(self.clock() - start, 1), **self._collect(part))
                            self.records.append(rec)
                            raise
                        rec.update(status=status, returncode=rc, wall_s=round(self.clock() - start, 1))
                        if status == "killed":
                            rec["reason"] = f"killed at its {part.limit_s:.0f} s limit"
                        rec.update(self._collect(part))
                        if status == "ok" and rec.get("failures"):
                            rec["status"] = "failed"
                    self.records.append(rec)
                    self.echo(f"gpu_check: {part.name:<12} {rec['status']:<8} {rec.get('wall_s', '-')} s"
                              + (f"  ({rec['reason']})" if rec.get("reason") else "")
                              + (f"  failures: {len(rec['failures'])}" if rec.get("failures") else ""))
                    self.write_summary()
            finally:
                self.meta["total_s"] = round(self.clock() - t0, 1)
                self.write_summary()
                parts_dir = self.out / "parts"
                if not any(parts_dir.iterdir()):  # all folded into the summary: one folder fewer to fetch
                    parts_dir.rmdir()
        return self.records

    def _collect(self, part: Part) -> dict:
        path = self.out / "parts" / f"{part.name}.json"
        if not path.exists():
            return {"results": {}, "failures": []}
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            return {"results": {}, "failures": [f"{part.name}: unreadable result file ({e})"]}
        path.unlink()  # folded into summary.json
        return {"results": data.get("results", {}), "figures": data.get("figures", []),
                "failures": data.get("failures", [])}

    def write_summary(self) -> None:
        summary = {**self.meta, "parts": self.records,
                   "failures": [f"{r['part']}: {f}" for r in self.records for f in r.get("failures", [])]
                   + [f"{r['part']}: {r['status']} ({r.get('reason') or 'exit ' + str(r.get('returncode'))})"
                      for r in self.records if r["status"] in ("killed", "interrupted")
                      or (r["status"] == "failed" and not r.get("failures"))]}
        _atomic_write(self.out / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
        _atomic_write(self.out / "summary.md", summary_md(summary))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_md(s: dict) -> str:
    lines = ["# fastgpt quick GPU check", "",
             f"Started {s.get('started_utc')}, budget {s.get('budget_s')} s, total {s.get('total_s', '?')} s.", ""]
    env = next((r.get("results", {}) for r in s["parts"] if r["part"] == "env"), {})
    if env:
        lines += [f"GPU: {env.get('gpu')} (sm_{env.get('capability')}), driver {env.get('driver')}, "
                  f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}", ""]
    lines += ["| part | status | wall s | limit s | note |", "|---|---|---|---|---|"]
    for r in s["parts"]:
        lines.append(f"| {r['part']} | {r['status']} | {r.get('wall_s', '-')} | {r['limit_s']:.0f} | "
                     f"{r.get('reason', '')} |")
    lines += ["", "## Failures", ""] + ([f"- {f}" for f in s["failures"]] or ["none"])
    for r in s["parts"]:
        figs = r.get("figures") or []
        if figs:
            lines += ["", f"## {r['part']}: figures", "", "| name | value | unit | shape | dtype | note |",
                      "|---|---|---|---|---|---|"]
            for f in figs:
                lines.append(f"| {f['name']} | {_fmt(f['value'])} | {f['unit']} | {f.get('shape', '')} | "
                             f"{f.get('dtype', '')} | {f.get('note', '')} |")
        res = {k: v for k, v in (r.get("results") or {}).items() if k != "tests"}
        if res:
            lines += ["", f"## {r['part']}: results", "", "```", json.dumps(res, indent=1, default=str), "```"]
        tests = (r.get("results") or {}).get("tests")
        if tests:
            counts: dict[str, int] = {}
            for t in tests.values():
                counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
            lines += ["", f"{r['part']} tests: " + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Inside a part's subprocess.
# --------------------------------------------------------------------------------------------
class PartResult:
    """What one part reports; saved (atomically) whenever it changes, so a killed part keeps it."""

    def __init__(self, path: str | None):
        self.path = Path(path) if path else None
        self.results: dict = {}
        self.figures: list[dict] = []
        self.failures: list[str] = []

    def figure(self, name, value, unit, shape="", dtype="", note="") -> None:
        self.figures.append(dict(name=name, value=value, unit=unit, shape=shape, dtype=dtype, note=note))
        self.save()

    def save(self) -> None:
        if self.path is not None:
            _atomic_write(self.path, json.dumps({"results": self.results, "figures": self.figures,
                                                 "failures": self.failures}, default=str))


class _Collector:
    """pytest plugin: every test's outcome, and each benchmark's extra_info, as soon as it is known."""

    def __init__(self, res: PartResult, on_bench=None):
        self.res, self.on_bench = res, on_bench
        res.results.setdefault("tests", {})

    def pytest_runtest_makereport(self, item, call):
        if call.when == "call" and self.on_bench and call.excinfo is None:
            bench = getattr(item, "funcargs", {}).get("benchmark")
            if bench is not None and bench.extra_info:
                self.on_bench(item.nodeid, dict(bench.extra_info))

    def pytest_runtest_logreport(self, report):
        tests = self.res.results["tests"]
        if report.when == "call" or report.outcome != "passed":
            if report.nodeid in tests and tests[report.nodeid]["outcome"] != "passed":
                return  # keep a setup failure/skip over a later teardown report
            tests[report.nodeid] = {"outcome": report.outcome, "s": round(report.duration, 2)}
            if report.outcome == "failed":
                crash = getattr(report.longrepr, "reprcrash", None)  # the `E ...` line, where pytest has one
                why = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1]
                self.res.failures.append(f"{report.nodeid} ({report.when}): {why.splitlines()[0][:300]}")
            self.res.save()


def _pytest(res: PartResult, args: list[str], on_bench=None) -> int:
    import pytest

    rc = pytest.main(["-p", "no:cacheprovider", "-q", "-rfE", *args], plugins=[_Collector(res, on_bench)])
    if int(rc) not in (0, 5):  # 5: nothing collected (e.g. all deselected)
        if not res.failures:
            res.failures.append(f"pytest exit {int(rc)}")
    res.save()
    return int(rc)


def part_env(res: PartResult) -> None:
    import platform

    import numpy
    import torch
    import triton

    import kernels
    from bench.harness import peaks

    plan = kernels.device_plan()
    major, minor = torch.cuda.get_device_capability()
    r = res.results
    r.update(gpu=torch.cuda.get_device_name(), capability=f"{major}{minor}", torch=torch.__version__,
             triton=triton.__version__, cuda=torch.version.cuda, numpy=numpy.__version__,
             python=platform.python_version(), memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
             device_plan=dict(table=plan.table, dtype=plan.dtype, attention=plan.attention, reason=plan.reason))
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,"
                            "power.limit", "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
        r["nvidia_smi"] = q.stdout.strip()
        r["driver"] = q.stdout.split(",")[2].strip() if q.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, IndexError) as e:
        r["driver"], r["nvidia_smi"] = None, f"nvidia-smi unavailable: {e}"
    pk = peaks()
    r["peaks"] = ({"hbm_tb_per_s": pk[0] / 1e12, "bf16_tflops": pk[1] / 1e12, "source": "fastgpt.metrics.KNOWN_GPUS"}
                  if pk else "unknown GPU: no MFU / % of HBM peak (set FASTGPT_PEAK_TFLOPS / FASTGPT_PEAK_TBPS)")
    print(json.dumps(r, indent=1))
    res.save()


def part_correctness(res: PartResult) -> None:
    import kernels

    _pytest(res, CORRECTNESS_TESTS)
    res.results["attention_tiles_chosen"] = kernels.attention_configs()
    print("attention tiles the autotuner chose:")
    for e in res.results["attention_tiles_chosen"]:
        print("  ", e)
    res.save()


def _bench_figures(res: PartResult):
    """on_bench for pytest parts: the harness's extra_info -> figures with unit, shape, dtype."""

    def on_bench(nodeid: str, ex: dict) -> None:
        name = f"{ex.get('op')} {ex.get('impl')}"
        shape, dtype = ex.get("shape", ""), ex.get("dtype", "")
        res.figure(name, ex["median_s"] * 1e6, "us (median)", shape, dtype)
        for key, unit in (("tokens_per_s", "tokens/s"), ("tflops_per_s", "TFLOP/s"), ("gb_per_s", "GB/s")):
            if key in ex:
                res.figure(name, ex[key], unit, shape, dtype)
        if "mfu" in ex:
            res.figure(name, 100 * ex["mfu"], "% MFU", shape, dtype,
                       "FLOPs: roofline.train_step_flops / dense bf16 peak" if ex.get("kind") == "step"
                       else "matmul FLOPs / dense bf16 peak")
        if "hbm_utilisation" in ex and not ex.get("flops"):
            res.figure(name, 100 * ex["hbm_utilisation"], "% of HBM peak", shape, dtype, "bytes: roofline minimum")
        if "peak_mem_bytes" in ex:
            res.figure(name, ex["peak_mem_bytes"] / 2**30, "GiB peak allocated", shape, dtype)

    return on_bench


def part_step(res: PartResult) -> None:
    _pytest(res, [f"bench/test_model_bench.py::test_train_step[{s}]" for s in STEP_SYSTEMS], _bench_figures(res))


def part_kernels(res: PartResult) -> None:
    sel = ("(test_attention and (fastgpt or sdpa) and (fwd- or fwd+bwd)) or "
           "((test_layer_norm or test_gelu) and not compile) or "
           "(test_adamw_step and (fastgpt or torch-fused))")
    _pytest(res, ["bench/test_kernels_bench.py", "-k", sel], _bench_figures(res))
    for fn in (_cross_entropy_vs_full_logits, _adamw_parity):
        try:
            fn(res)
        except Exception as e:  # one measurement failing must not hide the other
            res.failures.append(f"{fn.__name__}: {type(e).__name__}: {e}")
            res.save()


def _cross_entropy_vs_full_logits(res: PartResult) -> None:
    """Fused linear CE vs F.cross_entropy over full logits, fwd+bwd: time (do_bench) and peak memory."""
    import torch
    import torch.nn.functional as F

    import kernels
    from bench import harness

    N, C, V, dt = 16384, 768, 50257, torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, C, device="cuda", dtype=dt, generator=g, requires_grad=True)
    w = (torch.randn(V, C, device="cuda", dtype=dt, generator=g) * 0.02).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    systems = {"fused linear CE (kernels.linear_cross_entropy)": lambda: kernels.linear_cross_entropy(x, w, t),
               "F.cross_entropy(x @ w.T) full logits": lambda: F.cross_entropy((x @ w.T).float(), t)}
    losses = {}
    shape = f"x {N}x{C}, W {V}x{C}"
    for name, f in systems.items():
        def fwd_bwd():
            return torch.autograd.grad(f(), (x, w))
        fwd_bwd()
        losses[name] = f().item()
        times = harness.kernel_times(fwd_bwd)
        peak, before = harness.peak_memory(fwd_bwd)
        res.figure(f"cross-entropy fwd+bwd: {name}", sorted(times)[len(times) // 2] * 1e3, "ms (median)", shape, "bf16")
        res.figure(f"cross-entropy fwd+bwd: {name}", (peak - before) / 2**20, "MiB peak over inputs", shape, "bf16")
    a, b = losses.values()
    res.results["cross_entropy_loss_diff"] = abs(a - b)
    if abs(a - b) > 1e-2:
        res.failures.append(f"cross-entropy: fused loss {a:.5f} vs full logits {b:.5f}")
    res.save()


def _adamw_parity(res: PartResult) -> None:
    """FusedAdamW vs torch.optim.AdamW(fused=True) on gpt2's parameter shapes: 3 steps, max |diff|."""
    import torch

    import kernels
    from bench.test_kernels_bench import gpt2_param_shapes

    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = gpt2_param_shapes(768, 12)
    base = [torch.randn(s, device="cuda", generator=g) * 0.02 for s in shapes]
    grads = [[torch.randn(s, device="cuda", generator=g) * 1e-3 for s in shapes] for _ in range(3)]
    kw = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
    finals = []
    for make in (lambda gr: kernels.FusedAdamW(gr, **kw), lambda gr: torch.optim.AdamW(gr, fused=True, **kw)):
        ps = [b.clone().requires_grad_() for b in base]
        opt = make([{"params": [p for p in ps if p.dim() >= 2], "weight_decay": 0.1},
                    {"params": [p for p in ps if p.dim() < 2], "weight_decay": 0.0}])
        for step in range(3):
            for p, gr in zip(ps, grads[step]):
                p.grad = gr.clone()
            opt.step()
        finals.append(ps)
    diff = max((a - b).abs().max().item() for a, b in zip(*finals))
    moved = max((a - b).abs().max().item() for a, b in zip(finals[1], base))
    res.figure("FusedAdamW vs torch fused AdamW: max |param diff| after 3 steps", diff, "abs", "gpt2 124M params",
               "fp32", f"largest update {moved:.3g}")
    if not diff <= 1e-6:
        res.failures.append(f"adamw parity: max |diff| {diff:.3g} after 3 steps (largest update {moved:.3g})")
    res.save()


def part_tests(res: PartResult) -> None:
    args = ["tests", "-m", "gpu"] + [f"--deselect={t}" for t in CORRECTNESS_TESTS] + [f"--deselect={MEMORY_TEST}"]
    _pytest(res, args)


def part_extra(res: PartResult) -> None:
    _pytest(res, [MEMORY_TEST])  # first: quicker than the two inductor compiles of a whole model
    _pytest(res, [f"bench/test_model_bench.py::test_train_step[{s}]" for s in COMPILED_SYSTEMS], _bench_figures(res))


PART_FUNCS = {"env": part_env, "correctness": part_correctness, "step": part_step, "kernels": part_kernels,
              "tests": part_tests, "extra": part_extra}


# --------------------------------------------------------------------------------------------
def default_out() -> Path:
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"])
    try:
        import torch

        gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:
        gpu = "unknown"
    gpu = "".join(c if c.isalnum() or c in "-_." else "-" for c in gpu.replace("NVIDIA ", "")).strip("-")
    return ROOT / "bench_results" / f"{gpu}-{datetime.date.today().isoformat()}"


def plan_text(parts: list[Part], budget_s: float) -> str:
    lines = [f"bench.gpu_check plan: budget {budget_s:.0f} s, parts in order, each in its own subprocess:"]
    for p in parts:
        env = " ".join(f"{k}={v}" for k, v in p.env.items())
        lines.append(f"  {p.name:<12} limit {p.limit_s:>4.0f} s{'  (only if time is left)' if p.optional else ''}"
                     f"  {p.what}" + (f"  [{env}]" if env else ""))
    required = sum(p.limit_s for p in parts if not p.optional)
    lines.append(f"required parts' limits: {required:.0f} s of {budget_s:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: $OUT, else "
                    "bench_results/<gpu>-<date>/)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all parts (default 480)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and each part's limit; run nothing")
    ap.add_argument("--only", default=None, help="comma-separated part names to run (e.g. a rerun of failed ones)")
    ap.add_argument("--part", choices=sorted(PART_FUNCS), help=argparse.SUPPRESS)  # inside a part's subprocess
    args = ap.parse_args(argv)
    parts = PARTS
    if args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in PART_FUNCS]
        if unknown:
            ap.error(f"--only: unknown part(s) {unknown}; parts are {list(PART_FUNCS)}")
        parts = [p for p in PARTS if p.name in names]
    if args.budget <= 0:
        ap.error(f"--budget must be positive, got {args.budget}")
    if args.dry_run:
        print(plan_text(parts, args.budget))
        return 0
    if args.part:
        res = PartResult(os.environ.get(RESULT_ENV))
        try:
            PART_FUNCS[args.part](res)
        except Exception as e:
            res.failures.append(f"{type(e).__name__}: {e}")
            res.save()
            raise
        return 1 if res.failures else 0
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu_check: no GPU: torch.cuda.is_available() is False, nothing was run (exit 2). "
              "`python -m bench.gpu_check --dry-run` prints the plan.", file=sys.stderr)
        return 2
    out = (args.out or default_out()).resolve()  # parts run with the repository root as cwd
    out.mkdir(parents=True, exist_ok=True)
    print(plan_text(parts, args.budget), flush=True)
    print(f"writing to {out}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")))
    runner = Runner(parts, out, args.budget)
    try:
        runner.run()
    except KeyboardInterrupt:
        print("gpu_check: stopped; summary written with the parts done so far", file=sys.stderr)
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
