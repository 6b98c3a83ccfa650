"""Token shards: preparing them and reading them back for training.

A dataset directory holds 1-D integer `.npy` files per split, `train_00000.npy`, `val_00000.npy`, ...
(uint16 when every id fits, as GPT-2's 50,257 do), and `manifest.json`, the record of which shards'
ids were already checked (shards.py).

- prepare.py: text files and HuggingFace datasets -> shards (worker processes, resumable).
- shards.py: finding, opening and checking shards; the manifest.
- loader.py: `ShardLoader`, batches in sequential or shuffled order, identical at any world size.

This module holds the pieces that need no tokenizer: Tiny Shakespeare and downloads.
"""
from __future__ import annotations

import errno
import hashlib
import os
import time
import urllib.request
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

from .loader import DATA_ORDERS, ShardLoader
from .prepare import SPOOL, prepare_hf, prepare_texts
from .shards import DataError, _split_of, find_shards, load_shard, numbering_gaps
from .stream import prepare_files, prepare_hf_stream

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# Tiny Shakespeare (public domain, 1.1 MB) ships inside the package, so preparing it needs no network.
PACKAGED_SHAKESPEARE = Path(__file__).resolve().parent.parent / "assets" / "tinyshakespeare.txt"
DEFAULT_DATA_ROOT = "shakespeare_data"
DEFAULT_SHARD_TOKENS = 100_000_000

__all__ = ["DATA_ORDERS", "DEFAULT_DATA_ROOT", "DataError", "ShardLoader", "find_shards", "load_shard",
           "numbering_gaps", "prepare_default_data", "prepare_files", "prepare_hf", "prepare_hf_stream", "prepare_shakespeare", "prepare_texts"]


def cache_dir() -> Path:
    """Where downloads go: $FASTGPT_CACHE, else ~/.cache/fastgpt."""
    root = os.environ.get("FASTGPT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastgpt"
    return Path(root)


def download(url: str, dest: Path, what: str, hint: str) -> Path:
    """Fetch url to dest (atomically) unless it is already there; a clear error when offline."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + f".part{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        os.replace(tmp, dest)
    except OSError as e:  # URLError, timeouts and refused connections are all OSErrors
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not download {what} from {url} ({e}). Offline? {hint}") from e
    return dest


def prepare_shakespeare(input: str | Path | None = None, out: str | Path = DEFAULT_DATA_ROOT,
                        download_url: str | None = None) -> tuple[int, int]:
    """Tiny Shakespeare -> out/train_00000.npy (90%) and out/val_00000.npy (10%).

    The text comes from `input` if given, else from `download_url` (fetched into the cache), else from
    the copy packaged with fastgpt.
    """
    if input is None and download_url is not None:
        # One cache file per URL: a cached copy from another --url must not stand in for this one.
        tag = "" if download_url == SHAKESPEARE_URL else "-" + hashlib.sha1(download_url.encode()).hexdigest()[:12]
        name = f"tinyshakespeare{tag}.txt"
        input = download(download_url, cache_dir() / name, "Tiny Shakespeare",
                         "Drop --download/--url to use the copy packaged with fastgpt, "
                         "or pass a local copy with --input FILE")
    elif input is None:
        input = PACKAGED_SHAKESPEARE
        if not input.is_file():
            raise DataError(f"{input}: the packaged Tiny Shakespeare is missing (a broken install?); "
                            f"reinstall fastgpt, or use --download or --input FILE")
    path = Path(input)
    if not path.is_file():
        raise DataError(f"{path}: no such file (pass the Tiny Shakespeare input.txt with --input)")
    return prepare_texts([path], out)


PREPARE_LOCK = ".prepare.lock"  # data_root/.prepare.lock: held while the default data is being prepared


def _default_data_ready(root: Path) -> bool:
    """Shards there and no spool left: a finished preparation (prepare.py removes its spool only after the
    last shard and the manifest are written), or the user's own shards, which are kept."""
    has = root.is_dir() and any(_split_of(p.name) in ("train", "val") for p in root.glob("*.npy"))
    return has and not (root / SPOOL).exists()


def prepare_default_data(data_root: str | Path, log=print) -> bool:
    """Prepare the packaged Tiny Shakespeare into data_root if it holds no shards yet; True if it did.

    For the default --data_root only, so that `python train.py` on a fresh machine trains with no other
    step; any other missing directory stays an error (a typo must not silently train on Shakespeare).
    Two runs started at once in a fresh directory would both prepare into it (one could read a half-written
    split, or delete the other's spool): an exclusive flock on data_root/.prepare.lock makes the second
    wait and then use the first one's shards. The kernel drops the lock when its holder dies (kill -9), and
    the next run resumes that preparation.
    """
    root = Path(data_root)
    if _default_data_ready(root):
        return False
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root / PREPARE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise DataError(f"--data_root {root}: cannot create it or its {PREPARE_LOCK} "
                        f"({e.strerror or e}); prepare it with `fastgpt prepare shakespeare --out {root}`") from None
    try:
        waited = _lock(fd, root, log)
        if _default_data_ready(root):
            log(f"waited {waited:.1f}s for another process preparing {str(root)!r}: using its shards")
            return False
        log(f"no data in {str(root)!r}: preparing the Tiny Shakespeare packaged with fastgpt "
            f"(same as `fastgpt prepare shakespeare --out {root}`)")
        prepare_shakespeare(None, root)
        return True
    finally:
        os.close(fd)  # drops the flock


def _lock(fd: int, root: Path, log) -> float:
    """Take the exclusive lock on fd, waiting if another process holds it; the seconds waited."""
    if fcntl is None:  # not POSIX: no lock (two runs at once in a fresh directory are then on their own)
        return 0.0
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return 0.0
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return 0.0  # flock unsupported here (some network filesystems): as without fcntl
    log(f"another process is preparing the default data in {str(root)!r}: waiting for it")
    t0 = time.monotonic()
    fcntl.flock(fd, fcntl.LOCK_EX)
    return time.monotonic() - t0
