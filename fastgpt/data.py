"""Token shards: preparing them and reading them back for training.

A dataset directory holds 1-D integer `.npy` files per split, `train_00000.npy`, `val_00000.npy`, ...
(uint16 when every id fits, as GPT-2's 50,257 do). Preparation tokenizes with the GPT-2 encoding
(ordinary text, no special tokens) and splits 90/10.

`ShardLoader` cuts each shard into consecutive chunks of B*T+1 tokens (inputs and targets shifted by
one) and numbers the chunks of all shards in one sequence. Rank r of a world of W ranks takes chunks
r, r+W, r+2W, ...: a step of W ranks reads exactly the chunks one process would read in W
consecutive micro-steps, so a run's data does not depend on how many processes share it. The loader's
state is the next chunk as (shard, position), which checkpoints save.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import re
import sys
import urllib.request
from pathlib import Path

import numpy as np
import torch

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# Tiny Shakespeare (public domain, 1.1 MB) ships inside the package, so preparing it needs no network.
PACKAGED_SHAKESPEARE = Path(__file__).resolve().parent / "assets" / "tinyshakespeare.txt"
DEFAULT_DATA_ROOT = "shakespeare_data"
DEFAULT_SHARD_TOKENS = 100_000_000


class DataError(ValueError):
    """A dataset that cannot be prepared or trained on; the message names the file."""


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


# ------------------------------------------------------------------------------------------------
# Writing shards
# ------------------------------------------------------------------------------------------------
def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


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


def prepare_default_data(data_root: str | Path, log=print) -> bool:
    """Prepare the packaged Tiny Shakespeare into data_root if it holds no shards yet; True if it did.

    For the default --data_root only, so that `python train.py` on a fresh machine trains with no other
    step; any other missing directory stays an error (a typo must not silently train on Shakespeare).
    """
    root = Path(data_root)
    if root.is_dir() and any(_split_of(p.name) in ("train", "val") for p in root.glob("*.npy")):
        return False
    log(f"no data in {str(root)!r}: preparing the Tiny Shakespeare packaged with fastgpt "
        f"(same as `fastgpt prepare shakespeare --out {root}`)")
    prepare_shakespeare(None, root)
    return True


def prepare_texts(files: list[str | Path], out: str | Path, val_fraction: float = 0.1,
                  shard_tokens: int | None = None, num_proc: int = 1) -> tuple[int, int]:
    """Plain-text files, joined by newlines, tokenized and split into train/val shards.

    The text is tokenized in pieces cut where the GPT-2 pre-tokenizer always splits (see _cut_points),
    so the tokens equal those of encoding the whole text at once, whatever num_proc is."""
    texts = []
    for f in files:
        p = Path(f)
        if p.is_dir():
            raise DataError(f"{p}: is a directory; pass the text files in it (e.g. {p}/*.txt)")
        if not p.is_file():
            raise DataError(f"{p}: no such file")
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise DataError(f"{p}: not UTF-8 text ({e})") from e
    text = "\n".join(texts)
    _check_split_args(val_fraction, shard_tokens, num_proc)
    cuts = _cut_points(text, PIECE_CHARS)
    n_pieces = len(cuts) - 1
    fingerprint = {"source": "text", "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
                   "pieces": n_pieces}
    # Piece k is sliced from the text only when it is tokenized: no second copy of the whole text.
    _tokenize_pieces(Path(out), fingerprint, n_pieces, lambda k: text[cuts[k]:cuts[k + 1]], _encode_text, num_proc)
    return _write_from_pieces(Path(out), n_pieces, val_fraction, shard_tokens,
                              f"{', '.join(map(str, files))}: fewer than 2 tokens of text")


def prepare_hf(dataset: str, out: str | Path, name: str | None = None, split: str = "train",
               text_field: str = "text", val_fraction: float = 0.1, shard_tokens: int | None = None,
               limit: int | None = None, num_proc: int = 1) -> tuple[int, int]:
    """A HuggingFace dataset's text column; documents are separated by <|endoftext|>."""
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise DataError("`fastgpt prepare hf` needs the `datasets` package: pip install 'fastgpt[hf]'") from e
    _check_split_args(val_fraction, shard_tokens, num_proc)
    try:
        ds = load_dataset(dataset, name, split=split)
    except Exception as e:
        raise DataError(f"could not load dataset {dataset!r} ({type(e).__name__}: {e})") from e
    if text_field not in ds.column_names:
        raise DataError(f"dataset {dataset!r} has no column {text_field!r}; columns: {ds.column_names} "
                        f"(choose one with --text_field)")
    n_docs = len(ds) if limit is None else min(len(ds), limit)
    starts = list(range(0, n_docs, DOCS_PER_PIECE))

    def piece(k: int) -> tuple[bool, list[str]]:
        # Pieces are fetched lazily (only those not yet tokenized); document i of piece k is ds[k*D + i].
        a = starts[k]
        return k == 0, list(ds[a:min(a + DOCS_PER_PIECE, n_docs)][text_field])

    fingerprint = {"source": "hf", "dataset": dataset, "name": name, "split": split, "text_field": text_field,
                   "documents": n_docs, "hf_fingerprint": getattr(ds, "_fingerprint", None), "pieces": len(starts)}
    _tokenize_pieces(Path(out), fingerprint, len(starts), piece, _encode_docs, num_proc)
    return _write_from_pieces(Path(out), len(starts), val_fraction, shard_tokens,
                              f"{Path(out)}: fewer than 2 tokens of text to split")


