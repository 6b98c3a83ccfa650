"""LayerNorm and GELU kernels against PyTorch on a CUDA GPU, at GPT-2 widths.

    python -m bench.kernel_speed [--tokens 16384] [--widths 768,1024,1280,1600] [--dtype bf16|fp16|fp32]

For each width C it times, with triton.testing.do_bench (median of repeated runs, L2 flushed):
- layer_norm forward and backward on (tokens, C), fp32 weights and bias (autocast's layout when
  --dtype is bf16/fp16; PyTorch gets weights in the activation dtype, which F.layer_norm requires)
- gelu forward and backward on (tokens, 4C), the MLP's hidden activation
and prints microseconds and effective bandwidth (bytes the op must move / time) for ours and PyTorch.
Backward is timed alone: the graph is built once and `torch.autograd.grad(..., retain_graph=True)`
replays it. Needs CUDA; it is a measuring tool, not a test.
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _bench_fwd_bwd(fn, inputs, dy):
    from triton.testing import do_bench

    with torch.no_grad():
        fwd = do_bench(lambda: fn(*inputs))
    leaves = [t for t in inputs if t is not None and t.requires_grad]
    y = fn(*inputs)
    bwd = do_bench(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True))
    return fwd * 1e3, bwd * 1e3  # ms -> us


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_speed", description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="rows: batch x sequence (default 16 x 1024)")
    p.add_argument("--widths", default="768,1024,1280,1600")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.kernel_speed needs a CUDA GPU", file=sys.stderr)
        return 2
    import kernels

    dt = DTYPES[args.dtype]
    es = torch.empty(0, dtype=dt).element_size()
    m = args.tokens
    print(f"{torch.cuda.get_device_name()}  tokens={m}  dtype={args.dtype}")
    print(f"{'op':<16}{'C':>6} | {'ours us':>9} {'GB/s':>7} | {'torch us':>9} {'GB/s':>7} | {'speedup':>7}")
    for c in (int(w) for w in args.widths.split(",")):
        x = torch.randn(m, c, device="cuda", dtype=dt, requires_grad=True)
        w = torch.randn(c, device="cuda", requires_grad=True)
        b = torch.randn(c, device="cuda", requires_grad=True)
        wt = w.detach().to(dt).requires_grad_()
        bt = b.detach().to(dt).requires_grad_()
        dy = torch.randn(m, c, device="cuda", dtype=dt)
        ours = _bench_fwd_bwd(lambda x, w, b: kernels.layer_norm(x, w, b, 1e-5), (x, w, b), dy)
        ref = _bench_fwd_bwd(lambda x, w, b: F.layer_norm(x, (c,), w, b, 1e-5), (x, wt, bt), dy)
        # Minimum traffic: fwd reads x, writes y; bwd reads x and dy, writes dx.
        for name, nbytes, o, r in (("layer_norm fwd", 2 * m * c * es, ours[0], ref[0]),
                                   ("layer_norm bwd", 3 * m * c * es, ours[1], ref[1])):
            print(f"{name:<16}{c:>6} | {o:9.1f} {nbytes / o / 1e3:7.0f} | {r:9.1f} {nbytes / r / 1e3:7.0f} | {r / o:7.2f}")

        h = torch.randn(m, 4 * c, device="cuda", dtype=dt, requires_grad=True)
        dh = torch.randn(m, 4 * c, device="cuda", dtype=dt)
        ours = _bench_fwd_bwd(kernels.gelu, (h,), dh)
        ref = _bench_fwd_bwd(lambda t: F.gelu(t, approximate="tanh"), (h,), dh)
        for name, nbytes, o, r in (("gelu fwd", 2 * m * 4 * c * es, ours[0], ref[0]),
                                   ("gelu bwd", 3 * m * 4 * c * es, ours[1], ref[1])):
            print(f"{name:<16}{4 * c:>6} | {o:9.1f} {nbytes / o / 1e3:7.0f} | {r:9.1f} {nbytes / r / 1e3:7.0f} | {r / o:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
