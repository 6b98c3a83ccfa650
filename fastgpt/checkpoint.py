"""Training checkpoints: atomic writes, finding the latest complete one, loading without pickle.

A checkpoint `log/model_00050.pt` is a dict of plain Python values and tensors only, so
`torch.load(path)` (weights_only=True, the default) opens it and a file carrying pickled objects is
refused. It is written to a temporary file in the same directory, fsynced, then renamed over the
final name: a crash at any moment leaves either the old set of files or the new one, never a
truncated `model_*.pt`. Leftover temporaries (".model_00050.pt.tmp*") are removed at the next start.

Resume takes the newest checkpoint that is usable: it loads, holds every entry a run needs with the
shapes the model has, and has only finite weights, optimizer moments and val loss. A newer file that
fails any of these is named in a warning and skipped; when every file fails, resuming is refused
(never a silent fresh start over them). `healthy_checkpoints` lists the usable ones newest-first for
messages that tell the user where to resume from.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

CKPT_RE = re.compile(r"^model_(\d+)\.pt$")
TMP_GLOB = ".model_*.pt.tmp*"
# What a training checkpoint must hold to resume a run (train_config and data_fingerprint are optional:
# older checkpoints lack them, and then only what they hold is compared).
REQUIRED = ("config", "model", "optimizer", "step", "loader", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def checkpoint_path(log_dir: str | Path, step: int) -> Path:
    return Path(log_dir) / f"model_{step:05d}.pt"


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_atomic(obj: dict, path: str | Path) -> Path:
    """torch.save(obj) to path so that path is either absent/old or complete, never partial."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def remove_stale_temporaries(log_dir: str | Path) -> list[Path]:
    """Delete temporaries left by a process killed mid-write; returns what was removed."""
    d = Path(log_dir)
    stale = sorted(d.glob(TMP_GLOB)) if d.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def list_checkpoints(log_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) for every model_NNNNN.pt in log_dir, by step as an integer (not by name)."""
    d = Path(log_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return sorted(found)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load(path: str | Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True; any failure becomes a CheckpointError naming the file."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint "
                              f"(pass a file such as {checkpoint_path(path, 1000)})")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({_first_line(e)})") from None
    if not magic:
        raise CheckpointError(f"{path}: empty file (0 bytes), e.g. left by a full disk")
    # torch.save writes a zip archive (PK\x03\x04); very old torch versions a bare pickle (\x80).
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a checkpoint (not a file written by torch.save; "
                              f"checkpoints are the model_NNNNN.pt files in the --log_dir)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            # Never suggest weights_only=False: that runs whatever the pickle says.
            why = "it holds pickled Python objects, which fastgpt never loads"
        elif "central directory" in str(e) or "PytorchStreamReader failed" in str(e):
            why = "truncated or corrupt: incomplete zip archive"
        else:
            why = _first_line(e)
        raise CheckpointError(f"{path}: cannot be loaded safely ({why})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a fastgpt checkpoint (no 'model' entry)")
    return ckpt


def nonfinite(state: dict) -> list[str]:
    """Names of the entries of a checkpoint state that hold NaN or Inf: weights, optimizer tensors, val loss."""
    bad = []

    def visit(obj, name):
        if isinstance(obj, torch.Tensor):
            if obj.is_floating_point() and obj.numel() and not bool(torch.isfinite(obj).all()):
                bad.append(name)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, f"{name}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                visit(v, f"{name}.{i}")

    visit(state.get("model", {}), "model")
    visit(state.get("optimizer", {}).get("state", {}) if isinstance(state.get("optimizer"), dict) else {},
          "optimizer.state")
    v = state.get("val_loss")
    if isinstance(v, (int, float)) and not (v == v and abs(v) != float("inf")):
        bad.append("val_loss")
    return bad


def check_state(state: dict, path: str | Path, model: torch.nn.Module | None = None,
                optimizer: torch.optim.Optimizer | None = None) -> None:
    """Raise CheckpointError unless state can resume a run of `model`/`optimizer`: every entry present,
    the model's keys and shapes, optimizer moments shaped like their parameters, finite values."""
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"{path}: incomplete checkpoint, missing {', '.join(map(repr, missing))}")
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise CheckpointError(f"{path}: 'step' is {state['step']!r}, not a step count")
    for k in ("config", "model", "optimizer", "loader", "rng"):
        if not isinstance(state[k], dict):
            raise CheckpointError(f"{path}: {k!r} is a {type(state[k]).__name__}, not a dict")
    if model is not None:
        want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        got = state["model"]
        lost, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        if lost:
            raise CheckpointError(f"{path}: the model weights lack {_some(lost)}")
        if extra:
            raise CheckpointError(f"{path}: unexpected model weights {_some(extra)}")
        for k, shape in want.items():
            t = got[k]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                have = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise CheckpointError(f"{path}: model weight {k} has shape {have}, the model needs {shape}")
    opt = state["optimizer"]
    if optimizer is not None and isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list):
        params = [p for g in optimizer.param_groups for p in g["params"]]
        n_saved = sum(len(g.get("params", ())) for g in opt["param_groups"] if isinstance(g, dict))
        if len(opt["param_groups"]) != len(optimizer.param_groups) or n_saved != len(params):
            raise CheckpointError(f"{path}: the optimizer state covers {n_saved} tensors in "
                                  f"{len(opt['param_groups'])} groups, the model has {len(params)} in "
                                  f"{len(optimizer.param_groups)}")
        for i, s in opt["state"].items():
            if not isinstance(i, int) or not 0 <= i < len(params) or not isinstance(s, dict):
                raise CheckpointError(f"{path}: optimizer state entry {i!r} matches no parameter")
            for name, t in s.items():
                if isinstance(t, torch.Tensor) and t.dim() > 0 and tuple(t.shape) != tuple(params[i].shape):
                    raise CheckpointError(f"{path}: optimizer {name} of tensor {i} has shape {tuple(t.shape)}, "
                                          f"its parameter {tuple(params[i].shape)}")
    for k in ("shard", "position"):
        if not isinstance(state["loader"].get(k), int):
            raise CheckpointError(f"{path}: loader state lacks an integer {k!r}")
    for k in ("python", "numpy", "torch"):
        if k not in state["rng"]:
            raise CheckpointError(f"{path}: RNG state lacks {k!r}")
    bad = nonfinite(state)
    if bad:
        raise CheckpointError(f"{path}: non-finite values (NaN/Inf) in {_some(bad)}: written by a diverging run")


