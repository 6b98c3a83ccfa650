"""resolve(cfg, given, env) -> RunPlan: everything about a run that follows from its flags and the machine,
decided before any data, model or process group exists. Pure apart from reading --init_from / --resume_from /
--hellaswag_data and asking the kernels whether Triton runs here, so every flag error comes before the slow
part of setup, and the rules are tested without a Trainer (tests pass an `Env`).

    device and world     Env (from torchrun's variables and torch.cuda) -> device, rank, world
    CPU defaults         no GPU and no --model: CPU_DEFAULTS for every flag not given
    model                --model preset, or the shape of --init_from's weights
    accumulation         total_batch_size / (micro_batch_size x seq_len x world), or an error with values that fit
    dtype                choose_dtype: bf16 / fp16 (+ loss scaling) / fp32 from what the device reports
    cross-flag checks    --restart with --resume_from, --seq_len against the block size, --kernels triton here, ...
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from ..config import DTYPE_CHOICES, PRESETS, GPTConfig
from .options import TrainConfig, TrainError

# With no GPU and no --model, these replace the GPU-sized defaults for every flag the user did not give:
# a 7M-parameter model on 1,024-token steps shows the loss falling within a minute and finishes in a few
# minutes (docs/cpu.md has the sweep behind the step count: `python -m bench.cpu_sweep`).
CPU_DEFAULTS = dict(model="tiny", total_batch_size=1024, micro_batch_size=8, seq_len=128, max_lr=2e-3,
                    warmup_steps=10, max_steps=320, eval_interval=25, eval_steps=4, checkpoint_interval=50)


@dataclass(frozen=True)
class Env:
    """What the machine and the launcher say: torchrun's RANK / LOCAL_RANK / WORLD_SIZE and the GPU."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    cuda: bool = False  # torch sees a CUDA GPU
    bf16: bool = False  # that GPU has bf16 (compute capability >= 8.0)
    gpu: str = "this GPU"

    @classmethod
    def from_os(cls, device: str = "auto") -> "Env":
        import torch

        ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
        rank, local, world = ((int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
                               int(os.environ.get("WORLD_SIZE", 1))) if ddp else (0, 0, 1))
        cuda = device != "cpu" and torch.cuda.is_available()
        bf16, gpu = False, "this GPU"
        if cuda:
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            major, minor = torch.cuda.get_device_capability(local)
            gpu = f"{torch.cuda.get_device_name(local)} (compute capability {major}.{minor})"
        return cls(world, rank, local, cuda, bf16, gpu)


@dataclass(frozen=True)
class RunPlan:
    cfg: TrainConfig  # the flags with the CPU defaults applied
    given: frozenset
    device: str  # "cpu" or "cuda:N"
    rank: int
    local_rank: int
    world: int
    model_name: str
    gcfg: GPTConfig
    accum: int  # micro-steps per optimizer step
    eval_batch: int  # sequences per eval micro-step, fixed before the per-rank split (val tokens: world-free)
    dtype: str  # bf16 | fp16 (with loss scaling) | fp32
    sample_every: int  # steps between samples (0: off)
    notes: tuple = ()  # lines printed at startup
    init_state: dict | None = field(default=None, repr=False, compare=False)  # --init_from's weights
    hellaswag_examples: list | None = field(default=None, repr=False, compare=False)

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ddp(self) -> bool:
        return self.world > 1

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


