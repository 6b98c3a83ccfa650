"""--shard ddp: DistributedDataParallel. Every rank holds the weights, gradients and both AdamW moments
(fp32 training: 16 bytes per parameter, before activations); gradients are all-reduced once per step."""
from __future__ import annotations

import torch
import torch.nn as nn

from .common import Strategy


class DDP(Strategy):
    name = "ddp"
    order = 0

    def describe(self, cuda: bool) -> str:
        return f"sharding: ddp over {self.world} ranks (every rank holds the full model and AdamW state)"

    def wrap(self, raw: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, *, compile: bool = False,
             param_dtype: torch.dtype | None = None, optimizer_state: dict | None = None):
        core, _, optimizer = super().wrap(raw, optimizer, device, compile=compile)
        model = ddp_wrap(core, device) if self.sharded else core
        if optimizer_state is not None:
            self.load_optimizer_state(raw, optimizer, optimizer_state)
        return model, core, optimizer

    def micro_step(self, model: nn.Module, last: bool):
        # Only the last micro-step's backward all-reduces: the others accumulate locally.
        return super().micro_step(model, last) if last or not self.sharded else model.no_sync()


def ddp_wrap(core: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets instead of beside a copy
    # of them there (4 bytes per parameter less: 6 GB at gpt2-xl)
    return DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)
