"""Streaming preparation (`fastgpt prepare files` / `prepare hf`): ids equal to encoding each document,
SIGKILL midway + resume gives the uninterrupted run's shards byte for byte (kept shards not rewritten),
1 and 2 workers agree, --part slices land in one directory the loader reads, bad input named."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
import pyarrow.parquet as pq  # noqa: E402

from fastgpt.data import DataError, ShardLoader, prepare_files, prepare_hf_stream, stream  # noqa: E402
from fastgpt.tokenizer import EOT_TOKEN, get_encoding  # noqa: E402

N_DOCS = 2_000_000  # 1M rows of parquet (4 files) + 1M lines of jsonl (2 files, one gzipped)
WORDS = ["the", "cat", "sat", "on", "a", "mat", "Hello", "world", "\n", "été", "  "]
LITERAL = {5, 1_000_003, N_DOCS - 2}  # documents holding the separator's text (stays ordinary tokens)


def _pool(seed: int, size: int = 4096) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(1, 4))) for _ in range(size)]


def _docs(n: int, seed: int) -> list[str]:
    """n short documents drawn from a pool (fast to generate and write), a few with '<|endoftext|>'."""
    pool = _pool(seed)
    docs = [pool[i] for i in np.random.default_rng(seed + 1).integers(0, len(pool), n).tolist()]
    for i in LITERAL:
        if i < n:
            docs[i] = f"x <|endoftext|> {docs[i]}"
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import gzip

    d = tmp_path_factory.mktemp("corpus")
    docs = _docs(N_DOCS, 0)
    q = N_DOCS // 8
    for i in range(4):
        pq.write_table(pa.table({"id": range(q), "text": docs[i * q:(i + 1) * q]}), d / f"part{i}.parquet",
                       row_group_size=50_000)
    lines = [json.dumps({"text": t}) + "\n" for t in docs[4 * q:]]
    half = len(lines) // 2
    (d / "z0.jsonl").write_text("".join(lines[:half]))
    with gzip.open(d / "z1.json.gz", "wt") as f:
        f.write("".join(lines[half:]))
    return d, docs


SHARD, VAL = 400_000, 500_000


def _shards(out):
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.npy"))}


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    d, _ = corpus
    out = tmp_path_factory.mktemp("ref")
    counts = prepare_files([d], out, shard_tokens=SHARD, val_tokens=VAL, num_proc=1)
    return out, counts


def test_tokens_equal_each_document_encoded_after_a_separator(corpus, reference):
    _, docs = corpus
    out, (train, val) = reference
    assert val == VAL and train > 10 * SHARD
    names = sorted(p.name for p in out.glob("*.npy"))
    assert names[:2] == ["train_000000.npy", "train_000001.npy"] and names[-2:] == ["val_000000.npy", "val_000001.npy"]
    tokens = np.concatenate([np.load(out / n) for n in sorted(names, key=lambda n: (n[0] != "v", n))])
    assert tokens.dtype == np.uint16 and len(tokens) == train + val
    enc = get_encoding()  # spot-check documents at both ends and at file boundaries
    starts = np.flatnonzero(tokens == EOT_TOKEN)
    assert len(starts) == N_DOCS
    for i in [0, 1, 249_999, 250_000, 999_999, 1_000_000, 1_499_999, 1_500_000, N_DOCS - 1]:
        end = starts[i + 1] if i + 1 < N_DOCS else len(tokens)
        assert tokens[starts[i] + 1:end].tolist() == enc.encode_ordinary(docs[i]), i
    assert all(np.load(out / n).size == SHARD for n in names[:-3])  # all train shards but the last are full


def test_sigkill_midway_then_resume_gives_identical_shards_with_2_workers(corpus, reference, tmp_path):
    d, _ = corpus
    ref_out, _ = reference
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastgpt", "prepare", "files", str(d), "--out", str(out), "--num_proc", "2",
           "--shard_tokens", str(SHARD), "--val_tokens", str(VAL)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    state = out / ".prepare_state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(json.loads(state.read_text())["shards"]) >= 4:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "the preparation finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers
    proc.wait()
    kept = json.loads(state.read_text())["shards"]
    assert 4 <= len(kept) < len(_shards(ref_out))
    before = {e["name"]: (out / e["name"]).stat().st_mtime_ns for e in kept}
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"resuming: {len(kept)} shards verified and kept" in r.stderr
    assert "tokens/s" in r.stderr and "shards written" in r.stderr
    assert {n: (out / n).stat().st_mtime_ns for n in before} == before  # kept, not rewritten
    assert _shards(out) == _shards(ref_out)
    loader = ShardLoader(out, "train", 4, 64, verbose=False)
    assert loader.total == sum((len(np.load(p, mmap_mode="r")) - 1) // 256 for p in sorted(out.glob("train_*.npy")))
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and "already prepared" in again.stdout


def test_a_changed_kept_shard_is_prepared_again(corpus, tmp_path):
    d, _ = corpus
    src = tmp_path / "one.parquet"
    pq.write_table(pq.read_table(d / "part0.parquet").slice(0, 20_000), src)
    out = tmp_path / "out"
    prepare_files([src], out, shard_tokens=20_000, val_tokens=10_000, num_proc=1)
    ref = _shards(out)
    state = json.loads((out / ".prepare_state.json").read_text())
    state["done"] = False  # as if killed after the last shard
    (out / ".prepare_state.json").write_text(json.dumps(state))
    bad = np.load(out / "train_000001.npy")
    bad[0] = 7
    np.save(out / "train_000001.npy", bad)
    prepare_files([src], out, shard_tokens=20_000, val_tokens=10_000, num_proc=1)
    assert _shards(out) == ref


def test_parts_prepare_disjoint_slices_into_one_directory(tmp_path):
    docs = _docs(80_000, 2)
    files = [tmp_path / f"f{i}.parquet" for i in range(4)]  # 2 files per part
    for i, f in enumerate(files):
        pq.write_table(pa.table({"text": docs[i * 20_000:(i + 1) * 20_000]}), f)
    SHARD, VAL = 30_000, 40_000
    whole = tmp_path / "whole"
    prepare_files(files, whole, shard_tokens=SHARD, val_tokens=VAL, num_proc=1)
    out = tmp_path / "parts"
    t1, v1 = prepare_files(files, out, shard_tokens=SHARD, val_tokens=VAL, num_proc=1, part="1/2")
    t2, v2 = prepare_files(files, out, shard_tokens=SHARD, val_tokens=VAL, num_proc=1, part="2/2")
    names = sorted(p.name for p in out.glob("*.npy"))
    assert v2 == 0 and any(n.startswith("train_p02of02_") for n in names)
    assert all(n.startswith(("train_p01of02_", "train_p02of02_", "val_p01of02_")) for n in names)
    total = lambda root: sum(len(np.load(p, mmap_mode="r")) for p in root.glob("*.npy"))  # noqa: E731
    assert total(out) == total(whole) == t1 + v1 + t2
    first = np.concatenate([np.load(out / n) for n in names if n.startswith("val_")] +
                           [np.load(out / n) for n in names if n.startswith("train_p01")])
    assert np.array_equal(first, np.concatenate([np.load(whole / n) for n in sorted(
        (p.name for p in whole.glob("*.npy")), key=lambda n: (n[0] != "v", n))])[:len(first)])
    ShardLoader(out, "train", 4, 64, verbose=False)  # reads both parts' shards
    with pytest.raises(DataError, match="--part must look like i/N"):
        prepare_files(files, out, part="2")
    with pytest.raises(DataError, match="fewer than 8 parts"):
        prepare_files(files, out, part="1/8")


class _FakeStream:
    """An IterableDataset stand-in: iteration, skip and take, as datasets' streaming datasets have."""

    def __init__(self, rows, log):
        self.rows, self.log = rows, log

    def skip(self, n):
        self.log.append(("skip", n))
        return _FakeStream(self.rows[n:], self.log)

    def take(self, n):
        return _FakeStream(self.rows[:n], self.log)

    def __iter__(self):
        return iter(self.rows)


