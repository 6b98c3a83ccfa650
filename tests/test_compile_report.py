"""`python -m bench.compile_report` compiles the kernels for every GPU target without a GPU.

Runs in a subprocess without TRITON_INTERPRET (this test session sets it; the report needs compiled
@triton.jit kernels). Default run: sm_80, sm_89 and sm_90a, first fitting build per group (every
memory-bound build, and per attention kernel, dtype and head dim the first tile that fits; no SASS
read, tensor cores seen in the PTX), a few minutes on 2 cores with a cold Triton cache and seconds with a warm one. `-m slow`: every build on all
seven targets (about 1,850 compiles; tens of minutes with a cold cache).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"kernel", "arch", "config", "group", "registers", "spill_bytes", "shared_bytes", "smem_limit", "fits",
        "mma_instructions", "ptx_mma", "vector_loads"}
ALL_ARCHS = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120"]
DEFAULT_ARCHS = ["sm_80", "sm_89", "sm_90a"]
SMEM_LIMIT = {"sm_75": 64, "sm_80": 163, "sm_86": 99, "sm_89": 99, "sm_90a": 227, "sm_100a": 227, "sm_120": 99}

# Kernel families training uses on every arch, and attention's (>= 8.0 only: SDPA below).
MEMORY_BOUND = {"layer_norm_fwd", "layer_norm_bwd", "layer_norm_dwdb", "gelu_fwd", "gelu_bwd", "adamw", "cross_entropy"}
ATTENTION = {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"}
# Every head dim the launcher accepts at every dtype, and the other launch shapes at bf16 D=64.
ATTENTION_GROUPS = {f"{dtype} D={d}" for dtype in ("fp16", "bf16", "fp32") for d in (16, 32, 64, 128)} | \
    {"bf16 D=64 non-causal", "bf16 D=64 T=1", "bf16 D=64 T=1000"}
# LayerNorm (x, w, y) dtypes compiled at every model width, AdamW grad dtypes.
LN_DTYPES = {"x=fp32 w=fp32 y=fp32", "x=fp32 w=fp32 y=bf16", "x=bf16 w=fp32 y=bf16", "x=bf16 w=bf16 y=bf16",
             "x=fp32 w=fp32 y=fp16", "x=fp16 w=fp32 y=fp16", "x=fp16 w=fp16 y=fp16"}
ADAMW_GRADS = {"fp32", "bf16", "fp16"}
# The SASS name of each arch's tensor-core MMA for fp16/bf16 (counted by the report).
TENSOR_CORE_ARCHS = {"sm_80", "sm_86", "sm_89", "sm_90a", "sm_100a", "sm_120"}


def _run(args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "bench.compile_report", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=3000)


def _report(tmp_path_factory, args):
    out = tmp_path_factory.mktemp("report") / "report.json"
    # Every core: the report's own default (idle cores by the 1-minute load average) sees the tests that
    # ran just before and would compile in one process on a 2-core CI machine.
    proc = _run([*args, "--jobs", str(os.cpu_count() or 1), "--json", str(out)])
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
            assert r["ptx_mma"] > 0, r  # mma.sync, wgmma or tcgen05.mma: fp16/bf16 dots on tensor cores
            assert r["mma_instructions"] > 0 or r["mma_instructions"] == -1 == r["vector_loads"], r  # or no SASS read


def _check_launch_coverage(rows, archs):
    """The builds every launch path needs are in the report and fit: LayerNorm at every preset width in every
    dtype (bf16 and fp32 also at 8192), AdamW at every grad dtype."""
    from fastgpt.config import PRESETS

    widths = {p.n_embd for p in PRESETS.values()}
    assert {128, 384, 768, 1024, 1280, 1600} <= widths
    fit = {(r["kernel"], r["arch"], r["config"]) for r in rows if r["fits"]}
    for arch in archs:
        for kernel in ("layer_norm_fwd", "layer_norm_bwd"):
            have = {(c.split(" N=")[0], int(c.split(" N=")[1].split()[0])) for k, a, c in fit
                    if k == kernel and a == arch and " N=" in c and "no-bias" not in c}
            assert {(d, n) for d in LN_DTYPES for n in widths} <= have, (kernel, arch)
            assert {(d, 8192) for d in LN_DTYPES if "fp16" not in d} <= have, (kernel, arch)
        grads = {c.split()[1] for k, a, c in fit if k == "adamw" and a == arch and " aligned" in c}
        assert grads == ADAMW_GRADS, (arch, grads)


@pytest.fixture(scope="module")
def default_report(tmp_path_factory):
    return _report(tmp_path_factory, ["--arch", ",".join(DEFAULT_ARCHS), "--first-fit"])


def test_compile_report_default_archs_fit(default_report):
    rows, stdout = default_report
    _check_training_kernels_fit(rows, DEFAULT_ARCHS)
    _check_launch_coverage(rows, DEFAULT_ARCHS)
    assert "first fit per group" in stdout
    # The quick check reads no SASS; the PTX says where the tensor cores are used: attention only.
    assert all(r["mma_instructions"] == -1 == r["vector_loads"] for r in rows)
    assert {r["kernel"] for r in rows if r["ptx_mma"] > 0} >= ATTENTION
    assert all(r["ptx_mma"] == 0 for r in rows if r["kernel"] in MEMORY_BOUND)


def test_compile_report_first_fit_starts_with_the_fixed_tile(default_report):
    """--first-fit compiles first, per arch and attention group, the tile FASTGPT_ATTENTION_CONFIGS=fixed
    launches (its table's first tile for that dtype and head dim), and that tile fits with 0 spills: the
    default check covers what runs."""
    import torch

    from kernels._launch import config_table
    from kernels.attention import tiles_for

    rows, _ = default_report
    capability = {"sm_80": (8, 0), "sm_89": (8, 9), "sm_90a": (9, 0)}
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    checked = 0
    for kernel in ("fwd", "dkdv", "dq"):
        name = "attention_" + ("fwd" if kernel == "fwd" else "bwd_" + kernel)
        for arch in DEFAULT_ARCHS:
            for group in ATTENTION_GROUPS:
                dtype, d = group.split()[0], int(group.split()[1][2:])
                t = tiles_for(kernel, config_table(capability[arch]), dtypes[dtype], d)[0]
                tile = f"BLOCK_M={t.BLOCK_M} BLOCK_N={t.BLOCK_N} w{t.num_warps} s{t.num_stages}"
                got = [r for r in rows if r["kernel"] == name and r["arch"] == arch and r["group"] == group]
                assert len(got) == 1 and got[0]["config"].endswith(tile), (name, arch, group, tile, got)
                assert got[0]["fits"] and got[0]["spill_bytes"] == 0, got[0]
                checked += 1
    assert checked == 3 * len(DEFAULT_ARCHS) * len(ATTENTION_GROUPS)


@pytest.mark.slow
def test_compile_report_all_archs_every_build(tmp_path_factory):
    """The full matrix: every registered build on every target fits (tables hold only fitting tiles)."""
    rows, stdout = _report(tmp_path_factory, [])
    _check_training_kernels_fit(rows, ALL_ARCHS)
    for r in rows:
        assert r["fits"], r
        assert 0 < r["registers"] <= 255, r
        # The AdamW fallback is scalar by design; the fp16 LayerNorm backward takes 4 elements a thread
        # (8-byte loads: more spilled on sm_80, kernels/layer_norm.py _bwd_config).
        scalar = (r["kernel"] == "adamw" and "unaligned" in r["config"]) or (
            r["kernel"] == "layer_norm_bwd" and r["config"].startswith("x=fp16"))
        if r["kernel"] in MEMORY_BOUND and not scalar:  # attention at small D loads 32-64 byte rows otherwise
            assert r["vector_loads"] > 0, r
        if r["kernel"].startswith("layer_norm"):
            assert r["mma_instructions"] == 0, r  # row kernels: no tensor-core work to find
        # The quick check's PTX count says what the SASS holds (ptxas adds no MMA and drops none)
        assert (r["ptx_mma"] > 0) == (r["mma_instructions"] > 0), r
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