# ------------------------------------------------------------------------------------------------
# Tokenizing in pieces: worker processes, progress, resumable
# ------------------------------------------------------------------------------------------------
PIECE_CHARS = 1 << 20  # characters of text per piece (a few hundred thousand tokens)
DOCS_PER_PIECE = 1024  # documents of a HF dataset per piece
SPOOL = ".prepare"  # out/.prepare/: manifest.json and piece_000000.npy ... while a preparation runs


def _check_split_args(val_fraction: float, shard_tokens: int | None, num_proc: int) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    if shard_tokens is not None and shard_tokens <= 0:
        raise DataError(f"--shard_tokens must be positive, got {shard_tokens}")
    if num_proc <= 0:
        raise DataError(f"--num_proc must be positive, got {num_proc}")


def _cut_points(text: str, target: int) -> list[int]:
    """Offsets [0, ..., len(text)] that cut text into pieces of about `target` characters.

    A cut goes right after a newline that has a non-space character on both sides. GPT-2's pre-tokenizer
    then ends a pre-token there in the whole text too: a newline run only joins other whitespace, and with
    no whitespace after it the `\\s+(?!\\S)` rule matches just the run, as at the end of a piece. BPE works
    within pre-tokens, so the pieces' tokens, concatenated, are the whole text's tokens.
    (str.isspace covers every character the pattern's \\s does, so it errs on the safe side.)"""
    cuts = [0]
    pos = target
    while pos < len(text):
        i = text.find("\n", pos)
        while i != -1 and not (0 < i < len(text) - 1 and not text[i - 1].isspace() and not text[i + 1].isspace()):
            i = text.find("\n", i + 1)
        if i == -1:
            break
        cuts.append(i + 1)
        pos = i + 1 + target
    if cuts[-1] != len(text) or len(cuts) == 1:
        cuts.append(len(text))
    return cuts


def _encode_text(piece: str) -> np.ndarray:
    from .tokenizer import N_VOCAB, get_encoding

    return np.asarray(get_encoding().encode_ordinary(piece), dtype=_token_dtype(N_VOCAB))


def _encode_docs(item: tuple[bool, list[str]]) -> np.ndarray:
    """Documents joined by <|endoftext|>; every piece but the first also starts with one."""
    from .tokenizer import EOT_TOKEN, N_VOCAB, get_encoding

    first, docs = item
    enc, tokens = get_encoding(), []
    for i, doc in enumerate(docs):
        if i or not first:
            tokens.append(EOT_TOKEN)
        tokens.extend(enc.encode_ordinary(doc))
    return np.asarray(tokens, dtype=_token_dtype(N_VOCAB))