def test_hf_streaming_resumes_with_skip(tmp_path, monkeypatch):
    rows = [{"text": t} for t in _docs(30_000, 1)]
    log = []
    load = lambda: _FakeStream(rows, log)  # noqa: E731
    ref = tmp_path / "ref"
    prepare_hf_stream("fake/ds", ref, shard_tokens=10_000, val_tokens=10_000, num_proc=1, load=load)
    out = tmp_path / "out"
    real, calls = stream.encode_batch, []

    def dies(batch):
        calls.append(1)
        if len(calls) > 12:
            raise KeyboardInterrupt
        return real(batch)

    monkeypatch.setattr(stream, "encode_batch", dies)
    with pytest.raises(KeyboardInterrupt):
        prepare_hf_stream("fake/ds", out, shard_tokens=10_000, val_tokens=10_000, num_proc=1, load=load)
    monkeypatch.setattr(stream, "encode_batch", real)
    log.clear()
    prepare_hf_stream("fake/ds", out, shard_tokens=10_000, val_tokens=10_000, num_proc=1, load=load)
    assert log and log[0][0] == "skip" and log[0][1] > 0
    assert _shards(out) == _shards(ref)
    with pytest.raises(DataError, match="no column 'body'"):
        prepare_hf_stream("fake/ds", tmp_path / "x", text_field="body", shard_tokens=10_000, num_proc=1, load=load)


def test_bad_input_is_named(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "hi"}\n{"txt": "oops"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: no field 'text'"):
        prepare_files([tmp_path / "a.jsonl"], tmp_path / "o", shard_tokens=100, val_tokens=1, num_proc=1)
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(DataError, match=r"b\.txt: unsupported file type"):
        prepare_files([tmp_path / "b.txt"], tmp_path / "o", num_proc=1)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: no column 'text'; columns: \['body'\]"):
        prepare_files([tmp_path / "c.parquet"], tmp_path / "o", num_proc=1)
    (tmp_path / "d.jsonl").write_text('{"text": "tiny"}\n')
    with pytest.raises(DataError, match="not more than --val_tokens"):
        prepare_files([tmp_path / "d.jsonl"], tmp_path / "o2", shard_tokens=100, num_proc=1)