def resolve(cfg: TrainConfig, given=frozenset(), env: Env | None = None) -> RunPlan:
    env = env or Env.from_os(cfg.device)
    if cfg.device == "cuda" and not env.cuda:
        raise TrainError("--device cuda was requested but torch sees no CUDA GPU (check nvidia-smi and that "
                         "your torch build has CUDA); use --device cpu")
    notes: list[str] = []
    eval_batch = cfg.micro_batch_size
    if not env.cuda and cfg.model is None:
        changed = {k: v for k, v in CPU_DEFAULTS.items() if k not in given}
        eval_batch = changed.get("micro_batch_size", cfg.micro_batch_size)
        world_note = ""
        if env.world > 1 and not {"micro_batch_size", "total_batch_size"} & set(given):
            changed, world_note = cpu_defaults_for_world(changed, env.world, cfg.seq_len)
        cfg = replace(cfg, **changed)
        flags = " ".join(f"--{k} {v}" for k, v in changed.items() if k != "model")
        notes.append(f"no GPU: using the CPU-sized preset '{cfg.model}' with {flags or 'your flags'}{world_note}; "
                     f"pass --model gpt2 (and the batch flags) to train GPT-2 small on the CPU anyway")
    model_name = cfg.model or "gpt2"
    gcfg, init_state = GPTConfig.preset(model_name, kernels=cfg.kernels), None
    if cfg.init_from:
        gcfg, init_state, model_name, note = load_init_weights(cfg, given)
        notes.append(note)
    sample_every, examples = check_watch_flags(cfg, gcfg, env.world)
    check_before_torch(cfg)
    if cfg.restart and cfg.resume_from:
        raise TrainError("--restart starts a new run and --resume_from continues one: give only one")
    if cfg.resume_from and not Path(cfg.resume_from).is_file():
        raise TrainError(f"--resume_from {cfg.resume_from}: no such file")
    device = f"cuda:{env.local_rank}" if env.cuda else "cpu"
    if gcfg.kernels == "triton":
        import torch

        from ..ops import use_triton

        try:
            use_triton("triton", torch.empty(0, device=device))
        except RuntimeError as e:
            raise TrainError(f"--kernels triton: {e}") from None
    if cfg.seq_len > gcfg.block_size:
        raise TrainError(f"--seq_len {cfg.seq_len} exceeds the {model_name} block size {gcfg.block_size}")
    from ..parallel import strategy

    strategy(cfg.shard, env.world).check(cfg)
    if cfg.shard != "ddp" and env.world == 1:
        notes.append(f"--shard {cfg.shard} with a single process: nothing to shard, training as one process")
    accum = grad_accum_steps(cfg, env.world)
    dtype = choose_dtype(cfg.dtype, "cuda" if env.cuda else "cpu", env.bf16, env.gpu)
    return RunPlan(cfg, frozenset(given), device, env.rank, env.local_rank, env.world, model_name, gcfg, accum,
                   eval_batch, dtype, sample_every, tuple(notes), init_state, examples)


