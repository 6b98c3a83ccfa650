"""Data parallelism: one Strategy per --shard mode, each in its own file, and the rank watchdog.

    ddp.py    DistributedDataParallel: everything on every rank                        16 bytes/param (fp32)
    zero1.py  DDP + ZeroRedundancyOptimizer: AdamW moments sharded                      8 + 8/W
    fsdp.py   FSDP2 per Block and root: weights, gradients and moments sharded          16/W (+ blocks in flight)

`STRATEGIES` maps each --shard name to its class (bench/memory.py models the same modes); adding a mode is
adding one file and its line here. Checkpoints do not depend on the mode (common.py).
"""
from __future__ import annotations

from .common import Strategy, check_same_start, to_cpu
from .ddp import DDP
from .fsdp import FSDP, fully_shard_gpt
from .zero1 import Zero1

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (DDP, Zero1, FSDP)}
SHARD_MODES = tuple(STRATEGIES)


def strategy(mode: str, world: int) -> Strategy:
    if mode not in STRATEGIES:
        raise ValueError(f"--shard must be one of {', '.join(STRATEGIES)}, got {mode!r}")
    return STRATEGIES[mode](world)


def wrap(raw, optimizer, mode: str, world: int, device, **kw):
    """(model to train, core for evaluation, optimizer) under `mode` (Strategy.wrap)."""
    return strategy(mode, world).wrap(raw, optimizer, device, **kw)


__all__ = ["STRATEGIES", "SHARD_MODES", "Strategy", "strategy", "wrap", "fully_shard_gpt", "check_same_start",
           "to_cpu", "DDP", "Zero1", "FSDP"]
