"""Autoregressive sampling, with a KV cache.

With the cache the prompt runs once (prefill) and each new token costs one position per layer. When
the sequence outgrows block_size the window slides: the cache is rebuilt from the last block_size
tokens, exactly what the cache-free path feeds the model, so both give the same tokens.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from .config import GPTConfig


class PromptCroppedWarning(UserWarning):
    """A prompt longer than the model's block: only its last block_size tokens condition the sample."""


class KVCache:
    """Keys and values of every layer for incremental decoding: (B, nh, T_max, hs) per layer."""

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, config.n_head, max_len, config.head_size)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.pos = 0  # tokens already cached
        self.max_len = max_len

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        T = q.shape[2]
        start = self.pos
        self.k[layer][:, :, start:start + T] = k
        self.v[layer][:, :, start:start + T] = v
        keys = self.k[layer][:, :, :start + T]  # (B, nh, start+T, hs)
        values = self.v[layer][:, :, :start + T]
        # New query i (absolute position start+i) may see keys 0..start+i.
        mask = torch.ones(T, start + T, dtype=torch.bool, device=q.device).tril(diagonal=start)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def advance(self, n: int) -> None:
        self.pos += n


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """logits (B, V) -> next ids (B, 1). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    try:
        return torch.multinomial(probs, 1, generator=generator)
    except RuntimeError:  # checked only on failure: no host sync per token on the normal path
        if torch.isfinite(probs).all():
            raise
        raise ValueError("the model's next-token probabilities are not finite (its logits are NaN or overflowed): "
                         "its weights are broken, e.g. by a diverging run") from None


@torch.no_grad()
def sample(model, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """idx (B, T) -> (B, T + max_new_tokens): each new token drawn from the model's next-token distribution."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be (B, T) with T >= 1, got shape {tuple(idx.shape)}")
    cfg = model.config
    block = cfg.block_size
    if idx.shape[1] > block:
        warnings.warn(f"prompt of {idx.shape[1]} tokens is longer than block_size {block}: the model sees only "
                      f"its last {block} tokens", PromptCroppedWarning, stacklevel=3)
    out = idx
    cache: KVCache | None = None
    dtype = next(model.parameters()).dtype
    # The prompt's ids are checked once: every later id is sampled from the vocabulary, and the model's
    # own check would cost a GPU->CPU sync per generated token.
    model._check_input(idx[:, -block:])  # what the model is fed
    with model.ids_checked():
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = model(out[:, -block:])
            elif cache is None or cache.pos >= block:
                ctx = out[:, -block:]
                # (Re)fill from the last block_size tokens; the cache spans the whole position table.
                cache = KVCache(cfg, out.shape[0], block, out.device, dtype)
                logits, _ = model(ctx, kv_cache=cache)
            else:
                logits, _ = model(out[:, -1:], kv_cache=cache)
            nxt = _pick(logits[:, -1, :], temperature, top_k, generator)
            out = torch.cat([out, nxt.to(out.dtype)], dim=1)
    return out


def sample_text(model, prompt: str = "\n", max_new_tokens: int = 40, temperature: float = 0.8, top_k: int = 40,
                seed: int = 42) -> str:
    """The decoded continuation of `prompt` (prompt not included), reproducible by seed: what a training run
    prints of its model. Its own generator draws the tokens, so no other RNG stream (and no resume) moves."""
    from .tokenizer import EOT_TOKEN, get_encoding

    enc = get_encoding()
    device = next(model.parameters()).device
    ids = enc.encode_ordinary(prompt) or [EOT_TOKEN]
    idx = torch.tensor([ids[-model.config.block_size:]], device=device)  # (1, T)
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        # In the weights' own dtype (no autocast): the KV cache holds that dtype.
        out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    finally:
        model.train(was_training)
    # A vocabulary padded past GPT-2's (e.g. 50304) may yield ids no tokenizer knows: leave them out.
    return enc.decode([t for t in out[0, idx.shape[1]:].tolist() if t < enc.n_vocab])
