"""The training loop: `python train.py`, `fastgpt train`, `torchrun --standalone --nproc_per_node=N train.py`.

One optimizer step sees `total_batch_size` tokens: micro-batches of (micro_batch_size, seq_len) on each
of `world` ranks, accumulated over `total / (micro x seq x world)` micro-steps. Under DDP gradients are
all-reduced only on the last micro-step, and the logged loss is the mean over micro-steps and ranks.
Rank 0 alone prints and writes.

Checkpoints (`log/model_00050.pt`, the state after 50 optimizer steps) hold model, optimizer, loader
and RNG states, so a run resumed from one continues with the very losses the uninterrupted run had.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt_io
from . import distributed, fingerprint
from .config import DTYPE_CHOICES, KERNEL_CHOICES, PRESETS, GPTConfig, TrainConfig
from .data import DATA_ORDERS, DEFAULT_DATA_ROOT, DataError, ShardLoader, prepare_default_data
from .data.recipes import RECIPES, recipe
from .distributed import SHARD_MODES, to_cpu as _to_cpu  # noqa: F401 (_to_cpu: tests)
from .lock import LockError, RunLock
from .metrics import LOG_TXT, METRICS, Progress, RunLog, fmt_duration, peak_flops
from .model import GPT

# With no GPU and no --model, these replace the GPU-sized defaults for every flag the user did not give:
# a 7M-parameter model on 1,024-token steps shows the loss falling within a minute and finishes in a few
# minutes (the GPU defaults would need hours there). 320 steps: with the fused CPU loss a step costs
# ~0.6 of what it did, so 320 steps fit the CPU time 200 took and reach a lower val loss
# (README, "CPU default"; `python -m bench.cpu_sweep`).
CPU_DEFAULTS = dict(model="tiny", total_batch_size=1024, micro_batch_size=8, seq_len=128, max_lr=2e-3,
                    warmup_steps=10, max_steps=320, eval_interval=25, eval_steps=4, checkpoint_interval=50)
MAX_NONFINITE = 3  # consecutive skipped updates (non-finite loss or norm, or loss spikes) before giving up
MAX_OVERFLOWS = 30  # consecutive fp16 loss-scaler skips before giving up: the scale has fallen by 2^30 by then
SPIKE_WINDOW = 20  # the spike guard compares a loss with the mean of this many recent accepted losses,
SPIKE_MIN_HISTORY = 10  # once it has seen at least this many


def _cpu_defaults_for_world(changed: dict, world: int, seq_len: int) -> tuple[dict, str]:
    """Split the CPU default micro-batch over `world` ranks so a step keeps its tokens (8 x 128 on one
    rank = 4 x 128 on each of two); where the micro-batch does not divide, grow the step instead."""
    micro, total = changed["micro_batch_size"], changed["total_batch_size"]
    if micro % world == 0:
        changed = {**changed, "micro_batch_size": micro // world}
        return changed, f" (micro-batch {micro} split over {world} ranks: a step stays {total} tokens)"
    m = max(1, micro // world)
    changed = {**changed, "micro_batch_size": m, "total_batch_size": m * changed.get("seq_len", seq_len) * world}
    return changed, (f" (micro-batch {micro} does not split over {world} ranks: {m} per rank, "
                     f"{changed['total_batch_size']} tokens per step)")


class TrainError(Exception):
    """A problem with the requested run that the user can fix; printed without a traceback."""


class EvalInterrupted(Exception):
    """A stop request arrived during evaluation: the evaluation is abandoned so the checkpoint comes sooner."""


# ------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------
HELP = {
    "data_root": "directory with train_*.npy / val_*.npy token shards",
    "data_order": "train chunks in order (sequential) or in a seeded permutation per epoch (shuffled)",
    "recipe": "fill the flags not given from a named recipe (gpt2-124m-fineweb: build-nanogpt's 124M run)",
    "total_batch_size": "tokens per optimizer step, over all ranks and accumulation micro-steps",
    "micro_batch_size": "sequences per forward pass per rank (lower it if you run out of memory)",
    "seq_len": "tokens per sequence",
    "max_lr": "peak learning rate, reached after warmup",
    "min_lr_ratio": "cosine decay ends at max_lr x this",
    "warmup_steps": "linear warmup steps",
    "max_steps": "optimizer steps in the whole run",
    "model": f"model preset: {', '.join(PRESETS)} (default: gpt2 on GPU, tiny on CPU)",
    "device": "auto | cpu | cuda",
    "log_dir": "where checkpoints and log.txt go; an existing checkpoint there is resumed",
    "eval_interval": "steps between validation losses",
    "eval_steps": "validation micro-batches per evaluation (shared across ranks)",
    "checkpoint_interval": "steps between checkpoints (one is also written at the end)",
    "keep_checkpoints": "keep only the newest N checkpoints (0: keep all; GPT-2 small is ~1.5 GB each)",
    "seed": "random seed",
    "weight_decay": "AdamW weight decay on matrices and embeddings",
    "grad_clip": "clip the global gradient norm to this (0: no clipping)",
    "compile": "torch.compile the model",
    "kernels": "auto (Triton on CUDA), triton or torch",
    "dtype": "autocast precision: auto (bf16 on GPUs that have it, fp16 with loss scaling on older GPUs, fp32 on "
             "CPU), bf16, fp16 or fp32",
    "spike_guard": f"skip an update whose loss exceeds K x the mean of the last {SPIKE_WINDOW} accepted losses; "
                   f"{MAX_NONFINITE} in a row stop the run (0: off)",
    "resume_from": "resume from this checkpoint file instead of the newest in --log_dir (newer ones there are "
                   "moved aside into a subdirectory)",
    "restart": "start a new run in --log_dir: its checkpoints and logs are moved aside into a subdirectory",
    "allow_changed": "resume although these flags (comma-separated; 'data' for the shards) differ from the "
                     "checkpoint's run, e.g. max_steps,max_lr",
    "dist_timeout": "seconds a rank waits for the others in a collective before the job ends with an error",
    "init_from": "start from pretrained weights (step 0, fresh optimizer): gpt2 ... gpt2-xl (hub, online), a local "
                 "HF directory, or a fastgpt checkpoint; the model shape comes from them",
    "sample_interval": "steps between text samples printed while training, and one at the end "
                       "(-1: four per run; 0: off)",
    "sample_prompt": "prompt of those samples",
    "sample_tokens": "tokens per sample",
    "hellaswag_interval": "steps between HellaSwag evaluations during training (0: off; needs --hellaswag_data)",
    "hellaswag_data": "a HellaSwag .jsonl file for --hellaswag_interval",
    "hellaswag_limit": "evaluate only the first N HellaSwag examples (0: all)",
    "shard": "with several ranks: ddp (full copy per rank), zero1 (AdamW state sharded) or fsdp (weights, "
             "gradients and AdamW state sharded, FSDP2); checkpoints are the same whichever you use",
    "activation_checkpointing": "recompute each block's activations in the backward (less memory, ~1/3 more "
                                "compute, same losses)",
}


def build_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    cpu = " ".join(f"--{k} {v}" for k, v in CPU_DEFAULTS.items())
    p = argparse.ArgumentParser(
        prog=prog, description="Train GPT-2 on token shards (single process or torchrun). Defaults in brackets.",
        epilog=f"Without a GPU and without --model, flags you do not give default to: {cpu}. "
               f"An existing checkpoint in --log_dir is resumed.")
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        d = getattr(defaults, f.name)
        # default=None everywhere so we can tell which flags were given (CPU defaults fill the rest).
        if f.name in ("compile", "restart", "activation_checkpointing"):
            p.add_argument(f"--{f.name}", action="store_true", default=None, help=HELP[f.name])
        elif f.name == "shard":
            p.add_argument("--shard", choices=SHARD_MODES, default=None, help=f"{HELP[f.name]} [{d}]")
        elif f.name == "kernels":
            p.add_argument("--kernels", choices=KERNEL_CHOICES, default=None, help=f"{HELP[f.name]} [{d}]")
        elif f.name == "dtype":
            p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help=f"{HELP[f.name]} [{d}]")
        elif f.name == "device":
            p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help=f"{HELP[f.name]} [{d}]")
        elif f.name == "model":
            p.add_argument("--model", choices=list(PRESETS), default=None, help=HELP[f.name])
        elif f.name == "data_order":
            p.add_argument("--data_order", choices=DATA_ORDERS, default=None, help=f"{HELP[f.name]} [{d}]")
        elif f.name == "recipe":
            p.add_argument("--recipe", choices=sorted(RECIPES), default=None, help=HELP[f.name])
        else:
            typ = type(d) if d is not None else str
            p.add_argument(f"--{f.name}", type=typ, default=None, help=f"{HELP.get(f.name, '')} [{d}]")
    return p


def parse_args(argv=None, prog: str = "train.py") -> tuple[TrainConfig, set[str]]:
    ns = build_parser(prog).parse_args(argv)
    given = {k for k, v in vars(ns).items() if v is not None}
    values = {k: getattr(ns, k) for k in given}
    if ns.recipe:  # the recipe's values count as given (CPU defaults do not override them)
        values = {**recipe(ns.recipe), **values}
        given |= set(values)
    cfg = replace(TrainConfig(), **values)
    return cfg, given


# ------------------------------------------------------------------------------------------------
# Pieces of the loop
# ------------------------------------------------------------------------------------------------
def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to max_lr over warmup_steps, then cosine decay to max_lr x min_lr_ratio at max_steps."""
    min_lr = cfg.max_lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.max_lr - min_lr)


