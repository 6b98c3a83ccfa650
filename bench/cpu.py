"""fastgpt on the CPU against the usual ways of training GPT-2 there: `python -m bench.cpu`.

Systems, all holding the same weights (copied from one seeded fastgpt model) and fed the same batch:
    fastgpt    GPT(kernels="auto") as `train.py` runs it on CPU: fused PyTorch loss (fastgpt/loss.py),
               return_logits=False, torch's fused AdamW (fastgpt.ops.make_optimizer)
    nanogpt    bench/nanogpt.py, the nanoGPT recipe: full logits + F.cross_entropy, AdamW (fused on CUDA only)
    hf-eager   transformers GPT2LMHeadModel, eager attention; logits + F.cross_entropy; torch AdamW
    hf-sdpa    the same with attn_implementation="sdpa"

Measured, per model size (`tiny` 8 x 128 and `gpt2` 4 x 128 by default):
1. training throughput: tokens per CPU-second (time.process_time) of one optimizer step (forward,
   backward, clip, AdamW), one thread, the systems interleaved rep by rep so that a shared machine's
   load falls on all of them alike; median and range over --reps;
2. step peak RSS: each system in its own fresh process; the growth of peak RSS over the RSS just
   before a training step (after a warm-up step, so optimizer state already exists), and the peak.
   Measured twice. Once with glibc's malloc as a user runs it: it keeps freed blocks below its
   (adaptive, up to 32 MiB) mmap threshold for reuse, so the warm-up step's gradients and activations
   partly stay in the RSS before the step and only what the step needs beyond them shows as growth.
   Once "live", with MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ fixed at 128 KiB so that freed
   memory goes back to the system at once: the RSS then follows the live tensors, and the growth is
   the step's own memory: activations, gradients (freed between steps: zero_grad(set_to_none=True)),
   the loss's buffers;
3. generation: greedy tokens per CPU-second with each system's KV cache from a 16-token prompt, with
   the generated ids checked equal across systems (fastgpt vs HF; nanogpt has no cache and is skipped).
The first-step losses are checked equal too (same weights and batch).
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

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("fastgpt", "nanogpt", "hf-eager", "hf-sdpa")
SHAPES = {"tiny": ("tiny", 8, 128), "gpt2": ("gpt2", 4, 128)}  # name: (fastgpt preset, batch, seq)


# ------------------------------------------------------------------------------------------------
# Systems
# ------------------------------------------------------------------------------------------------
def make_systems(preset: str, names=SYSTEMS, seed: int = 0) -> dict:
    """name -> (model, step_loss(x, y) -> loss, optimizer), all with one seeded fastgpt model's weights."""
    from fastgpt import GPT, GPTConfig

    torch.manual_seed(seed)
    ref = GPT(GPTConfig.preset(preset))
    out = {}
    for name in names:
        if name == "fastgpt":
            model = ref
            opt = model.configure_optimizers(weight_decay=0.1, lr=1e-4, device_type="cpu")
            out[name] = (model, lambda x, y, m=model: m(x, y, return_logits=False)[1], opt)
        elif name == "nanogpt":
            from bench.nanogpt import NanoConfig, NanoGPT

            c = ref.config
            model = NanoGPT(NanoConfig(block_size=c.block_size, vocab_size=c.vocab_size, n_layer=c.n_layer,
                                       n_head=c.n_head, n_embd=c.n_embd))
            model.load_state_dict(ref.state_dict())
            out[name] = (model, lambda x, y, m=model: m(x, y)[1], model.configure_optimizer(1e-4, 0.1))
        elif name.startswith("hf-"):
            from bench.nanogpt import decay_groups
            from fastgpt.hf import to_hf

            model = to_hf(ref)
            model.config._attn_implementation = name[3:]
            model.config.use_cache = False
            model.train()

            def loss_fn(x, y, m=model):
                logits = m(input_ids=x).logits  # (B, T, V); the targets are already shifted, as for the others
                return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1), ignore_index=-1)

            out[name] = (model, loss_fn, torch.optim.AdamW(decay_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95)))
        else:
            raise ValueError(f"unknown system {name!r}; choose from {SYSTEMS}")
    return out


