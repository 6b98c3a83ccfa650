"""Turn a pytest-benchmark JSON into markdown tables, a PNG chart and the roofline section.

    python -m bench.report RESULTS.json [--out DIR] [--memory MEMORY.json ...]

Per benchmark group (one op at one shape, or one training step): every implementation's median time,
tokens/s, TFLOP/s, GB/s, MFU, peak memory, and fastgpt's speedup over it (its time / fastgpt's time).
Groups without a fastgpt result (CPU runs, where Triton skips) are compared with their first baseline.
The chart shows, per group, each implementation's throughput relative to that reference.
Writes DIR/report.md and DIR/chart.png (DIR defaults to RESULTS-report next to the JSON) and prints
the markdown. `--memory` adds the tables of `python -m bench.memory --json` files.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import OrderedDict

REFERENCE_ORDER = ["fastgpt", "torch", "torch-sdpa", "torch-fused", "nanogpt", "hf-sdpa"]


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _impl(b: dict) -> str:
    return b.get("extra_info", {}).get("impl") or (b.get("params") or {}).get("impl") or \
        (b.get("params") or {}).get("system") or b["name"]


def groups(data: dict) -> "OrderedDict[str, list[dict]]":
    out: OrderedDict[str, list[dict]] = OrderedDict()
    for b in data.get("benchmarks", []):
        out.setdefault(b.get("group") or b["name"], []).append(b)
    return out


def _median(b: dict) -> float:
    return b.get("extra_info", {}).get("median_s") or b["stats"]["median"]


def reference(rows: list[dict]) -> dict:
    by = {_impl(b): b for b in rows}
    for name in REFERENCE_ORDER:
        if name in by:
            return by[name]
    return rows[0]


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} us"


def _fmt(v, spec, scale=1.0, suffix=""):
    return "-" if v is None else f"{v * scale:{spec}}{suffix}"


def _mem(v) -> str:
    return "-" if v is None else f"{v / 2**30:.2f} GiB"


def group_table(name: str, rows: list[dict]) -> str:
    ref = reference(rows)
    ref_name, ref_t = _impl(ref), _median(ref)
    is_fast = ref_name == "fastgpt"
    head = f"### {name}\n\n"
    if not is_fast:
        head += f"(no fastgpt result in this group; speedups are relative to `{ref_name}`)\n\n"
    col = "fastgpt speedup" if is_fast else f"speedup of {ref_name}"
    lines = [f"| impl | median | tokens/s | TFLOP/s | GB/s | MFU | peak mem | NVML used | {col} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for b in sorted(rows, key=_median):
        ex = b.get("extra_info", {})
        t = _median(b)
        speed = "-" if b is ref else f"{t / ref_t:.2f}x"
        lines.append(
            f"| {_impl(b)} | {_fmt_time(t)} | {_fmt(ex.get('tokens_per_s'), ',.0f')} "
            f"| {_fmt(ex.get('tflops_per_s'), '.3g')} | {_fmt(ex.get('gb_per_s'), '.3g')} "
            f"| {_fmt(ex.get('mfu'), '.1%')} | {_mem(ex.get('peak_mem_bytes'))} | {_mem(ex.get('nvml_used_bytes'))} "
            f"| {speed} |")
    return head + "\n".join(lines) + "\n"


def chart(data: dict, path: str) -> str | None:
    """Horizontal bars: throughput of each implementation relative to its group's reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gs = groups(data)
    if not gs:
        return None
    impls: list[str] = []
    for rows in gs.values():
        for b in rows:
            if _impl(b) not in impls:
                impls.append(_impl(b))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(impls)}
    n_bars = sum(len(rows) for rows in gs.values())
    fig, ax = plt.subplots(figsize=(10, 0.22 * n_bars + 0.35 * len(gs) + 1.5))
    y, ticks, labels, seen = 0.0, [], [], set()
    for name, rows in gs.items():
        ref_t = _median(reference(rows))
        start = y
        for b in sorted(rows, key=lambda r: impls.index(_impl(r))):
            impl = _impl(b)
            ax.barh(y, ref_t / _median(b), height=0.8, color=colors[impl],
                    label=None if impl in seen else impl)  # >1: faster than the reference
            seen.add(impl)
            y += 1
        ticks.append((start + y - 1) / 2)
        labels.append(name)
        y += 0.8  # gap between groups
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xlabel("throughput relative to fastgpt (or the group's first baseline); higher is faster")
    dev = data.get("machine_info", {}).get("device", "")
    ax.set_title(f"fastgpt vs baselines ({dev})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def measured_for_roofline(data: dict) -> dict:
    """(kernel, shape) -> (median seconds, GPU name) for fastgpt's kernels measured on a GPU."""
    out = {}
    for b in data.get("benchmarks", []):
        ex = b.get("extra_info", {})
        if ex.get("impl") == "fastgpt" and ex.get("kind") == "kernel" and not str(ex.get("device", "")).startswith("CPU"):
            out[(ex.get("op"), ex.get("shape"))] = (_median(b), ex.get("device", ""))
    return out


def memory_section(paths: list[str]) -> str:
    from bench.memory import Result, render

    parts = []
    fields = set(Result.__dataclass_fields__)
    for p in paths:
        rows = load(p)
        parts.append(render([Result(**{k: v for k, v in r.items() if k in fields}) for r in rows]))
        measured = [r for r in rows if "measured_peak_bytes" in r]
        if measured:
            parts.append("Measured on the GPU (torch.cuda.max_memory_allocated): " + ", ".join(
                f"{r['system']} {r['measured_peak_bytes'] / 2**30:.2f} GiB (model {r['peak_bytes'] / 2**30:.2f})"
                for r in measured))
    return "\n\n".join(parts)


def render_report(data: dict, chart_name: str | None = None, memory: list[str] | None = None) -> str:
    from bench.roofline import roofline_table

    mi = data.get("machine_info", {})
    out = [f"# fastgpt benchmarks\n\nDevice: {mi.get('device', '?')}; torch {mi.get('torch', '?')}; "
           f"{len(data.get('benchmarks', []))} benchmarks; {data.get('datetime', '')}\n"]
    gs = groups(data)
    steps = [g for g in gs if g.startswith("train-step")]
    kernels = [g for g in gs if g not in steps]
    if steps:
        from fastgpt.model import FLOP_CONVENTION

        out.append("## Training step (forward, backward, AdamW)\n")
        out.append(f"TFLOP/s and MFU count fastgpt.model.train_flops_per_token ({FLOP_CONVENTION} attention: "
                   f"6N + 6·L·C·T a token), the convention of the training log's MFU and the roofline.\n")
        out += [group_table(g, gs[g]) for g in steps]
    if kernels:
        out.append("## Kernels\n")
        out += [group_table(g, gs[g]) for g in kernels]
    if chart_name:
        out.append(f"![fastgpt vs baselines]({chart_name})\n")
    out.append(roofline_table(measured_for_roofline(data)) + "\n")
    if memory:
        out.append(memory_section(memory) + "\n")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n")[0])
    p.add_argument("results", help="pytest-benchmark JSON (pytest bench/ --benchmark-json RESULTS.json)")
    p.add_argument("--out", help="directory for report.md and chart.png (default: RESULTS-report/)")
    p.add_argument("--memory", nargs="*", default=[], help="JSON files written by python -m bench.memory --json")
    a = p.parse_args(argv)
    data = load(a.results)
    out = a.out or os.path.splitext(a.results)[0] + "-report"
    os.makedirs(out, exist_ok=True)
    png = chart(data, os.path.join(out, "chart.png"))
    text = render_report(data, "chart.png" if png else None, a.memory)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    print(text)
    print(f"\nwrote {os.path.join(out, 'report.md')}" + (f" and {png}" if png else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
