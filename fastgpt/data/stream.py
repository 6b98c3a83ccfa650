"""Streaming preparation: documents -> fixed-size uint16 shards, in bounded memory, resumable after kill -9.

The token stream is <|endoftext|> doc0 <|endoftext|> doc1 ... (each document opened by the separator,
as build-nanogpt does). Its first `val_tokens` tokens are the val split and the rest train; each split
is cut into shards of `shard_tokens` (the last of each split shorter):

    val_000000.npy  [0, S)   val_000001.npy [S, V)   train_000000.npy [V, V+S)   train_000001.npy ...

The main process reads documents in batches of DOCS_PER_BATCH and hands them to `num_proc` worker
processes (at most 2 batches per worker in flight, so memory does not grow with the corpus); results
come back in order into one shard buffer of S tokens. A run of documents is encoded with one tiktoken
call on the documents joined by the separator, which gives the same ids as encoding each document
alone (tiktoken splits at special tokens first); a document that itself contains the separator's
text is encoded alone with encode_ordinary.

After each shard is written (atomically), out/.prepare_state[_part].json records it (name, size,
content hash, largest id) and where the next shard starts: (document index, tokens of that document
already written). A rerun with the same input and settings verifies the shards recorded, keeps them,
and re-reads the input from that document; the shards then equal an uninterrupted run's byte for byte.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

from .shards import DataError, manifest_entry, record_checked, save_npy_atomic

DOCS_PER_BATCH = 1024
SEP = "<|endoftext|>"


def encode_batch(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens uint16, start offset of each document in tokens) for separator + doc, for each doc.

    Runs of documents are encoded with one call; a document that itself contains the separator's
    text is encoded on its own with encode_ordinary, so that text stays ordinary tokens."""
    from ..tokenizer import EOT_TOKEN, get_encoding

    enc = get_encoding()
    pieces, starts, n, i = [], [], 0, 0
    while i < len(docs):
        j = i
        while j < len(docs) and SEP not in docs[j]:
            j += 1
        if j > i:
            toks = np.asarray(enc.encode(SEP + SEP.join(docs[i:j]), allowed_special={SEP}), dtype=np.uint16)
            st = np.flatnonzero(toks == EOT_TOKEN)  # encode_ordinary never yields the separator id
            assert len(st) == j - i
            pieces.append(toks), starts.append(st + n)
            n += len(toks)
        if j < len(docs):
            toks = np.asarray([EOT_TOKEN] + enc.encode_ordinary(docs[j]), dtype=np.uint16)
            pieces.append(toks), starts.append(np.array([n]))
            n += len(toks)
            j += 1
        i = j
    if not pieces:
        return np.zeros(0, np.uint16), np.zeros(0, np.int64)
    return np.concatenate(pieces), np.concatenate(starts).astype(np.int64)


def _shard_bounds(t: int, val_tokens: int, size: int) -> tuple[str, int, int]:
    """(split, shard index, end position) of the shard holding global token position t."""
    if t < val_tokens:
        return "val", t // size, min((t // size + 1) * size, val_tokens)
    return "train", (t - val_tokens) // size, val_tokens + ((t - val_tokens) // size + 1) * size


def _state_path(out: Path, tag: str) -> Path:
    return out / f".prepare_state{tag}.json"


def _load_state(out: Path, tag: str, fingerprint: dict) -> dict | None:
    """The recorded progress, cut back to the shards that are still there unchanged."""
    try:
        state = json.loads(_state_path(out, tag).read_text())
    except (OSError, ValueError):
        return None
    if state.get("fingerprint") != fingerprint:
        return None
    kept = []
    for entry in state["shards"]:
        p = out / entry["name"]
        if not p.is_file() or manifest_entry(p) != [entry["size"], entry["hash"]]:
            print(f"{p}: missing or changed since it was written: preparing again from there", file=sys.stderr)
            break
        kept.append(entry)
    state["done"] = bool(state.get("done")) and len(kept) == len(state["shards"])
    state["shards"] = kept
    return state


