"""Training checkpoints: atomic writes, finding the latest complete one, loading without pickle.

A checkpoint `log/model_00050.pt` is a dict of plain Python values and tensors only, so
`torch.load(path)` (weights_only=True, the default) opens it and a file carrying pickled objects is
refused. It is written to a temporary file in the same directory, fsynced, then renamed over the
final name: a crash at any moment leaves either the old set of files or the new one, never a
truncated `model_*.pt`. Leftover temporaries (".model_00050.pt.tmp*") are removed at the next start.
"""
from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

CKPT_RE = re.compile(r"^model_(\d+)\.pt$")
TMP_GLOB = ".model_*.pt.tmp*"


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


def load(path: str | Path, map_location="cpu") -> dict:
    """torch.load with weights_only=True; any failure becomes a CheckpointError naming the file."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"{path}: not a fastgpt checkpoint (no 'model' entry)")
    return ckpt


def load_latest(log_dir: str | Path, map_location="cpu", warn: bool = True) -> tuple[Path | None, dict | None]:
    """The highest-step checkpoint that loads; each unreadable newer one is named in a warning."""
    ckpts = list_checkpoints(log_dir)
    for i in range(len(ckpts) - 1, -1, -1):
        step, path = ckpts[i]
        try:
            return path, load(path, map_location)
        except CheckpointError as e:
            if warn:
                prev = ckpts[i - 1][1] if i > 0 else None
                fallback = f"falling back to {prev}" if prev else "no earlier checkpoint: starting fresh"
                warnings.warn(f"checkpoint {path} is corrupt or incomplete ({e}); {fallback}", stacklevel=2)
    return None, None


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
    cfg = dict(ckpt["config"])
    if kernels is not None:
        cfg["kernels"] = kernels
    model = GPT(GPTConfig(**cfg))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
