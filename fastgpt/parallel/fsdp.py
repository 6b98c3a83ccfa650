"""--shard fsdp: FSDP2 `fully_shard` per Block and on the root. Weights, gradients and AdamW moments are
sharded (16/W bytes per parameter in fp32), plus one or two blocks' gathered weights in flight.

Mixed precision: fp32 master weights and fp32 sharded gradients; each Block's (and the root's) weights are
all-gathered in bf16 on CUDA (`param_dtype`) and gradients are reduce-scattered in fp32 (`reduce_dtype`): an
fp32 sum over ranks, twice bf16's traffic. On CPU everything stays fp32. The tied wte/lm_head matrix is one
Parameter in the root's group, gathered once for the embedding and the loss. fsdp reduce-scatters on every
micro-step (no `no_sync`): skipping it would keep every layer's full gradient until the last micro-step,
the memory fsdp is there to save.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from .common import Strategy, _retie, optimizer_kwargs, regroup, to_cpu


def fully_shard_gpt(raw: nn.Module, mesh, param_dtype: torch.dtype | None) -> None:
    """FSDP2 in place over a 1-D device mesh: one group per transformer Block, the rest (wte = lm_head, wpe,
    ln_f) in the root's. bench.memory calls it on fake tensors."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in raw.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(raw, mesh=mesh, mp_policy=mp)


class FSDP(Strategy):
    name = "fsdp"
    order = 2
    sharded_state = ("Parameter", "Gradient", "Optstate")

    def describe(self, cuda: bool) -> str:
        mp = "weights gathered in bf16, gradients reduced in fp32" if cuda else "fp32"
        return (f"sharding: fsdp over {self.world} ranks (FSDP2 fully_shard per block and root; weights, gradients "
                f"and AdamW state sharded; {mp})")

    def check(self, cfg) -> str | None:
        if self.sharded and cfg.hellaswag_interval > 0:
            from ..train.options import TrainError

            # Each FSDP2 forward is collective, and HellaSwag's rank shards differ in length: ranks would wait on
            # each other for ever. Until its batches are padded to one count per rank, refuse rather than hang.
            raise TrainError("--hellaswag_interval does not run under --shard fsdp yet (ranks would run different "
                             "numbers of forwards); use --shard ddp or zero1, or `fastgpt eval hellaswag` on a "
                             "checkpoint")
        return None

    def wrap(self, raw: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, *, compile: bool = False,
             param_dtype: torch.dtype | None = None, optimizer_state: dict | None = None):
        if self.sharded:
            from torch.distributed.device_mesh import init_device_mesh

            old_names = {id(p): n for n, p in raw.named_parameters()}
            fully_shard_gpt(raw, init_device_mesh(device.type, (self.world,)), param_dtype)
            # fully_shard swapped every Parameter for a sharded DTensor one: the optimizer must hold those.
            optimizer = type(optimizer)(regroup(optimizer, old_names, dict(raw.named_parameters())),
                                        **optimizer_kwargs(optimizer))
        return super().wrap(raw, optimizer, device, compile=compile, optimizer_state=optimizer_state)

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if self.sharded else norm  # a DTensor norm over the shards

    def full_state_dicts(self, raw: nn.Module, optimizer: torch.optim.Optimizer):
        if not self.sharded:
            return super().full_state_dicts(raw, optimizer)
        rank = dist.get_rank()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(raw, options=opts)
        osd = get_optimizer_state_dict(raw, optimizer, options=opts)
        if rank != 0:
            return None, None
        # parameter names -> the integer ids torch.optim gives them: their position over the param groups
        ids = {fqn: i for i, fqn in enumerate(fqn for g in osd["param_groups"] for fqn in g["params"])}
        groups = [dict(g, params=[ids[f] for f in g["params"]]) for g in osd["param_groups"]]
        optim_sd = {"state": {ids[f]: s for f, s in osd["state"].items()}, "param_groups": groups}
        return _retie(raw, dict(model_sd)), to_cpu(optim_sd)

    def load_optimizer_state(self, raw: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self.sharded:
            return super().load_optimizer_state(raw, optimizer, state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(p): n for n, p in raw.named_parameters()}
        fqns = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        groups = [dict(g, params=[fqns[i] for i in g["params"]]) for g in state["param_groups"]]
        osd = {"state": {fqns[i]: s for i, s in state["state"].items()}, "param_groups": groups}
        # Every rank holds the full state (it read the checkpoint) and keeps its own shard of each tensor.
        set_optimizer_state_dict(raw, optimizer, osd, options=StateDictOptions(full_state_dict=True))