def _progress(tokens: int, t0: float, shards: int, source, docs: int, final: bool = False) -> None:
    dt = max(time.monotonic() - t0, 1e-9)
    eta = ""
    if getattr(source, "read_fraction", None) and 0 < source.read_fraction() < 1:
        eta = f" | ETA {dt * (1 / source.read_fraction() - 1):,.0f} s"
    print(f"{'prepared' if final else 'preparing'}: {tokens:,} tokens | {tokens / dt:,.0f} tokens/s | "
          f"{docs:,} documents | {shards} shards written{eta}", file=sys.stderr, flush=True)


def prepare_stream(source, out: str | Path, shard_tokens: int, val_tokens: int, num_proc: int = 1,
                   tag: str = "", with_val: bool = True, progress_s: float = 10.0) -> tuple[int, int]:
    """Tokenize source.docs() into out/{val,train}{tag}_NNNNNN.npy; returns (train, val) tokens written
    by this part. tag (e.g. "_p02of04") keeps the names of parallel parts apart; with_val=False makes the
    whole stream train (parts after the first)."""
    if shard_tokens <= 0 or val_tokens < 0 or num_proc <= 0:
        raise DataError(f"--shard_tokens and --num_proc must be positive and --val_tokens >= 0, got "
                        f"{shard_tokens}, {num_proc}, {val_tokens}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    val_tokens = val_tokens if with_val else 0
    fp = {**source.fingerprint(), "shard_tokens": shard_tokens, "val_tokens": val_tokens, "tag": tag}
    state = _load_state(out, tag, fp) or {"fingerprint": fp, "shards": [], "done": False}
    if state["done"]:
        print(f"{out}: already prepared ({len(state['shards'])} shards verified)")
        return _counts(state)
    last = state["shards"][-1] if state["shards"] else {"doc": 0, "skip": 0, "end": 0}
    if not state["shards"]:  # a fresh start: this part's shards of an earlier preparation would mix in
        for old in list(out.glob(f"val{tag}_*.npy")) + list(out.glob(f"train{tag}_*.npy")):
            old.unlink()
    elif last["end"]:
        print(f"resuming: {len(state['shards'])} shards verified and kept, continuing at document {last['doc']:,}",
              file=sys.stderr)
    t, doc0, skip = last["end"], last["doc"], last["skip"]
    buf, fill = np.empty(shard_tokens, dtype=np.uint16), 0
    split, index, end = _shard_bounds(t, val_tokens, shard_tokens)
    t0, shown, docs_done = time.monotonic(), time.monotonic(), doc0

    def flush(next_doc: int, next_skip: int) -> None:
        nonlocal fill, split, index, end
        name = f"{split}{tag}_{index:06d}.npy"
        arr = buf[:fill]
        save_npy_atomic(arr, out / name)
        size, h = manifest_entry(out / name)
        top = int(arr.max(initial=0))
        record_checked(out, {name: [size, h, top]})
        state["shards"].append({"name": name, "size": size, "hash": h, "tokens": fill, "split": split,
                                "end": t, "doc": next_doc, "skip": next_skip})
        _write_state(out, tag, state)
        fill = 0
        split, index, end = _shard_bounds(t, val_tokens, shard_tokens)

    for d0, tokens, starts in _encoded(source.docs(doc0), doc0, num_proc):
        p = skip if d0 == doc0 else 0  # tokens of the first document already in the last kept shard
        while p < len(tokens):
            take = min(end - t, len(tokens) - p)
            buf[fill:fill + take] = tokens[p:p + take]
            fill, t, p = fill + take, t + take, p + take
            if t == end:
                j = int(np.searchsorted(starts, p, side="right")) - 1 if p < len(tokens) else len(starts)
                flush(d0 + j, p - int(starts[j]) if p < len(tokens) else 0)
        docs_done = d0 + len(starts)
        if time.monotonic() - shown >= progress_s:
            shown = time.monotonic()
            _progress(t - last["end"], t0, len(state["shards"]), source, docs_done)
    if fill:
        flush(docs_done, 0)
    if with_val and t <= val_tokens:
        raise DataError(f"{out}: the input has {t:,} tokens, not more than --val_tokens {val_tokens:,}: "
                        f"nothing left to train on (pass a smaller --val_tokens)")
    state["done"] = True
    _write_state(out, tag, state)
    _progress(t - last["end"], t0, len(state["shards"]), source, docs_done, final=True)
    train, val = _counts(state)
    print(f"Saved {train:,} train tokens and {val:,} val tokens")
    return train, val


def _counts(state: dict) -> tuple[int, int]:
    val = sum(e["tokens"] for e in state["shards"] if e["split"] == "val")
    return sum(e["tokens"] for e in state["shards"]) - val, val


def _write_state(out: Path, tag: str, state: dict) -> None:
    p = _state_path(out, tag)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, p)


