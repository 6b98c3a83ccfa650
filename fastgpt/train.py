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
from . import fingerprint
from .config import KERNEL_CHOICES, PRESETS, GPTConfig, TrainConfig
from .data import DataError, ShardLoader
from .lock import LockError, RunLock
from .model import GPT

# With no GPU and no --model, these replace the GPU-sized defaults for every flag the user did not give:
# a 7M-parameter model on 1,024-token steps shows the loss falling within a minute or two on a laptop CPU
# and finishes 200 steps in minutes (the GPU defaults would need hours there).
CPU_DEFAULTS = dict(model="tiny", total_batch_size=1024, micro_batch_size=8, seq_len=128, max_lr=2e-3,
                    warmup_steps=10, max_steps=200, eval_interval=25, eval_steps=4, checkpoint_interval=50)
MAX_NONFINITE = 3  # consecutive skipped updates before giving up


class TrainError(Exception):
    """A problem with the requested run that the user can fix; printed without a traceback."""


class EvalInterrupted(Exception):
    """A stop request arrived during evaluation: the evaluation is abandoned so the checkpoint comes sooner."""


# ------------------------------------------------------------------------------------------------
# Flags
# ------------------------------------------------------------------------------------------------
HELP = {
    "data_root": "directory with train_*.npy / val_*.npy token shards",
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
    "resume_from": "resume from this checkpoint file instead of the newest in --log_dir (newer ones there are "
                   "moved aside into a subdirectory)",
    "restart": "start a new run in --log_dir: its checkpoints and logs are moved aside into a subdirectory",
    "allow_changed": "resume although these flags (comma-separated; 'data' for the shards) differ from the "
                     "checkpoint's run, e.g. max_steps,max_lr",
    "dist_timeout": "seconds a rank waits for the others in a collective before the job ends with an error",
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
        if f.name in ("compile", "restart"):
            p.add_argument(f"--{f.name}", action="store_true", default=None, help=HELP[f.name])
        elif f.name == "kernels":
            p.add_argument("--kernels", choices=KERNEL_CHOICES, default=None, help=f"{HELP[f.name]} [{d}]")
        elif f.name == "device":
            p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help=f"{HELP[f.name]} [{d}]")
        elif f.name == "model":
            p.add_argument("--model", choices=list(PRESETS), default=None, help=HELP[f.name])
        else:
            typ = type(d) if d is not None else str
            p.add_argument(f"--{f.name}", type=typ, default=None, help=f"{HELP.get(f.name, '')} [{d}]")
    return p


def parse_args(argv=None, prog: str = "train.py") -> tuple[TrainConfig, set[str]]:
    ns = build_parser(prog).parse_args(argv)
    given = {k for k, v in vars(ns).items() if v is not None}
    cfg = replace(TrainConfig(), **{k: getattr(ns, k) for k in given})
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


def _to_cpu(obj, _seen=None):
    """CPU copies of every tensor in obj. Tensors that alias one another (the tied wte/lm_head
    weight) map to one copy, so torch.save writes their storage once, as it does on CPU."""
    seen = {} if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        key = (obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape),
               obj.stride(), obj.dtype)
        if key not in seen:
            seen[key] = obj.detach().cpu()
        return seen[key]
    if isinstance(obj, dict):
        return {k: _to_cpu(v, seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v, seen) for v in obj)
    return obj


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


def _check_resume_config(path: Path, saved: dict, wanted: GPTConfig, model_name: str) -> None:
    want = asdict(wanted)
    diffs = [f"{k}={saved.get(k)!r} (now {want[k]!r})" for k in want
             if k != "kernels" and saved.get(k) != want[k]]  # kernels choose code paths, not weights
    if diffs:
        preset = next((n for n, c in PRESETS.items()
                       if all(saved.get(k) == v for k, v in asdict(c).items() if k not in ("kernels", "dropout"))), None)
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
        return trainer.run()
    except RuntimeError as e:
        if trainer.ddp and _is_collective_timeout(e):
            raise TrainError(trainer.timeout_message(e)) from None
        raise
    finally:
        if getattr(trainer, "lock", None) is not None:
            trainer.lock.release()


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
    finite: bool