def _piece_path(spool: Path, k: int) -> Path:
    return spool / f"piece_{k:06d}.npy"


def _save_npy_atomic(arr: np.ndarray, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _tokenize_pieces(out: Path, fingerprint: dict, n_pieces: int, piece, encode, num_proc: int) -> None:
    """Tokenize pieces 0..n_pieces-1 (piece(k) gives piece k, asked for only when it is tokenized) into
    out/.prepare/piece_K.npy, skipping pieces an interrupted run of the same preparation (same manifest)
    already wrote."""
    import json

    from .metrics import Counter

    spool = out / SPOOL
    manifest = spool / "manifest.json"
    want = json.dumps(fingerprint, sort_keys=True)
    if spool.is_dir() and (not manifest.exists() or manifest.read_text() != want):
        import shutil

        shutil.rmtree(spool)  # a half-finished preparation of other input: start over
    spool.mkdir(parents=True, exist_ok=True)
    manifest.write_text(want)
    todo = [k for k in range(n_pieces) if not _piece_path(spool, k).exists()]
    done = n_pieces - len(todo)
    if done:
        print(f"resuming an interrupted preparation: {done} of {n_pieces} pieces already tokenized")
    bar = Counter(n_pieces, "tokenizing", "pieces")
    bar.update(done)
    if num_proc > 1 and len(todo) > 1:
        import multiprocessing as mp

        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(min(num_proc, len(todo))) as pool:
            # imap keeps the order and hands out one piece per task; results are written as they arrive.
            for k, arr in zip(todo, pool.imap(encode, (piece(k) for k in todo))):
                _save_npy_atomic(arr, _piece_path(spool, k))
                bar.update()
    else:
        for k in todo:
            _save_npy_atomic(encode(piece(k)), _piece_path(spool, k))
            bar.update()
    bar.close()


def _write_from_pieces(out: Path, n_pieces: int, val_fraction: float, shard_tokens: int | None,
                       too_few: str) -> tuple[int, int]:
    """The last val_fraction of the tokens become val shards, the rest train shards; then the spool goes.
    Fewer than 2 tokens raise DataError(too_few), leaving the spool and any earlier shards in place."""
    import shutil

    spool = out / SPOOL
    parts = [np.load(_piece_path(spool, k), mmap_mode="r") for k in range(n_pieces)]
    total = sum(len(p) for p in parts)
    if total < 2:
        raise DataError(too_few)
    split = int(total * (1.0 - val_fraction))
    # Stale shards from an earlier, larger preparation would otherwise be read as part of this one.
    for old in out.glob("*.npy"):
        if _split_of(old.name) in ("train", "val"):
            old.unlink()
    for name, lo, hi in (("train", 0, split), ("val", split, total)):
        size = shard_tokens or max(hi - lo, 1)
        for i, start in enumerate(range(lo, max(hi, lo + 1), size)):
            _save_npy_atomic(_gather(parts, start, min(start + size, hi)), out / f"{name}_{i:05d}.npy")
    shutil.rmtree(spool)
    print(f"Saved {split:,} train tokens and {total - split:,} val tokens")
    return split, total - split


def _gather(parts: list[np.ndarray], lo: int, hi: int) -> np.ndarray:
    """Tokens [lo, hi) of the concatenation of parts, reading only the parts that overlap."""
    chunks, off = [], 0
    for p in parts:
        a, b = max(lo - off, 0), min(hi - off, len(p))
        if a < b:
            chunks.append(p[a:b])
        off += len(p)
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=parts[0].dtype if parts else np.uint16)


# ------------------------------------------------------------------------------------------------
# Reading shards
# ------------------------------------------------------------------------------------------------
_SPLIT_RE = re.compile(r"(?:^|[_\-.])(train|val)(?:[_\-.]|$)")


