"""Per-GPU choices without a GPU: compute capability -> attention config table, training dtype and
attention route (kernels._launch.arch_plan), the tables themselves, and the dispatch of `ops.attention`
when a GPU's route is SDPA. Whether each table's tiles fit their arch is checked by compiling them
(tests/test_compile_report.py)."""
import json
import sys

import pytest
import torch
import triton

import kernels
from kernels import _launch

attn_mod = sys.modules["kernels.attention"]  # `kernels.attention` is the function

# (capability) -> (table, dtype, attention route): the rule docs/gpus.md's table states.
PLANS = {
    (7, 5): (None, "fp16", "sdpa"),  # T4
    (8, 0): ("sm80", "bf16", "triton"),  # A100
    (8, 6): ("sm86", "bf16", "triton"),  # RTX 3090
    (8, 9): ("sm89", "bf16", "triton"),  # RTX 4090, L4
    (9, 0): ("sm90", "bf16", "triton"),  # H100
    (10, 0): ("sm100", "bf16", "triton"),  # B200
    (12, 0): ("sm120", "bf16", "triton"),  # RTX 5090
}


@pytest.mark.parametrize("capability", list(PLANS), ids=lambda c: f"{c[0]}.{c[1]}")
def test_arch_plan(capability):
    plan = kernels.arch_plan(capability)
    assert (plan.table, plan.dtype, plan.attention) == PLANS[capability]
    table, dtype, route, reason = plan
    assert f"{capability[0]}.{capability[1]}" in reason and "\n" not in reason
    if route == "sdpa":
        assert "SDPA" in reason and "fp16" in reason


def test_consumer_blackwell_is_not_sent_to_datacenter_tables():
    """sm_120 has mma.sync and 99 KB per block: its table must fit 99 KB, unlike Hopper's or B200's."""
    assert kernels.arch_plan((12, 0)).table == "sm120" and kernels.arch_plan((12, 1)).table == "sm120"
    assert _launch.table_arch("sm120").smem_per_block == 99 * 1024
    for table in ("sm90", "sm100"):
        assert _launch.table_arch(table).smem_per_block == 227 * 1024
    assert kernels.arch_plan((8, 7)).table == "sm80"  # Orin: 163 KB like A100


def test_every_table_has_a_tile_for_every_kernel_dtype_and_head_dim():
    assert set(attn_mod.TABLES) == set(attn_mod.FP32_TABLES) == {p[0] for p in PLANS.values() if p[0]}
    for table in attn_mod.TABLES:
        for kernel in attn_mod.KERNELS:
            for dtype in (torch.float16, torch.bfloat16, torch.float32):
                for d in attn_mod.HEAD_DIMS:
                    tiles = attn_mod.tiles_for(kernel, table, dtype, d)
                    assert tiles, (table, kernel, dtype, d)
                    for t in tiles:  # the loops' diagonal handling needs one tile size to divide the other
                        big, small = (t.BLOCK_N, t.BLOCK_M) if kernel == "dkdv" else (t.BLOCK_M, t.BLOCK_N)
                        assert big % small == 0, (table, kernel, t)


@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_autotune_configs_survive_the_disk_cache_rebuild(kernel):
    """TRITON_CACHE_AUTOTUNING=1 stores config.__dict__ and rebuilds with triton.Config(**d)."""
    configs = attn_mod.autotune_configs(kernel)
    assert len(configs) >= 4
    for c in configs:
        again = triton.Config(**json.loads(json.dumps(c.__dict__)))
        assert attn_mod._config_key(again) == attn_mod._config_key(c)
    # Every table's tiles are among the autotuner's configs, so the pruner can keep each of them.
    keys = {attn_mod._config_key(c) for c in configs}
    for tables in (attn_mod.TABLES, attn_mod.FP32_TABLES):
        assert all(t.key in keys for table in tables.values() for t in table[kernel])


def test_device_plan_names_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    _launch._device_plan.cache_clear()
    try:
        plan = kernels.device_plan(0)
        assert plan.attention == "sdpa" and plan.dtype == "fp16"
        assert plan.reason.startswith("Tesla T4: compute capability 7.5 (sm_75)")
        assert kernels.attention_route(torch.device("cuda", 0)) == "sdpa"
        assert kernels.attention_route("cpu") == "triton"  # the interpreter
    finally:
        _launch._device_plan.cache_clear()


def test_ops_routes_attention_to_sdpa_where_the_gpu_says_so(monkeypatch):
    """kernels="auto": a GPU whose plan is SDPA (cc < 8.0) gets SDPA; layer_norm etc. still use Triton."""
    from fastgpt import ops

    if not kernels.interpreting():
        pytest.skip("CPU routing test (interpreter)")
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    monkeypatch.setattr(kernels, "attention_route", lambda device: "sdpa")
    before = kernels.launches("attention_fwd")
    out = ops.attention(q, k, v, mode="auto")
    assert kernels.launches("attention_fwd") == before
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True))
    ops.attention(q, k, v, mode="triton")  # "triton" does not route around: the kernel runs (or raises on a GPU)
    assert kernels.launches("attention_fwd") == before + 1


def test_startup_attention_line_and_triton_refusal_follow_the_plan():
    """The trainer's startup line names the attention route and its reason; --kernels triton on a GPU
    whose plan sends attention to SDPA is refused before training, naming the capability."""
    from fastgpt.train import TrainError, attention_line

    t4, h100 = kernels.arch_plan((7, 5)), kernels.arch_plan((9, 0))
    assert attention_line("auto", h100) == f"attention: Triton ({h100.reason})"
    assert attention_line("triton", h100).startswith("attention: Triton")
    assert attention_line("auto", t4) == f"attention: PyTorch SDPA ({t4.reason})"
    with pytest.raises(TrainError, match=r"--kernels triton: .*7\.5.*--kernels auto"):
        attention_line("triton", t4)


def test_attention_plan_is_none_off_cuda():
    from fastgpt.ops import attention_plan

    assert attention_plan("cpu") is None
