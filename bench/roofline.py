"""Roofline: the bytes each kernel must move and the FLOPs it must do at GPT-2 shapes, the floor time
that implies on an A100 and an H100, and (with GPU results) how close a measurement comes to it.

Floor time = max(bytes / HBM bandwidth, matmul FLOPs / bf16 tensor-core peak). Only attention and the
full training step have matmul FLOPs; layer_norm, gelu and AdamW are bandwidth-bound by construction
(their few FLOPs per element run on CUDA cores, far from either roof), so their floor is bytes / bandwidth.
Bytes count each tensor read or written once (the ideal a fused kernel can reach), bf16 activations,
fp32 parameters and optimizer state, fp32 per-row statistics. LayerNorm uses the model's real dtypes
under bf16 autocast: it reads the fp32 residual stream and writes bf16 (the kernel emits the autocast
dtype), so its forward moves 4 + 2 bytes an element and its backward reads x (4) and a bf16 dy (2) and
writes an fp32 dx (4).

FLOPs of a training step: `fastgpt.model.train_flops_per_token`, the one convention for MFU in the
training log, here and in the bench report (causal attention: 6N + 6·L·C·T a token).

GPUs: A100 SXM 80GB (2.039 TB/s HBM2e; the 40GB part has 1.555 TB/s), 312 TFLOP/s dense bf16;
H100 SXM (3.35 TB/s HBM3, 989 TFLOP/s dense bf16).
"""
from __future__ import annotations

from dataclasses import dataclass

from fastgpt.metrics import KNOWN_GPUS, gpu_peaks  # noqa: F401 (re-exported: bench's GPU table is the trainer's)
from fastgpt.model import FLOP_CONVENTION, train_flops_per_token

# name: (HBM bytes/s, dense bf16 tensor-core FLOP/s), from fastgpt.metrics.KNOWN_GPUS
GPUS = {name: gpu_peaks(name) for name in ("A100-SXM4-80GB", "H100-SXM")}
WIDTHS = {768: 12, 1024: 16, 1280: 20, 1600: 25}  # GPT-2 widths -> heads (head dim 64)
GPT2_PARAMS = {768: 124_439_808, 1024: 354_823_168, 1280: 774_030_080, 1600: 1_557_611_200}
LAYERS = {768: 12, 1024: 24, 1280: 36, 1600: 48}
BATCH, SEQ, HEAD_DIM = 16, 1024, 64


@dataclass
class Cost:
    kernel: str  # e.g. "layer_norm-fwd"
    shape: str
    bytes: float
    flops: float  # matmul (tensor-core) FLOPs; 0 for bandwidth-bound kernels

    def floor_s(self, bw: float, flops: float) -> float:
        return max(self.bytes / bw, self.flops / flops if self.flops else 0.0)


def layer_norm_cost(rows: int, C: int, pass_: str, act_bytes: int | None = None) -> Cost:
    """The model's LayerNorm under bf16 autocast by default: fp32 x in, bf16 y out (dy in bf16, dx fp32).
    `act_bytes` sets both (a LayerNorm on 16-bit activations, as the kernel benchmark runs it)."""
    in_bytes, out_bytes = (4, 2) if act_bytes is None else (act_bytes, act_bytes)
    fwd = rows * C * (in_bytes + out_bytes) + 2 * rows * 4 + 2 * C * 4  # x in, y out, mean+rstd out, w+b in
    bwd = rows * C * (2 * in_bytes + out_bytes) + 2 * rows * 4 + 4 * C * 4  # x, dy in, dx out, stats in, dw+db
    b = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]
    return Cost(f"layer_norm-{pass_}", f"{rows}x{C}", b, 0.0)


def gelu_cost(rows: int, C: int, pass_: str, act_bytes: int = 2) -> Cost:
    n = rows * 4 * C  # the MLP's hidden activations
    b = {"fwd": 2 * n, "bwd": 3 * n, "fwd+bwd": 5 * n}[pass_] * act_bytes
    return Cost(f"gelu-{pass_}", f"{rows}x{4 * C}", b, 0.0)


