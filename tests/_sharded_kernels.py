"""torchrun script for tests/test_distributed.py: fastgpt's Triton kernels inside sharded models, 2 ranks, gloo.

fsdp: a GPT with kernels="triton" (the interpreter on CPU) and kernels.FusedAdamW over FSDP2's DTensor
parameters, against the same GPT with kernels="torch" and torch.optim.AdamW, also under FSDP2.
zero1: kernels.FusedAdamW as ZeroRedundancyOptimizer's optimizer_class against torch.optim.AdamW.
Rank 0 prints one JSON line with what the test checks.
"""
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before kernels is imported

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import kernels  # noqa: E402
from fastgpt import GPT, GPTConfig  # noqa: E402
from fastgpt.parallel import strategy  # noqa: E402
from kernels.adamw import _aligned  # noqa: E402

STEPS = 3


def run(mode: str, kernel_mode: str, fused: bool, data):
    torch.manual_seed(0)
    # odd sizes: uneven shards (vocab 101 rows over 2 ranks), unaligned biases
    cfg = GPTConfig(block_size=16, vocab_size=101, n_layer=2, n_head=2, n_embd=32, kernels=kernel_mode)
    raw = GPT(cfg)
    opt = raw.configure_optimizers(weight_decay=0.1, lr=3e-3)  # FusedAdamW where Triton runs, else AdamW
    if fused and not isinstance(opt, kernels.FusedAdamW):
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in opt.param_groups]
        opt = kernels.FusedAdamW(groups, lr=3e-3, betas=(0.9, 0.95))
    assert isinstance(opt, kernels.FusedAdamW) == fused, type(opt)
    shard = strategy(mode, dist.get_world_size())
    model, _, opt = shard.wrap(raw, opt, torch.device("cpu"))
    params = [p for p in raw.parameters()]
    losses, launches, classes = [], [], []
    rank = dist.get_rank()
    for x, y in data:
        opt.zero_grad(set_to_none=True)
        _, loss = model(x[rank], y[rank], return_logits=False)
        loss.backward()
        shard.clip_grad_norm_(params, 1.0)
        before = kernels.launches("adamw")
        opt.step()
        launches.append(kernels.launches("adamw") - before)
        if fused and mode == "fsdp":
            st = opt.state
            classes.append(len({_aligned(p.to_local(), p.grad.to_local(), st[p]["exp_avg"].to_local(),
                                         st[p]["exp_avg_sq"].to_local()) for p in params}))
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / dist.get_world_size())
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for p in raw.parameters()]
    return losses, launches, classes, full, raw


def main():
    dist.init_process_group("gloo")
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 101, (2, 2, 16), generator=g), torch.randint(0, 101, (2, 2, 16), generator=g))
            for _ in range(STEPS)]
    out = {}
    ops = ("layer_norm_fwd", "layer_norm_bwd", "attention_fwd", "attention_bwd_dq", "gelu_fwd", "gelu_bwd",
           "cross_entropy")
    names = {n: kernels.launches(n) for n in ops}
    fl, fn, fc, fp, fraw = run("fsdp", "triton", True, data)
    out["fsdp_kernel_launches"] = {n: kernels.launches(n) - names[n] for n in ops}
    out["fsdp_param_is_dtensor"] = type(fraw.transformer.wte.weight).__name__
    tl, tn, _, tp, _ = run("fsdp", "torch", False, data)
    out.update(fsdp_fused=fl, fsdp_torch=tl, fsdp_adamw_launches=fn, fsdp_classes=fc,
               fsdp_param_maxdiff=max((a - b).abs().max().item() for a, b in zip(fp, tp)))
    zl, zn, _, zp, _ = run("zero1", "torch", True, data)
    rl, _, _, rp, _ = run("zero1", "torch", False, data)
    out.update(zero1_fused=zl, zero1_torch=rl, zero1_adamw_launches=zn,
               zero1_param_maxdiff=max((a - b).abs().max().item() for a, b in zip(zp, rp)))
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    # Both ranks past every collective before either tears gloo down: without it rank 1 sometimes aborted at
    # exit ("terminate called without an active exception") after all its work was done.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
