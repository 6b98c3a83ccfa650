"""What every part of the memory model shares: the systems, model sizes, vocabulary, units."""
from __future__ import annotations


import torch
import torch.utils.checkpoint


BF16 = torch.bfloat16
SYSTEMS = ("fastgpt", "fastgpt-logits", "nanogpt", "hf-eager", "hf-sdpa")
SYSTEM_HELP = {
    "fastgpt": "fastgpt, Triton kernels, fused linear cross-entropy (no logits)",
    "fastgpt-logits": "fastgpt, Triton kernels, full logits + cross-entropy (fused loss off)",
    "nanogpt": "bench/nanogpt.py: PyTorch SDPA (flash), fused AdamW",
    "hf-eager": "transformers GPT2LMHeadModel, attn_implementation='eager'",
    "hf-sdpa": "transformers GPT2LMHeadModel, attn_implementation='sdpa' (flash on CUDA)",
}
MODELS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    "tiny": dict(n_layer=4, n_head=4, n_embd=128),
}
VOCAB = 50257
CE_CHUNK_ROWS = 0  # rows per chunk of fastgpt's fused loss; 0: the kernel's own choice (see --ce-chunk)


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f} MiB"
