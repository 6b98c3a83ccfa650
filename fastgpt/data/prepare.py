"""Tokenizing text into train/val shards: plain-text files (`prepare_texts`) and HF datasets (`prepare_hf`).

Preparation tokenizes with the GPT-2 encoding (ordinary text, no special tokens; documents of a dataset
are separated by <|endoftext|>) in pieces, in worker processes, into out/.prepare/piece_K.npy, so a killed
run resumes at the first piece it had not written; then the last val_fraction of the tokens become the
val shards and the rest the train shards (uint16 when every id fits, as GPT-2's 50,257 do).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .shards import DataError, _split_of, manifest_entry, record_checked, save_npy_atomic, token_dtype


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
    from ..tokenizer import N_VOCAB, get_encoding

    return np.asarray(get_encoding().encode_ordinary(piece), dtype=token_dtype(N_VOCAB))


def _encode_docs(item: tuple[bool, list[str]]) -> np.ndarray:
    """Documents joined by <|endoftext|>; every piece but the first also starts with one."""
    from ..tokenizer import EOT_TOKEN, N_VOCAB, get_encoding

    first, docs = item
    enc, tokens = get_encoding(), []
    for i, doc in enumerate(docs):
        if i or not first:
            tokens.append(EOT_TOKEN)
        tokens.extend(enc.encode_ordinary(doc))
    return np.asarray(tokens, dtype=token_dtype(N_VOCAB))


def _piece_path(spool: Path, k: int) -> Path:
    return spool / f"piece_{k:06d}.npy"


def _tokenize_pieces(out: Path, fingerprint: dict, n_pieces: int, piece, encode, num_proc: int) -> None:
    """Tokenize pieces 0..n_pieces-1 (piece(k) gives piece k, asked for only when it is tokenized) into
    out/.prepare/piece_K.npy, skipping pieces an interrupted run of the same preparation (same manifest)
    already wrote."""
    import json

    from ..metrics import Counter

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
                save_npy_atomic(arr, _piece_path(spool, k))
                bar.update()
    else:
        for k in todo:
            save_npy_atomic(encode(piece(k)), _piece_path(spool, k))
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
    checked = {}
    for name, lo, hi in (("train", 0, split), ("val", split, total)):
        size = shard_tokens or max(hi - lo, 1)
        for i, start in enumerate(range(lo, max(hi, lo + 1), size)):
            shard = _gather(parts, start, min(start + size, hi))
            save_npy_atomic(shard, out / f"{name}_{i:05d}.npy")
            # The ids come from the tokenizer, so the check a loader would do is this one max.
            checked[f"{name}_{i:05d}.npy"] = manifest_entry(out / f"{name}_{i:05d}.npy") + [int(shard.max(initial=0))]
    record_checked(out, checked)
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
