"""--shard zero1: DDP plus torch's ZeroRedundancyOptimizer. Weights and gradients on every rank, the AdamW
moments sharded: rank r keeps and steps its part only (8 + 8/W bytes per parameter in fp32)."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .common import optimizer_kwargs, regroup, to_cpu
from .ddp import DDP, ddp_wrap


def zero_class():
    """torch's ZeroRedundancyOptimizer class; its module jit-scripts helpers at import, which warns of
    torch.jit's deprecation on every rank: internal to torch, and nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.distributed.optim import ZeroRedundancyOptimizer
    return ZeroRedundancyOptimizer


class Zero1(DDP):
    name = "zero1"
    order = 1
    sharded_state = ("Optstate",)

    def describe(self, cuda: bool) -> str:
        return f"sharding: zero1 over {self.world} ranks (DDP; AdamW state sharded by ZeroRedundancyOptimizer)"

    def wrap(self, raw: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, *, compile: bool = False,
             param_dtype: torch.dtype | None = None, optimizer_state: dict | None = None):
        if not self.sharded:
            return super().wrap(raw, optimizer, device, compile=compile, optimizer_state=optimizer_state)
        core = torch.compile(raw) if compile else raw
        model = ddp_wrap(core, device)
        names = {id(p): n for n, p in raw.named_parameters()}
        optimizer = zero_class()(regroup(optimizer, names, dict(raw.named_parameters())),
                                 optimizer_class=type(optimizer), **optimizer_kwargs(optimizer))
        if optimizer_state is not None:
            self.load_optimizer_state(raw, optimizer, optimizer_state)
        return model, core, optimizer

    def inner(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        # ZeroRedundancyOptimizer steps the optimizer it wraps over this rank's share
        return optimizer.optim if self.sharded else optimizer

    def full_state_dicts(self, raw: nn.Module, optimizer: torch.optim.Optimizer):
        if not self.sharded:
            return super().full_state_dicts(raw, optimizer)
        import torch.distributed as dist

        optimizer.consolidate_state_dict(to=0)  # collective: every rank sends its share to rank 0
        if dist.get_rank() != 0:
            return None, None
        seen: dict = {}
        model_sd = to_cpu(raw.state_dict(), seen)
        return model_sd, to_cpu(optimizer.state_dict(), seen)

    def load_optimizer_state(self, raw: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self.sharded:
            return super().load_optimizer_state(raw, optimizer, state)
        # ZeRO's load_state_dict blanks the entries other ranks own in the dict it is given
        optimizer.load_state_dict({"state": dict(state["state"]), "param_groups": state["param_groups"]})
