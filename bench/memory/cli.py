"""python -m bench.memory: the command line."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

import torch
import torch.utils.checkpoint

from . import common
from .common import MODELS, SYSTEMS, fmt_bytes
from .model import measure_cuda, run_one
from .ranks import SHARD_MODES, fit_table, run_rank
from .render import render, render_ranks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2", choices=list(MODELS))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--system", default="all", help="|".join(SYSTEMS) + "|all, or a comma-separated list")
    p.add_argument("--ce-chunk", type=int, default=common.CE_CHUNK_ROWS, help="rows per chunk of fastgpt's fused loss")
    p.add_argument("--json", help="write the results as a JSON list here")
    p.add_argument("--measure", action="store_true", help="on a GPU, also measure max_memory_allocated")
    p.add_argument("--shard", choices=SHARD_MODES,
                   help="per rank, as train.py --shard runs fastgpt (with --world; no --system)")
    p.add_argument("--world", default="2", help="ranks for --shard: one number or a comma-separated list [2]")
    p.add_argument("--activation_checkpointing", action="store_true",
                   help="with --shard: each row also with train.py --activation_checkpointing")
    p.add_argument("--fit", action="store_true",
                   help="which GPT-2 size fits which card (8-80 GB) at which world size and mode, at --batch x --seq")
    a = p.parse_args(argv)
    common.CE_CHUNK_ROWS = a.ce_chunk
    if a.shard or a.fit:
        return main_ranks(a, p)
    systems = list(SYSTEMS) if a.system == "all" else a.system.split(",")
    results = []
    for s in systems:
        r = run_one(s, a.model, a.batch, a.seq)
        results.append(r)
        print(f"{s}: peak {fmt_bytes(r.peak_bytes)}", file=sys.stderr, flush=True)
    print(render(results))
    rows = [asdict(r) for r in results]
    if a.measure:
        if not torch.cuda.is_available():
            print("--measure needs a CUDA GPU; skipped", file=sys.stderr)
        else:
            print("\nMeasured on " + torch.cuda.get_device_name() + " (torch.cuda.max_memory_allocated):")
            for row in rows:
                try:
                    row["measured_peak_bytes"] = measure_cuda(row["system"], a.model, a.batch, a.seq)
                    print(f"- {row['system']}: model {fmt_bytes(row['peak_bytes'])}, measured "
                          f"{fmt_bytes(row['measured_peak_bytes'])} "
                          f"({row['peak_bytes'] / row['measured_peak_bytes']:.3f}x)")
                except Exception as e:  # e.g. fastgpt kernels missing, OOM: report and go on
                    row["measured_error"] = repr(e)
                    print(f"- {row['system']}: could not measure: {e!r}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def main_ranks(a, p) -> int:
    if a.fit:
        table, results = fit_table(a.batch, a.seq, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(table)
    else:
        try:
            worlds = [int(w) for w in a.world.split(",")]
        except ValueError:
            p.error(f"--world must be a number or a comma-separated list of numbers, got {a.world!r}")
        if any(w < 1 for w in worlds):
            p.error(f"--world must be >= 1, got {a.world!r}")
        results = []
        for w in worlds:
            for ac in (False, True) if a.activation_checkpointing else (False,):
                r = run_rank(a.shard, a.model, a.batch, a.seq, w, ac)
                results.append(r)
                print(f"{r.mode} x{w}{' + AC' if ac else ''}: peak per rank {fmt_bytes(r.peak_bytes)}",
                      file=sys.stderr, flush=True)
        print(render_ranks(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=1)
    return 0
