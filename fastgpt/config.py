"""Model and training configuration.

`GPTConfig` is a plain dataclass: `dataclasses.asdict(cfg)` is what checkpoints store and
`GPTConfig(**d)` rebuilds it. Presets cover the four GPT-2 sizes and CPU-sized models that learn
Tiny Shakespeare within minutes on a laptop.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

KERNEL_CHOICES = ("auto", "triton", "torch")
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence the position table covers
    vocab_size: int = 50257  # GPT-2 BPE: 50,000 merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # GPT-2 has biases in every Linear and LayerNorm
    kernels: str = "auto"  # "auto" | "triton" | "torch": see fastgpt/ops.py

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                f"(head size would be {self.n_embd / self.n_head:g})"
            )
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"GPTConfig.kernels must be one of {KERNEL_CHOICES}, got {self.kernels!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPTConfig":
        """A named configuration (see `PRESETS`), with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)


PRESETS: dict[str, GPTConfig] = {
    # The four released GPT-2 sizes (124M, 350M, 774M, 1558M parameters).
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # CPU-sized: the full GPT-2 vocabulary, so they read the same token shards.
    "tiny": GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=128),  # ~7.2M params, mostly wte
    "mini": GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),  # ~30M params
}


def __getattr__(name: str):
    """`from fastgpt.config import TrainConfig` still works: the flags live in fastgpt/train/options.py."""
    if name == "TrainConfig":
        from .train.options import TrainConfig

        return TrainConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
