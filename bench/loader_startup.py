"""Loader startup over many large shards, after their first validation: `python -m bench.loader_startup`.

Makes --shards shards of --tokens uint16 tokens each (default 100 x 100M = 20 GB apparent size) as
SPARSE files (an .npy header, a few KiB of random ids at 64 spots, holes elsewhere), so they cost almost
no disk and no writing time; records them in manifest.json the way a preparation does as it writes each
shard ([size, hash, largest id]). Then times, in --runs fresh processes, the construction of the
train ShardLoader (B=64, T=1024, the gpt2-124m-fineweb recipe's micro-batch): find the shards, read each
header, hash each (about 1 MiB read per shard), compare with the manifest. The holes read as zeros, so
the hash reads are page-cache/zero-page fast: this measures the manifest path, not a cold disk.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TIMER = """
import sys, time
t0 = time.perf_counter()
from fastgpt.data import ShardLoader
t1 = time.perf_counter()
ld = ShardLoader(sys.argv[1], "train", 64, 1024, verbose=False)
t2 = time.perf_counter()
ld.next_batch()
print(t2 - t1, time.perf_counter() - t0, ld.total)
"""


def make_shards(root: Path, n: int, tokens: int, seed: int = 0) -> None:
    from fastgpt.data.shards import manifest_entry, record_checked

    rng = np.random.default_rng(seed)
    entries = {}
    for i in range(n):
        path = root / f"train_{i:06d}.npy"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(tokens,))
        for off in np.linspace(0, tokens - 2048, 64).astype(np.int64):
            arr[off:off + 2048] = rng.integers(0, 50257, 2048, dtype=np.uint16)
        arr.flush()
        del arr
        entries[path.name] = manifest_entry(path) + [50256]
    record_checked(root, entries)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--tokens", type=int, default=100_000_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the shards go (default: a temporary directory)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="loader_startup_", dir=args.dir) as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        make_shards(root, args.shards, args.tokens)
        gb = args.shards * args.tokens * 2 / 1e9
        print(f"{args.shards} sparse shards of {args.tokens:,} tokens ({gb:.1f} GB apparent) "
              f"made and recorded in {time.perf_counter() - t:.1f}s")
        loads, totals = [], []
        for r in range(args.runs):
            out = subprocess.run([sys.executable, "-c", TIMER, str(root)], capture_output=True, text=True, check=True)
            load, total, chunks = out.stdout.split()
            loads.append(float(load))
            totals.append(float(total))
            print(f"run {r + 1}: ShardLoader {float(load):.2f}s, process to first batch {float(total):.2f}s, "
                  f"{int(chunks):,} chunks", flush=True)
    med = statistics.median
    print(f"ShardLoader startup: median {med(loads):.2f}s ({min(loads):.2f}-{max(loads):.2f}); to first batch "
          f"incl. import: median {med(totals):.2f}s ({min(totals):.2f}-{max(totals):.2f}), {args.runs} runs")


if __name__ == "__main__":
    main()
