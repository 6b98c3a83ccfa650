"""Which CPU default learns the most in a fixed CPU budget: `python -m bench.cpu_sweep`.

Each configuration trains Tiny Shakespeare from scratch in its own process on one thread and reports
the CPU seconds its training took (`time.process_time` around the run: on a shared machine CPU time,
not wall time, is what a configuration spends), tokens per CPU-second, the final val loss and a short
sample. `--jobs 2` runs two configurations at a time.

    python -m bench.cpu_sweep --only old tiny-400 --jobs 2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(n_layer=4, n_head=4, n_embd=128)

# name: (model shape, train flags). "old" is the CPU default before this sweep (tiny, 200 x 1,024 tokens).
CONFIGS = {
    "old": (TINY, dict(max_steps=200, total_batch_size=1024, max_lr=2e-3)),
    "tiny-320": (TINY, dict(max_steps=320, total_batch_size=1024, max_lr=2e-3)),  # the CPU default since
    "tiny-320-lr4e-3": (TINY, dict(max_steps=320, total_batch_size=1024, max_lr=4e-3)),
    "L6-280-lr3e-3": (dict(n_layer=6, n_head=4, n_embd=128), dict(max_steps=280, total_batch_size=1024, max_lr=3e-3)),
    "tiny-160x2048-lr4e-3": (TINY, dict(max_steps=160, total_batch_size=2048, max_lr=4e-3)),
}

ENTRY = """
import glob, json, sys, time
sys.path.insert(0, {root!r})
from fastgpt.config import PRESETS, GPTConfig
PRESETS["sweep"] = GPTConfig(block_size=256, **json.loads(sys.argv[1]))
from fastgpt.train import main
from fastgpt.checkpoint import load_model
try:
    from fastgpt.generate import sample_text
except ImportError:  # --code: an older fastgpt without it
    sample_text = lambda model, prompt, n: ""
t0 = time.process_time()
rc = main(sys.argv[2:])
print("TRAIN_CPU_S:", time.process_time() - t0)
last = sorted(glob.glob(sys.argv[sys.argv.index("--log_dir") + 1] + "/model_*.pt"))[-1]
print("SAMPLE:", json.dumps("ROMEO:" + sample_text(load_model(last), "ROMEO:", 30)))
sys.exit(rc)
"""


def run_one(name: str, data_root: str, workdir: Path, code: Path = ROOT) -> dict:
    shape, flags = CONFIGS[name]
    # The CPU defaults' evaluation and checkpoint cadence, so their cost is counted as in a real run.
    flags = {"micro_batch_size": 8, "seq_len": 128, "warmup_steps": 10, "eval_interval": 25,
             "eval_steps": 4, "checkpoint_interval": 50, **flags}
    args = ["--model", "sweep", "--device", "cpu", "--kernels", "torch", "--data_root", data_root,
            "--log_dir", str(workdir / name)] + [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code)}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", ENTRY.format(root=str(code)), json.dumps(shape), *args],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"name": name, "error": r.stderr[-2000:]}
    out = r.stdout
    cpu = float(re.search(r"^TRAIN_CPU_S: (\S+)", out, re.M).group(1))
    tokens = flags["max_steps"] * flags["total_batch_size"]
    return {"name": name, **shape, "max_steps": flags["max_steps"], "total_batch_size": flags["total_batch_size"],
            "max_lr": flags["max_lr"], "val_loss": float(re.findall(r"^val loss (\S+)", out, re.M)[-1]),
            "cpu_s": cpu, "tok_per_cpu_s": tokens / cpu,
            "sample": json.loads(out.split("SAMPLE: ", 1)[1].splitlines()[0])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu_sweep", description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--data_root", default=None, help="prepared shards (default: prepare the packaged text)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--code", type=Path, default=ROOT, help="the fastgpt checkout to run (e.g. an older one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data_root
        if data_root is None:
            from fastgpt.data import prepare_shakespeare

            data_root = str(Path(tmp) / "data")
            prepare_shakespeare(None, data_root)
        with ThreadPoolExecutor(args.jobs) as pool:
            rows = list(pool.map(lambda n: run_one(n, data_root, Path(tmp), args.code), args.only))
    print(f"{'config':18s} {'shape LxC':>9s} {'steps x tok':>12s} {'lr':>7s} {'CPU s':>7s} {'tok/CPU-s':>9s} "
          f"{'val loss':>8s}  sample")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:18s} ERROR {r['error']}")
            continue
        print(f"{r['name']:18s} {r['n_layer']:>4d}x{r['n_embd']:<4d} {r['max_steps']:>5d}x{r['total_batch_size']:<6d} "
              f"{r['max_lr']:>7.0e} {r['cpu_s']:>7.1f} {r['tok_per_cpu_s']:>9,.0f} {r['val_loss']:>8.4f}  "
              f"{r['sample'][:60]!r}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
