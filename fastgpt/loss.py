"""Fused linear cross-entropy in plain PyTorch: the loss of `x @ weight.T` without the full logits.

The CPU (and any device where Triton cannot run) twin of `kernels.linear_cross_entropy`, with the
same contract and the same plan; it imports no triton.

    linear_cross_entropy(x (N, C), weight (V, C), targets (N,)) ==
        F.cross_entropy(x @ weight.T, targets, ignore_index=ignore_index)

Why: the unfused path (`F.linear` + `F.cross_entropy(logits.float())`) holds the (N, V) logits, their
log-softmax for backward and, in backward, two more (N, V) gradients. At GPT-2's V = 50,257 those are
most of a small model's step memory and a large share of its time (allocation, zero-fill, passes).

Algorithm, all in the forward:
    for each chunk of `rows` rows of x:
        logits = x_chunk @ w.T                           (rows, V) in the compute dtype, fp32 for the statistics
        lse = logsumexp(logits); loss_row = lse - logit[target]
        logits <- (softmax - onehot(target)) / n_valid   in place; 0 for ignored rows
        dx[chunk] = grad_logits @ w                      (rows, C)
        dw       += grad_logits.T @ x_chunk              (V, C), fp32 across chunks
    loss = sum(loss_rows) / n_valid

Saved for backward: dx (N, C) and dweight (V, C), already d(loss)/d(.); backward only scales them
by grad_output. Nothing of size N x V outlives a chunk. dweight is the (V, C) gradient the weight needs
anyway (GPT-2's tied wte adds its token rows into it: ops.tied_embedding), so the loss's own extra
memory is one chunk's (rows, V) buffer, allocated once and reused. The chunk trades that buffer against
matmul efficiency: every chunk after the first also reads and writes the whole (V, C) dweight.
`ROWS = 128` keeps the buffer at 25 MiB (fp32, V = 50,257) and costs little time against larger chunks
(the timings per chunk size are in docs/cpu.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ROWS = 128


def _chunk_rows(n: int, chunk_rows: int | None) -> int:
    return chunk_rows if chunk_rows else max(1, min(n, ROWS))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, compute_dtype, rows, need_dx, need_dw):
        N, C = x.shape
        V = weight.shape[0]
        w = weight.to(compute_dtype)
        valid = targets != ignore_index  # (N,)
        n_valid = valid.sum()
        safe_targets = torch.where(valid, targets, 0).unsqueeze(1)  # (N, 1): ignored rows read column 0
        # Per-row gradient scale: 1/n_valid for counted rows, 0 for ignored ones (and for all, if none counts).
        row_scale = (valid.to(torch.float32) / n_valid.clamp(min=1).to(torch.float32)).unsqueeze(1)  # (N, 1)
        loss_rows = torch.empty((N, 1), dtype=torch.float32, device=x.device)
        dx = torch.empty((N, C), dtype=x.dtype, device=x.device) if need_dx else None
        dw = None
        buf = torch.empty((min(rows, N), V), dtype=compute_dtype, device=x.device)  # reused by every chunk
        for s in range(0, N, rows):
            e = min(N, s + rows)
            xc = x[s:e].to(compute_dtype)
            logits = torch.mm(xc, w.T, out=buf[:e - s])  # (r, V)
            z = logits if compute_dtype == torch.float32 else logits.float()  # fp32 statistics
            target_logit = z.gather(1, safe_targets[s:e])  # (r, 1), read before z turns into exp(z - max)
            zmax = z.amax(dim=1, keepdim=True)
            p = z.sub_(zmax).exp_()  # unnormalised softmax, in place
            sumexp = p.sum(dim=1, keepdim=True)
            loss_rows[s:e] = zmax + sumexp.log() - target_logit  # logsumexp - logit[target]
            if dx is None and not need_dw:
                continue
            # d loss / d logits = (softmax - onehot(target)) * row_scale, written over p
            p.mul_(row_scale[s:e] / sumexp)
            p.scatter_add_(1, safe_targets[s:e], -row_scale[s:e])
            g = p.to(compute_dtype)
            if dx is not None:
                torch.mm(g, w, out=dx[s:e]) if dx.dtype == compute_dtype else dx[s:e].copy_(g @ w)
            if need_dw:
                if compute_dtype != torch.float32:
                    dw = (g.T @ xc).float() if dw is None else dw.add_(g.T @ xc)
                elif dw is None:
                    dw = g.T @ xc  # (V, C): no zero-filled accumulator
                else:
                    dw.addmm_(g.T, xc)  # (V, C) += (V, r) @ (r, C)
        loss = (loss_rows.squeeze(1) * valid).sum() / n_valid.to(torch.float32)  # NaN if every target is ignored
        ctx.save_for_backward(dx, None if dw is None else dw.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        # Scaled in place: the saved gradients are this node's alone, and autograd's version check
        # refuses a second backward through it (retain_graph) instead of reusing scaled values.
        # The product is formed in fp32: GradScaler's grad_loss (65536 at first) is not representable in fp16.
        dx, dw = ctx.saved_tensors
        dw = _scaled(dw, grad_loss)
        if dw is not None:
            hand_off(dw)
        return _scaled(dx, grad_loss), dw, None, None, None, None, None, None


_SOLE = "_fastgpt_handed_off_at_version"


def hand_off(grad: torch.Tensor) -> None:
    """Mark a gradient this module made and gives to autograd, referenced nowhere else, so the next node
    (ops.tied_embedding) may add into it in place. The mark holds while its version does not change."""
    setattr(grad, _SOLE, grad._version)


def handed_off(grad: torch.Tensor) -> bool:
    """Whether `grad` is one `hand_off` marked and nothing has written into it since."""
    return getattr(grad, _SOLE, None) == grad._version


def _scaled(g: torch.Tensor | None, grad_loss: torch.Tensor) -> torch.Tensor | None:
    """g * grad_loss into g: in place for fp32 (no (V, C) temporary), through fp32 for low precision."""
    if g is None:
        return None
    if g.dtype == torch.float32:
        return g.mul_(grad_loss)
    return g.copy_(g.float() * grad_loss)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """Mean F.cross_entropy(x @ weight.T, targets) for x (N, C), weight (V, C), targets (N,); fp32 loss.

    Under autocast both matmuls run in the autocast dtype (as `F.linear` would); otherwise in the
    promoted dtype of x and weight. `chunk_rows` overrides the automatic chunk size.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"expected x (N, C) and weight (V, C), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if targets.shape != (x.shape[0],) or targets.dtype.is_floating_point:
        raise ValueError(f"expected integer targets of shape ({x.shape[0]},), got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if chunk_rows is not None and chunk_rows < 0:
        raise ValueError(f"chunk_rows must be positive (or None for automatic), got {chunk_rows}")
    dev = x.device.type
    autocast = torch.is_autocast_enabled(dev)
    compute_dtype = torch.get_autocast_dtype(dev) if autocast else torch.promote_types(x.dtype, weight.dtype)
    grad = torch.is_grad_enabled()
    rows = _chunk_rows(x.shape[0], chunk_rows)
    with torch.autocast(dev, enabled=False):
        return _LinearCrossEntropy.apply(x, weight, targets.long(), int(ignore_index), compute_dtype, rows,
                                         grad and x.requires_grad, grad and weight.requires_grad)


def linear_cross_entropy_reference(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -1) -> torch.Tensor:
    """The unfused computation: full logits, then cross-entropy in fp32."""
    return F.cross_entropy(F.linear(x, weight).float(), targets, ignore_index=ignore_index)
