"""pytest-benchmark setup for bench/ (separate from tests/: the Triton interpreter is NOT switched on here,
because interpreted kernel timings mean nothing; Triton benchmarks need CUDA and skip without it).

    pytest bench/ --benchmark-json out.json      # CPU: PyTorch paths at CPU-sized shapes (~2-3 min)
    bash bench/run_gpu.sh                        # GPU: the whole suite at GPT-2 shapes + the report
"""
import os

import pytest

from bench.harness import HAS_CUDA, device_name, peaks


def pytest_configure(config):
    # One compiled wrapper per shape: keep dynamo from falling back to eager after 8 recompiles of the
    # same function, which would silently report eager numbers as torch.compile's.
    try:
        import torch._dynamo

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    except Exception:
        pass


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["device"] = device_name()
    pk = peaks()
    if pk:
        machine_info["peak_hbm_bytes_per_s"], machine_info["peak_bf16_flops"] = pk
    try:
        import torch

        machine_info["torch"] = torch.__version__
        machine_info["cuda"] = torch.version.cuda
    except Exception:
        pass


def pytest_report_header(config):
    interp = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return [f"fastgpt bench: device {device_name()}"
            + ("" if HAS_CUDA else " (Triton benchmarks skip; PyTorch paths at CPU sizes)")
            + (" WARNING: TRITON_INTERPRET is set; Triton benchmarks skip" if interp else "")]


@pytest.fixture
def triton_ready():
    """Skip unless Triton kernels can really run (CUDA, not the interpreter)."""
    if not HAS_CUDA:
        pytest.skip("Triton kernels need a CUDA GPU; the interpreter's timings would be meaningless")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET=1 is set: interpreted kernels are not benchmarked")
    import kernels

    return kernels