def grad_accum_steps(cfg: TrainConfig, world: int) -> int:
    per = cfg.micro_batch_size * cfg.seq_len * world
    if cfg.total_batch_size <= 0 or cfg.total_batch_size % per:
        lo = max(per, cfg.total_batch_size // per * per)
        totals = sorted({lo, lo + per, 2 * lo})
        micros = [m for m in range(1, cfg.micro_batch_size + 1)
                  if cfg.total_batch_size > 0 and cfg.total_batch_size % (m * cfg.seq_len * world) == 0]
        # Flag values exactly as they are typed (no thousands separators), so a hint pastes back.
        hint = f"--total_batch_size {' or '.join(map(str, totals))}"
        if micros:
            hint += f", or keep it and use --micro_batch_size {' or '.join(map(str, micros[-3:]))}"
        raise TrainError(
            f"--total_batch_size {cfg.total_batch_size} is not a multiple of micro_batch_size x seq_len x "
            f"world_size = {cfg.micro_batch_size} x {cfg.seq_len} x {world} = {per}. Values that divide: {hint}")
    return cfg.total_batch_size // per


def choose_dtype(requested: str, device_type: str, bf16_supported: bool = False, gpu: str = "this GPU") -> str:
    """The autocast dtype of a run, "bf16", "fp16" (with loss scaling) or "fp32", from what the device reports
    (pure, so the rule is tested without a GPU). auto: bf16 on a GPU that has it (compute capability >= 8.0),
    fp16 on older GPUs, fp32 on CPU, where autocast would only add casts. An explicit bf16 on a GPU without
    bf16 is an error (it would be emulated, slowly); bf16 and fp16 on CPU are allowed (fp16 for testing)."""
    if requested not in DTYPE_CHOICES:
        raise TrainError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    if requested == "auto":
        return ("bf16" if bf16_supported else "fp16") if device_type == "cuda" else "fp32"
    if requested == "bf16" and device_type == "cuda" and not bf16_supported:
        raise TrainError(f"--dtype bf16: {gpu} has no bf16 support (it needs compute capability 8.0 or newer); "
                         f"use --dtype fp16 (loss-scaled) or --dtype auto, which picks fp16 here")
    return requested


_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def attention_line(mode: str, plan) -> str:
    """The startup line saying where attention runs on this GPU and why (`plan`: kernels.device_plan). With
    --kernels triton on a GPU whose attention goes to SDPA (compute capability < 8.0) the run is refused
    here, before anything trains, naming the GPU and the reason."""
    if plan.attention == "triton":
        return f"attention: Triton ({plan.reason})"
    if mode == "triton":
        raise TrainError(f"--kernels triton: {plan.reason}. Use --kernels auto (Triton for LayerNorm, GELU, the "
                         f"loss and AdamW; PyTorch SDPA for attention) or --kernels torch")
    return f"attention: PyTorch SDPA ({plan.reason})"


def attention_configs() -> list[dict]:
    """The attention launch configs this process chose (kernels.attention_configs), for the checkpoint; none
    when the kernels were never imported (no Triton attention ran)."""
    read = getattr(sys.modules.get("kernels"), "attention_configs", None)
    return list(read()) if read is not None else []


def install_attention_configs(entries) -> int:
    """Launch attention with these recorded configs instead of autotuning afresh (kernels.install_attention_
    configs): a resumed run uses the very kernels the checkpointed one did. Returns how many were installed."""
    if not entries:
        return 0
    try:
        import kernels
    except Exception:  # no triton here: nothing to install into (the run uses PyTorch attention)
        return 0
    install = getattr(kernels, "install_attention_configs", None)
    return int(install(entries)) if install is not None else 0


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits. A second Ctrl+C aborts."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              f"(Ctrl+C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading_is_main():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _preset_of(config: dict) -> str | None:
    """The preset whose shape a GPTConfig dict has (kernels and dropout aside), or None for a custom model."""
    return next((n for n, c in PRESETS.items()
                 if all(config.get(k) == v for k, v in asdict(c).items() if k not in ("kernels", "dropout"))), None)


def _check_resume_config(path: Path, saved: dict, wanted: GPTConfig, model_name: str) -> None:
    want = asdict(wanted)
    diffs = [f"{k}={saved.get(k)!r} (now {want[k]!r})" for k in want
             if k != "kernels" and saved.get(k) != want[k]]  # kernels choose code paths, not weights
    if diffs:
        preset = _preset_of(saved)
        how = f"pass --model {preset} to continue it" if preset else "train with the model it was made with"
        raise TrainError(f"{path} holds a different model than --model {model_name}: {', '.join(diffs)}. "
                         f"To resume it, {how}; to start a new run, pass another --log_dir.")


def setup_distributed(cfg: TrainConfig) -> tuple[torch.device, int, int, int]:
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0)) if ddp else 0
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if ddp else 0
    world = int(os.environ.get("WORLD_SIZE", 1)) if ddp else 1
    want = cfg.device
    if want == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda was requested but torch sees no CUDA GPU (check nvidia-smi and that "
                         "your torch build has CUDA); use --device cpu")
    use_cuda = want == "cuda" or (want == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if ddp:
        if not (math.isfinite(cfg.dist_timeout) and cfg.dist_timeout > 0):
            raise TrainError(f"--dist_timeout must be a positive number of seconds, got {cfg.dist_timeout}")
        # A stuck collective (a frozen or hung rank) raises after this long on gloo; on NCCL the watchdog
        # aborts the job. Either way the job ends instead of waiting forever.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout),
                                **({"device_id": device} if use_cuda else {}))
    return device, rank, local_rank, world


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def main(argv=None, prog: str = "train.py") -> int:
    cfg, given = parse_args(argv, prog)
    try:
        return train(cfg, given)
    except (TrainError, DataError, ckpt_io.CheckpointError, LockError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except torch.OutOfMemoryError as e:
        print(f"error: CUDA out of memory ({str(e).splitlines()[0]})\n"
              f"  Lower --micro_batch_size (now {cfg.micro_batch_size}; try {max(1, cfg.micro_batch_size // 2)} "
              f"or {max(1, cfg.micro_batch_size // 4)}): gradient accumulation keeps the total batch of "
              f"{cfg.total_batch_size} tokens per step unchanged. A smaller --model or --seq_len also helps.",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, given: set[str] = frozenset()) -> int:
    """Set up, resume, and run the loop; returns the process exit code."""
    trainer = Trainer(cfg, given)
    try:
        rc = trainer.run()
        if trainer.ddp:
            # Every rank past its last collective before any tears gloo down: without it a rank sometimes
            # aborted at exit ("terminate called without an active exception") after all its work was done.
            dist.barrier()
        return rc
    except RuntimeError as e:
        if trainer.ddp and _is_collective_timeout(e):
            raise TrainError(trainer.timeout_message(e)) from None
        raise


def _is_collective_timeout(e: BaseException) -> bool:
    """gloo: "Timed out waiting Nms for recv operation"; also its peer-gone variants, which follow a timeout."""
    text = str(e)
    signs = ("Timed out", "timed out", "Connection closed by peer")
    return isinstance(e, dist.DistError) or any(m in text for m in signs)


@dataclass
class StepResult:
    """What one optimizer step reports (host values: read once, after the update)."""

    step: int
    loss: float
    norm: float
    lr: float
    dt: float
    skip: str = ""  # why the update was skipped: "nonfinite", "overflow" (fp16 loss scaler), "spike"; "": applied
    note: str = ""  # what the log line says about a skipped update

    @property
    def finite(self) -> bool:
        return self.skip not in ("nonfinite", "overflow")


class Trainer:
    """One training run. Read top to bottom: the methods follow the order a run goes through them.

    __init__  -> setup_distributed, resolve_config, build_data, build_model   (nothing trained yet)
    run       -> under the log directory's lock, train_loop: resume, wrap_model, warm_up_kernels, then per
                 step: train_step, log_step, check_divergence, maybe evaluate / HellaSwag / sample, maybe save
    """

    def __init__(self, cfg: TrainConfig, given: set[str] = frozenset()):
        self.given = given
        self.notes: list[str] = []
        self.device, self.rank, self.local_rank, self.world = setup_distributed(cfg)
        self.master = self.rank == 0
        self.ddp = self.world > 1
        self.cuda = self.device.type == "cuda"
        self.cfg = self.resolve_config(cfg)
        self.build_data()
        self.log(f"using device: {self.device.type}")
        for n in self.notes:
            self.log(n)
        self.build_model()
        self.log_dir = Path(self.cfg.log_dir)
        self.start_step = 0
        self.last_val: float | None = None
        self.resolve_step_options()

    # --------------------------------------------------------------------------------------------
    # Setup
    # --------------------------------------------------------------------------------------------
    def log(self, *a) -> None:
        if self.master:
            print(*a, flush=True)

    def resolve_config(self, cfg: TrainConfig) -> TrainConfig:
        """CPU-sized defaults where no GPU is present, the model preset, and flag checks."""
        # Evaluation reads eval_steps batches of this many sequences, split over the ranks: fixed before any
        # per-rank micro-batch is derived below, so the validation tokens do not depend on the world size.
        self.eval_batch = cfg.micro_batch_size
        if not self.cuda and cfg.model is None:
            changed = {k: v for k, v in CPU_DEFAULTS.items() if k not in self.given}
            self.eval_batch = changed.get("micro_batch_size", cfg.micro_batch_size)
            world_note = ""
            if self.world > 1 and not {"micro_batch_size", "total_batch_size"} & self.given:
                changed, world_note = _cpu_defaults_for_world(changed, self.world, cfg.seq_len)
            cfg = replace(cfg, **changed)
            flags = " ".join(f"--{k} {v}" for k, v in changed.items() if k != "model")
            self.notes.append(f"no GPU: using the CPU-sized preset '{cfg.model}' with {flags or 'your flags'}"
                              f"{world_note}; pass --model gpt2 (and the batch flags) to train GPT-2 small on "
                              f"the CPU anyway")
        self.model_name = cfg.model or "gpt2"
        self.gcfg = GPTConfig.preset(self.model_name, kernels=cfg.kernels)
        self.init_state = None
        if cfg.init_from:
            self.load_init_weights(cfg)
        self.check_watch_flags(cfg)
        for name in ("micro_batch_size", "seq_len", "max_steps", "eval_interval", "eval_steps",
                     "checkpoint_interval"):
            if getattr(cfg, name) <= 0:
                raise TrainError(f"--{name} must be positive, got {getattr(cfg, name)}")
        for name in ("warmup_steps", "keep_checkpoints"):
            if getattr(cfg, name) < 0:
                raise TrainError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
        for name, lo, hi, what in (("max_lr", 0.0, None, "a positive number"),
                                   ("min_lr_ratio", 0.0, 1.0, "in [0, 1]"),
                                   ("weight_decay", 0.0, None, "a number >= 0"),
                                   ("grad_clip", 0.0, None, "a number >= 0 (0: no clipping)")):
            v = getattr(cfg, name)
            if not math.isfinite(v) or v < lo or (hi is not None and v > hi) or (name == "max_lr" and v == 0):
                raise TrainError(f"--{name} must be {what}, got {v}")
        if not 0 <= cfg.seed < 2**32:  # numpy's seed range
            raise TrainError(f"--seed must be in [0, 2**32), got {cfg.seed}")
        try:
            self.allowed_changes = fingerprint.parse_allowed(cfg.allow_changed)
        except ValueError as e:
            raise TrainError(str(e)) from None
        if cfg.restart and cfg.resume_from:
            raise TrainError("--restart starts a new run and --resume_from continues one: give only one")
        if cfg.resume_from and not Path(cfg.resume_from).is_file():
            raise TrainError(f"--resume_from {cfg.resume_from}: no such file")
        if self.gcfg.kernels == "triton":
            from .ops import use_triton

            try:
                use_triton("triton", torch.empty(0, device=self.device))
            except RuntimeError as e:
                raise TrainError(f"--kernels triton: {e}") from None
        if cfg.seq_len > self.gcfg.block_size:
            raise TrainError(f"--seq_len {cfg.seq_len} exceeds the {self.model_name} block size "
                             f"{self.gcfg.block_size}")
        if cfg.shard not in SHARD_MODES:
            raise TrainError(f"--shard must be one of {', '.join(SHARD_MODES)}, got {cfg.shard!r}")
        if cfg.shard != "ddp" and self.world == 1:
            self.notes.append(f"--shard {cfg.shard} with a single process: nothing to shard, training as one process")
        self.accum = grad_accum_steps(cfg, self.world)
        return cfg

    def build_data(self) -> None:
        cfg, B, T = self.cfg, self.cfg.micro_batch_size, self.cfg.seq_len
        if cfg.data_root == DEFAULT_DATA_ROOT:  # a fresh machine: `python train.py` needs no other step
            if self.local_rank == 0:
                prepare_default_data(cfg.data_root, log=self.log)
            if self.ddp:
                dist.barrier()
        self.train_loader = ShardLoader(cfg.data_root, "train", B, T, self.rank, self.world, self.gcfg.vocab_size,
                                        verbose=self.master, pin_memory=self.cuda, order=cfg.data_order,
                                        seed=cfg.seed)
        # One sequence per chunk: rank r evaluates sequences r, r + world, ... of the same eval set.
        self.val_loader = ShardLoader(cfg.data_root, "val", 1, T, self.rank, self.world, self.gcfg.vocab_size,
                                      verbose=self.master)

    def build_model(self) -> None:
        cfg = self.cfg
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision("high")
        self.raw = GPT(self.gcfg).to(self.device)
        if self.init_state is not None:
            self.raw.load_state_dict(self.init_state)
            self.init_state = None
        self.raw.activation_checkpointing = cfg.activation_checkpointing
        self.optimizer = self.raw.configure_optimizers(weight_decay=cfg.weight_decay, lr=cfg.max_lr,
                                                       device_type=self.device.type)
        from .ops import attention_plan, backend_name

        self.log(f"model: {self.model_name} ({self.raw.num_params() / 1e6:.1f}M parameters) | kernels: "
                 f"{backend_name(self.gcfg.kernels, self.device)} | optimizer: {type(self.optimizer).__name__} | "
                 f"{self.world} rank(s) | {cfg.total_batch_size:,} tokens per step = {cfg.micro_batch_size} x "
                 f"{cfg.seq_len} x {self.world} x {self.accum} accumulation")
        plan = attention_plan(self.device) if self.gcfg.kernels != "torch" else None
        if plan is not None:
            self.log(attention_line(self.gcfg.kernels, plan))

    def resolve_step_options(self) -> None:
        """Precision (dtype, fp16 loss scaler), the spike guard and the divergence counters."""
        cfg = self.cfg
        bf16, gpu = False, "this GPU"
        if self.cuda:
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            major, minor = torch.cuda.get_device_capability(self.device)
            gpu = f"{torch.cuda.get_device_name(self.device)} (compute capability {major}.{minor})"
        self.dtype = choose_dtype(cfg.dtype, self.device.type, bf16, gpu)
        # fp16's narrow range needs the loss scaled up for backward (and the gradients unscaled before clipping)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.dtype == "fp16" else None
        why = " (auto)" if cfg.dtype == "auto" else ""
        self.log(f"dtype: {self.dtype}{why}{' with loss scaling' if self.scaler else ''}")
        if not (cfg.spike_guard == 0 or cfg.spike_guard > 1) or not math.isfinite(cfg.spike_guard):
            raise TrainError(f"--spike_guard must be 0 (off) or a factor above 1, got {cfg.spike_guard}")
        self.recent_losses: list[float] = []  # accepted steps' losses, for the spike guard
        self.skips_in_row: dict[str, int] = {}  # consecutive skipped updates by kind, reset by an applied one
        self.last_healthy: Path | None = None  # the newest checkpoint this run wrote
        self.stop = None  # the StopRequest, while run() loops
        self.stop_all = False  # under DDP: the stop flag all ranks agreed on at the last step
        self.raw.check_ids = False  # the loaders checked every token id; the model's check would sync per forward
    def load_init_weights(self, cfg: TrainConfig) -> None:
        """--init_from: the model's shape and weights from HF GPT-2 weights or a fastgpt checkpoint."""
        src = cfg.init_from
        path = Path(src).expanduser()
        try:
            if path.is_file():
                ck = ckpt_io.load(path)
                gcfg = GPTConfig(**{**ck["config"], "kernels": cfg.kernels})
                state, what = ck["model"], f"fastgpt checkpoint {path} (step {ck.get('step', '?')})"
            else:
                from .hf import load_pretrained

                # An unknown path or an offline hub id fails here with a message naming it.
                model = load_pretrained(GPT, src, kernels=cfg.kernels)
                gcfg, state, what = model.config, model.state_dict(), f"HuggingFace GPT-2 weights {src}"
        except (OSError, ValueError, RuntimeError) as e:
            raise TrainError(f"--init_from {src}: {e}") from None
        except (KeyError, TypeError) as e:  # a checkpoint without a usable config
            raise TrainError(f"--init_from {src}: not a fastgpt checkpoint with a model config ({e!r})") from None
        preset = _preset_of(asdict(gcfg))
        if "model" in self.given and preset != cfg.model:
            raise TrainError(f"--model {cfg.model} does not match --init_from {src} (a {preset or 'custom'} model: "
                             f"n_layer={gcfg.n_layer}, n_head={gcfg.n_head}, n_embd={gcfg.n_embd}); drop --model")
        self.gcfg, self.init_state = gcfg, state
        self.model_name = preset or f"{gcfg.n_layer}-layer {gcfg.n_embd}-wide model"
        self.notes.append(f"init_from: {what} -> {self.model_name} (block_size {gcfg.block_size}); "
                          f"starting at step 0 with a fresh optimizer")

    def check_watch_flags(self, cfg: TrainConfig) -> None:
        """Samples and HellaSwag during training: intervals and the HellaSwag file, checked before step 0."""
        if cfg.sample_tokens <= 0:
            raise TrainError(f"--sample_tokens must be positive, got {cfg.sample_tokens}")
        if cfg.sample_interval < -1:
            raise TrainError(f"--sample_interval must be -1 (four per run), 0 (off) or a step count, "
                             f"got {cfg.sample_interval}")
        for name in ("hellaswag_interval", "hellaswag_limit"):
            if getattr(cfg, name) < 0:
                raise TrainError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
        self.sample_every = max(1, cfg.max_steps // 4) if cfg.sample_interval == -1 else cfg.sample_interval
        self.hellaswag_examples = None
        from .tokenizer import N_VOCAB

        if self.gcfg.vocab_size < N_VOCAB:  # a model over another vocabulary: GPT-2 text means nothing to it
            for name in ("sample_interval", "hellaswag_interval"):
                if getattr(cfg, name) > 0:
                    raise TrainError(f"--{name} needs the GPT-2 vocabulary; this model has {self.gcfg.vocab_size} "
                                     f"tokens (pass --{name} 0)")
            self.sample_every = 0
        if cfg.hellaswag_interval > 0 and cfg.shard == "fsdp" and self.world > 1:
            # Each FSDP2 forward is collective, and HellaSwag's rank shards differ in length: ranks would wait on
            # each other for ever. Until its batches are padded to one count per rank, refuse rather than hang.
            raise TrainError("--hellaswag_interval does not run under --shard fsdp yet (ranks would run different "
                             "numbers of forwards); use --shard ddp or zero1, or `fastgpt eval hellaswag` on a "
                             "checkpoint")
        if cfg.hellaswag_interval > 0:
            if not cfg.hellaswag_data:
                raise TrainError("--hellaswag_interval needs --hellaswag_data FILE (a HellaSwag .jsonl, e.g. "
                                 "hellaswag_val.jsonl from github.com/rowanz/hellaswag)")
            from .hellaswag import load_examples

            try:
                self.hellaswag_examples = load_examples(cfg.hellaswag_data, cfg.hellaswag_limit or None)
            except (OSError, ValueError) as e:
                raise TrainError(f"--hellaswag_data: {e}") from None

    def log_summary(self) -> None:
        """One block before step 0: what this run is and how long it is."""
        cfg, B, T = self.cfg, self.cfg.micro_batch_size, self.cfg.seq_len
        dtype = self.dtype + (" with loss scaling" if self.scaler is not None else "")
        train_tokens = self.train_loader.total * B * T
        epochs = cfg.max_steps * cfg.total_batch_size / max(1, train_tokens)
        watch = []
        if cfg.eval_interval:
            watch.append(f"val loss every {cfg.eval_interval}")
        if self.sample_every:
            watch.append(f"sample every {self.sample_every}")
        if self.hellaswag_examples is not None:
            watch.append(f"HellaSwag ({len(self.hellaswag_examples)} examples) every {cfg.hellaswag_interval}")
        watch.append(f"checkpoint every {cfg.checkpoint_interval} steps")
        self.log(f"run: {cfg.max_steps:,} steps x {cfg.total_batch_size:,} tokens = "
                 f"{cfg.max_steps * cfg.total_batch_size:,} tokens | data: {train_tokens:,} train tokens in "
                 f"{len(self.train_loader.paths)} shard(s) -> {epochs:.2f} epochs | dtype: {dtype}")
        self.log(f"watch: {', '.join(watch)} | logs: {self.log_dir / LOG_TXT}, {self.log_dir / METRICS}")

    def autocast(self):
        dtype = _AUTOCAST.get(self.dtype)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    # --------------------------------------------------------------------------------------------
    # Resume, wrap
    # --------------------------------------------------------------------------------------------
    def resume(self) -> None:
        """Load the newest usable checkpoint in log_dir (or --resume_from), if any: model, optimizer, loader,
        RNG, step. Unusable newer files are skipped with a warning; a run whose flags or data changed is
        refused unless --allow_changed names the change; --restart moves earlier files aside first."""
        cfg = self.cfg
        if self.master:
            for p in ckpt_io.remove_stale_temporaries(self.log_dir):
                print(f"removed {p}, left by an interrupted checkpoint write")
            if cfg.restart:
                old = [p for _, p in ckpt_io.list_checkpoints(self.log_dir)] + \
                      [self.log_dir / n for n in (LOG_TXT, METRICS)]
                dest = ckpt_io.move_aside(self.log_dir, old, "restart")
                if dest:
                    self.log(f"--restart: moved the previous run's files to {dest}; starting a new run")
        if self.ddp:
            self.start_heartbeat()
            dist.barrier()  # rank 0 has moved files; everyone now sees the same checkpoints
        self.step = 0
        if cfg.resume_from:
            path = Path(cfg.resume_from)
            state = ckpt_io.load(path)
            self.check_checkpoint(path, state)
        else:
            path, state = ckpt_io.load_latest(self.log_dir, warn=self.master, check=self.check_checkpoint)
        self.resumed_from = path if state is not None else None
        self.optimizer_state = None
        if state is None:
            return
        step = int(state["step"])
        if step < cfg.max_steps:
            self.check_same_run(path, state)
        if cfg.resume_from and self.master:
            # Newer checkpoints in log_dir (a diverged continuation, say) would be picked over the files
            # this run writes next: keep them, out of the way.
            newer = [p for s_, p in ckpt_io.list_checkpoints(self.log_dir)
                     if s_ >= step and p.resolve() != path.resolve()]
            dest = ckpt_io.move_aside(self.log_dir, newer, "superseded")
            if dest:
                self.log(f"--resume_from: moved {len(newer)} checkpoint(s) at step >= {step} to {dest}")
        if cfg.resume_from and self.ddp:
            dist.barrier()
        try:
            self.raw.load_state_dict(state["model"])
            self.optimizer_state = state["optimizer"]  # wrap_model loads it, into the sharded optimizer if any
            self.train_loader.load_state_dict(state["loader"])
            ckpt_io.set_rng_state(state["rng"])
            self.load_step_state(state)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            raise ckpt_io.CheckpointError(f"{path}: cannot be applied to this run ({type(e).__name__}: "
                                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        self.start_step, self.last_val = step, state.get("val_loss")
        self.step = step
        vl = f", val loss {self.last_val:.4f}" if self.last_val is not None else ""
        self.log(f"resuming from {path} (step {self.start_step}{vl})")

    def check_checkpoint(self, path: Path, state: dict) -> None:
        """A checkpoint of another model is an error (TrainError); a damaged one is a CheckpointError."""
        if not isinstance(state.get("config"), dict):
            raise ckpt_io.CheckpointError(f"{path}: incomplete checkpoint, no model 'config'")
        _check_resume_config(path, state["config"], self.gcfg, self.model_name)
        ckpt_io.check_state(state, path, self.raw, self.optimizer)

    @property
    def data_fingerprint(self) -> dict:
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = fingerprint.data_fingerprint(
                {"train": self.train_loader.paths, "val": self.val_loader.paths})
        return self._fingerprint

    def check_same_run(self, path: Path, state: dict) -> None:
        """Refuse to resume with flags or data that differ from the checkpoint's run, unless allowed."""
        cfg, step = self.cfg, int(state["step"])
        changes = fingerprint.resume_changes(state.get("train_config"), state.get("data_fingerprint"), cfg,
                                             self.data_fingerprint)
        lr_note = ""
        if "max_steps" in changes:
            old = replace(cfg, max_steps=state["train_config"]["max_steps"])
            lr_note = (f"A changed --max_steps re-plans the cosine decay to end at step {cfg.max_steps} instead of "
                       f"{old.max_steps} (warmup and peak unchanged)")
            if get_lr(step, cfg) != get_lr(step, old):
                lr_note += (f": the learning rate at step {step} becomes {get_lr(step, cfg):.6f} instead of "
                            f"{get_lr(step, old):.6f}")
            lr_note += "."
        refused = {k: v for k, v in changes.items() if k not in self.allowed_changes}
        if refused:
            names = ",".join(refused)
            raise TrainError(
                f"{path} belongs to a run with other settings: {'; '.join(refused.values())}. Resuming would not "
                f"continue that run. Pass the checkpoint's values to continue it, --allow_changed {names} to "
                f"continue with the new ones, or another --log_dir (or --restart) to start over. {lr_note}".strip())
        for k, v in changes.items():
            self.log(f"note: resuming with a change you allowed: {v}")
        if lr_note:
            self.log(f"note: {lr_note}")

    def wrap_model(self) -> None:
        """--shard (DDP, ZeRO-1 or FSDP2) and torch.compile around the raw model; `core` is what evaluation
        calls (no DDP). zero1 and fsdp replace the optimizer by a sharded one; a resumed state goes into it."""
        if self.ddp:
            try:
                distributed.check_same_start(self.start_step, self.device)
            except ValueError as e:
                raise TrainError(str(e)) from None
        self.model, self.core, self.optimizer = distributed.wrap(
            self.raw, self.optimizer, self.cfg.shard, self.world, self.device, compile=self.cfg.compile,
            param_dtype=_AUTOCAST.get(self.dtype) if self.cuda else None,  # FSDP2 computes in --dtype's dtype
            optimizer_state=getattr(self, "optimizer_state", None))
        self.optimizer_state = None
        self.params = [p for p in self.raw.parameters() if p.requires_grad]  # fsdp's are new (sharded) ones
        if self.ddp:
            self.log(distributed.describe(self.cfg.shard, self.world, self.cuda))

    def warm_up_kernels(self) -> None:
        """On CUDA, one forward/backward of a dummy batch before step 0's timer: Triton compiles its kernels and
        autotunes attention here (torch.compile too), so step 0's dt is a real step. The batch goes through no
        optimizer; grads are dropped and the RNG restored, so training is unchanged. Under DDP every rank then
        launches rank 0's attention configs."""
        if not self.cuda:
            return
        t0 = time.perf_counter()
        rng = torch.get_rng_state(), torch.cuda.get_rng_state(self.device)
        x = torch.zeros((self.cfg.micro_batch_size, self.cfg.seq_len), dtype=torch.long, device=self.device)
        self.model.train()
        with self.model.no_sync() if distributed.defers_grad_sync(self.model) else contextlib.nullcontext():
            with self.autocast():
                _, loss = self.model(x, x, return_logits=False)
            loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng[0])
        torch.cuda.set_rng_state(rng[1], self.device)
        if self.ddp and attention_configs():
            table = [attention_configs() if self.master else None]
            dist.broadcast_object_list(table, src=0)
            if not self.master:
                install_attention_configs(table[0])
        torch.cuda.synchronize(self.device)
        self.log(f"kernel warm-up (compile and autotune) took {time.perf_counter() - t0:.1f}s")

    # --------------------------------------------------------------------------------------------
    # One step, evaluation, checkpoint
    # --------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> StepResult:
        """accum micro-steps of forward/backward, clip, then the update, skipped on the device when the loss or
        gradient norm is non-finite or the loss spikes (weights and optimizer state unchanged). The host reads
        the device once per step, after the update: loss, norm and flags in one transfer, which also ends the
        step's timing (it waits for the GPU to finish the step)."""
        t0 = time.perf_counter()
        cfg, model, optimizer = self.cfg, self.model, self.optimizer
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y = self.train_loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # ddp/zero1: gradients cross ranks only once per step, on the last micro-step (fsdp: every one).
            sync = (contextlib.nullcontext() if not distributed.defers_grad_sync(model) or micro == self.accum - 1
                    else model.no_sync())
            with sync:
                with self.autocast():
                    _, loss = model(x, y, return_logits=False)
                loss = loss / self.accum
                loss_sum += loss.detach().float()
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        stop = torch.zeros((), device=self.device)
        if self.ddp:
            # One all-reduce carries the loss and each rank's stop flag (a signal may reach some ranks only).
            asked = self.stop is not None and self.stop.requested
            packed = torch.stack([loss_sum, torch.full((), float(asked), device=self.device)])
            dist.all_reduce(packed)
            loss_sum, stop = packed[0] / self.world, packed[1]
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clip (and log) the true gradient norm
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = distributed.clip_grad_norm_(self.params, clip)
        lr = get_lr(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        finite = torch.isfinite(loss_sum) & torch.isfinite(norm)
        limit = self.spike_limit()
        spike = loss_sum > limit
        self.apply_update(~finite | spike)
        scale = torch.zeros((), device=self.device)
        if self.scaler is not None:
            self.scaler.update()  # halves the scale after an overflow, grows it after a run of good steps
            scale = self.scaler._get_scale_async()  # the device tensor get_scale() would read on its own
        # The one host read of the step.
        loss_v, norm_v, finite_v, spike_v, stop_v, scale_v = torch.stack(
            [loss_sum, norm.float(), finite.float(), spike.float(), stop, scale.to(self.device)]).tolist()
        dt = time.perf_counter() - t0
        skip, note = "", ""
        if not finite_v and self.scaler is not None and math.isfinite(loss_v):
            skip, note = "overflow", f"skipped by the fp16 loss scaler: gradient overflow, loss scale now {scale_v:g}"
        elif not finite_v:
            skip, note = "nonfinite", "skipped: non-finite loss or gradient norm, weights unchanged"
        elif spike_v:
            skip, note = "spike", (f"skipped: loss spike, above {cfg.spike_guard:g} x the recent mean "
                                   f"{limit / cfg.spike_guard:.4f}; weights unchanged")
        if skip:
            # FusedAdamW counts steps on the host, which cannot see the device-side skip: it is told now
            undo = getattr(distributed.inner_optimizer(optimizer), "undo_step_count", None)
            if undo is not None:
                undo()
        else:
            self.recent_losses = (self.recent_losses + [loss_v])[-SPIKE_WINDOW:]
        self.stop_all = stop_v > 0
        return StepResult(step, loss_v, norm_v, lr, dt, skip, note)

    def spike_limit(self) -> float:
        """Losses above this are spikes: spike_guard x the mean of the recent accepted losses (inf while the
        guard is off or has seen too few). Computed on the host from losses it has already read, so the
        comparison itself runs on the device."""
        h = self.recent_losses
        if self.cfg.spike_guard <= 0 or len(h) < SPIKE_MIN_HISTORY:
            return math.inf
        return self.cfg.spike_guard * sum(h) / len(h)

    def apply_update(self, skip: torch.Tensor) -> None:
        """optimizer.step(), a no-op where the device flag `skip` holds. The flag goes in as `found_inf`, the
        AMP protocol of torch's fused AdamW and of kernels.FusedAdamW: the update kernels read it on the
        device, so the host never waits for it."""
        opt = self.optimizer
        inner = distributed.inner_optimizer(opt)  # ZeroRedundancyOptimizer steps the optimizer it wraps
        if getattr(inner, "_step_supports_amp_scaling", False):
            inner.found_inf, inner.grad_scale = skip.float(), None
            try:
                opt.step()
            finally:
                del inner.found_inf, inner.grad_scale
        elif not bool(skip):  # an optimizer without found_inf costs one more host read per step
            opt.step()

    def log_step(self, r: StepResult) -> None:
        tok_s = self.cfg.total_batch_size / r.dt
        self.progress.update(r.step, r.dt)
        self.last_loss = r.loss
        line = (f"step {r.step} | loss: {r.loss:.4f} | lr: {r.lr:.6f} | norm: {r.norm:.4f} | "
                f"dt: {r.dt * 1000:.0f}ms | tok/s: {tok_s:,.0f} | {self.progress.fields(r.step)}")
        extra = {}
        if self.peak is not None:
            # Per GPU: this rank's share of the tokens against one GPU's peak.
            extra["mfu"] = self.raw.estimate_mfu(tok_s / self.world, self.peak, T=self.cfg.seq_len)
            line += f" | mfu: {100 * extra['mfu']:.1f}%"
        if r.note:
            line += f" | {r.note}"
            extra["skipped"] = r.skip
        self.log(line)
        if self.master:
            self.runlog.train(r.step, r.loss, r.norm, r.lr, r.dt, **extra)

    def check_divergence(self, r: StepResult) -> None:
        """Stop the run when updates keep being skipped: MAX_NONFINITE in a row for non-finite losses or loss
        spikes, MAX_OVERFLOWS for fp16 overflows (the loss scaler finds its scale through a few of those)."""
        if not r.skip:
            self.skips_in_row.clear()
            return
        n = self.skips_in_row[r.skip] = self.skips_in_row.get(r.skip, 0) + 1
        if n < (MAX_OVERFLOWS if r.skip == "overflow" else MAX_NONFINITE):
            return
        what = {"nonfinite": "had a non-finite loss or gradient norm",
                "spike": f"had a loss spike (above {self.cfg.spike_guard:g} x the recent mean loss)",
                "overflow": "overflowed in fp16 although the loss scaler kept lowering its scale"}[r.skip]
        extra = (" If the data changed on purpose (a new dataset or task), the guard is comparing with the old "
                 "losses: pass --spike_guard 0 for the first steps." if r.skip == "spike" else "")
        lower = f"{self.cfg.max_lr / 2:g}"
        raise TrainError(f"{n} steps in a row {what}; the run is diverging. Lower the learning rate (e.g. "
                         f"--max_lr {lower}) and {self.resume_advice(lower)}.{extra}")

    def resume_advice(self, lower_lr: str) -> str:
        """How to go on after a divergence: from the newest healthy checkpoint, named, with flags that the
        changed-run check accepts (a new --max_lr must be allowed explicitly)."""
        path = self.last_healthy or getattr(self, "resumed_from", None)
        if path is None:
            return f"start over (no healthy checkpoint was written yet): remove {self.log_dir} or pass a new --log_dir"
        return (f"resume from the newest healthy checkpoint, {path}: run the same command with "
                f"--resume_from {path} --max_lr {lower_lr} --allow_changed max_lr")

    def evaluate(self) -> float:
        """Mean validation loss over the first eval_steps x eval_batch sequences of the val split, whatever
        the world size: each rank takes every world-th sequence, in micro-batches of micro_batch_size."""
        core, world, B = self.core, self.world, self.cfg.micro_batch_size
        n_seq = min(self.cfg.eval_steps * self.eval_batch, self.val_loader.total)
        mine = len(range(self.rank, n_seq, world))  # this rank's share
        core.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.device)  # sum over sequences of their mean token loss
        with torch.no_grad():
            for start in self.interruptible(range(0, mine, B)):
                rows = [self.val_loader.next_batch() for _ in range(min(B, mine - start))]
                x = torch.cat([r[0] for r in rows])  # (b, T)
                y = torch.cat([r[1] for r in rows])
                with self.autocast():
                    _, loss = core(x.to(self.device), y.to(self.device), return_logits=False)
                total += loss.float() * x.shape[0]
        if self.ddp:
            dist.all_reduce(total)
        core.train()
        return (total / n_seq).item()

    def log_eval(self, done: int) -> None:
        self.last_val = self.evaluate()
        self.log(f"val loss {self.last_val:.4f}")
        if self.master:
            self.runlog.val(done, self.last_val)

    def log_sample(self, done: int) -> None:
        """A seeded continuation of --sample_prompt, printed by rank 0. Its own generator (seeded by --seed and
        the step) draws the tokens, so the training RNG streams, and with them resume, stay untouched. Every
        rank generates the same tokens: a model sharded across ranks needs all of them in each forward."""
        from .generate import sample_text

        cfg = self.cfg
        text = sample_text(self.raw, cfg.sample_prompt, cfg.sample_tokens, temperature=1.0, top_k=50,
                           seed=cfg.seed + done)
        if self.master:
            self.log(f"sample at step {done}:\n{cfg.sample_prompt + text}")
            self.runlog.sample(done, cfg.sample_prompt, text)

    def log_hellaswag(self, done: int) -> None:
        """HellaSwag acc / acc_norm on rank-sharded examples, the same computation as `fastgpt eval hellaswag`."""
        from .hellaswag import evaluate_examples

        # The uncompiled model: every batch has another length, which would recompile a compiled one.
        res = evaluate_examples(self.raw, self.hellaswag_examples, device=self.device, rank=self.rank,
                                world=self.world)
        self.raw.train()
        self.log(f"hellaswag: {res['examples']} examples | acc: {res['acc']:.4f} | acc_norm: {res['acc_norm']:.4f}")
        if self.master:
            self.runlog.hellaswag(done, res)

    def log_end(self, done: int, last_ckpt: Path | None) -> None:
        """The one line that says what the run did."""
        steps = done - self.start_step
        val = f"{self.last_val:.4f}" if self.last_val is not None else "n/a"
        last = getattr(self, "last_loss", None)
        train = f"{last:.4f}" if last is not None else "n/a"
        self.log(f"done: {steps:,} steps ({self.start_step} -> {done}), {steps * self.cfg.total_batch_size:,} tokens "
                 f"in {fmt_duration(self.progress.elapsed)} | final train loss {train} | val loss {val} | "
                 f"last checkpoint: {last_ckpt or 'none'}")

    def checkpoint_state(self, step: int) -> dict | None:
        """Plain dicts and CPU tensors only, so torch.load(weights_only=True) opens it. The full model and
        optimizer state whatever --shard and world size made them; every rank calls this (gathering sharded
        state is collective) and rank 0 gets the dict, the others None."""
        model_sd, optim_sd = distributed.full_state_dicts(self.raw, self.optimizer)
        if not self.master:
            return None
        return {
            "config": asdict(self.raw.config),
            "model": model_sd,
            "optimizer": optim_sd,
            "step": step,
            "val_loss": self.last_val,
            "loader": self.train_loader.state_dict(),
            "rng": ckpt_io.rng_state(),
            "train_config": asdict(self.cfg),
            "world_size": self.world,
            **self.step_state(),
            "shard": self.cfg.shard,
        }

    def step_state(self) -> dict:
        """What the step adds to a checkpoint: the fp16 loss scaler, the spike guard's history and counters, and
        the attention configs this process launched (the resumed process launches the same ones)."""
        return {
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "guard": {"recent_losses": list(self.recent_losses), "skips_in_row": dict(self.skips_in_row)},
            "attention_configs": attention_configs(),
        }

    def load_step_state(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        guard = state.get("guard") or {}
        self.recent_losses = [float(v) for v in guard.get("recent_losses", [])][-SPIKE_WINDOW:]
        self.skips_in_row = {str(k): int(v) for k, v in guard.get("skips_in_row", {}).items()}
        n = install_attention_configs(state.get("attention_configs"))
        if n:
            self.log(f"attention: launching the {n} kernel configs recorded in the checkpoint (no autotuning)")

    def unhealthy(self) -> str | None:
        """Why the current state must not become a checkpoint (None: it may): a non-finite last step, val loss,
        weight or optimizer tensor, or a loss far above what uniform guessing scores (weights blown up while
        still finite). One host read (plus one all-reduce under DDP), at checkpoint time only."""
        if self.skips_in_row.get("nonfinite"):
            return "the last step had a non-finite loss or gradient norm"
        uniform = math.log(self.gcfg.vocab_size)  # a fresh model's loss; no model that learned anything is at 2x
        last = self.recent_losses[-1] if self.recent_losses else None
        for what, v in (("val loss", self.last_val), ("last applied step's loss", last)):
            if v is not None and not math.isfinite(v):
                return f"the {what} is {v}"
            if v is not None and v > 2 * uniform:
                return f"the {what} {v:.4g} is far above a uniform guess's {uniform:.2f}: the weights have blown up"
        named = [(f"weight {n}", p) for n, p in self.raw.named_parameters()]
        opt = distributed.inner_optimizer(self.optimizer)
        named += [(f"optimizer {k} of tensor {i}", t) for i, st in enumerate(opt.state.values())
                  for k, t in st.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
        local = [t.to_local() if hasattr(t, "to_local") else t for _, t in named]  # a sharded tensor's own part
        ok = torch.stack([torch.isfinite(t.detach()).all().to(self.device) for t in local])
        bad = (~ok).sum()
        if self.ddp:  # each rank checks what it holds (sharded optimizer states differ)
            dist.all_reduce(bad)
        flags = torch.cat([ok.float(), bad.float().view(1)]).tolist()
        if flags[-1] == 0:
            return None
        names = [name for (name, _), f in zip(named, flags[:-1]) if not f] or ["tensors of another rank"]
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        return f"non-finite values in {', '.join(names[:3])}{more}"

    def save(self, step: int) -> Path | None:
        """Rank 0 writes model_{step}.pt atomically and applies --keep_checkpoints; all ranks wait for it.
        An unhealthy state (see `unhealthy`) is never written: returns None and deletes nothing, so retention
        never removes the newest healthy checkpoint."""
        problem = self.unhealthy()
        if problem:
            path = self.last_healthy or getattr(self, "resumed_from", None)
            self.log(f"not writing a checkpoint at step {step}: {problem}. "
                     f"{f'The newest healthy one is {path}' if path else 'No healthy checkpoint exists yet'}.")
            return None
        p = ckpt_io.checkpoint_path(self.log_dir, step)
        state = self.checkpoint_state(step)
        if self.master:
            state["data_fingerprint"] = self.data_fingerprint  # so a resume can tell the data changed
            try:
                ckpt_io.save_atomic(state, p)
            except (OSError, RuntimeError) as e:  # disk full, read-only, a directory in the way, ...
                prev = [q for _, q in ckpt_io.list_checkpoints(self.log_dir) if q != p]
                kept = f"; the previous checkpoint {prev[-1]} is intact" if prev else ""
                raise TrainError(ckpt_io.describe_write_error(p, e) + kept +
                                 ". Free space or fix the directory, then run the same command to resume.") from None
            if self.cfg.keep_checkpoints > 0:
                for _, old in ckpt_io.list_checkpoints(self.log_dir)[:-self.cfg.keep_checkpoints]:
                    if old != p:
                        old.unlink(missing_ok=True)
        if self.ddp:
            dist.barrier()
        self.last_healthy = p
        return p

    def stop_requested(self, stop: "StopRequest") -> bool:
        if self.ddp:  # a signal may reach some ranks only; all must stop at the same step: the flag they
            self.heartbeat()  # agreed on in the last step's all-reduce (no extra sync per step)
            return self.stop_all
        return stop.requested

    def stop_agreed(self, stop: "StopRequest") -> bool:
        """Whether any rank got a stop request, now (one all-reduce and host read: used between eval batches)."""
        stopping = stop.requested
        if self.ddp:
            flag = torch.tensor(float(stopping), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopping = bool(flag.item())
        return stopping

    def interruptible(self, batches):
        """Evaluation batches, abandoned (EvalInterrupted) as soon as any rank got a stop request."""
        stop = getattr(self, "stop", None)
        for b in batches:
            if stop is not None and self.stop_agreed(stop):
                raise EvalInterrupted
            yield b

    # --------------------------------------------------------------------------------------------
    # A stuck rank: each rank records in the process group's store its last finished step and, from a
    # background thread, the time it was last alive (a stopped process's threads stop too), so the rank
    # whose collective times out can name the rank that stopped responding.
    # --------------------------------------------------------------------------------------------
    def _store(self):
        if not hasattr(self, "_pg_store"):
            try:
                self._pg_store = dist.distributed_c10d._get_default_store()
            except Exception:  # private API: without it the message names no other rank
                self._pg_store = None
        return self._pg_store

    def start_heartbeat(self) -> None:
        import threading

        store = self._store()
        if store is None or getattr(self, "_alive_thread", None) is not None:
            return
        every = min(5.0, self.cfg.dist_timeout / 4)

        def beat():
            while True:
                try:
                    store.set(f"fastgpt/alive/{self.rank}", repr(time.time()))
                except Exception:
                    return  # the store is gone: the job is ending
                time.sleep(every)

        self._alive_thread = threading.Thread(target=beat, name="fastgpt-heartbeat", daemon=True)
        self._alive_thread.start()

    def heartbeat(self) -> None:
        store = self._store()
        if store is not None:
            try:
                store.set(f"fastgpt/finished/{self.rank}", str(self.step + 1))
            except Exception:
                pass

    def timeout_message(self, e: BaseException) -> str:
        finished, alive = {}, {}
        store = self._store()
        if store is not None:
            try:
                store.set_timeout(datetime.timedelta(seconds=5))
                for r in range(self.world):
                    for table, key in ((finished, f"fastgpt/finished/{r}"), (alive, f"fastgpt/alive/{r}")):
                        if store.check([key]):
                            table[r] = float(store.get(key))
            except Exception:
                pass
        cause = " ".join(str(e).split())
        cause = cause[cause.find("]") + 1:].strip() if cause.startswith("[") else cause
        what = (f"waited more than {self.cfg.dist_timeout:g} s (--dist_timeout) for the other ranks"
                if "imed out" in cause else f"lost contact with the other ranks ({cause[:160]})")
        msg = f"rank {self.rank} {what} in a collective at step {self.step}"
        now, quiet = time.time(), []
        for r in range(self.world):
            if r == self.rank:
                continue
            silent = now - alive[r] if r in alive else None
            if silent is None or silent > min(10.0, self.cfg.dist_timeout / 2):
                done = int(finished.get(r, 0))
                last = f"last finished step {done - 1}" if done else "finished no step"
                quiet.append(f"rank {r} ({last}) has not responded for {silent:.0f} s" if silent is not None
                             else f"rank {r} ({last}) never reported")
        if quiet:
            msg += "; " + "; ".join(quiet)
        return (msg + ". A rank is frozen or stuck (a stopped process, a hung GPU, a lost node): the job ends "
                "instead of waiting forever. Check that rank's machine, then run the same command to resume from "
                "the last checkpoint.")

    # --------------------------------------------------------------------------------------------
    # The loop
    # --------------------------------------------------------------------------------------------
    def run(self) -> int:
        """The whole run under the log directory's lock, released however the run ends (an error included)."""
        # One run per log directory; taking the lock also proves the directory is writable before step 0.
        self.lock = RunLock(self.log_dir).acquire() if self.master else None
        try:
            if self.lock is not None and self.lock.took_over:
                self.log(f"note: took over {self.lock.path} from a run that ended without releasing it "
                         f"({self.lock.took_over})")
            return self.train_loop()
        finally:
            if self.lock is not None:
                self.lock.release()

    def train_loop(self) -> int:
        cfg = self.cfg
        self.resume()
        if self.start_step >= cfg.max_steps:
            self.log(f"{self.resumed_from} is already at step {self.start_step} >= --max_steps {cfg.max_steps}: "
                     f"nothing to do (to train further, raise --max_steps and add --allow_changed max_steps)")
            return 0
        self.wrap_model()
        self.warm_up_kernels()
        if self.master:
            # Drops what a killed run logged past the checkpoint it resumes from: one record per step.
            self.runlog = RunLog(self.log_dir, self.start_step, cfg.total_batch_size)
        self.peak = peak_flops(self.device)
        self.progress = Progress(self.start_step, cfg.max_steps)
        self.log_summary()
        p = None
        with StopRequest() as stop:
            self.stop = stop
            for step in range(self.start_step, cfg.max_steps):
                self.step = step
                r = self.train_step(step)
                self.log_step(r)
                self.check_divergence(r)
                done = step + 1
                if done % cfg.eval_interval == 0 or done == cfg.max_steps:
                    try:
                        self.log_eval(done)
                    except EvalInterrupted:
                        self.core.train()
                        self.stop_all = True  # every rank agreed to stop (stop_agreed), after the step's own vote
                        self.log(f"evaluation at step {done} abandoned for the stop request (no val loss)")
                stopping = self.stop_requested(stop)  # agreed by all ranks: extras below are collective
                if not stopping and cfg.hellaswag_interval and (done % cfg.hellaswag_interval == 0
                                                                or done == cfg.max_steps):
                    self.log_hellaswag(done)
                # Also at the end: the run's last word is a sample of what it learned.
                if not stopping and self.sample_every and (done % self.sample_every == 0 or done == cfg.max_steps):
                    self.log_sample(done)
                if done % cfg.checkpoint_interval == 0 or done == cfg.max_steps or stopping:
                    p = self.save(done)
                    if self.master:
                        self.runlog.sync()  # the logs are on disk as far as the checkpoint goes
                    if stopping:
                        saved = f"checkpoint saved to {p}" if p else "no checkpoint written (see above)"
                        self.log(f"stopped at step {done}: {saved}. Run the same command to resume.")
                        self.log_end(done, p or self.last_healthy)
                        return 0
                    if p:
                        self.log(f"saved checkpoint {p}")
        self.log_end(cfg.max_steps, p or self.last_healthy)
        return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m fastgpt.train"))