def get_lr(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to max_lr over warmup_steps, then cosine decay to max_lr x min_lr_ratio at max_steps."""
    min_lr = cfg.max_lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.max_lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.max_lr - min_lr)


def check_before_torch(cfg: TrainConfig) -> None:
    """The flag errors that need neither torch nor a model: main() checks them before importing torch (seconds),
    resolve() again for callers of the API. --device cpu with --kernels triton and no interpreter is decided
    here on the flags alone, in the words the kernels use (kernels.why_not)."""
    check_log_dir(Path(cfg.log_dir))
    if cfg.kernels == "triton" and cfg.device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise TrainError("--kernels triton: kernels='triton' was requested but Triton cannot run here: tensors are "
                         "on the CPU and TRITON_INTERPRET=1 is not set. Use --kernels auto or --kernels torch.")


def check_log_dir(d: Path) -> None:
    """--log_dir must be a directory this process can create files in (or create): checked here, before data
    and model, so a typo costs no setup. The run lock (lock.RunLock) checks again by writing, at step 0."""
    existing = d
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    why = None
    if not existing.is_dir():
        why = f"Not a directory: {existing}"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"Permission denied: {existing}"
    if why:
        raise TrainError(f"--log_dir {d} is not a writable directory ({why}); pass a --log_dir you can write to")


def cpu_defaults_for_world(changed: dict, world: int, seq_len: int) -> tuple[dict, str]:
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
    """The autocast dtype of a run, "bf16", "fp16" (with loss scaling) or "fp32", from what the device reports.
    auto: bf16 on a GPU that has it (compute capability >= 8.0), fp16 on older GPUs, fp32 on CPU, where autocast
    would only add casts. An explicit bf16 on a GPU without bf16 is an error (it would be emulated, slowly);
    bf16 and fp16 on CPU are allowed (fp16 for testing)."""
    if requested not in DTYPE_CHOICES:
        raise TrainError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}, got {requested!r}")
    if requested == "auto":
        return ("bf16" if bf16_supported else "fp16") if device_type == "cuda" else "fp32"
    if requested == "bf16" and device_type == "cuda" and not bf16_supported:
        raise TrainError(f"--dtype bf16: {gpu} has no bf16 support (it needs compute capability 8.0 or newer); "
                         f"use --dtype fp16 (loss-scaled) or --dtype auto, which picks fp16 here")
    return requested


def preset_of(config: dict) -> str | None:
    """The preset whose shape a GPTConfig dict has (kernels and dropout aside), or None for a custom model."""
    return next((n for n, c in PRESETS.items()
                 if all(config.get(k) == v for k, v in asdict(c).items() if k not in ("kernels", "dropout"))), None)


def load_init_weights(cfg: TrainConfig, given) -> tuple[GPTConfig, dict, str, str]:
    """--init_from: (model config, weights, model name, startup note) from HF GPT-2 weights or a checkpoint."""
    src = cfg.init_from
    path = Path(src).expanduser()
    try:
        if path.is_file():
            from .. import checkpoint as ckpt_io

            ck = ckpt_io.load(path)
            gcfg = GPTConfig(**{**ck["config"], "kernels": cfg.kernels})
            state, what = ck["model"], f"fastgpt checkpoint {path} (step {ck.get('step', '?')})"
        else:
            from ..hf import load_pretrained
            from ..model import GPT

            # An unknown path or an offline hub id fails here with a message naming it.
            model = load_pretrained(GPT, src, kernels=cfg.kernels)
            gcfg, state, what = model.config, model.state_dict(), f"HuggingFace GPT-2 weights {src}"
    except (OSError, ValueError, RuntimeError) as e:
        raise TrainError(f"--init_from {src}: {e}") from None
    except (KeyError, TypeError) as e:  # a checkpoint without a usable config
        raise TrainError(f"--init_from {src}: not a fastgpt checkpoint with a model config ({e!r})") from None
    preset = preset_of(asdict(gcfg))
    if "model" in given and preset != cfg.model:
        raise TrainError(f"--model {cfg.model} does not match --init_from {src} (a {preset or 'custom'} model: "
                         f"n_layer={gcfg.n_layer}, n_head={gcfg.n_head}, n_embd={gcfg.n_embd}); drop --model")
    name = preset or f"{gcfg.n_layer}-layer {gcfg.n_embd}-wide model"
    return gcfg, state, name, (f"init_from: {what} -> {name} (block_size {gcfg.block_size}); "
                               f"starting at step 0 with a fresh optimizer")


def check_watch_flags(cfg: TrainConfig, gcfg: GPTConfig, world: int) -> tuple[int, list | None]:
    """Samples and HellaSwag during training: (steps between samples, the HellaSwag examples or None)."""
    sample_every = max(1, cfg.max_steps // 4) if cfg.sample_interval == -1 else cfg.sample_interval
    from ..tokenizer import N_VOCAB

    if gcfg.vocab_size < N_VOCAB:  # a model over another vocabulary: GPT-2 text means nothing to it
        for name in ("sample_interval", "hellaswag_interval"):
            if getattr(cfg, name) > 0:
                raise TrainError(f"--{name} needs the GPT-2 vocabulary; this model has {gcfg.vocab_size} "
                                 f"tokens (pass --{name} 0)")
        sample_every = 0
    if cfg.hellaswag_interval <= 0:
        return sample_every, None
    from ..parallel import strategy

    strategy(cfg.shard, world).check(cfg)  # fsdp at several ranks refuses it
    if not cfg.hellaswag_data:
        raise TrainError("--hellaswag_interval needs --hellaswag_data FILE (a HellaSwag .jsonl, e.g. "
                         "hellaswag_val.jsonl from github.com/rowanz/hellaswag)")
    from ..hellaswag import load_examples

    try:
        return sample_every, load_examples(cfg.hellaswag_data, cfg.hellaswag_limit or None)
    except (OSError, ValueError) as e:
        raise TrainError(f"--hellaswag_data: {e}") from None
