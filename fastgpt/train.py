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
from . import distributed
from .config import KERNEL_CHOICES, PRESETS, GPTConfig, TrainConfig
from .data import DataError, ShardLoader
from .distributed import SHARD_MODES, to_cpu as _to_cpu  # noqa: F401 (_to_cpu: tests)
from .model import GPT

# With no GPU and no --model, these replace the GPU-sized defaults for every flag the user did not give:
# a 7M-parameter model on 1,024-token steps shows the loss falling within a minute or two on a laptop CPU
# and finishes 200 steps in minutes (the GPU defaults would need hours there).
CPU_DEFAULTS = dict(model="tiny", total_batch_size=1024, micro_batch_size=8, seq_len=128, max_lr=2e-3,
                    warmup_steps=10, max_steps=200, eval_interval=25, eval_steps=4, checkpoint_interval=50)
MAX_NONFINITE = 3  # consecutive skipped updates before giving up


class TrainError(Exception):
    """A problem with the requested run that the user can fix; printed without a traceback."""


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
        if f.name in ("compile", "activation_checkpointing"):
            p.add_argument(f"--{f.name}", action="store_true", default=None, help=HELP[f.name])
        elif f.name == "shard":
            p.add_argument("--shard", choices=SHARD_MODES, default=None, help=f"{HELP[f.name]} [{d}]")
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
        dist.init_process_group(backend="nccl" if use_cuda else "gloo",
                                **({"device_id": device} if use_cuda else {}))
    return device, rank, local_rank, world


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
def main(argv=None, prog: str = "train.py") -> int:
    cfg, given = parse_args(argv, prog)
    try:
        return train(cfg, given)
    except (TrainError, DataError, ckpt_io.CheckpointError) as e:
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
    return Trainer(cfg, given).run()


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
            if "micro_batch_size" in changed and self.world > 1:
                # The same steps on several ranks: fewer sequences per rank, so the losses match one process.
                total = changed.get("total_batch_size", cfg.total_batch_size)
                seq = changed.get("seq_len", cfg.seq_len)
                fits = [m for m in range(changed["micro_batch_size"], 0, -1) if total % (m * seq * self.world) == 0]
                changed["micro_batch_size"] = fits[0] if fits else changed["micro_batch_size"]
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
        self.raw.activation_checkpointing = cfg.activation_checkpointing
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
        """Load the newest complete checkpoint in log_dir, if any: model, optimizer, loader, RNG, step."""
        if self.master:
            for p in ckpt_io.remove_stale_temporaries(self.log_dir):
                print(f"removed {p}, left by an interrupted checkpoint write")
        path, state = ckpt_io.load_latest(self.log_dir, warn=self.master)
        self.resumed_from = path if state is not None else None
        self.optimizer_state = None
        if state is None:
            return
        _check_resume_config(path, state["config"], self.gcfg, self.model_name)
        self.raw.load_state_dict(state["model"])
        self.optimizer_state = state["optimizer"]  # wrap_model loads it, into the sharded optimizer if any
        self.train_loader.load_state_dict(state["loader"])
        ckpt_io.set_rng_state(state["rng"])
        self.start_step, self.last_val = int(state["step"]), state.get("val_loss")
        vl = f", val loss {self.last_val:.4f}" if self.last_val is not None else ""
        self.log(f"resuming from {path} (step {self.start_step}{vl})")

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
            param_dtype=torch.bfloat16 if self.cuda else None, optimizer_state=getattr(self, "optimizer_state", None))
        self.optimizer_state = None
        self.params = [p for p in self.raw.parameters() if p.requires_grad]  # fsdp's are new (sharded) ones
        if self.ddp:
            self.log(distributed.describe(self.cfg.shard, self.world, self.cuda))

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
            # ddp/zero1: gradients cross ranks only once per step, on the last micro-step (fsdp: every one).
            sync = (contextlib.nullcontext() if not distributed.defers_grad_sync(model) or micro == self.accum - 1
                    else model.no_sync())
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
        norm = distributed.clip_grad_norm_(self.params, clip)
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
            for _ in range(val_steps):
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
            "shard": self.cfg.shard,
        }

    def save(self, step: int) -> Path:
        """Rank 0 writes model_{step}.pt atomically and applies --keep_checkpoints; all ranks wait for it."""
        p = ckpt_io.checkpoint_path(self.log_dir, step)
        state = self.checkpoint_state(step)
        if self.master:
            ckpt_io.save_atomic(state, p)
            if self.cfg.keep_checkpoints > 0:
                for _, old in ckpt_io.list_checkpoints(self.log_dir)[:-self.cfg.keep_checkpoints]:
                    if old != p:
                        old.unlink(missing_ok=True)
        if self.ddp:
            dist.barrier()
        return p

    def stop_requested(self, stop: "StopRequest") -> bool:
        stopping = stop.requested
        if self.ddp:  # a signal may reach some ranks only; all must stop at the same step
            flag = torch.tensor(float(stopping), device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stopping = bool(flag.item())
        return stopping

    # --------------------------------------------------------------------------------------------
    # The loop
    # --------------------------------------------------------------------------------------------
    def run(self) -> int:
        cfg = self.cfg
        self.resume()
        if self.start_step >= cfg.max_steps:
            self.log(f"{self.resumed_from} is already at step {self.start_step} >= --max_steps {cfg.max_steps}: "
                     f"nothing to do (raise --max_steps to train further)")
            return 0
        self.wrap_model()
        if self.master:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        with StopRequest() as stop:
            for step in range(self.start_step, cfg.max_steps):
                r = self.train_step(step)
                self.log_step(r)
                self.check_divergence(r)
                done = step + 1
                if done % cfg.eval_interval == 0 or done == cfg.max_steps:
                    self.log_eval(done)
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
