"""Model and training configuration.

`GPTConfig` is a plain dataclass: `dataclasses.asdict(cfg)` is what checkpoints store and
`GPTConfig(**d)` rebuilds it. Presets cover the four GPT-2 sizes and CPU-sized models that learn
Tiny Shakespeare within minutes on a laptop.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

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


@dataclass
class TrainConfig:
    """Every `train.py` flag. Defaults follow the training guide."""

    data_root: str = "shakespeare_data"
    total_batch_size: int = 32768  # tokens per optimizer step, across ranks and micro-steps
    micro_batch_size: int = 16  # sequences per forward pass per rank
    seq_len: int = 256
    max_lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to max_lr * min_lr_ratio
    warmup_steps: int = 100
    max_steps: int = 1000
    model: str | None = None  # preset name; None: gpt2 on GPU, tiny on CPU
    device: str = "auto"  # auto | cpu | cuda
    log_dir: str = "log"
    eval_interval: int = 50
    eval_steps: int = 20
    checkpoint_interval: int = 50
    keep_checkpoints: int = 0  # keep only the newest N model_*.pt files; 0 keeps all
    seed: int = 1337
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    compile: bool = False
    kernels: str = "auto"
    dtype: str = "auto"  # autocast dtype: auto = bf16 on GPUs that have it, else fp16 + loss scaling; fp32 on CPU
    spike_guard: float = 3.0  # skip an update whose loss exceeds this x the recent mean loss; 0: off
    resume_from: str | None = None  # a checkpoint file to resume from instead of the newest in log_dir
    restart: bool = False  # move log_dir's checkpoints aside and start a new run there
    allow_changed: str = ""  # comma-separated flags (or "data") that may differ from the checkpoint's run
    dist_timeout: float = 600.0  # seconds a collective may wait for the other ranks before the job ends
    init_from: str | None = None  # HF GPT-2 weights (hub id or local dir) or a fastgpt checkpoint
    sample_interval: int = -1  # steps between samples; -1: four per run; 0: off
    sample_prompt: str = "ROMEO:"
    sample_tokens: int = 48
    hellaswag_interval: int = 0  # steps between HellaSwag evaluations; 0: off
    hellaswag_data: str | None = None
    hellaswag_limit: int = 0  # first N examples; 0: all
    shard: str = "ddp"  # ddp | zero1 | fsdp: what each rank keeps (fastgpt/distributed.py)
    activation_checkpointing: bool = False  # recompute each block in the backward instead of storing it
    data_order: str = "sequential"  # sequential | shuffled: order of the train chunks (fastgpt/data/loader.py)
    recipe: str | None = None  # a named flag set (fastgpt/data/recipes.py); flags given still win

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
