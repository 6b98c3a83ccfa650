"""fastgpt against HuggingFace transformers: same weights, same prompt, compare logits and greedy text.

Both models load the same files (a hub name like "gpt2", or a local directory written by
`save_pretrained`), each through its own loader, so the check covers fastgpt's weight import as well
as its forward pass. Runs in fp32 with TF32 off so the only differences are summation order.
"""
from __future__ import annotations

import torch


def compare(name_or_dir: str, prompt: str = "Hello world", max_new_tokens: int = 20, device="cpu",
            kernels: str = "auto") -> dict:
    from .hf import _resolve

    # Resolve (and fail on an unreachable hub) before the seconds-long transformers import.
    path = _resolve(name_or_dir)

    from transformers import GPT2LMHeadModel

    from .model import GPT
    from .tokenizer import get_encoding

    ours = GPT.from_pretrained(str(path), kernels=kernels).to(device).eval()
    theirs = GPT2LMHeadModel.from_pretrained(str(path)).to(device).eval()
    enc = get_encoding()
    ids = enc.encode_ordinary(prompt)
    if not ids:
        raise ValueError("the prompt is empty")
    if len(ids) + max_new_tokens > ours.config.block_size:
        raise ValueError(f"prompt ({len(ids)} tokens) + {max_new_tokens} new tokens exceeds the block size "
                         f"{ours.config.block_size}")
    idx = torch.tensor([ids], device=device)
    old_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            a, _ = ours(idx)
            b = theirs(idx).logits
            diff = (a.float() - b.float()).abs().max().item()
            ours_out = ours.generate(idx, max_new_tokens, temperature=0.0)
            # HF's greedy loop, written out so no generation config can change it.
            seq = idx
            for _ in range(max_new_tokens):
                nxt = theirs(seq).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old_tf32
    return {
        "max_logit_diff": diff,
        "fastgpt": enc.decode(ours_out[0, len(ids):].tolist()),
        "transformers": enc.decode(seq[0, len(ids):].tolist()),
        "fastgpt_ids": ours_out[0, len(ids):].tolist(),
        "transformers_ids": seq[0, len(ids):].tolist(),
    }


def default_tolerance(device, kernels: str) -> float:
    """1e-3 for fp32 PyTorch on both sides; 2e-2 when fastgpt runs Triton kernels, whose fp32 matmuls
    (tl.dot) may use TF32 inputs (10-bit mantissa)."""
    from .ops import backend_name

    return 2e-2 if backend_name(kernels, device) == "triton" else 1e-3


def run(name_or_dir: str, prompt: str, max_new_tokens: int = 20, tol: float | None = None, device="cpu",
        kernels: str = "auto") -> int:
    """Print the comparison; 0 within tolerance, 1 beyond it."""
    if tol is None:
        tol = default_tolerance(device, kernels)
    r = compare(name_or_dir, prompt, max_new_tokens, device, kernels)
    same = r["fastgpt_ids"] == r["transformers_ids"]
    print(f"model: {name_or_dir} | prompt: {prompt!r}")
    print(f"max |logit difference|: {r['max_logit_diff']:.3e} (tolerance {tol:g})")
    print(f"fastgpt greedy:      {prompt + r['fastgpt']!r}")
    print(f"transformers greedy: {prompt + r['transformers']!r}")
    print(f"greedy continuations {'match' if same else 'DIFFER'}")
    if r["max_logit_diff"] > tol:
        print(f"FAIL: logits differ by {r['max_logit_diff']:.3e} > {tol:g}")
        return 1
    print("OK")
    return 0
