"""Shard files on disk: naming, checking, and the manifest that lets a start skip re-reading them.

A shard is a 1-D integer `.npy` file named `<split>_<anything>.npy` (`train_00000.npy`,
`train_p01of04_00003.npy` from `--part`, ...). Checking every token id of a 100M-token shard reads
200 MB, so it is done once: the ids of a shard are checked when it is written (or the first time a
loader opens it), and `manifest.json` in the data directory records {name: [size, content hash, largest id]}
(`fingerprint.shard_hash`: about 1 MiB read per shard). A later start reads only each shard's
.npy header and that hash; a shard whose size or hash differs from its entry is checked in full
again, so a rewritten shard with bad ids is still refused by name. The hash samples 18 blocks, so
an edit confined to bytes it does not sample goes unnoticed by the manifest (and by the resume
fingerprint, which uses the same hash).
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
_SPLIT_RE = re.compile(r"(?:^|[_\-.])(train|val)(?:[_\-.]|$)")


class DataError(ValueError):
    """A dataset that cannot be prepared or trained on; the message names the file."""


def _split_of(filename: str) -> str | None:
    m = _SPLIT_RE.search(filename)
    return m.group(1) if m else None


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def save_npy_atomic(arr: np.ndarray, path: Path) -> None:
    """np.save through a temporary file and a rename: a killed writer leaves the old file or none."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def missing_data_hint(root: Path) -> str:
    """The command that fills this directory (plain `prepare shakespeare` writes ./shakespeare_data only)."""
    return f"run `fastgpt prepare shakespeare --out {root}` first (or `fastgpt prepare text FILE... --out {root}`)"


def find_shards(data_root: str | Path, split: str) -> list[Path]:
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"data directory {str(root)!r} not found: {missing_data_hint(root)} "
                        f"(or pass --data_root DIR holding train_*.npy and val_*.npy)")
    shards = sorted(p for p in root.iterdir() if p.suffix == ".npy" and _split_of(p.name) == split)
    if not shards:
        raise DataError(f"no {split} shards (*{split}_*.npy) in {root}: {missing_data_hint(root)}")
    return shards


# ------------------------------------------------------------------------------------------------
# The manifest: {name: [size, hash, largest id]} of shards whose ids were checked
# ------------------------------------------------------------------------------------------------
def read_manifest(root: Path) -> dict:
    try:
        entries = json.loads((root / MANIFEST).read_text()).get("shards", {})
        return entries if isinstance(entries, dict) else {}
    except (OSError, ValueError, AttributeError):
        return {}  # none yet, or damaged: every shard is then checked in full (and the manifest rewritten)


def record_checked(root: Path, entries: dict[str, list]) -> None:
    """Merge entries into root/manifest.json atomically; a read-only data directory only costs a warning
    (the shards are then checked in full at every start)."""
    merged = read_manifest(root)
    merged.update(entries)
    tmp = root / f".{MANIFEST}.tmp{os.getpid()}"
    try:
        tmp.write_text(json.dumps({"shards": dict(sorted(merged.items()))}, indent=0))
        os.replace(tmp, root / MANIFEST)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(f"warning: cannot write {root / MANIFEST} ({e}); shards will be checked in full at every start",
              file=sys.stderr)


def manifest_entry(path: Path) -> list:
    from ..fingerprint import shard_hash

    return [path.stat().st_size, shard_hash(path)]


# ------------------------------------------------------------------------------------------------
# Opening and checking one shard
# ------------------------------------------------------------------------------------------------
def open_shard(path: Path) -> np.ndarray:
    """The shard as a read-only memory map (nothing read but the header), after checking its header."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e})") from e
    if magic != b"\x93NUMPY":
        raise DataError(f"{path}: not a readable .npy file (no NumPy header); shards are saved with np.save")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:  # object arrays need pickle, which we never allow; or the file is short
        raise DataError(_npy_problem(path, e)) from e
    except Exception as e:
        raise DataError(f"{path}: not a readable .npy file ({type(e).__name__}: {e})") from e
    if not isinstance(arr, np.ndarray):
        raise DataError(f"{path}: expected one array, found {type(arr).__name__}")
    if arr.dtype.kind not in "iu":
        raise DataError(f"{path}: dtype {arr.dtype} is not an integer type; token shards hold integer ids")
    if arr.ndim != 1:
        raise DataError(f"{path}: shape {arr.shape} is not 1-D; token shards are flat arrays of ids")
    return arr


def check_ids(path: Path, arr: np.ndarray, vocab_size: int) -> int:
    """Every id in [0, vocab_size), read in 16M-token blocks so memory stays flat; returns the largest."""
    step, top = 1 << 24, -1
    for a in range(0, len(arr), step):
        block = np.asarray(arr[a:a + step])
        lo, hi = int(block.min()), int(block.max())
        if lo < 0 or hi >= vocab_size:
            i = a + int(np.flatnonzero((block < 0) | (block >= vocab_size))[0])
            raise DataError(f"{path}: token id {int(arr[i])} at index {i:,} is outside the vocabulary "
                            f"[0, {vocab_size})")
        top = max(top, hi)
    return top


def load_shard(path: Path, vocab_size: int, min_tokens: int, known: dict | None = None) -> np.ndarray:
    """open_shard, the length check, and check_ids unless `known` (a manifest's entries) vouches for the
    shard: same size and hash as when its ids were checked, and its largest id below vocab_size. A shard
    checked here gets a new entry in `known` (the caller saves it)."""
    arr = open_shard(path)
    if len(arr) < min_tokens:
        raise DataError(f"{path}: {len(arr):,} tokens is too short for one batch of {min_tokens:,} "
                        f"(micro_batch_size x seq_len + 1); lower --micro_batch_size or --seq_len")
    if known is None:
        check_ids(path, arr, vocab_size)
        return arr
    entry, saved = manifest_entry(path), known.get(path.name)
    if not (isinstance(saved, list) and len(saved) == 3 and saved[:2] == entry and saved[2] < vocab_size):
        known[path.name] = entry + [check_ids(path, arr, vocab_size)]
    return arr


def _npy_problem(path: Path, e: Exception) -> str:
    """Why np.load refused a file with a valid magic: a truncated file, a pickled (object) array, or other."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
            header = f.tell()
        size = path.stat().st_size
    except Exception:
        return f"{path}: not a readable .npy file (its header is damaged: {e})"
    if dtype.hasobject:
        return f"{path}: holds Python objects and cannot be loaded without pickle; shards must be integer arrays"
    need = header + int(np.prod(shape)) * dtype.itemsize
    if size < need:
        return (f"{path}: truncated: its header promises {int(np.prod(shape)):,} values ({need:,} bytes) but the file "
                f"has {size:,} bytes (an interrupted copy or write? prepare or copy it again)")
    return f"{path}: not a readable .npy file ({e})"


def numbering_gaps(paths: list[Path], split: str) -> list[str]:
    """Names missing from the split_00000, split_00001, ... sequence (shards named otherwise are not judged)."""
    digits = [m.group(1) for p in paths if (m := re.fullmatch(rf"{split}_(\d+)\.npy", p.name))]
    if not digits:
        return []
    width = max(map(len, digits))
    have = {int(d) for d in digits}
    return [f"{split}_{i:0{width}d}.npy" for i in range(0, max(have)) if i not in have]
