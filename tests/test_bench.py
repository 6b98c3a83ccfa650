"""The measuring tools in bench/: memory model, report, roofline, timing replay, nanoGPT baseline (CPU, fast)."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from bench import harness, memory, report, roofline

GPT2_PARAMS = 124_439_808


@pytest.fixture(scope="module")
def gpt2_b16():
    """Memory model of gpt2 at batch 16, T 1024 (fake tensors: a few seconds per system).

    Run with the interpreter switched off (tests/conftest.py switches it on), as `python -m bench.memory`
    runs: then only bench.memory's own switch can route the fake CPU tensors to fastgpt's kernels.
    """
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")
        return {s: memory.run_one(s, "gpt2", 16, 1024) for s in ("fastgpt", "hf-sdpa", "hf-eager")}


def test_memory_params_grads_adamw_exact(gpt2_b16):
    assert memory.gpt2_params(12, 768) == GPT2_PARAMS
    for r in gpt2_b16.values():
        assert r.n_params == GPT2_PARAMS
        assert r.params_bytes == 4 * GPT2_PARAMS  # fp32
        assert r.grads_bytes == 4 * GPT2_PARAMS  # fp32 grads, the tied matrix once
        assert r.optimizer_bytes == 8 * GPT2_PARAMS  # exp_avg + exp_avg_sq, fp32
        # parameters and optimizer state are resident at the peak; activations come on top
        assert r.peak_breakdown["Parameter"] == r.params_bytes
        assert r.peak_bytes > r.params_bytes + r.optimizer_bytes + r.activation_bytes * 0.9


def test_memory_ordering(gpt2_b16):
    fast, sdpa, eager = gpt2_b16["fastgpt"], gpt2_b16["hf-sdpa"], gpt2_b16["hf-eager"]
    assert eager.peak_bytes > sdpa.peak_bytes
    assert fast.peak_bytes <= sdpa.peak_bytes
    assert fast.peak_bytes <= 0.6 * sdpa.peak_bytes  # issue 7's target for the fused loss
    assert fast.logits_bytes == 0 and sdpa.logits_bytes >= 16 * 1024 * 50257 * 4


def test_memory_per_layer_matches_arithmetic(gpt2_b16):
    s, b, h, a = 1024, 16, 768, 12
    sbh, as2b = s * b * h, a * s * s * b
    # flash-style attention + bf16 autocast: 36 sbh + small fp32 row statistics. fastgpt's attention op
    # returns a (B, H, T, D) view of (B, T, H, D) memory, so merging heads copies nothing (+0 sbh).
    assert abs(gpt2_b16["fastgpt"].per_layer_bytes - 36 * sbh) < 0.01 * sbh * 36
    # HF eager keeps the (T, T) probabilities in fp32 and in bf16: 6 as^2b more than its sdpa variant
    extra = gpt2_b16["hf-eager"].per_layer_bytes - gpt2_b16["hf-sdpa"].per_layer_bytes
    assert abs(extra - 6 * as2b) < 0.01 * as2b


def test_memory_json_and_render(tmp_path, capsys):
    out = tmp_path / "mem.json"
    assert memory.main(["--model", "tiny", "--batch", "1", "--seq", "32", "--system", "nanogpt,fastgpt",
                        "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["system"] for r in rows] == ["nanogpt", "fastgpt"]
    for r in rows:
        for key in ("system", "model", "batch", "seq", "peak_bytes", "activation_bytes", "params_bytes"):
            assert key in r
        assert r["model"] == "tiny" and r["batch"] == 1 and r["seq"] == 32
    text = capsys.readouterr().out
    assert "Korthikanti" in text and "Assumptions" in text and "exact" in text


def test_memory_fastgpt_runs_its_custom_ops(gpt2_b16):
    """fastgpt's step went through the real fastgpt:: custom ops (fake implementations + registered
    autograd), so what is saved is what the kernels' setup_context saves."""
    from fastgpt import ops

    L, B, H, T, C, V = 12, 16, 12, 1024, 768, 50257
    fast = gpt2_b16["fastgpt"]
    assert fast.fastgpt_ops == {
        "layer_norm_fwd": 2 * L + 1, "layer_norm_bwd": 2 * L + 1, "gelu_fwd": L, "gelu_bwd": L,
        "attention_fwd": L, "attention_bwd": L, "linear_cross_entropy": 1, "adamw_step": 1,
    }
    assert gpt2_b16["hf-sdpa"].fastgpt_ops == {} and gpt2_b16["hf-eager"].fastgpt_ops == {}
    saved = [(sc, sub, dt, tuple(shape)) for sc, sub, dt, shape in fast.saved_shapes]  # one per storage
    # fastgpt::attention_fwd's logsumexp, fp32 (B, H, T); layer_norm_fwd's fp32 input and mean/rstd (B, T)
    assert ("h.0", "attn", "float32", (B, H, T)) in saved
    assert ("h.0", "ln_1", "float32", (B, T, C)) in saved
    assert sum(1 for k in saved if k[:3] == ("h.0", "ln_1", "float32") and k[3] == (B, T)) == 2
    # the fused loss saves dx (N, C) in ln_f's output dtype (bf16: LayerNorm writes the autocast dtype)
    # and dweight (V, C) in fp32, and nothing of size N x V
    assert ("head", "", "bfloat16", (B * T, C)) in saved and ("head", "", "float32", (V, C)) in saved
    assert ("head", "", "float32", (B * T, C)) not in saved
    assert not any(V in shape and B * T in shape for *_, shape in saved)
    assert not any(shape[-1:] == (V,) for *_, shape in saved)
    assert ops.use_triton.__module__ == "fastgpt.ops"  # the switch is undone after the run