def _split_of(filename: str) -> str | None:
    m = _SPLIT_RE.search(filename)
    return m.group(1) if m else None


def find_shards(data_root: str | Path, split: str) -> list[Path]:
    root = Path(data_root)
    if not root.is_dir():
        raise DataError(f"data directory {str(root)!r} not found: run `fastgpt prepare shakespeare` first "
                        f"(or pass --data_root DIR holding train_*.npy and val_*.npy)")
    shards = sorted(p for p in root.iterdir() if p.suffix == ".npy" and _split_of(p.name) == split)
    if not shards:
        raise DataError(f"no {split} shards (*{split}_*.npy) in {root}: run `fastgpt prepare shakespeare` first")
    return shards


def load_shard(path: Path, vocab_size: int, min_tokens: int) -> np.ndarray:
    """The shard as a read-only memory map, after checking dtype, shape, length and every id."""
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
    if len(arr) < min_tokens:
        raise DataError(f"{path}: {len(arr):,} tokens is too short for one batch of {min_tokens:,} "
                        f"(micro_batch_size x seq_len + 1); lower --micro_batch_size or --seq_len")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab_size:
        bad_mask = (arr < 0) | (arr >= vocab_size)
        i = int(np.flatnonzero(bad_mask)[0])
        raise DataError(f"{path}: token id {int(arr[i])} at index {i:,} is outside the vocabulary "
                        f"[0, {vocab_size})")
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


class ShardLoader:
    """(x, y) batches of shape (B, T) from one split, strided across DDP ranks (see module docstring)."""

    def __init__(self, data_root: str | Path, split: str, B: int, T: int, rank: int = 0, world: int = 1,
                 vocab_size: int = 50257, verbose: bool = True, pin_memory: bool = False):
        self.B, self.T, self.rank, self.world = B, T, rank, world
        self.pin_memory = pin_memory  # page-locked batches: a non_blocking copy to the GPU is then asynchronous
        self.paths = find_shards(data_root, split)
        if verbose:
            print(f"found {len(self.paths)} shards for split {split}")
            if gaps := numbering_gaps(self.paths, split):  # a shard lost in a copy would go unnoticed
                more = f" and {len(gaps) - 5} more" if len(gaps) > 5 else ""
                print(f"warning: {data_root}: {split} shards are not numbered consecutively: missing "
                      f"{', '.join(gaps[:5])}{more}; training on the {len(self.paths)} present", file=sys.stderr)
        self.shards = [load_shard(p, vocab_size, B * T + 1) for p in self.paths]
        counts = [(len(s) - 1) // (B * T) for s in self.shards]  # whole chunks per shard
        self.starts = np.cumsum([0] + counts).tolist()  # chunk index where each shard begins
        self.total = self.starts[-1]
        self.next = 0  # the chunk rank 0 reads next; rank r reads next + r

    def _locate(self, chunk: int) -> tuple[int, int]:
        chunk %= self.total
        shard = bisect.bisect_right(self.starts, chunk) - 1
        return shard, (chunk - self.starts[shard]) * self.B * self.T

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        shard, pos = self._locate(self.next + self.rank)
        self.next += self.world
        n = self.B * self.T
        buf = torch.from_numpy(self.shards[shard][pos:pos + n + 1].astype(np.int64))
        if self.pin_memory:
            buf = buf.pin_memory()
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def reset(self) -> None:
        self.next = 0

    def state_dict(self) -> dict:
        shard, pos = self._locate(self.next)
        return {"shard": shard, "position": pos, "epoch": self.next // self.total}

    def load_state_dict(self, state: dict) -> None:
        shard, pos = int(state["shard"]), int(state["position"])
        if not 0 <= shard < len(self.shards):
            raise DataError(f"loader state points at shard {shard} but only {len(self.shards)} shards exist")
        # position // (B*T) also maps a state saved with another batch shape to a whole chunk.
        self.next = int(state.get("epoch", 0)) * self.total + self.starts[shard] + pos // (self.B * self.T)

