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
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint as ckpt_io
from .config import KERNEL_CHOICES, PRESETS, GPTConfig, TrainConfig
from .data import DataError, ShardLoader
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
        if f.name == "compile":
            p.add_argument("--compile", action="store_true", default=None, help=HELP[f.name])
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
        hint = f"--total_batch_size {' or '.join(f'{t:,}' for t in totals)}"
        if micros:
            hint += f", or keep it and use --micro_batch_size {' or '.join(map(str, micros[-3:]))}"
        raise TrainError(
            f"--total_batch_size {cfg.total_batch_size:,} is not a multiple of micro_batch_size x seq_len x "
            f"world_size = {cfg.micro_batch_size} x {cfg.seq_len} x {world} = {per:,}. Values that divide: {hint}")
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
              f"{cfg.total_batch_size:,} tokens per step unchanged. A smaller --model or --seq_len also helps.",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _setup_device(cfg: TrainConfig) -> tuple[torch.device, int, int, int]:
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


def train(cfg: TrainConfig, given: set[str] = frozenset()) -> int:
    device, rank, _, world = _setup_device(cfg)
    master = rank == 0
    ddp = world > 1
    cuda = device.type == "cuda"

    def log(*a):
        if master:
            print(*a, flush=True)

    notes = []
    if not cuda and cfg.model is None:
        changed = {k: v for k, v in CPU_DEFAULTS.items() if k not in given}
        cfg = replace(cfg, **changed)
        flags = " ".join(f"--{k} {v}" for k, v in changed.items() if k != "model")
        notes.append(f"no GPU: using the CPU-sized preset '{cfg.model}' with {flags or 'your flags'}; "
                     f"pass --model gpt2 (and the batch flags) to train GPT-2 small on the CPU anyway")
    model_name = cfg.model or "gpt2"
    gcfg = GPTConfig.preset(model_name, kernels=cfg.kernels)
    for name in ("micro_batch_size", "seq_len", "max_steps", "eval_interval", "eval_steps", "checkpoint_interval"):
        if getattr(cfg, name) <= 0:
            raise TrainError(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "keep_checkpoints"):
        if getattr(cfg, name) < 0:
            raise TrainError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.seq_len > gcfg.block_size:
        raise TrainError(f"--seq_len {cfg.seq_len} exceeds the {model_name} block size {gcfg.block_size}")
    accum = grad_accum_steps(cfg, world)
    B, T = cfg.micro_batch_size, cfg.seq_len

    train_loader = ShardLoader(cfg.data_root, "train", B, T, rank, world, gcfg.vocab_size, verbose=master)
    val_loader = ShardLoader(cfg.data_root, "val", B, T, rank, world, gcfg.vocab_size, verbose=master)
    log(f"using device: {device.type}")
    for n in notes:
        log(n)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    raw = GPT(gcfg).to(device)
    optimizer = raw.configure_optimizers(weight_decay=cfg.weight_decay, lr=cfg.max_lr, device_type=device.type)
    from .ops import backend_name

    log(f"model: {model_name} ({raw.num_params() / 1e6:.1f}M parameters) | kernels: "
        f"{backend_name(gcfg.kernels, device)} | optimizer: {type(optimizer).__name__} | {world} rank(s) | "
        f"{cfg.total_batch_size:,} tokens per step = {B} x {T} x {world} x {accum} accumulation")

    # Resume from the newest complete checkpoint.
    log_dir = Path(cfg.log_dir)
    if master:
        for p in ckpt_io.remove_stale_temporaries(log_dir):
            print(f"removed {p}, left by an interrupted checkpoint write")
    path, state = ckpt_io.load_latest(log_dir, warn=master)
    start, last_val = 0, None
    if state is not None:
        _check_resume_config(path, state["config"], gcfg, model_name)
        raw.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        train_loader.load_state_dict(state["loader"])
        ckpt_io.set_rng_state(state["rng"])
        start, last_val = int(state["step"]), state.get("val_loss")
        vl = f", val loss {last_val:.4f}" if last_val is not None else ""
        log(f"resuming from {path} (step {start}{vl})")
        del state
    if start >= cfg.max_steps:
        log(f"{path} is already at step {start} >= --max_steps {cfg.max_steps}: nothing to do "
            f"(raise --max_steps to train further)")
        return 0

    core = torch.compile(raw) if cfg.compile else raw
    model = core
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(core, device_ids=[device.index] if cuda else None)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    val_steps = max(1, min(cfg.eval_steps, val_loader.total) // world)
    log_file = log_dir / "log.txt"
    if master:
        log_dir.mkdir(parents=True, exist_ok=True)

    def evaluate() -> float:
        core.eval()
        val_loader.reset()
        total = torch.zeros((), device=device)
        with torch.no_grad():
            for _ in range(val_steps):
                x, y = val_loader.next_batch()
                with autocast():
                    _, loss = core(x.to(device), y.to(device), return_logits=False)
                total += loss.float()
        total /= val_steps
        if ddp:
            dist.all_reduce(total)
            total /= world
        core.train()
        return total.item()

    def save(step: int) -> Path:
        p = ckpt_io.checkpoint_path(log_dir, step)
        if master:
            ckpt_io.save_atomic({
                "config": asdict(raw.config),
                "model": _to_cpu(raw.state_dict()),
                "optimizer": _to_cpu(optimizer.state_dict()),
                "step": step,
                "val_loss": last_val,
                "loader": train_loader.state_dict(),
                "rng": ckpt_io.rng_state(),
                "train_config": asdict(cfg),
                "world_size": world,
            }, p)
            if cfg.keep_checkpoints > 0:
                for _, old in ckpt_io.list_checkpoints(log_dir)[:-cfg.keep_checkpoints]:
                    if old != p:
                        old.unlink(missing_ok=True)
        if ddp:
            dist.barrier()
        return p

    params = [p for p in raw.parameters() if p.requires_grad]
    bad_in_row = 0
    with StopRequest() as stop:
        for step in range(start, cfg.max_steps):
            t0 = time.perf_counter()
            model.train()
            optimizer.zero_grad(set_to_none=True)
            loss_sum = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = train_loader.next_batch()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                # Gradients cross ranks only once per step: on the last micro-step.
                sync = contextlib.nullcontext() if not ddp or micro == accum - 1 else model.no_sync()
                with sync:
                    with autocast():
                        _, loss = model(x, y, return_logits=False)
                    loss = loss / accum
                    loss_sum += loss.detach().float()
                    loss.backward()
            if ddp:
                dist.all_reduce(loss_sum)
                loss_sum /= world
            clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
            norm = torch.nn.utils.clip_grad_norm_(params, clip)
            lr = get_lr(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_val, norm_val = loss_sum.item(), norm.item()
            finite = math.isfinite(loss_val) and math.isfinite(norm_val)
            if finite:
                optimizer.step()
                bad_in_row = 0
            else:
                optimizer.zero_grad(set_to_none=True)
                bad_in_row += 1
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            line = (f"step {step} | loss: {loss_val:.4f} | lr: {lr:.6f} | norm: {norm_val:.4f} | "
                    f"dt: {dt * 1000:.0f}ms | tok/s: {cfg.total_batch_size / dt:,.0f}")
            if not finite:
                line += " | skipped: non-finite loss or gradient norm, weights unchanged"
            log(line)
            if master:
                with open(log_file, "a") as f:
                    f.write(f"{step} train {loss_val!r} norm {norm_val!r} lr {lr!r}\n")
            if bad_in_row >= MAX_NONFINITE:
                raise TrainError(f"{bad_in_row} steps in a row had a non-finite loss or gradient norm; the run is "
                                 f"diverging. Lower the learning rate (e.g. --max_lr {cfg.max_lr / 2:g}) and resume "
                                 f"from the last checkpoint in {log_dir}, or start over with a new --log_dir.")

            done = step + 1
            if done % cfg.eval_interval == 0 or done == cfg.max_steps:
                last_val = evaluate()
                log(f"val loss {last_val:.4f}")
                if master:
                    with open(log_file, "a") as f:
                        f.write(f"{done} val {last_val!r}\n")
            stopping = stop.requested
            if ddp:  # a signal may reach some ranks only; all must stop at the same step
                flag = torch.tensor(float(stopping), device=device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                stopping = bool(flag.item())
            if done % cfg.checkpoint_interval == 0 or done == cfg.max_steps or stopping:
                p = save(done)
                if stopping:
                    log(f"stopped at step {done}: checkpoint saved to {p}. Run the same command to resume.")
                    return 0
                log(f"saved checkpoint {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m fastgpt.train"))