def test_attention_wrapper_reaches_fake_impl_but_refuses_real_cpu(monkeypatch):
    """kernels.attention checks launchability inside the custom op, so fake tensors (the memory model,
    torch.compile tracing) reach the fake implementation, while real CPU tensors without the
    interpreter still get the explanatory error."""
    import kernels
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with FakeTensorMode():
        q = torch.empty(2, 3, 17, 64, dtype=torch.bfloat16)
        o = kernels.attention(q, q, q)
    assert o.shape == q.shape and o.transpose(1, 2).is_contiguous()  # (B, T, H, D) memory
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="cannot run"):
        kernels.attention(q, q, q)


def test_memory_flash_stand_in_matches_sdpa():
    q, k, v = (torch.randn(2, 3, 17, 8, requires_grad=True) for _ in range(3))
    o, lse = memory.flash_attention(q, k, v, True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.allclose(o, ref, atol=1e-5) and lse.shape == (2, 3, 17) and lse.dtype == torch.float32
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, (q, k, v), do)
    want = torch.autograd.grad(ref, (q, k, v), do)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5)


# ------------------------------------------------------------------------------------------------
def test_roofline_sane():
    ln = roofline.layer_norm_cost(16384, 768, "fwd")
    # the model's LayerNorm under bf16 autocast: fp32 in, bf16 out
    assert ln.bytes == pytest.approx(16384 * 768 * (4 + 2), rel=0.01) and ln.flops == 0
    assert roofline.layer_norm_cost(16384, 768, "bwd").bytes == pytest.approx(16384 * 768 * (4 + 2 + 4), rel=0.01)
    assert roofline.layer_norm_cost(16384, 768, "fwd", 2).bytes == pytest.approx(16384 * 768 * 4, rel=0.01)
    h_bw, h_fl = roofline.GPUS["H100-SXM"]
    assert ln.floor_s(h_bw, h_fl) == pytest.approx(ln.bytes / 3.35e12)
    att = roofline.attention_cost(16, 12, 1024, 64, "fwd")
    assert att.flops == 2 * 16 * 12 * 1024 * 1024 * 64  # causal: half of 4·B·H·T²·D
    both = roofline.attention_cost(16, 12, 1024, 64, "fwd+bwd")
    assert both.flops == pytest.approx(3.5 * att.flops)
    assert roofline.adamw_cost(GPT2_PARAMS).bytes == 28 * GPT2_PARAMS
    a_bw, a_fl = roofline.GPUS["A100-SXM4-80GB"]
    for c in roofline.gpt2_costs():
        assert c.bytes > 0 and 0 < c.floor_s(h_bw, h_fl) < c.floor_s(a_bw, a_fl) < 0.1
    assert roofline.gpu_peaks("NVIDIA H100 80GB HBM3") == (3.35e12, 989e12)
    assert roofline.gpu_peaks("NVIDIA A100-SXM4-40GB")[0] == 1.555e12
    assert roofline.gpu_peaks("NVIDIA H100 PCIe")[1] == 756e12
    assert roofline.gpu_peaks("some CPU") is None
    assert roofline.GPT2_PARAMS[768] == GPT2_PARAMS


def test_gpu_peaks_most_specific_name_wins():
    """GH200 is not an H200, an L40 not an L4 (nor the other way round), an A10 not an A100."""
    known = dict(roofline.KNOWN_GPUS)
    assert roofline.gpu_peaks("NVIDIA GH200 480GB") == known["GH200"] != known["H200"]
    assert roofline.gpu_peaks("NVIDIA H200") == known["H200"]
    assert roofline.gpu_peaks("NVIDIA L4") == known["L4"]
    assert roofline.gpu_peaks("NVIDIA L40") == known["L40"] != known["L4"]
    assert roofline.gpu_peaks("NVIDIA L40S") == known["L40S"]
    assert roofline.gpu_peaks("NVIDIA A10") == known["A10"]
    assert roofline.gpu_peaks("NVIDIA A100 80GB PCIe") == known["A100 80GB PCIe"]
    assert roofline.gpu_peaks("NVIDIA H100 NVL") == known["H100 NVL"]


