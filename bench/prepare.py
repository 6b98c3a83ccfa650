"""Data preparation throughput and memory: fastgpt's streaming `prepare files` against a
build-nanogpt-style preparation, side by side on one generated corpus: `python -m bench.prepare`.

Corpus: --gb of text (default 2) as parquet files of documents of 200-8,000 characters, cut at
random from the packaged Tiny Shakespeare (English text, so tokens per byte are realistic).

Systems, each in its own fresh process, both with --num_proc workers and --shard_tokens shards:
    fastgpt      fastgpt.data.prepare_files (documents read in batches, at most 2 batches per worker
                 in flight, one tiktoken call per run of documents, shards written atomically)
    build-nanogpt  its fineweb.py loop: multiprocessing.Pool.imap(tokenize, docs, chunksize=16), each
                 document [<|endoftext|>] + encode_ordinary(doc) as uint16, a 100M-token buffer filled
                 and np.save'd (the documents come from the same parquet reader, not `datasets`)
Measured per run: tokens/s, tokens/s per worker (per core used), and peak RSS of the whole process
tree (main + workers), sampled from /proc every 0.1 s. The systems alternate run by run (--runs)
so a shared machine's load falls on both alike; median and range are printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def make_corpus(root: Path, gb: float, seed: int = 0) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fastgpt.data import PACKAGED_SHAKESPEARE

    out = root / f"corpus_{gb:g}gb"
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    text = PACKAGED_SHAKESPEARE.read_text()
    rng = np.random.default_rng(seed)
    target, written, k = int(gb * 1e9), 0, 0
    while written < target:
        lengths = rng.integers(200, 8000, 20_000)
        starts = rng.integers(0, len(text) - 8000, len(lengths))
        docs = [text[s:s + n] for s, n in zip(starts.tolist(), lengths.tolist())]
        pq.write_table(pa.table({"text": docs}), out / f"shard_{k:04d}.parquet", row_group_size=2000)
        written += int(lengths.sum())
        k += 1
    (out / "done").write_text(str(written))
    return out


def _nanogpt_style(corpus: Path, out: Path, num_proc: int, shard_tokens: int) -> int:
    import multiprocessing as mp

    import numpy as np

    from fastgpt.data.sources import FileSource, expand

    out.mkdir(parents=True, exist_ok=True)
    docs = FileSource(expand([corpus]), "text").docs()
    buf, fill, index, total = np.empty(shard_tokens, dtype=np.uint16), 0, 0, 0
    with mp.get_context("fork").Pool(num_proc) as pool:
        for tokens in pool.imap(_tokenize, docs, chunksize=16):
            while len(tokens):
                take = min(shard_tokens - fill, len(tokens))
                buf[fill:fill + take] = tokens[:take]
                fill, tokens, total = fill + take, tokens[take:], total + take
                if fill == shard_tokens:
                    np.save(out / f"{'val' if index == 0 else 'train'}_{index:06d}.npy", buf)
                    fill, index = 0, index + 1
    if fill:
        np.save(out / f"train_{index:06d}.npy", buf[:fill])
    return total


def _tokenize(doc: str):
    import numpy as np

    from fastgpt.tokenizer import EOT_TOKEN, get_encoding

    return np.asarray([EOT_TOKEN] + get_encoding().encode_ordinary(doc), dtype=np.uint16)


def _child(system: str, corpus: Path, out: Path, num_proc: int, shard_tokens: int) -> None:
    t0 = time.perf_counter()
    if system == "fastgpt":
        from fastgpt.data import prepare_files

        train, val = prepare_files([corpus], out, shard_tokens=shard_tokens, val_tokens=shard_tokens,
                                   num_proc=num_proc, progress_s=1e9)
        tokens = train + val
    else:
        tokens = _nanogpt_style(corpus, out, num_proc, shard_tokens)
    print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0}))


def _tree_rss(pid: int) -> int:
    """Resident bytes of pid and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return total


def run_one(system: str, corpus: Path, out: Path, num_proc: int, shard_tokens: int) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "bench.prepare", "--child", system, "--corpus", str(corpus), "--out", str(out),
           "--num_proc", str(num_proc), "--shard_tokens", str(shard_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(proc.pid))
        time.sleep(0.1)
    res = json.loads(proc.stdout.read().strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return {**res, "peak_rss": peak, "tok_s": res["tokens"] / res["seconds"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=2.0, help="GB of text in the generated corpus (>= 2 for the claim)")
    ap.add_argument("--num_proc", type=int, default=2)
    ap.add_argument("--shard_tokens", type=int, default=100_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--work", default="/tmp/fastgpt_bench_prepare")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child(a.child, Path(a.corpus), Path(a.out), a.num_proc, a.shard_tokens)
    work = Path(a.work)
    corpus = make_corpus(work, a.gb)
    gb = int((corpus / "done").read_text()) / 1e9
    print(f"corpus: {gb:.2f} GB of text in {len(list(corpus.glob('*.parquet')))} parquet files; "
          f"--num_proc {a.num_proc}, --shard_tokens {a.shard_tokens:,}, {a.runs} runs alternating")
    results = {"fastgpt": [], "build-nanogpt": []}
    for r in range(a.runs):
        for system in results:
            res = run_one(system, corpus, work / "out", a.num_proc, a.shard_tokens)
            results[system].append(res)
            print(f"  run {r + 1} {system:14s} {res['tokens']:,} tokens in {res['seconds']:.1f} s: "
                  f"{res['tok_s']:,.0f} tokens/s, peak RSS {res['peak_rss'] / 2**20:,.0f} MiB", flush=True)
    print(f"{'system':14s} {'tokens/s per worker (median, range)':>40s} {'peak RSS MiB (median, range)':>34s}")
    for system, rs in results.items():
        per = [x["tok_s"] / a.num_proc for x in rs]
        rss = [x["peak_rss"] / 2**20 for x in rs]
        print(f"{system:14s} {statistics.median(per):>18,.0f} ({min(per):,.0f}-{max(per):,.0f}) "
              f"{statistics.median(rss):>18,.0f} ({min(rss):,.0f}-{max(rss):,.0f})")


if __name__ == "__main__":
    main()
