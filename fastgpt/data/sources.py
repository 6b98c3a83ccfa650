"""Documents from local files (.parquet, .jsonl / .jsonl.gz / .json.gz, .arrow) or a streamed HF dataset.

Every source is an ordered list of documents; `docs(start)` yields the text of document start,
start+1, ... so a resumed preparation re-reads only from the document where it stopped (parquet skips
whole row groups by their metadata; jsonl skips lines without parsing them). pyarrow and datasets are
imported only here, and only when such a source is used.
"""
from __future__ import annotations

import gzip
import itertools
import json
import os
from pathlib import Path

from .shards import DataError

SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz", ".json.gz", ".json", ".arrow")
_BATCH_ROWS = 8192  # rows pyarrow decodes at a time


def _kind(p: Path) -> str | None:
    name = p.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def expand(paths: list[str | Path]) -> list[Path]:
    """Files named, and the supported files under directories named, each list sorted by path."""
    out = []
    for a in paths:
        p = Path(a)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _kind(q) and not q.name.startswith("."))
            if not found:
                raise DataError(f"{p}: no {', '.join(SUFFIXES)} files in this directory")
            out.extend(found)
        elif p.is_file():
            if not _kind(p):
                raise DataError(f"{p}: unsupported file type; `prepare files` reads {', '.join(SUFFIXES)} "
                                f"(plain text: `fastgpt prepare text`)")
            out.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    return out


def part_of(files: list[Path], part: tuple[int, int]) -> list[Path]:
    """Part i of N (1-based): the i-th of N contiguous, near-equal runs of the sorted files."""
    i, n = part
    if len(files) < n:
        raise DataError(f"--part {i}/{n}: only {len(files)} input files, fewer than {n} parts")
    return files[(i - 1) * len(files) // n: i * len(files) // n]


def _need_pyarrow(p: Path):
    try:
        import pyarrow  # noqa: F401
    except ImportError as e:
        raise DataError(f"{p}: reading {_kind(p)} files needs pyarrow: pip install 'fastgpt[hf]'") from e


def _column(p: Path, table_or_batch, field: str):
    names = table_or_batch.schema.names
    if field not in names:
        raise DataError(f"{p}: no column {field!r}; columns: {names} (choose one with --text_field)")
    return table_or_batch.column(names.index(field)).to_pylist()


def _parquet(p: Path, field: str, skip: int):
    _need_pyarrow(p)
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(p)
    except Exception as e:
        raise DataError(f"{p}: not a readable parquet file ({type(e).__name__}: {e})") from e
    if field not in f.schema_arrow.names:
        raise DataError(f"{p}: no column {field!r}; columns: {f.schema_arrow.names} (choose one with --text_field)")
    groups = []
    for g in range(f.num_row_groups):
        rows = f.metadata.row_group(g).num_rows
        if skip >= rows:
            skip -= rows  # a whole row group before the resume point: not even decoded
            continue
        groups.append(g)
    for batch in f.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups, columns=[field]):
        texts = _column(p, batch, field)
        yield from texts[skip:]
        skip = max(0, skip - len(texts))


def _arrow(p: Path, field: str | None, skip: int, count: bool = False):
    _need_pyarrow(p)
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(p)  # what `datasets` writes
    except Exception:
        try:
            reader = pa.ipc.open_file(p)
        except Exception as e:
            raise DataError(f"{p}: not a readable Arrow IPC file ({type(e).__name__}: {e})") from e
    batches = reader if hasattr(reader, "__iter__") else (reader.get_batch(i) for i in range(reader.num_record_batches))
    for batch in batches:
        if count:
            yield from range(batch.num_rows)
            continue
        texts = _column(p, batch, field)
        yield from texts[skip:]
        skip = max(0, skip - len(texts))


def _jsonl(p: Path, field: str, skip: int):
    """One JSON object per non-blank line; the first `skip` of them are passed over unparsed."""
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if skip:
                skip -= 1
                continue
            try:
                doc = json.loads(line)
            except ValueError as e:
                raise DataError(f"{p}:{n}: not a JSON object per line ({e})") from e
            if not isinstance(doc, dict) or field not in doc:
                keys = list(doc) if isinstance(doc, dict) else type(doc).__name__
                raise DataError(f"{p}:{n}: no field {field!r} (has {keys}); choose one with --text_field")
            yield doc[field]


def _count(p: Path) -> int:
    """Documents in file p: read only to carry a resume point past whole files."""
    if _kind(p) == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(p).metadata.num_rows
    if _kind(p) == ".arrow":
        return sum(1 for _ in _arrow(p, None, 0, count=True))
    opener = gzip.open if p.name.lower().endswith(".gz") else open
    with opener(p, "rt", encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


_READERS = {".parquet": _parquet, ".arrow": _arrow}


class FileSource:
    """Documents of local files, in the order of the file list, rows in file order (a jsonl's blank lines
    are no documents)."""

    def __init__(self, files: list[Path], text_field: str):
        self.files, self.text_field = files, text_field
        self.total_bytes = sum(f.stat().st_size for f in files)
        self._bytes_done = 0

    def read_fraction(self) -> float:
        """Share of the input bytes in files already read: the progress line's ETA."""
        return self._bytes_done / max(self.total_bytes, 1)

    def fingerprint(self) -> dict:
        return {"source": "files", "text_field": self.text_field,
                "files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in self.files]}

    def docs(self, start: int = 0):
        """Document texts from global index start."""
        for p in self.files:
            if start:
                n = _count(p)
                if start >= n:
                    start -= n
                    self._bytes_done += p.stat().st_size
                    continue
            for text in _READERS.get(_kind(p), _jsonl)(p, self.text_field, start):
                yield _as_text(p, text)
            start = 0
            self._bytes_done += p.stat().st_size


def _as_text(p: Path, text) -> str:
    if not isinstance(text, str):
        raise DataError(f"{p}: a document's text is {type(text).__name__}, not a string (a null row?)")
    return text


class HFStreamSource:
    """A HuggingFace dataset read with streaming=True: no local copy; resume skips with IterableDataset.skip."""

    def __init__(self, dataset: str, name: str | None, split: str, text_field: str, load=None,
                 limit: int | None = None):
        self.dataset, self.name, self.split, self.text_field, self.limit = dataset, name, split, text_field, limit
        self.total_bytes = None
        if load is None:
            try:
                from datasets import load_dataset
            except ImportError as e:
                raise DataError("`fastgpt prepare hf` needs the `datasets` package: pip install 'fastgpt[hf]'") from e
            load = lambda: load_dataset(dataset, name, split=split, streaming=True)  # noqa: E731
        self._load = load

    def fingerprint(self) -> dict:
        return {"source": "hf-stream", "dataset": self.dataset, "name": self.name, "split": self.split,
                "text_field": self.text_field, "limit": self.limit}

    def docs(self, start: int = 0):
        try:
            ds = self._load()
        except Exception as e:
            raise DataError(f"could not load dataset {self.dataset!r} ({type(e).__name__}: {e})") from e
        if self.limit is not None:
            ds = ds.take(self.limit) if hasattr(ds, "take") else itertools.islice(ds, self.limit)
        if start:
            ds = ds.skip(start) if hasattr(ds, "skip") else _drop(ds, start)
        for row in ds:
            if self.text_field not in row:
                raise DataError(f"dataset {self.dataset!r} has no column {self.text_field!r}; columns: "
                                f"{list(row)} (choose one with --text_field)")
            yield _as_text(Path(self.dataset), row[self.text_field])


def _drop(it, n: int):
    it = iter(it)
    for _ in range(n):
        next(it, None)
    return it


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