def test_one_flop_convention_for_mfu_roofline_and_report():
    """GPT.estimate_mfu, the roofline's train-step FLOPs (which the bench report's MFU uses) and the
    report's text all come from fastgpt.model.train_flops_per_token: causal attention, 6N + 6·L·C·T."""
    from fastgpt import GPT, GPTConfig
    from fastgpt.model import FLOP_CONVENTION, train_flops_per_token

    model = GPT(GPTConfig.preset("gpt2"))
    n, n_wpe = model.num_params(), model.transformer.wpe.weight.numel()
    assert FLOP_CONVENTION == "causal"
    assert model.flops_per_token(1024) == train_flops_per_token(n - n_wpe, 12, 768, 1024)
    assert roofline.train_step_flops(n, 12, 768, 1024, 16384, vocab_params=n_wpe) == \
        16384 * model.flops_per_token(1024)
    # the attention term is the causal half of the full-attention count (12·L·C·T)
    assert train_flops_per_token(0, 12, 768, 1024) == 12 * 12 * 768 * 1024 / 2
    # forward + backward of the causal attention kernel's scores and PV, without the backward's
    # recomputation of QK^T (2 of its 14 units): the same 6·L·C·T, from the roofline's attention costs
    att = roofline.attention_cost(16, 12, 1024, 64, "fwd+bwd")
    assert att.flops * 12 * 6 / 7 == pytest.approx(train_flops_per_token(0, 12, 768, 1024) * 16 * 1024)  # 12 layers
    rep = report.render_report({"benchmarks": [_bench("train", "train-step gpt2", "fastgpt", 1.0)]})
    assert "train_flops_per_token (causal attention" in rep


def _bench(name, group, impl, median, **extra):
    info = dict(impl=impl, median_s=median, **extra)
    return {"name": name, "group": group, "params": {"impl": impl}, "extra_info": info,
            "stats": {"median": median, "mean": median, "min": median}}


def test_report_renders_synthetic_results(tmp_path):
    gpu = "NVIDIA H100 80GB HBM3"
    ln = roofline.layer_norm_cost(16384, 768, "fwd")
    data = {
        "machine_info": {"device": gpu, "torch": "2.x"},
        "datetime": "2026-01-01",
        "benchmarks": [
            _bench("test_layer_norm[fastgpt]", "layer_norm-fwd 16384x768", "fastgpt", 20e-6, op=ln.kernel,
                   shape=ln.shape, kind="kernel", device=gpu, gb_per_s=2500.0),
            _bench("test_layer_norm[torch]", "layer_norm-fwd 16384x768", "torch", 40e-6, kind="kernel", device=gpu),
            _bench("test_train_step[fastgpt]", "train-step gpt2 b16 T1024", "fastgpt", 0.25, tokens_per_s=65536.0,
                   mfu=0.5, peak_mem_bytes=8 * 2**30, kind="step", device=gpu),
            _bench("test_train_step[hf-sdpa]", "train-step gpt2 b16 T1024", "hf-sdpa", 0.5, tokens_per_s=32768.0,
                   kind="step", device=gpu),
            _bench("test_gelu[torch]", "gelu-fwd 256x1024", "torch", 1e-3, kind="kernel", device="CPU"),
        ],
    }
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "rep"
    assert report.main([str(path), "--out", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| fastgpt | 20.0 us |" in text and "| torch | 40.0 us |" in text and "2.00x" in text
    assert "65,536" in text and "50.0%" in text and "8.00 GiB" in text
    assert "no fastgpt result in this group" in text  # the CPU-only gelu group
    floor_us = ln.bytes / 3.35e12 * 1e6
    assert f"{floor_us:.1f}" in text and f"{floor_us / 20:.0%} ({gpu})" in text  # measured fraction of floor
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_replay_feeds_measured_times(benchmark):
    times = [3e-3, 1e-3, 2e-3]
    harness.replay(benchmark, times)
    assert benchmark.stats.stats.min == pytest.approx(1e-3)
    assert benchmark.stats.stats.median == pytest.approx(2e-3)
    assert benchmark.stats.stats.rounds == 3


def test_nanogpt_baseline():
    from bench.nanogpt import make_model

    assert sum(p.numel() for p in make_model("gpt2").parameters()) == GPT2_PARAMS
    torch.manual_seed(0)
    m = make_model(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=16)
    idx = torch.randint(0, 100, (2, 16))
    logits, loss = m(idx, idx)
    assert logits.shape == (2, 16, 100) and abs(loss.item() - math.log(100)) < 0.5
    opt = m.configure_optimizer(lr=1e-2)
    loss.backward()
    opt.step()
    assert m(idx, idx)[1].item() < loss.item()


@pytest.mark.gpu
@pytest.mark.parametrize("system,tol", [("nanogpt", 0.10), ("hf-sdpa", 0.10), ("hf-eager", 0.10), ("fastgpt", 0.15)])
def test_memory_model_matches_cuda(system, tol):
    """On a GPU: the fake-tensor model's peak is within tol of torch.cuda.max_memory_allocated."""
    model = memory.run_one(system, "gpt2", 4, 1024)
    measured = memory.measure_cuda(system, "gpt2", 4, 1024)
    assert abs(model.peak_bytes - measured) <= tol * measured, (model.peak_bytes, measured)
