"""`python -m bench.compile_report` compiles every registered kernel for sm_80 and sm_90a without a GPU.

Runs in a subprocess without TRITON_INTERPRET (this test session sets it; the report needs
compiled @triton.jit kernels). A cold Triton cache costs ~1 minute on 2 cores, a warm one seconds.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"kernel", "arch", "config", "registers", "spill_bytes", "shared_bytes", "mma_instructions", "vector_loads"}


def _run(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "bench.compile_report", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


FAMILIES = {
    "layer_norm_fwd", "layer_norm_bwd", "layer_norm_dwdb", "gelu_fwd", "gelu_bwd", "adamw", "cross_entropy",
    "attention_fwd", "attention_bwd_preprocess", "attention_bwd_dkdv", "attention_bwd_dq",
}
TENSOR_CORE = {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"}
SMEM_LIMIT = {"sm_80": 164 * 1024, "sm_90a": 227 * 1024}  # A100, H100 per-block maximum


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """Every build of every kernel, compiled once for this module (CI fails here on a spill)."""
    out = tmp_path_factory.mktemp("report") / "report.json"
    proc = _run(["--json", str(out)], out.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_compile_report_every_kernel_both_archs(full_report):
    rows, _ = full_report
    assert rows and all(set(r) == KEYS for r in rows)
    assert {r["kernel"] for r in rows} == FAMILIES
    for r in rows:
        assert r["spill_bytes"] == 0, r
        assert 0 < r["registers"] <= 255, r
        assert r["shared_bytes"] <= SMEM_LIMIT[r["arch"]], r
        if r["kernel"] in TENSOR_CORE:  # HMMA on sm_80, HGMMA (wgmma) on sm_90a
            assert r["mma_instructions"] > 0, r
        if not (r["kernel"] == "adamw" and "unaligned" in r["config"]):  # that fallback is scalar by design
            assert r["vector_loads"] > 0, r
    attn = [r for r in rows if r["kernel"] == "attention_fwd"]
    assert {"fp16", "bf16"} <= {d for r in attn for d in ("fp16", "bf16") if d in r["config"]}


@pytest.mark.slow
def test_compile_report_layer_norm(full_report):
    rows, stdout = full_report
    rows = [r for r in rows if r["kernel"].startswith("layer_norm")]
    assert {r["kernel"] for r in rows} == {"layer_norm_fwd", "layer_norm_bwd", "layer_norm_dwdb"}
    for kernel in {r["kernel"] for r in rows}:
        for config in {r["config"] for r in rows if r["kernel"] == kernel}:
            archs = sorted(r["arch"] for r in rows if r["kernel"] == kernel and r["config"] == config)
            assert archs == ["sm_80", "sm_90a"], (kernel, config, archs)
    widths = {int(c.split("N=")[1].split()[0]) for c in (r["config"] for r in rows) if " N=" in c}
    assert {768, 1024, 1280, 1600} <= widths
    for r in rows:
        assert r["spill_bytes"] == 0, r
        assert r["registers"] > 0 and r["vector_loads"] > 0, r
        assert r["mma_instructions"] == 0, r  # row kernels: no tensor-core work to find
    # The table goes to stdout, one row per build.
    assert stdout.count("layer_norm_") >= len(rows)


def test_compile_report_unknown_kernel_is_a_usage_error(tmp_path):
    proc = _run(["--kernel", "no_such_kernel"], tmp_path)
    assert proc.returncode == 2
    assert "no registered kernel" in proc.stderr