def _batches(docs, doc0: int):
    batch, d = [], doc0
    for text in docs:
        batch.append(text)
        if len(batch) == DOCS_PER_BATCH:
            yield d, batch
            d, batch = d + len(batch), []
    if batch:
        yield d, batch


def _encoded(docs, doc0: int, num_proc: int):
    """(first document index, tokens, document starts) per batch, in order; at most 2 batches per worker
    in flight, so reading never runs ahead of tokenizing by more than that."""
    if num_proc == 1:
        for d, batch in _batches(docs, doc0):
            yield (d, *encode_batch(batch))
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(num_proc) as pool:
        pending: deque = deque()
        for d, batch in _batches(docs, doc0):
            pending.append((d, pool.apply_async(encode_batch, (batch,))))
            if len(pending) >= 2 * num_proc:
                d1, r = pending.popleft()
                yield (d1, *r.get())
        while pending:
            d1, r = pending.popleft()
            yield (d1, *r.get())


# ------------------------------------------------------------------------------------------------
# Entry points: `fastgpt prepare files` and `fastgpt prepare hf` (streaming)
# ------------------------------------------------------------------------------------------------
def parse_part(part: str | None) -> tuple[int, int] | None:
    """'i/N' -> (i, N) with 1 <= i <= N."""
    if part is None:
        return None
    try:
        i, n = (int(x) for x in part.split("/"))
    except ValueError:
        raise DataError(f"--part must look like i/N (e.g. 2/8), got {part!r}") from None
    if not 1 <= i <= n:
        raise DataError(f"--part {part}: i must be between 1 and N")
    return i, n


def prepare_files(paths: list, out: str | Path, text_field: str = "text", shard_tokens: int = 100_000_000,
                  val_tokens: int | None = None, num_proc: int | None = None, part: str | None = None,
                  progress_s: float = 10.0) -> tuple[int, int]:
    """Local .parquet / .jsonl(.gz) / .json.gz / .arrow files (or directories of them) -> shards.
    val_tokens defaults to one shard; --part i/N takes the i-th contiguous slice of the sorted files
    (only part 1 holds the val split) under names train_pIIofNN_*.npy."""
    from .sources import FileSource, default_workers, expand, part_of

    files = expand(paths)
    tag, first = "", True
    if (p := parse_part(part)) is not None:
        files, tag, first = part_of(files, p), f"_p{p[0]:02d}of{p[1]:02d}", p[0] == 1
    return prepare_stream(FileSource(files, text_field), out, shard_tokens,
                          shard_tokens if val_tokens is None else val_tokens, num_proc or default_workers(),
                          tag=tag, with_val=first, progress_s=progress_s)


def prepare_hf_stream(dataset: str, out: str | Path, name: str | None = None, split: str = "train",
                      text_field: str = "text", shard_tokens: int = 100_000_000, val_tokens: int | None = None,
                      limit: int | None = None, num_proc: int | None = None, load=None) -> tuple[int, int]:
    """A HuggingFace dataset read with streaming=True (`load`, if given, returns the iterable instead)."""
    from .sources import HFStreamSource, default_workers

    source = HFStreamSource(dataset, name, split, text_field, load=load, limit=limit)
    return prepare_stream(source, out, shard_tokens, shard_tokens if val_tokens is None else val_tokens,
                          num_proc or default_workers())
