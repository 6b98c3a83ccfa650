"""Every training flag, once: `TrainConfig` is one dataclass field per flag, and the field's metadata carries
its help text, its choices, and whether a resumed run must keep it (`resume=True`, compared with the
checkpoint's run by fingerprint.resume_changes). The argparse parser is generated from the fields, and a
value that is wrong on its own (a negative step count, an unknown choice) is refused in __post_init__.
Checks that need several flags, the device or the world size live in plan.py.

Adding a flag = adding one field here.
"""
from __future__ import annotations

import argparse
import ast
import math
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from ..config import DTYPE_CHOICES, KERNEL_CHOICES, PRESETS

_PKG = Path(__file__).resolve().parent.parent  # fastgpt/


def _module_literal(path: Path, name: str):
    """The literal assigned to `name` at the top of the module at `path`, read without importing it."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return ast.literal_eval(node.value)
    raise LookupError(f"{path} assigns no literal {name}")


def _declared_strategies(parallel: Path = _PKG / "parallel") -> tuple[str, ...]:
    """The --shard names, in Strategy.order: each class in `parallel`/*.py that sets a string `name`
    (with its `order`, default 0, then name), read from the source without importing it."""
    found = []
    for path in sorted(parallel.glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                attrs = {t.id: ast.literal_eval(a.value) for a in node.body if isinstance(a, ast.Assign)
                         for t in a.targets if isinstance(t, ast.Name) and t.id in ("name", "order")}
                if attrs.get("name"):
                    found.append((attrs.get("order", 0), attrs["name"]))
    return tuple(n for _, n in sorted(found))


# The choices of --shard, --data_order and --recipe come from their registries' source files, read as text:
# their packages import torch or numpy, and parsing the flags (--help, a flag error) must not wait seconds
# for them. tests/test_lazy_import.py checks that they equal the imported registries.
SHARD_MODES = _declared_strategies()  # parallel.STRATEGIES: one file per mode
DATA_ORDERS = tuple(_module_literal(_PKG / "data" / "loader.py", "DATA_ORDERS"))  # data.DATA_ORDERS
RECIPES = tuple(sorted(_module_literal(_PKG / "data" / "recipes.py", "RECIPES")))  # data.recipes.RECIPES


SPIKE_WINDOW = 20  # the spike guard compares a loss with the mean of this many recent accepted losses,
SPIKE_MIN_HISTORY = 10  # once it has seen at least this many
MAX_NONFINITE = 3  # consecutive skipped updates (non-finite loss or norm, or loss spikes) before giving up
MAX_OVERFLOWS = 30  # consecutive fp16 loss-scaler skips before giving up: the scale has fallen by 2^30 by then


class TrainError(Exception):
    """A problem with the requested run that the user can fix; printed without a traceback."""


def flag(default, help: str, *, choices=None, resume: bool = False, check=None):
    """A TrainConfig field. `choices`: a tuple, or a function returning one. `check(value) -> str | None` names
    what the value must be ("a positive number") when it is wrong; `resume`: a resumed run must keep this value
    (or name it in --allow_changed)."""
    return field(default=default, metadata=dict(help=help, choices=choices, resume=resume, check=check))


def positive(v):
    return None if v > 0 else "positive"


def at_least_0(v):
    return None if v >= 0 else ">= 0"


def _finite_at_least_0(what):
    return lambda v: None if math.isfinite(v) and v >= 0 else what


@dataclass
class TrainConfig:
    """Every `train.py` flag. Defaults follow the training guide."""

    data_root: str = flag("shakespeare_data", "directory with train_*.npy / val_*.npy token shards")
    data_order: str = flag("shuffled", "train chunks in a seeded permutation per epoch (shuffled), in order "
                                       "(sequential), or nanoGPT's random windows (windows); docs/data.md",
                           choices=DATA_ORDERS)
    recipe: str | None = flag(None, "fill the flags not given from a named recipe (gpt2-124m-fineweb: build-nanogpt's "
                                    "124M run)", choices=RECIPES)
    total_batch_size: int = flag(32768, "tokens per optimizer step, over all ranks and accumulation micro-steps",
                                 resume=True)
    micro_batch_size: int = flag(16, "sequences per forward pass per rank (lower it if you run out of memory)",
                                 check=positive)
    seq_len: int = flag(256, "tokens per sequence", resume=True, check=positive)
    max_lr: float = flag(6e-4, "peak learning rate, reached after warmup", resume=True,
                         check=lambda v: None if math.isfinite(v) and v > 0 else "a positive number")
    min_lr_ratio: float = flag(0.1, "cosine decay ends at max_lr x this", resume=True,
                               check=lambda v: None if math.isfinite(v) and 0 <= v <= 1 else "in [0, 1]")
    warmup_steps: int = flag(100, "linear warmup steps", resume=True, check=at_least_0)
    max_steps: int = flag(1000, "optimizer steps in the whole run", resume=True, check=positive)
    model: str | None = flag(None, f"model preset: {', '.join(PRESETS)} (default: gpt2 on GPU, tiny on CPU)",
                             choices=lambda: tuple(PRESETS))  # at parse time: tests add presets
    device: str = flag("auto", "auto | cpu | cuda", choices=("auto", "cpu", "cuda"))
    log_dir: str = flag("log", "where checkpoints and log.txt go; an existing checkpoint there is resumed")
    eval_interval: int = flag(50, "steps between validation losses", check=positive)
    eval_steps: int = flag(20, "validation micro-batches per evaluation (shared across ranks)", check=positive)
    checkpoint_interval: int = flag(50, "steps between checkpoints (one is also written at the end)", check=positive)
    keep_checkpoints: int = flag(0, "keep only the newest N checkpoints (0: keep all; GPT-2 small is ~1.5 GB each)",
                                 check=at_least_0)
    seed: int = flag(1337, "random seed", resume=True,
                     check=lambda v: None if 0 <= v < 2**32 else "in [0, 2**32)")  # numpy's seed range
    weight_decay: float = flag(0.1, "AdamW weight decay on matrices and embeddings", resume=True,
                               check=_finite_at_least_0("a number >= 0"))
    grad_clip: float = flag(1.0, "clip the global gradient norm to this (0: no clipping)", resume=True,
                            check=_finite_at_least_0("a number >= 0 (0: no clipping)"))
    compile: bool = flag(False, "torch.compile the model")
    kernels: str = flag("auto", "auto (Triton on CUDA), triton or torch", choices=KERNEL_CHOICES)
    dtype: str = flag("auto", "autocast precision: auto (bf16 on GPUs that have it, fp16 with loss scaling on older "
                              "GPUs, fp32 on CPU), bf16, fp16 or fp32", choices=DTYPE_CHOICES)
    spike_guard: float = flag(3.0, f"skip an update whose loss exceeds K x the mean of the last {SPIKE_WINDOW} "
                                   f"accepted losses; {MAX_NONFINITE} in a row stop the run (0: off)",
                              check=lambda v: None if math.isfinite(v) and (v == 0 or v > 1)
                              else "0 (off) or a factor above 1")
    resume_from: str | None = flag(None, "resume from this checkpoint file instead of the newest in --log_dir "
                                         "(newer ones there are moved aside into a subdirectory)")
    restart: bool = flag(False, "start a new run in --log_dir: its checkpoints and logs are moved aside into a "
                                "subdirectory")
    allow_changed: str = flag("", "resume although these flags (comma-separated; 'data' for the shards) differ "
                                  "from the checkpoint's run, e.g. max_steps,max_lr")
    dist_timeout: float = flag(600.0, "seconds a rank waits for the others in a collective before the job ends "
                                      "with an error",
                               check=lambda v: None if math.isfinite(v) and v > 0 else "a positive number of seconds")
    init_from: str | None = flag(None, "start from pretrained weights (step 0, fresh optimizer): gpt2 ... gpt2-xl "
                                       "(hub, online), a local HF directory, or a fastgpt checkpoint; the model "
                                       "shape comes from them")
    sample_interval: int = flag(-1, "steps between text samples printed while training, and one at the end "
                                    "(-1: four per run; 0: off)",
                                check=lambda v: None if v >= -1 else "-1 (four per run), 0 (off) or a step count")
    sample_prompt: str = flag("ROMEO:", "prompt of those samples")
    sample_tokens: int = flag(48, "tokens per sample", check=positive)
    hellaswag_interval: int = flag(0, "steps between HellaSwag evaluations during training (0: off; needs "
                                      "--hellaswag_data)", check=at_least_0)
    hellaswag_data: str | None = flag(None, "a HellaSwag .jsonl file for --hellaswag_interval")
    hellaswag_limit: int = flag(0, "evaluate only the first N HellaSwag examples (0: all)", check=at_least_0)
    shard: str = flag("ddp", "with several ranks: ddp (full copy per rank), zero1 (AdamW state sharded) or fsdp "
                             "(weights, gradients and AdamW state sharded, FSDP2); checkpoints are the same whichever "
                             "you use", choices=SHARD_MODES)
    activation_checkpointing: bool = flag(False, "recompute each block's activations in the backward (less memory, "
                                                 "~1/3 more compute, same losses)")

    def __post_init__(self) -> None:
        for f in fields(self):
            v, meta, choices = getattr(self, f.name), f.metadata, choices_of(f)
            if choices and v is not None and v not in choices:
                raise TrainError(f"--{f.name} must be one of {', '.join(choices)}, got {v!r}")
            problem = meta["check"] and meta["check"](v)
            if problem:
                raise TrainError(f"--{f.name} must be {problem}, got {v}")
        from .. import fingerprint

        try:
            fingerprint.parse_allowed(self.allow_changed)
        except ValueError as e:
            raise TrainError(str(e)) from None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def resume_flags(cls) -> tuple[str, ...]:
        """The flags a resumed run must keep (the fields marked resume=True)."""
        return tuple(f.name for f in fields(cls) if f.metadata["resume"])

    @property
    def allowed_changes(self) -> set[str]:
        from .. import fingerprint

        return fingerprint.parse_allowed(self.allow_changed)


def choices_of(f) -> tuple | None:
    c = f.metadata["choices"]
    return c() if callable(c) else c


def build_parser(prog: str = "train.py", epilog: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train GPT-2 on token shards (single process or torchrun). Defaults in brackets.",
        epilog=epilog)
    for f in fields(TrainConfig):
        d, meta = (f.default if f.default is not MISSING else None), f.metadata
        # default=None everywhere so we can tell which flags were given (CPU defaults fill the rest).
        if isinstance(d, bool):
            p.add_argument(f"--{f.name}", action="store_true", default=None, help=meta["help"])
        elif meta["choices"]:
            shown = "" if d is None else f" [{d}]"
            p.add_argument(f"--{f.name}", choices=list(choices_of(f)), default=None, help=meta["help"] + shown)
        else:
            p.add_argument(f"--{f.name}", type=type(d) if d is not None else str, default=None,
                           help=f"{meta['help']} [{d}]")
    return p


def parse_args(argv=None, prog: str = "train.py", epilog: str = "") -> tuple[TrainConfig, set[str]]:
    """(config, the names of the flags given). A value wrong on its own raises TrainError."""
    ns = build_parser(prog, epilog).parse_args(argv)
    given = {k for k, v in vars(ns).items() if v is not None}
    values = {k: getattr(ns, k) for k in given}
    if ns.recipe:  # the recipe fills only the flags not given; its values count as given (CPU defaults keep off them)
        from ..data.recipes import recipe

        values = {**recipe(ns.recipe), **values}
        given |= set(values)
    return replace(TrainConfig(), **values), given
