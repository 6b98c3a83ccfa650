"""Data parallelism: one Strategy per --shard mode, each in its own file, and the rank watchdog.

    ddp.py    DistributedDataParallel: everything on every rank                        16 bytes/param (fp32)
    zero1.py  DDP + ZeroRedundancyOptimizer: AdamW moments sharded                      8 + 8/W
    fsdp.py   FSDP2 per Block and root: weights, gradients and moments sharded          16/W (+ blocks in flight)

`STRATEGIES` maps each --shard name to its class, in `Strategy.order` (bench.memory models the same
modes). Every module of this package is imported here and each Strategy subclass with a `name` registers
itself, so adding a mode is adding one file. Checkpoints do not depend on the mode (common.py).
"""
from __future__ import annotations

import importlib
import pkgutil

from . import common
from .common import Strategy, check_same_start, to_cpu


def import_modules(package: str, path) -> None:
    """Import every module of `package` (at `path`), so the Strategy subclasses they define register."""
    for info in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{info.name}")


def discovered() -> dict[str, type[Strategy]]:
    """The registered strategies, by --shard name, in their `order` (then name)."""
    return {s.name: s for s in sorted(common.REGISTRY.values(), key=lambda s: (s.order, s.name))}


import_modules(__name__, __path__)
from .ddp import DDP  # noqa: E402  (imported above; named for callers)
from .fsdp import FSDP, fully_shard_gpt  # noqa: E402
from .zero1 import Zero1  # noqa: E402

STRATEGIES: dict[str, type[Strategy]] = discovered()
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
