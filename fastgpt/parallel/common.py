"""What every sharding mode shares: the Strategy interface, and plain CPU copies of state for checkpoints.

Whatever the mode, a checkpoint holds the same plain, full state a single process would save: rank 0
gathers it (`Strategy.full_state_dicts`, a collective every rank calls) and the optimizer state is torch's
integer-keyed `Optimizer.state_dict()` format, so it loads into `torch.optim.AdamW` or `kernels.FusedAdamW`
on one process and into any mode at any world size (`Strategy.load_optimizer_state`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn


REGISTRY: dict[str, type] = {}  # --shard name -> Strategy subclass, filled as their modules are imported


class Strategy:
    """How W ranks share one model (--shard). One subclass per mode, one file each (ddp.py, zero1.py, fsdp.py);
    with one rank every mode trains the plain model. The loop calls only these methods:

        wrap(raw, optimizer, ...) -> (model to train, core for evaluation, optimizer)
        micro_step(model, last)   -> context for one micro-step's forward/backward (gradient sync or not)
        clip_grad_norm_(params, max_norm) -> the global norm as a plain tensor
        full_state_dicts(raw, optimizer)  -> (model state, optimizer state) on rank 0, plain and full
        load_optimizer_state(raw, optimizer, state), inner(optimizer), describe(cuda)
    """

    name = ""  # the --shard value; a subclass that sets one registers itself in REGISTRY
    order = 0  # position among the --shard choices (least to most sharded), so they do not follow file names
    # What a rank holds 1/W of, by torch MemTracker category ("Parameter", "Gradient", "Optstate"). bench.memory models
    # a mode as the one-process step less (W-1)/W of these, unless it has an exact run for it (fsdp does).
    sharded_state: tuple[str, ...] = ()

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("name"):
            if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
                raise ValueError(f"two Strategy classes for --shard {cls.name}: {REGISTRY[cls.name]} and {cls}")
            REGISTRY[cls.name] = cls

    def __init__(self, world: int):
        self.world = world

    @property
    def sharded(self) -> bool:
        """Whether this mode changes anything: with one process there is nothing to shard."""
        return self.world > 1

    def describe(self, cuda: bool) -> str:
        raise NotImplementedError

    def check(self, cfg) -> str | None:
        """A run this mode cannot do raises TrainError (plan.resolve calls it); returns a note or None."""
        return None

    def wrap(self, raw: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, *, compile: bool = False,
             param_dtype: torch.dtype | None = None, optimizer_state: dict | None = None):
        core = torch.compile(raw) if compile else raw
        if optimizer_state is not None:
            self.load_optimizer_state(raw, optimizer, optimizer_state)
        return core, core, optimizer

    def micro_step(self, model: nn.Module, last: bool):
        """ddp/zero1: gradients cross ranks only once per step, on the last micro-step (fsdp: every one)."""
        return contextlib.nullcontext()

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def inner(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer that updates this rank's tensors."""
        return optimizer

    def full_state_dicts(self, raw: nn.Module, optimizer: torch.optim.Optimizer):
        """(model state, optimizer state) as one process would save them, on CPU, on rank 0; (None, None)
        elsewhere. A collective under zero1 and fsdp: every rank must call it."""
        if dist.is_initialized() and dist.get_rank() != 0:
            return None, None
        seen: dict = {}
        model_sd = to_cpu(raw.state_dict(), seen)  # one CPU copy per storage: the tied weight stays shared
        return model_sd, to_cpu(optimizer.state_dict(), seen)

    def load_optimizer_state(self, raw: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load a full, integer-keyed optimizer state (any checkpoint) into this mode's optimizer."""
        optimizer.load_state_dict(state)


def optimizer_kwargs(optimizer: torch.optim.Optimizer) -> dict:
    """Constructor arguments that rebuild `optimizer` (ops.make_optimizer's AdamW or FusedAdamW)."""
    d = optimizer.defaults
    kw = dict(lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"])
    if isinstance(optimizer, torch.optim.AdamW) and d.get("fused"):
        kw["fused"] = True
    return kw


def regroup(optimizer: torch.optim.Optimizer, old_names: dict[int, str], new_params: dict[str, nn.Parameter]):
    """The optimizer's param groups (weight decay per group), pointing at the replacement parameters."""
    return [{"params": [new_params[old_names[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
            for g in optimizer.param_groups]


def check_same_start(step: int, device: torch.device) -> None:
    """Every rank resumed from the same step: on several machines a --log_dir that is not on shared storage
    lets rank 0 resume while the others start fresh, which would train a different model on each."""
    t = torch.tensor([step, -step], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise ValueError(f"ranks resumed from different steps (from {-int(t[1])} to {int(t[0])}): every rank must "
                         f"see the same checkpoints. On several machines, put --log_dir on storage they share "
                         f"(or copy the newest checkpoint to the same path on each).")


def _retie(raw: nn.Module, sd: dict) -> dict:
    """Names that share one Parameter (wte / lm_head) share one tensor again, so torch.save writes it once."""
    first: dict[int, str] = {}
    for name, p in raw.named_parameters(remove_duplicate=False):
        if id(p) in first:
            sd[name] = sd[first[id(p)]]
        else:
            first[id(p)] = name
    return sd


def to_cpu(obj, _seen=None):
    """CPU copies of every tensor in obj. Tensors that alias one another (the tied wte/lm_head
    weight) map to one copy, so torch.save writes their storage once, as it does on CPU."""
    seen = {} if _seen is None else _seen
    if isinstance(obj, torch.Tensor):
        key = (obj.device, obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape),
               obj.stride(), obj.dtype)
        if key not in seen:
            seen[key] = obj.detach().cpu()
        return seen[key]
    if isinstance(obj, dict):
        return {k: to_cpu(v, seen) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v, seen) for v in obj)
    return obj
