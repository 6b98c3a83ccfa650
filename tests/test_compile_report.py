"""`python -m bench.compile_report` compiles the kernels for every GPU target without a GPU.

Runs in a subprocess without TRITON_INTERPRET (this test session sets it; the report needs compiled
@triton.jit kernels). Default run: sm_80, sm_89 and sm_90a, first fitting build per group (every
memory-bound build, and per attention kernel, dtype and head dim the first tile that fits), a few
minutes on 2 cores with a cold Triton cache and seconds with a warm one. `-m slow`: every build on all
seven targets (about 600 compiles, tens of minutes cold).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"kernel", "arch", "config", "group", "registers", "spill_bytes", "shared_bytes", "smem_limit", "fits",
        "mma_instructions", "vector_loads"}
ALL_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120"]
DEFAULT_ARCHS = ["sm_80", "sm_89", "sm_90a"]
SMEM_LIMIT = {"sm_75": 64, "sm_80": 163, "sm_86": 99, "sm_89": 99, "sm_90a": 227, "sm_100a": 227, "sm_120": 99}

# Kernel families training uses on every arch, and attention's (>= 8.0 only: SDPA below).
MEMORY_BOUND = {"layer_norm_fwd", "layer_norm_bwd", "layer_norm_dwdb", "gelu_fwd", "gelu_bwd", "adamw", "cross_entropy"}
ATTENTION = {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"}
ATTENTION_GROUPS = {f"{dtype} D={d}" for dtype in ("fp16", "bf16", "fp32") for d in (64, 128)}
# The SASS name of each arch's tensor-core MMA for fp16/bf16 (counted by the report).
TENSOR_CORE_ARCHS = {"sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120"}


def _run(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "bench.compile_report", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3000)


def _report(tmp_path_factory, args):
    out = tmp_path_factory.mktemp("report") / "report.json"
    proc = _run([*args, "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def _check_training_kernels_fit(rows, archs):
    """Every kernel family training uses has, on every arch, a build that fits (per attention group)."""
    assert rows and all(set(r) == KEYS for r in rows)
    assert {r["arch"] for r in rows} == set(archs)
    for r in rows:
        assert r["smem_limit"] == SMEM_LIMIT[r["arch"]] * 1024, r
        assert r["fits"] == (r["spill_bytes"] == 0 and 0 <= r["shared_bytes"] <= r["smem_limit"]), r
    fitting = {(r["kernel"], r["arch"], r["group"]) for r in rows if r["fits"]}
    for arch in archs:
        for kernel in MEMORY_BOUND:
            assert any(k == kernel and a == arch for k, a, _ in fitting), (kernel, arch)
        attention = {(k, g) for k, a, g in fitting if a == arch and k in ATTENTION}
        if arch == "sm_75":  # attention routes to SDPA there: nothing registered
            assert not attention and not any(r["arch"] == arch and r["kernel"].startswith("attention") for r in rows)
            continue
        for kernel in ATTENTION:
            for group in ATTENTION_GROUPS:
                assert (kernel, group) in attention, (kernel, arch, group)
    for r in rows:
        if r["kernel"] in ATTENTION and r["arch"] in TENSOR_CORE_ARCHS and not r["config"].startswith("fp32"):
            assert r["mma_instructions"] > 0, r  # HMMA, HGMMA or UTCHMMA: fp16/bf16 dots on tensor cores


@pytest.fixture(scope="module")
def default_report(tmp_path_factory):
    return _report(tmp_path_factory, ["--arch", ",".join(DEFAULT_ARCHS), "--first-fit"])


def test_compile_report_default_archs_fit(default_report):
    rows, stdout = default_report
    _check_training_kernels_fit(rows, DEFAULT_ARCHS)
    assert "first fit per group" in stdout


@pytest.mark.slow
def test_compile_report_all_archs_every_build(tmp_path_factory):
    """The full matrix: every registered build on every target fits (tables hold only fitting tiles)."""
    rows, stdout = _report(tmp_path_factory, [])
    _check_training_kernels_fit(rows, ALL_ARCHS)
    for r in rows:
        assert r["fits"], r
        assert 0 < r["registers"] <= 255, r
        if not (r["kernel"] == "adamw" and "unaligned" in r["config"]):  # that fallback is scalar by design
            assert r["vector_loads"] > 0, r
        if r["kernel"].startswith("layer_norm"):
            assert r["mma_instructions"] == 0, r  # row kernels: no tensor-core work to find
    # Memory-bound builds are compiled for every arch, attention's for the archs whose table holds them.
    for kernel in MEMORY_BOUND:
        for config in {r["config"] for r in rows if r["kernel"] == kernel}:
            archs = sorted(r["arch"] for r in rows if r["kernel"] == kernel and r["config"] == config)
            assert archs == sorted(ALL_ARCHS), (kernel, config, archs)
    widths = {int(c.split("N=")[1].split()[0]) for c in (r["config"] for r in rows if r["kernel"] == "layer_norm_fwd")
              if " N=" in c}
    assert {768, 1024, 1280, 1600} <= widths
    assert stdout.count("layer_norm_") >= len([r for r in rows if r["kernel"].startswith("layer_norm")])


def test_compile_report_usage_errors():
    proc = _run(["--kernel", "no_such_kernel"])
    assert proc.returncode == 2 and "no registered kernel" in proc.stderr
    proc = _run(["--arch", "sm_80,sm_70"])
    assert proc.returncode == 2 and "unknown --arch sm_70" in proc.stderr