class Trainer:
    """One training run. Read top to bottom: the methods follow the order a run goes through them.

    __init__  -> setup_distributed, resolve_config, build_data, build_model   (nothing trained yet)
    run       -> resume, wrap_model, then per step: train_step, log_step, maybe evaluate, maybe save
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
        self.log_file = self.log_dir / "log.txt"
        self.start_step = 0
        self.last_val: float | None = None
        self.bad_in_row = 0

    # --------------------------------------------------------------------------------------------
    # Setup
    # --------------------------------------------------------------------------------------------
    def log(self, *a) -> None:
        if self.master:
            print(*a, flush=True)

    def resolve_config(self, cfg: TrainConfig) -> TrainConfig:
        """CPU-sized defaults where no GPU is present, the model preset, and flag checks."""
        if not self.cuda and cfg.model is None:
            changed = {k: v for k, v in CPU_DEFAULTS.items() if k not in self.given}
            cfg = replace(cfg, **changed)
            flags = " ".join(f"--{k} {v}" for k, v in changed.items() if k != "model")
            self.notes.append(f"no GPU: using the CPU-sized preset '{cfg.model}' with {flags or 'your flags'}; "
                              f"pass --model gpt2 (and the batch flags) to train GPT-2 small on the CPU anyway")
        self.model_name = cfg.model or "gpt2"
        self.gcfg = GPTConfig.preset(self.model_name, kernels=cfg.kernels)
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
        self.accum = grad_accum_steps(cfg, self.world)
        return cfg

    def build_data(self) -> None:
        cfg, B, T = self.cfg, self.cfg.micro_batch_size, self.cfg.seq_len
        self.train_loader = ShardLoader(cfg.data_root, "train", B, T, self.rank, self.world, self.gcfg.vocab_size,
                                        verbose=self.master)
        self.val_loader = ShardLoader(cfg.data_root, "val", B, T, self.rank, self.world, self.gcfg.vocab_size,
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
        self.optimizer = self.raw.configure_optimizers(weight_decay=cfg.weight_decay, lr=cfg.max_lr,
                                                       device_type=self.device.type)
        self.params = [p for p in self.raw.parameters() if p.requires_grad]
        from .ops import backend_name

        self.log(f"model: {self.model_name} ({self.raw.num_params() / 1e6:.1f}M parameters) | kernels: "
                 f"{backend_name(self.gcfg.kernels, self.device)} | optimizer: {type(self.optimizer).__name__} | "
                 f"{self.world} rank(s) | {cfg.total_batch_size:,} tokens per step = {cfg.micro_batch_size} x "
                 f"{cfg.seq_len} x {self.world} x {self.accum} accumulation")

    def autocast(self):
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.cuda else contextlib.nullcontext()

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
                      [self.log_dir / n for n in ("log.txt", "metrics.jsonl")]
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
            self.optimizer.load_state_dict(state["optimizer"])
            self.train_loader.load_state_dict(state["loader"])
            ckpt_io.set_rng_state(state["rng"])
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
        """torch.compile and DDP around the raw model; `core` is what evaluation calls (no DDP)."""
        self.core = torch.compile(self.raw) if self.cfg.compile else self.raw
        self.model = self.core
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.model = DDP(self.core, device_ids=[self.device.index] if self.cuda else None)

    # --------------------------------------------------------------------------------------------
    # One step, evaluation, checkpoint
    # --------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> StepResult:
        """accum micro-steps of forward/backward, clip, then update unless the loss or norm is non-finite."""
        t0 = time.perf_counter()
        cfg, model, optimizer = self.cfg, self.model, self.optimizer
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            x, y = self.train_loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            # Gradients cross ranks only once per step: on the last micro-step.
            sync = contextlib.nullcontext() if not self.ddp or micro == self.accum - 1 else model.no_sync()
            with sync:
                with self.autocast():
                    _, loss = model(x, y, return_logits=False)
                loss = loss / self.accum
                loss_sum += loss.detach().float()
                loss.backward()
        if self.ddp:
            dist.all_reduce(loss_sum)
            loss_sum /= self.world
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)
        lr = get_lr(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_val, norm_val = loss_sum.item(), norm.item()
        finite = math.isfinite(loss_val) and math.isfinite(norm_val)
        if finite:
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()
        return StepResult(step, loss_val, norm_val, lr, time.perf_counter() - t0, finite)

    def log_step(self, r: StepResult) -> None:
        line = (f"step {r.step} | loss: {r.loss:.4f} | lr: {r.lr:.6f} | norm: {r.norm:.4f} | "
                f"dt: {r.dt * 1000:.0f}ms | tok/s: {self.cfg.total_batch_size / r.dt:,.0f}")
        if not r.finite:
            line += " | skipped: non-finite loss or gradient norm, weights unchanged"
        self.log(line)
        if self.master:
            with open(self.log_file, "a") as f:
                f.write(f"{r.step} train {r.loss!r} norm {r.norm!r} lr {r.lr!r}\n")

    def check_divergence(self, r: StepResult) -> None:
        self.bad_in_row = 0 if r.finite else self.bad_in_row + 1
        if self.bad_in_row >= MAX_NONFINITE:
            raise TrainError(f"{self.bad_in_row} steps in a row had a non-finite loss or gradient norm; the run "
                             f"is diverging. Lower the learning rate (e.g. --max_lr {self.cfg.max_lr / 2:g}) and "
                             f"resume from the last checkpoint in {self.log_dir}, or start over with a new "
                             f"--log_dir.")

    def evaluate(self) -> float:
        """Mean validation loss over eval_steps micro-batches, shared across ranks."""
        core, world = self.core, self.world
        val_steps = max(1, min(self.cfg.eval_steps, self.val_loader.total) // world)
        core.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.device)
        with torch.no_grad():
            for _ in self.interruptible(range(val_steps)):
                x, y = self.val_loader.next_batch()
                with self.autocast():
                    _, loss = core(x.to(self.device), y.to(self.device), return_logits=False)
                total += loss.float()
        total /= val_steps
        if self.ddp:
            dist.all_reduce(total)
            total /= world
        core.train()
        return total.item()

    def log_eval(self, done: int) -> None:
        self.last_val = self.evaluate()
        self.log(f"val loss {self.last_val:.4f}")
        if self.master:
            with open(self.log_file, "a") as f:
                f.write(f"{done} val {self.last_val!r}\n")

    def checkpoint_state(self, step: int) -> dict:
        """Plain dicts and CPU tensors only, so torch.load(weights_only=True) opens it."""
        return {
            "config": asdict(self.raw.config),
            "model": _to_cpu(self.raw.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "step": step,
            "val_loss": self.last_val,
            "loader": self.train_loader.state_dict(),
            "rng": ckpt_io.rng_state(),
            "train_config": asdict(self.cfg),
            "world_size": self.world,
        }

    def save(self, step: int) -> Path:
        """Rank 0 writes model_{step}.pt atomically and applies --keep_checkpoints; all ranks wait for it."""
        p = ckpt_io.checkpoint_path(self.log_dir, step)
        if self.master:
            state = self.checkpoint_state(step)
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
        return p

    def stop_requested(self, stop: "StopRequest") -> bool:
        if self.ddp:
            self.heartbeat()
        return self.stop_agreed(stop)

    def stop_agreed(self, stop: "StopRequest") -> bool:
        stopping = stop.requested
        if self.ddp:  # a signal may reach some ranks only; all must stop at the same step
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
        cfg = self.cfg
        # One run per log directory; taking the lock also proves the directory is writable before step 0.
        self.lock = RunLock(self.log_dir).acquire() if self.master else None
        if self.lock is not None and self.lock.took_over:
            self.log(f"note: took over {self.lock.path} from a run that ended without releasing it "
                     f"({self.lock.took_over})")
        self.resume()
        if self.start_step >= cfg.max_steps:
            self.log(f"{self.resumed_from} is already at step {self.start_step} >= --max_steps {cfg.max_steps}: "
                     f"nothing to do (to train further, raise --max_steps and add --allow_changed max_steps)")
            return 0
        self.wrap_model()
        if self.master:
            self.log_dir.mkdir(parents=True, exist_ok=True)
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
                        self.log(f"evaluation at step {done} abandoned for the stop request (no val loss)")
                stopping = self.stop_requested(stop)
                if done % cfg.checkpoint_interval == 0 or done == cfg.max_steps or stopping:
                    p = self.save(done)
                    if stopping:
                        self.log(f"stopped at step {done}: checkpoint saved to {p}. Run the same command to resume.")
                        return 0
                    self.log(f"saved checkpoint {p}")
        return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m fastgpt.train"))
