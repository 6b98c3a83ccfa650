"""The memory model's reports: the per-system table and the per-rank table."""
from __future__ import annotations



from .common import MODELS, VOCAB, fmt_bytes
from .model import Result, gpt2_params, korthikanti
from .ranks import CARD_MARGIN, CARDS_GB, RankResult, _fits


def render(results: list[Result]) -> str:
    lines = []
    if not results:
        return ""
    r0 = results[0]
    size = MODELS[r0.model]
    lines.append(f"## Memory model: {r0.model}, batch {r0.batch}, seq {r0.seq}, bf16 autocast, AdamW\n")
    lines.append("| system | peak | params | grads | AdamW | activations (saved) | per layer | head (ln_f, logits, loss) "
                 "| bf16 weight casts | peak in | peak vs hf-sdpa |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    ref = next((r.peak_bytes for r in results if r.system == "hf-sdpa"), None)
    for r in results:
        rel = f"{r.peak_bytes / ref:.2f}x" if ref else "-"
        lines.append(f"| {r.system} | {fmt_bytes(r.peak_bytes)} | {fmt_bytes(r.params_bytes)} | {fmt_bytes(r.grads_bytes)} "
                     f"| {fmt_bytes(r.optimizer_bytes)} | {fmt_bytes(r.activation_bytes)} | {fmt_bytes(r.per_layer_bytes)} "
                     f"| {fmt_bytes(r.head_bytes)} | {fmt_bytes(r.weight_cast_bytes)} | {r.peak_phase} | {rel} |")
    lines.append("")
    # Arithmetic: parameters, gradients, AdamW.
    n = gpt2_params(size["n_layer"], size["n_embd"])
    lines.append(f"Arithmetic check: {r0.model} has {n:,} parameters (tied wte/lm_head) -> params {4 * n:,} B, "
                 f"grads {4 * n:,} B, AdamW {8 * n:,} B.")
    for r in results:
        ok = r.n_params == n and r.params_bytes == 4 * n and r.grads_bytes == 4 * n and r.optimizer_bytes == 8 * n
        lines.append(f"- {r.system}: {r.n_params:,} params, {r.params_bytes:,} / {r.grads_bytes:,} / "
                     f"{r.optimizer_bytes:,} B -> {'exact' if ok else 'MISMATCH'}")
    lines.append("")
    k = korthikanti(r0.batch, r0.seq, size["n_embd"], size["n_head"])
    lines.append("Per-layer activations vs Korthikanti et al. (16-bit activations; s=seq, b=batch, h=width, a=heads):")
    for name, v in k.items():
        lines.append(f"- {name}: {fmt_bytes(v)}")
    sbh = r0.seq * r0.batch * size["n_embd"]
    as2b = size["n_head"] * r0.seq * r0.seq * r0.batch
    flash_like = {r.system: r.per_layer_bytes for r in results if r.system != "hf-eager"}
    for r in results:
        line = f"- measured {r.system}: {fmt_bytes(r.per_layer_bytes)} = {r.per_layer_bytes / sbh:.2f} sbh"
        if r.system == "hf-eager" and "hf-sdpa" in flash_like:
            extra = r.per_layer_bytes - flash_like["hf-sdpa"]
            line += (f"; minus hf-sdpa's layer = {extra / as2b:.2f} as^2b (the (T, T) scores/probabilities; "
                     f"the paper has 5 with dropout, 2 without)")
        lines.append(line)
    lines.append("  Expected with flash attention and bf16 autocast (no dropout): 36 sbh = ln_1 and ln_2 inputs in "
                 "fp32 (2 x 4 sbh) + bf16 LN outputs for c_attn and c_fc (2 x 2 sbh) + qkv (6 sbh) + attention output "
                 "(2 sbh) + gelu input (8 sbh) + gelu output (8 sbh), plus fp32 row statistics (LN mean/rstd, attention "
                 "logsumexp); flash and fastgpt's attention kernel allocate their output (B, T, H, D), so merging "
                 "heads is a view, not a copy; HF's python gelu_new keeps 3 more (B, T, 4h) intermediates (+24 sbh).")
    lines.append("  Mixed precision differs from the paper's all-16-bit count: under CUDA autocast layer_norm runs in "
                 "fp32, so each LN saves its fp32 input (+4sbh over the paper for two LNs); eager softmax saves "
                 "fp32 probabilities plus their bf16 copy (6as^2b, not 5as^2b with dropout).")
    lines.append("")
    N = r0.batch * r0.seq
    lines.append(f"Logits: one (N, V) = ({N:,}, {VOCAB:,}) tensor is {fmt_bytes(N * VOCAB * 4)} in fp32, "
                 f"{fmt_bytes(N * VOCAB * 2)} in bf16. Saved for backward (N x V tensors): " + ", ".join(
                     f"{r.system} {fmt_bytes(r.logits_bytes)}" for r in results)
                 + ". Without the fused loss the backward also holds fp32 gradients of the logits (the Temp "
                 "category at the peak below).")
    lines.append("")
    lines.append("Where one layer's saved bytes go (layer 0, sub-module:dtype):")
    for r in results:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in sorted(r.layer_breakdown.items(), key=lambda kv: -kv[1]))
        lines.append(f"- {r.system}: {parts}")
    lines.append("")
    lines.append("Peak by category (MemTracker at the peak):")
    for r in results:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in r.peak_breakdown.items() if k != "Total" and v)
        lines.append(f"- {r.system} (peak in the {r.peak_phase}): {parts}")
    lines.append("")
    lines.append("Assumptions:")
    seen = []
    for r in results:
        for a in r.assumptions:
            if a not in seen:
                seen.append(a)
                lines.append(f"- {a}")
    return "\n".join(lines)




def render_ranks(results: list[RankResult]) -> str:
    r0 = results[0]
    lines = [f"## Per-rank memory model: {r0.model}, micro-batch {r0.batch} x {r0.seq}, bf16 autocast, AdamW\n",
             "| mode | world | activation checkpointing | peak per rank | smallest card | peak in | at the peak |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in r.breakdown.items() if k != "Total" and v > 0)
        lines.append(f"| {r.mode} | {r.world} | {'yes' if r.activation_checkpointing else 'no'} | "
                     f"{fmt_bytes(r.peak_bytes)} | {_fits(r.peak_bytes)} | {r.peak_phase} | {parts} |")
    lines.append("")
    lines.append(f"smallest card: of {', '.join(map(str, CARDS_GB))} GB, the smallest whose capacity (GiB) less "
                 f"{fmt_bytes(CARD_MARGIN)} holds the peak (the CUDA context, cuBLAS/NCCL workspaces and "
                 "fragmentation are not modelled).")
    for how in dict.fromkeys(f"{r.mode}: {r.how}" for r in results):
        lines.append(f"- {how}")
    return "\n".join(lines)