def attention_cost(B: int, H: int, T: int, D: int, pass_: str, causal: bool = True) -> Cost:
    frac = 0.5 if causal else 1.0
    tensor = B * H * T * D * 2  # one bf16 (B, H, T, D)
    lse = B * H * T * 4
    fwd_f = 4 * B * H * T * T * D * frac  # QK^T and PV
    bwd_f = 10 * B * H * T * T * D * frac  # recompute QK^T; dV, dP, dQ, dK
    fwd_b = 4 * tensor + lse  # q, k, v in; o out; lse out
    bwd_b = 8 * tensor + 2 * lse  # q, k, v, o, do in; dq, dk, dv out; lse in (+ delta)
    f, b = {"fwd": (fwd_f, fwd_b), "bwd": (bwd_f, bwd_b), "fwd+bwd": (fwd_f + bwd_f, fwd_b + bwd_b)}[pass_]
    return Cost(f"attention-{pass_}", f"{B}x{H}x{T}x{D}", b, f)


def adamw_cost(n_params: int) -> Cost:
    # fp32: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq
    return Cost("adamw-step", f"{n_params:,} params", 7 * 4 * n_params, 0.0)


def train_step_flops(n_params: int, n_layer: int, C: int, T: int, tokens: int, vocab_params: int = 0) -> float:
    """FLOPs of a training step of `tokens` tokens: fastgpt.model.train_flops_per_token (causal attention),
    with N = n_params - vocab_params (pass wpe's size: the position embedding does no matmul)."""
    return train_flops_per_token(n_params - vocab_params, n_layer, C, T) * tokens


def gpt2_costs(batch: int = BATCH, seq: int = SEQ) -> list[Cost]:
    rows = batch * seq
    out: list[Cost] = []
    for C, H in WIDTHS.items():
        for p in ("fwd", "bwd", "fwd+bwd"):
            out.append(layer_norm_cost(rows, C, p))
        for p in ("fwd", "bwd", "fwd+bwd"):
            out.append(gelu_cost(rows, C, p))
        for p in ("fwd", "bwd", "fwd+bwd"):
            out.append(attention_cost(batch, H, seq, HEAD_DIM, p))
        out.append(adamw_cost(GPT2_PARAMS[C]))
    return out


def roofline_table(measured: dict[tuple[str, str], tuple[float, str]] | None = None) -> str:
    """Markdown table; `measured` maps (kernel, shape) -> (seconds, gpu name) from fastgpt GPU runs."""
    a_bw, a_fl = GPUS["A100-SXM4-80GB"]
    h_bw, h_fl = GPUS["H100-SXM"]
    lines = [
        "## Roofline at GPT-2 shapes (batch 16, T 1024, head dim 64, bf16 activations; LayerNorm fp32 in, bf16 out)",
        "",
        "Floor = max(bytes / HBM bandwidth, matmul FLOPs / dense bf16 peak). A100 = SXM4 80GB "
        "(2.039 TB/s, 312 TFLOP/s); H100 = SXM (3.35 TB/s, 989 TFLOP/s). layer_norm, gelu and AdamW have "
        "no tensor-core work: their floor is bandwidth. Measured fraction = floor on the measuring GPU / time. "
        f"Training FLOPs: fastgpt.model.train_flops_per_token ({FLOP_CONVENTION} attention, 6N + 6·L·C·T a token).",
        "",
        "| kernel | shape | MB moved | GFLOP | A100 floor (us) | H100 floor (us) | bound on H100 | measured (us) | fraction of floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in gpt2_costs():
        a = c.floor_s(a_bw, a_fl) * 1e6
        h = c.floor_s(h_bw, h_fl) * 1e6
        bound = "compute" if c.flops and c.flops / h_fl > c.bytes / h_bw else "memory"
        meas, frac = "-", "-"
        if measured and (c.kernel, c.shape) in measured:
            t, gpu = measured[(c.kernel, c.shape)]
            peaks = gpu_peaks(gpu)
            meas = f"{t * 1e6:.1f}"
            if peaks:
                frac = f"{c.floor_s(*peaks) / t:.0%} ({gpu})"
        lines.append(f"| {c.kernel} | {c.shape} | {c.bytes / 1e6:.1f} | {c.flops / 1e9:.1f} | {a:.1f} | {h:.1f} "
                     f"| {bound} | {meas} | {frac} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(roofline_table())
