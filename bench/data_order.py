"""Data order against val loss on the CPU default run: `python -m bench.data_order`.

The CPU default of `train.py` (preset 'tiny', 7.3M parameters, 1,024 tokens a step = 8 x 128, packaged
Tiny Shakespeare in GPT-2 tokens), trained for --steps steps with --data_order sequential, shuffled
and windows (nanoGPT's get_batch sampler: random windows from a seeded generator), at equal tokens.
Each run evaluates the FULL val split (all 33,803 tokens: --eval_steps 264 sequences of 128) every
--every steps. Runs are interleaved (seed 0: all orders, seed 1: all orders, ...) so a shared machine's
load falls on every order alike; one thread each (OMP_NUM_THREADS=1). Prints median and range over seeds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ORDERS = ("sequential", "shuffled", "windows")


def run(order: str, seed: int, steps: int, every: int, work: Path) -> dict[int, float]:
    log = work / f"{order}_{seed}"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "train.py"), "--data_order", order, "--seed", str(seed),
           "--max_steps", str(steps), "--eval_interval", str(every), "--eval_steps", "264",
           "--sample_interval", "0", "--checkpoint_interval", str(10 * steps), "--log_dir", str(log)]
    r = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    out = {}
    for line in (log / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("type") == "val":
            out[rec["step"]] = rec["loss"]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--every", type=int, default=25, help="steps between full-val evaluations")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--orders", default=",".join(ORDERS))
    args = ap.parse_args(argv)
    orders = args.orders.split(",")
    res: dict[str, list[dict[int, float]]] = {o: [] for o in orders}
    with tempfile.TemporaryDirectory(prefix="data_order_") as tmp:
        work = Path(tmp)
        for seed in range(args.seeds):
            for o in orders:
                res[o].append(run(o, seed, args.steps, args.every, work))
                print(f"seed {seed} {o}: " + ", ".join(f"step {k}: {v:.3f}" for k, v in sorted(res[o][-1].items())),
                      flush=True)
    steps = sorted(res[orders[0]][0])
    print(f"\nfull-val loss, median [min-max] over {args.seeds} seeds, {args.steps}-step runs")
    print("| order | " + " | ".join(f"step {s}" for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for o in orders:
        cells = []
        for s in steps:
            v = [r[s] for r in res[o]]
            cells.append(f"{statistics.median(v):.3f} [{min(v):.3f}-{max(v):.3f}]")
        print(f"| {o} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