def _some(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def warning(msg: str) -> None:
    """One `warning:` line on stderr (not Python's warnings module: no source line, no category)."""
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def load_latest(log_dir: str | Path, map_location="cpu", warn: bool = True,
                check: Callable[[Path, dict], None] | None = None) -> tuple[Path | None, dict | None]:
    """The highest-step checkpoint that loads and passes `check` (which raises CheckpointError for an
    unusable one; other errors propagate). Each unusable newer one is named in a warning. No
    checkpoints: (None, None). Checkpoints but none usable: UnusableCheckpoints naming every file."""
    ckpts = list_checkpoints(log_dir)
    problems = []
    for i in range(len(ckpts) - 1, -1, -1):
        step, path = ckpts[i]
        try:
            state = load(path, map_location)
            if check is not None:
                check(path, state)
            return path, state
        except CheckpointError as e:
            problems.append(str(e))
            if warn:
                prev = ckpts[i - 1][1] if i > 0 else None
                if prev is not None:
                    warning(f"checkpoint {path} is unusable ({str(e).removeprefix(f'{path}: ')}); "
                            f"falling back to {prev}")
    if problems:
        raise UnusableCheckpoints(log_dir, problems)
    return None, None



class UnusableCheckpoints(CheckpointError):
    """Every checkpoint in a log directory failed to load: refuse to start over them."""

    def __init__(self, log_dir, problems: list[str]):
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"no usable checkpoint in {log_dir}; every one failed:\n{lines}\n"
                         f"  Nothing was overwritten. To start over in this directory pass --restart (the files "
                         f"are moved to a subdirectory, not deleted), use another --log_dir, or name a good "
                         f"checkpoint with --resume_from FILE.")


