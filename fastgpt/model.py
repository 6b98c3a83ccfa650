"""GPT-2, in the order data flows through it.

Parameter names follow nanoGPT and HuggingFace's GPT2LMHeadModel (`transformer.h.N.attn.c_attn`, ...)
so importing HF weights is a name-for-name copy (HF's Conv1D stores weights transposed: hf.py handles
that). Every non-matmul op goes through `fastgpt.ops`, which picks the Triton kernel or the PyTorch
reference; this file never imports triton.
"""
from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from . import ops
from .config import GPTConfig

if TYPE_CHECKING:  # the cache lives with generation; the model only calls its attend/advance
    from .generate import KVCache

LN_EPS = 1e-5  # GPT-2's layer_norm_epsilon

FLOP_CONVENTION = "causal"  # attention counted as the causal kernel computes it (see train_flops_per_token)


def train_flops_per_token(n_params: int, n_layer: int, n_embd: int, T: int) -> float:
    """Model FLOPs of one training token (forward + backward), the one convention fastgpt uses for MFU
    (GPT.estimate_mfu), the roofline and the bench report: CAUSAL attention.

        6 * N          the matmuls with the weights (N = parameters without wpe; the tied wte counts once,
                       as the lm_head matmul), 2 FLOPs a multiply-add, backward twice the forward
      + 6 * L * C * T  attention scores QK^T and PV: 4 * C * T FLOPs a token a layer forward if every key
                       were visited; the causal mask halves that (the kernel skips the tiles above the
                       diagonal), and forward + backward is 3x the forward: 3 * (4 * C * T) / 2.

    nanoGPT and PaLM count full attention (12 * L * C * T): for the same speed this convention gives an
    MFU 6.6 % lower than theirs at GPT-2 small, T = 1024. Recomputation in the backward (the flash
    kernel recomputes QK^T) is hardware work, not model FLOPs, and is not counted.
    """
    return 6 * n_params + 6 * n_layer * n_embd * T


class LayerNorm(nn.Module):
    def __init__(self, ndim: int, bias: bool, config: GPTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, LN_EPS, self.config.kernels)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.config = config

    def forward(self, x: torch.Tensor, kv_cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.c_attn(x)  # (B, T, 3C)
        # Views, no copies: the attention kernel takes any strides with a unit last-dim stride.
        q, k, v = qkv.view(B, T, 3, self.n_head, C // self.n_head).unbind(2)  # 3 x (B, T, nh, hs)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is None:
            y = ops.attention(q, k, v, self.config.kernels)
        else:
            y = kv_cache.attend(layer, q, k, v)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.dropout = nn.Dropout(config.dropout)
        self.config = config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(ops.gelu(self.c_fc(x), self.config.kernels)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: "KVCache | None" = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias, config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # Range-check token ids each forward. The check reads them on the host, a GPU->CPU sync per forward:
        # the trainer turns it off (its loaders checked every shard), generation after the prompt.
        self.check_ids = True
        # True (train.py --activation_checkpointing): training keeps only each block's input and recomputes
        # the block's inside during the backward; same losses, about one more forward of compute.
        self.activation_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std *= (2 * self.config.n_layer) ** -0.5  # residual stream grows with depth
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    # ---------------------------------------------------------------------------------------
    def _check_input(self, idx: torch.Tensor) -> None:
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T) token ids, got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise ValueError(f"idx must hold integer token ids, got dtype {idx.dtype}")
        # The range check costs a GPU->CPU sync per forward: training skips it on CUDA, where the
        # loader has already checked every shard's ids (fastgpt.data); inference keeps it.
        if (torch.compiler.is_compiling() or idx.numel() == 0 or not self.check_ids
                or (idx.is_cuda and torch.is_grad_enabled())):
            return
        lo, hi = torch.stack(torch.aminmax(idx)).tolist()  # one read for both ends
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool = True,
                kv_cache: KVCache | None = None):
        """idx (B, T) -> (logits (B, T, vocab_size) or None, loss or None).

        With targets and `return_logits=False` the loss comes from the fused linear cross-entropy and
        the full logits are never materialised (training). Target -1 is ignored.
        """
        self._check_input(idx)
        B, T = idx.shape
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"position {start + T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        wte = self.transformer.wte.weight
        if self.lm_head.weight is wte:  # tied (always, unless a caller untied them): one gradient buffer
            tok_emb, head_weight = ops.tied_embedding(idx, wte, self.config.kernels)  # (B, T, C), (V, C)
        else:
            tok_emb, head_weight = self.transformer.wte(idx), self.lm_head.weight
        x = self.transformer.drop(tok_emb + self.transformer.wpe(pos))  # (B, T, C)
        recompute = self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.transformer.h):
            if recompute:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, kv_cache, i)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.advance(T)

        mode = self.config.kernels
        if targets is None:
            return F.linear(x, head_weight), None
        if return_logits:
            logits = F.linear(x, head_weight)  # (B, T, V)
            return logits, ops.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), mode)
        loss = ops.linear_cross_entropy(x.view(B * T, -1), head_weight, targets.reshape(B * T), mode)
        return None, loss

    # ---------------------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, the tied wte/lm_head matrix counted once; `non_embedding` drops wpe too."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def flops_per_token(self, T: int | None = None) -> float:
        """Training FLOPs per token at sequence length T, fastgpt's convention: `train_flops_per_token`."""
        T = self.config.block_size if T is None else T
        return train_flops_per_token(self.num_params(non_embedding=True), self.config.n_layer, self.config.n_embd, T)

    def estimate_mfu(self, tokens_per_s: float, peak_flops: float, T: int | None = None) -> float:
        """Model FLOPs utilisation: achieved training FLOP/s over the hardware's peak FLOP/s."""
        return self.flops_per_token(T) * tokens_per_s / peak_flops

    def configure_optimizers(self, weight_decay: float, lr: float, betas=(0.9, 0.95), device_type: str = "cpu",
                             eps: float = 1e-8):
        """AdamW with weight decay on 2-D tensors (matmul weights, embeddings) only."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return ops.make_optimizer(groups, lr=lr, betas=betas, eps=eps, device_type=device_type,
                                  mode=self.config.kernels)

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_dir: str, **overrides) -> "GPT":
        """HuggingFace GPT-2 weights from a local directory or a hub id ("gpt2" ... "gpt2-xl")."""
        from .hf import load_pretrained

        return load_pretrained(cls, name_or_dir, **overrides)

    def save_pretrained(self, path: str) -> None:
        """config.json + model.safetensors that transformers' GPT2LMHeadModel.from_pretrained loads."""
        from .hf import save_pretrained

        save_pretrained(self, path)

    @contextlib.contextmanager
    def ids_checked(self):
        """Inside, forward skips the token-id range check: for ids already checked or sampled by the model."""
        before, self.check_ids = self.check_ids, False
        try:
            yield
        finally:
            self.check_ids = before

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample max_new_tokens after idx (B, T); temperature 0 is greedy. Returns (B, T + new)."""
        from .generate import sample

        return sample(self, idx, max_new_tokens, temperature=temperature, top_k=top_k, use_cache=use_cache,
                      generator=generator)
