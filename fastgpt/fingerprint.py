"""What a checkpoint remembers about its run, so a resume can tell whether it continues the same run.

Exact resume needs the same data and the same settings of everything that shapes the trajectory. A
checkpoint stores its `train_config` (every flag) and `data_fingerprint` (per split, each shard's name,
size and a cheap content hash); `resume_changes` compares them with the current run and names each
difference. The training flags compared are the TrainConfig fields marked resume=True
(fastgpt/train/options.py); flags that change only bookkeeping or
speed (eval and checkpoint intervals, --micro_batch_size, --kernels, --compile, --log_dir, the number
of ranks) may change freely. --micro_batch_size keeps the token order but sums the micro-steps in
another order, so losses then agree to rounding, not bit for bit.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

_BLOCK = 1 << 16  # bytes hashed at each sampled offset
_SAMPLES = 16  # evenly spaced blocks per shard, plus the first and the last


def shard_hash(path: Path) -> str:
    """blake2b of the size and 18 blocks of 64 KiB (start, end, 16 evenly spaced): about 1 MiB read per
    shard, whatever its size, yet any rewrite of the file (re-tokenization, truncation) changes it."""
    size = path.stat().st_size
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    offsets = sorted({0, max(0, size - _BLOCK), *(i * size // (_SAMPLES + 1) for i in range(1, _SAMPLES + 1))})
    with open(path, "rb") as f:
        for off in offsets:
            f.seek(off)
            h.update(f.read(_BLOCK))
    return h.hexdigest()


def data_fingerprint(shards: dict[str, list[Path]]) -> dict[str, list[list]]:
    """{split: [[name, size, hash], ...]}: plain lists and strings, so it loads with weights_only."""
    return {split: [[p.name, os.path.getsize(p), shard_hash(p)] for p in paths] for split, paths in shards.items()}


def _data_changes(saved: dict, now: dict) -> list[str]:
    out = []
    for split in sorted(set(saved) | set(now)):
        a = {n: (size, h) for n, size, h in saved.get(split, [])}
        b = {n: (size, h) for n, size, h in now.get(split, [])}
        gone, new = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        changed = sorted(n for n in set(a) & set(b) if a[n] != b[n])
        for what, names in (("missing", gone), ("new", new), ("changed", changed)):
            if names:
                more = f" and {len(names) - 3} more" if len(names) > 3 else ""
                out.append(f"{split} shards {what}: {', '.join(names[:3])}{more}")
    return out


def resume_changes(saved_cfg: dict | None, saved_fp: dict | None, cfg, fp: dict) -> dict[str, str]:
    """{flag or 'data': description} for every difference between a checkpoint's run and this one."""
    changes = {}
    if saved_cfg:
        for name in type(cfg).resume_flags():
            if name in saved_cfg and saved_cfg[name] != getattr(cfg, name):
                changes[name] = f"--{name} {saved_cfg[name]} (now {getattr(cfg, name)})"
    if saved_fp is not None:
        diff = _data_changes(saved_fp, fp)
        if diff:
            where = ""
            if saved_cfg and saved_cfg.get("data_root") != cfg.data_root:
                where = f" (--data_root {saved_cfg.get('data_root')}, now {cfg.data_root})"
            changes["data"] = "the training data changed" + where + ": " + "; ".join(diff)
    elif saved_cfg and "data_root" in saved_cfg and saved_cfg["data_root"] != cfg.data_root:
        # A checkpoint without a fingerprint (older fastgpt): the directory name is all there is to compare.
        changes["data"] = f"--data_root {saved_cfg['data_root']} (now {cfg.data_root})"
    return changes


def parse_allowed(value: str) -> set[str]:
    """--allow_changed FLAG[,FLAG]: resume flags or 'data', with or without the leading dashes."""
    from .train.options import TrainConfig

    allowable = TrainConfig.resume_flags() + ("data",)  # `data` stands for the shards' content
    names = {v.strip().lstrip("-") for v in value.split(",") if v.strip()}
    unknown = sorted(names - set(allowable))
    if unknown:
        raise ValueError(f"--allow_changed {value}: unknown {', '.join(unknown)}; choose from {', '.join(allowable)}")
    return names
