"""Model benchmarks: one full training step (zero_grad, forward + loss, backward, AdamW step).

Systems: fastgpt (Triton kernels, fused linear cross-entropy), fastgpt-logits (the same with full
logits and the plain cross-entropy), fastgpt-compile, the nanoGPT-recipe
baseline of bench/nanogpt.py (eager and compiled), transformers GPT2LMHeadModel with eager and sdpa
attention. Every system has the same architecture, vocabulary (50257), dropout 0, and the same batch.

GPU: gpt2 (124M) at batch 16 x T 1024 under bf16 autocast (FASTGPT_BENCH_MODEL / _BATCH / _SEQ change
it), fused AdamW for the PyTorch systems, kernels.FusedAdamW for fastgpt.
CPU: a 2-layer, width-128 model at batch 4 x T 128 in fp32; fastgpt runs its PyTorch path there
(kernels="torch"), compile variants skip unless FASTGPT_BENCH_COMPILE=1.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from bench import harness, roofline
from bench.harness import HAS_CUDA

DEV = harness.DEVICE
VOCAB = 50257
COMPILE = os.environ.get("FASTGPT_BENCH_COMPILE", "1" if HAS_CUDA else "0") == "1"

if HAS_CUDA:
    MODEL = os.environ.get("FASTGPT_BENCH_MODEL", "gpt2")
    SIZE = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
            "gpt2-xl": (48, 25, 1600)}[MODEL]
    BATCH = int(os.environ.get("FASTGPT_BENCH_BATCH", 16))
    SEQ = int(os.environ.get("FASTGPT_BENCH_SEQ", 1024))
else:
    MODEL, SIZE, BATCH, SEQ = "cpu-2L-128", (2, 4, 128), 4, 128
N_LAYER, N_HEAD, N_EMBD = SIZE
SYSTEMS = ["fastgpt", "fastgpt-logits", "fastgpt-compile", "nanogpt", "nanogpt-compile", "hf-eager", "hf-sdpa"]


def build(system: str):
    """(model, loss_fn(idx, targets), optimizer) for one system."""
    torch.manual_seed(0)
    if system.endswith("-compile") and not COMPILE:
        pytest.skip("torch.compile runs on CUDA here (FASTGPT_BENCH_COMPILE=1 compiles on the CPU)")
    if system.startswith("fastgpt"):
        from fastgpt.config import GPTConfig
        from fastgpt.model import GPT

        kernels = "auto" if HAS_CUDA else "torch"
        model = GPT(GPTConfig(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, vocab_size=VOCAB,
                              block_size=max(SEQ, 1024), kernels=kernels)).to(DEV)
        opt = model.configure_optimizers(0.1, 6e-4, device_type=DEV)
        core = torch.compile(model) if system.endswith("-compile") else model
        full_logits = system == "fastgpt-logits"  # fused linear cross-entropy off: before/after
        return model, (lambda idx, tgt: core(idx, tgt, return_logits=full_logits)[1]), opt
    if system.startswith("nanogpt"):
        from bench.nanogpt import NanoConfig, NanoGPT

        model = NanoGPT(NanoConfig(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, vocab_size=VOCAB,
                                   block_size=max(SEQ, 1024))).to(DEV)
        opt = model.configure_optimizer(device_type=DEV)
        core = torch.compile(model) if system.endswith("-compile") else model
        return model, (lambda idx, tgt: core(idx, tgt)[1]), opt
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_positions=max(SEQ, 1024), n_embd=N_EMBD, n_layer=N_LAYER,
                     n_head=N_HEAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    cfg._attn_implementation = system[3:]
    model = GPT2LMHeadModel(cfg).to(DEV).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), **({"fused": True} if HAS_CUDA else {}))
    # HF shifts the labels itself: pass the inputs as labels (T-1 targets per row).
    return model, (lambda idx, tgt: model(input_ids=idx, labels=idx).loss), opt


@pytest.mark.parametrize("system", SYSTEMS)
def test_train_step(benchmark, system):
    model, loss_fn, opt = build(system)
    idx = torch.randint(0, VOCAB, (BATCH, SEQ), device=DEV)
    tgt = torch.randint(0, VOCAB, (BATCH, SEQ), device=DEV)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if HAS_CUDA else contextlib.nullcontext()

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn(idx, tgt)
        loss.backward()
        opt.step()

    step()  # creates the optimizer state (and compiles)
    tokens = BATCH * SEQ
    n_params = sum(p.numel() for p in model.parameters())
    n_wpe = max(SEQ, 1024) * N_EMBD
    flops = roofline.train_step_flops(n_params, N_LAYER, N_EMBD, SEQ, tokens, vocab_params=n_wpe)
    benchmark.group = f"train-step {MODEL} b{BATCH} T{SEQ}"
    harness.run(benchmark, step, impl=system, op="train-step", shape=f"{MODEL} b{BATCH} T{SEQ}", flops=flops,
                tokens=tokens, kind="step", cpu_rounds=3, n_params=n_params, model=MODEL, batch=BATCH, seq=SEQ,
                dtype="bf16-autocast" if HAS_CUDA else "fp32")
    del model, opt
    if HAS_CUDA:
        torch.cuda.empty_cache()
