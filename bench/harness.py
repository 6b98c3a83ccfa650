"""Timing and bookkeeping shared by the benchmark files.

On CUDA a benchmark's times are GPU times: kernels through `triton.testing.do_bench` (L2 flushed
between calls, CUDA events), training steps through CUDA events around each step. Those per-call
times are handed to pytest-benchmark through a replay clock (`benchmark._timer`), so its statistics
(min, median, mean, rounds) and `--benchmark-json` hold the real GPU numbers. On the CPU the
ordinary `benchmark.pedantic` with perf_counter times the call (few rounds: the CPU run is a smoke
run of the PyTorch paths, not a performance claim).

Every benchmark records in `extra_info`: impl, op, shape, device name, and, where defined, tokens/s,
TFLOP/s, GB/s, MFU (vs the GPU's dense bf16 peak), peak memory (torch.cuda.max_memory_allocated during
one call) and device memory in use (NVML).
"""
from __future__ import annotations

import os
import platform

import torch

from .roofline import gpu_peaks

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def device_name() -> str:
    if HAS_CUDA:
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}"


def peaks() -> tuple[float, float] | None:
    """(HBM bytes/s, bf16 FLOP/s) of this GPU; FASTGPT_PEAK_TFLOPS / FASTGPT_PEAK_TBPS override."""
    if not HAS_CUDA:
        return None
    p = gpu_peaks(device_name())
    bw = float(os.environ.get("FASTGPT_PEAK_TBPS", 0)) * 1e12 or (p[0] if p else 0.0)
    fl = float(os.environ.get("FASTGPT_PEAK_TFLOPS", 0)) * 1e12 or (p[1] if p else 0.0)
    return (bw, fl) if bw and fl else None


def nvml_used_bytes() -> int | None:
    """Device memory in use as the driver sees it (includes the CUDA context and the caching allocator)."""
    if not HAS_CUDA:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        idx = torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            idx = int(visible.split(",")[idx])
        handle = pynvml.nvmlDeviceGetHandleByIndex(idx)
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
    except Exception:
        return None


def cuda_event_times(fn, warmup: int = 3, rep: int = 10) -> list[float]:
    """Seconds per call of fn, each bracketed by CUDA events (for calls of many kernels, e.g. a step)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def kernel_times(fn, grad_to_none=None) -> list[float]:
    """Seconds per call via triton.testing.do_bench (L2 flushed before every call)."""
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=25, rep=int(os.environ.get("FASTGPT_BENCH_REP_MS", 200)),
                                 grad_to_none=grad_to_none, return_mode="all")
    return [t / 1e3 for t in ms]


def replay(benchmark, times: list[float]) -> None:
    """Feed measured per-call times to pytest-benchmark as if it had timed them itself."""
    clock = {"t": 0.0, "i": 0}

    def tick():
        clock["t"] += times[clock["i"]]
        clock["i"] += 1

    benchmark._timer = lambda: clock["t"]
    benchmark.pedantic(tick, rounds=len(times), iterations=1, warmup_rounds=0)


def peak_memory(fn) -> tuple[int | None, int | None]:
    """(max_memory_allocated during one call, bytes allocated before it) on CUDA; (None, None) on CPU."""
    if not HAS_CUDA:
        return None, None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(), before


def run(benchmark, fn, *, impl: str, op: str, shape: str, flops: float = 0.0, bytes_moved: float = 0.0,
        tokens: int = 0, kind: str = "kernel", grad_to_none=None, cpu_rounds: int = 3, **info) -> None:
    """Time fn on this device and fill benchmark.extra_info. kind: "kernel" (do_bench) or "step" (events)."""
    if HAS_CUDA:
        if kind == "kernel":
            times = kernel_times(fn, grad_to_none=grad_to_none)
        else:
            times = cuda_event_times(fn, warmup=int(os.environ.get("FASTGPT_BENCH_WARMUP", 3)),
                                     rep=int(os.environ.get("FASTGPT_BENCH_STEPS", 10)))
        peak, before = peak_memory(fn)
        replay(benchmark, times)
        t = sorted(times)[len(times) // 2]  # median
    else:
        benchmark.pedantic(fn, rounds=cpu_rounds, iterations=1, warmup_rounds=1)
        t = benchmark.stats.stats.median
        peak, before = None, None
    ex = benchmark.extra_info
    ex.update(impl=impl, op=op, shape=shape, device=device_name(), kind=kind, median_s=t, **info)
    if flops:
        ex["flops"] = flops
        ex["tflops_per_s"] = flops / t / 1e12
    if bytes_moved:
        ex["bytes"] = bytes_moved
        ex["gb_per_s"] = bytes_moved / t / 1e9
    if tokens:
        ex["tokens"] = tokens
        ex["tokens_per_s"] = tokens / t
    pk = peaks()
    if pk:
        ex["peak_hbm_bytes_per_s"], ex["peak_bf16_flops"] = pk
        if flops:
            ex["mfu"] = flops / t / pk[1]
        if bytes_moved:
            ex["hbm_utilisation"] = bytes_moved / t / pk[0]
    if peak is not None:
        ex["peak_mem_bytes"] = peak
        ex["peak_mem_over_start_bytes"] = peak - before
    used = nvml_used_bytes()
    if used is not None:
        ex["nvml_used_bytes"] = used