def healthy_checkpoints(log_dir: str | Path, check: Callable[[Path, dict], None] | None = None
                        ) -> Iterator[tuple[int, Path]]:
    """(step, path) of each usable checkpoint in log_dir, newest first: it loads, holds every entry, and
    its weights, optimizer state and val loss are finite (plus `check`, if given). Lazy: each is loaded
    only when asked for, so `next(healthy_checkpoints(d), None)` reads as few files as it can."""
    for step, path in reversed(list_checkpoints(log_dir)):
        try:
            state = load(path)
            check_state(state, path)
            if check is not None:
                check(path, state)
        except CheckpointError:
            continue
        yield step, path


def newest_healthy(log_dir: str | Path) -> Path | None:
    """The newest usable checkpoint in log_dir (see healthy_checkpoints), or None."""
    found = next(healthy_checkpoints(log_dir), None)
    return found[1] if found else None


def move_aside(log_dir: str | Path, paths: list[Path], why: str) -> Path | None:
    """Move files of log_dir into a new subdirectory log_dir/{why}_YYYYmmdd-HHMMSS/ (nothing is deleted)."""
    paths = [p for p in paths if p.exists()]
    if not paths:
        return None
    dest = Path(log_dir) / f"{why}_{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while dest.exists():
        n += 1
        dest = Path(log_dir) / f"{why}_{time.strftime('%Y%m%d-%H%M%S')}_{n}"
    dest.mkdir(parents=True)
    for p in paths:
        os.replace(p, dest / p.name)
    _fsync_dir(Path(log_dir))
    return dest


def describe_write_error(path: Path, e: BaseException) -> str:
    """One line for a failed checkpoint write: the path, the cause, and the space left where it matters."""
    if isinstance(e, OSError) and e.strerror:
        cause = e.strerror + (f": {e.filename}" if e.filename else "")
    else:  # torch's writer: "[enforce fail at inline_container.cc:...] . PytorchStreamWriter failed writing ..."
        msg = " ".join(str(e).split())
        cause = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", msg)[:200] or type(e).__name__
    try:
        free = shutil.disk_usage(path.parent).free
        if free < 1 << 30 or "write" in cause.lower():
            cause += f"; {free / 2**20:,.0f} MiB free on that disk"
    except OSError:
        pass
    return f"could not write checkpoint {path}: {cause}"


# ------------------------------------------------------------------------------------------------
# RNG state as tensors and plain values (weights_only cannot unpickle numpy arrays)
# ------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),  # (version, tuple of 625 ints, gauss_next)
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        cuda = [s.cpu() for s in state["cuda"]][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda + [torch.cuda.get_rng_state(i) for i in range(len(cuda), torch.cuda.device_count())])


# ------------------------------------------------------------------------------------------------
def load_model(path: str | Path, device="cpu", kernels: str | None = None):
    """A GPT from a training checkpoint, in eval mode."""
    from .config import GPTConfig
    from .model import GPT

    ckpt = load(path)
    if not isinstance(ckpt.get("config"), dict):
        raise CheckpointError(f"{path}: no model 'config' entry")
    cfg = dict(ckpt["config"])
    if kernels is not None:
        cfg["kernels"] = kernels
    try:
        model = GPT(GPTConfig(**cfg))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its 'config' is not a GPT configuration ({_first_line(e)})") from None
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: its weights do not fit its config ({_first_line(e)})") from None
    return model.to(device).eval()