def train_step(system, x, y) -> float:
    model, loss_fn, opt = system
    model.train()
    loss = loss_fn(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def batch(B: int, T: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    buf = torch.randint(0, 50257, (B * T + 1,), generator=g)
    return buf[:-1].view(B, T), buf[1:].view(B, T)


# ------------------------------------------------------------------------------------------------
# 1. Throughput, interleaved
# ------------------------------------------------------------------------------------------------
def throughput(preset: str, B: int, T: int, reps: int, names=SYSTEMS) -> dict:
    systems = make_systems(preset, names)
    x, y = batch(B, T)
    # Same weights, same batch: the first losses agree (the steps then diverge only by rounding).
    first = {n: train_step(s, x, y) for n, s in systems.items()}
    spread = max(first.values()) - min(first.values())
    if spread > 1e-3:
        raise AssertionError(f"first-step losses differ by {spread:.2e}: {first}")
    times = {n: [] for n in systems}
    for _ in range(reps):
        for n, s in systems.items():
            t0 = time.process_time()
            train_step(s, x, y)
            times[n].append(time.process_time() - t0)
    tok = B * T
    return {n: {"tok_per_cpu_s": [tok / t for t in ts], "first_loss": first[n]} for n, ts in times.items()}


# ------------------------------------------------------------------------------------------------
# 2. Peak RSS of a step, one process per system
# ------------------------------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # kB


def rss_child(preset: str, B: int, T: int, name: str) -> dict:
    """Run in a fresh process: a warm-up step (optimizer state now exists), then the RSS before and the
    peak RSS (VmHWM, reset through /proc/self/clear_refs) over two more steps. getrusage's ru_maxrss
    is no use here: a child inherits its parent's peak across fork and exec."""
    torch.set_num_threads(1)
    system = make_systems(preset, (name,))[name]
    x, y = batch(B, T)
    train_step(system, x, y)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
    before = _status_bytes("VmRSS")
    for _ in range(2):
        train_step(system, x, y)
    return {"before": before, "peak": _status_bytes("VmHWM")}


LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}  # glibc: free = unmap


def rss(preset: str, B: int, T: int, name: str, live: bool = False) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from bench.cpu import rss_child; "
            f"print('RSS', json.dumps(rss_child({preset!r}, {B}, {T}, {name!r})))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)
    for k in LIVE_MALLOC:
        env.pop(k, None)
    if live:
        env.update(LIVE_MALLOC)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(f"RSS run of {name} failed:\n{r.stderr[-3000:]}")
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RSS "))
    return json.loads(line[4:])


def _median_run(runs: list[dict]) -> dict:
    """The run with the median step growth, with every run's (before, peak) kept beside it."""
    ranked = sorted(runs, key=lambda r: r["peak"] - r["before"])
    return {**ranked[(len(ranked) - 1) // 2], "runs": runs}


# ------------------------------------------------------------------------------------------------
# 3. Generation
# ------------------------------------------------------------------------------------------------
def generation(preset: str, new_tokens: int, reps: int) -> dict:
    """Greedy decoding with a KV cache: fastgpt.generate vs transformers' generate, same weights."""
    systems = make_systems(preset, ("fastgpt", "hf-eager", "hf-sdpa"))
    prompt = batch(1, 16, seed=2)[0]  # (1, 16)
    outs, times = {}, {n: [] for n in systems}
    for _ in range(reps):
        for n, (model, _, _) in systems.items():
            model.eval()
            t0 = time.process_time()
            with torch.no_grad():
                if n == "fastgpt":
                    ids = model.generate(prompt, new_tokens, temperature=0)
                else:
                    ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                                         pad_token_id=0)
            times[n].append(new_tokens / (time.process_time() - t0))
            outs[n] = ids[0, prompt.shape[1]:].tolist()
    same = all(o == outs["fastgpt"] for o in outs.values())
    return {n: {"tok_per_cpu_s": t, "same_ids": same} for n, t in times.items()}


# ------------------------------------------------------------------------------------------------
def _med(xs):
    return statistics.median(xs), min(xs), max(xs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    p.add_argument("--reps", type=int, default=5, help="interleaved timed steps per system")
    p.add_argument("--gen_tokens", type=int, default=32, help="greedy tokens per generation (0: skip)")
    p.add_argument("--no_rss", action="store_true", help="skip the per-process peak-RSS runs")
    p.add_argument("--rss_runs", type=int, default=3, help="processes per system for the glibc RSS (median)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for m in args.models:
        preset, B, T = SHAPES[m]
        print(f"== {m}: batch {B} x {T}, one thread, {args.reps} interleaved reps", flush=True)
        res = {"throughput": throughput(preset, B, T, args.reps, args.systems)}
        if not args.no_rss:
            # glibc's growth moves run to run with what it trims (docs/cpu.md gives the spread): the median
            # of --rss_runs. The live figure repeats to the MiB: one run.
            res["rss"] = {n: _median_run([rss(preset, B, T, n) for _ in range(args.rss_runs)])
                          for n in args.systems}
            res["rss_live"] = {n: rss(preset, B, T, n, live=True) for n in args.systems}
        if args.gen_tokens:
            res["generation"] = generation(preset, args.gen_tokens, max(1, args.reps // 2))
        results[m] = res
        print(render(m, B, T, res), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def render(m: str, B: int, T: int, res: dict) -> str:
    thr = res["throughput"]
    nano = statistics.median(thr["nanogpt"]["tok_per_cpu_s"]) if "nanogpt" in thr else None

    def memory_cells(kind: str, n: str) -> list[str]:
        """Step growth (with the runs' range), its ratio to nanoGPT's, and the peak, for one RSS kind."""
        rs, ref = res.get(kind, {}).get(n), res.get(kind, {}).get("nanogpt")
        if not rs:
            return ["-", "-", "-"]
        g = rs["peak"] - rs["before"]
        spread = ""
        if len(rs.get("runs", ())) > 1:
            gs = [(r["peak"] - r["before"]) / 2**20 for r in rs["runs"]]
            spread = f" ({min(gs):,.0f}-{max(gs):,.0f})"
        return [f"{g / 2**20:,.0f}{spread} MiB", f"{g / (ref['peak'] - ref['before']):.2f}x" if ref else "-",
                f"{rs['peak'] / 2**20:,.0f} MiB"]

    lines = [f"| {m} {B}x{T} | train tok/CPU-s (median, range) | vs nanoGPT | step RSS growth (median, range) | vs nanoGPT "
             f"| peak RSS | step live growth | vs nanoGPT | live peak | generate tok/CPU-s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for n, r in thr.items():
        med, lo, hi = _med(r["tok_per_cpu_s"])
        rel = f"{med / nano:.2f}x" if nano else "-"
        cells = memory_cells("rss", n) + memory_cells("rss_live", n)
        g = res.get("generation", {}).get(n)
        gen_s = f"{statistics.median(g['tok_per_cpu_s']):,.0f}" if g else "-"
        lines.append(f"| {n} | {med:,.0f} ({lo:,.0f}-{hi:,.0f}) | {rel} | {' | '.join(cells)} | {gen_s} |")
    gen = res.get("generation")
    if gen:
        lines.append(f"greedy ids equal across fastgpt/HF: {next(iter(gen.values()))['same_ids']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
