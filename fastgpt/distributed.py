"""Data parallelism in three sharding modes, and checkpoints that do not depend on the mode.

`--shard` chooses what each of W ranks keeps (fp32 training; bytes per parameter, before activations):

    ddp    DistributedDataParallel: weights, gradients and both AdamW moments on every rank   16
    zero1  DDP + ZeroRedundancyOptimizer: AdamW moments sharded, rank r steps its part only    8 + 8/W
    fsdp   FSDP2 `fully_shard` per Block and on the root: weights, gradients, moments sharded  16/W
           + one or two blocks' gathered weights in flight (bf16 on CUDA)

fsdp's mixed precision: fp32 master weights and fp32 sharded gradients; each Block's (and the root's)
weights are all-gathered in bf16 on CUDA (`param_dtype`) and gradients are reduce-scattered in fp32
(`reduce_dtype`): an fp32 sum over ranks, twice bf16's traffic. On CPU everything stays fp32. The tied
wte/lm_head matrix is one Parameter in the root's group, gathered once for the embedding and the loss.
fsdp reduce-scatters on every micro-step (no `no_sync`): skipping it would keep every layer's full
gradient until the last micro-step, the memory fsdp is there to save.

Whatever the mode, a checkpoint holds the same plain, full state a single process would save: rank 0
gathers it (`full_state_dicts`, a collective every rank calls) and the optimizer state is torch's
integer-keyed `Optimizer.state_dict()` format, so it loads into `torch.optim.AdamW` or
`kernels.FusedAdamW` on one process and into any mode at any world size (`load_optimizer_state`).
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

SHARD_MODES = ("ddp", "zero1", "fsdp")


def describe(mode: str, world: int, cuda: bool) -> str:
    """One log line: what each rank holds."""
    if mode == "zero1":
        return f"sharding: zero1 over {world} ranks (DDP; AdamW state sharded by ZeroRedundancyOptimizer)"
    if mode == "fsdp":
        mp = "weights gathered in bf16, gradients reduced in fp32" if cuda else "fp32"
        return (f"sharding: fsdp over {world} ranks (FSDP2 fully_shard per block and root; weights, gradients "
                f"and AdamW state sharded; {mp})")
    return f"sharding: ddp over {world} ranks (every rank holds the full model and AdamW state)"


# ------------------------------------------------------------------------------------------------
# Wrapping
# ------------------------------------------------------------------------------------------------
def _optimizer_kwargs(optimizer: torch.optim.Optimizer) -> dict:
    """Constructor arguments that rebuild `optimizer` (ops.make_optimizer's AdamW or FusedAdamW)."""
    d = optimizer.defaults
    kw = dict(lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"])
    if isinstance(optimizer, torch.optim.AdamW) and d.get("fused"):
        kw["fused"] = True
    return kw


def _regroup(optimizer: torch.optim.Optimizer, old_names: dict[int, str], new_params: dict[str, nn.Parameter]):
    """The optimizer's param groups (weight decay per group), pointing at the replacement parameters."""
    return [{"params": [new_params[old_names[id(p)]] for p in g["params"]], "weight_decay": g["weight_decay"]}
            for g in optimizer.param_groups]


def fully_shard_gpt(raw: nn.Module, mesh, param_dtype: torch.dtype | None) -> None:
    """FSDP2 in place over a 1-D device mesh: one group per transformer Block, the rest (wte = lm_head, wpe,
    ln_f) in the root's. bench/memory.py calls it on fake tensors."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in raw.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(raw, mesh=mesh, mp_policy=mp)


def wrap(raw: nn.Module, optimizer: torch.optim.Optimizer, mode: str, world: int, device: torch.device, *,
         compile: bool = False, param_dtype: torch.dtype | None = None, optimizer_state: dict | None = None):
    """(model to train, core for evaluation, optimizer) for `mode`; raw is modified in place under fsdp.

    `optimizer` was built over raw's parameters; zero1 and fsdp replace it with a sharded one of the same
    class and param groups. `optimizer_state` (a full state from a checkpoint) is loaded into the result.
    """
    if mode not in SHARD_MODES:
        raise ValueError(f"--shard must be one of {', '.join(SHARD_MODES)}, got {mode!r}")
    if world > 1 and mode == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh

        old_names = {id(p): n for n, p in raw.named_parameters()}
        fully_shard_gpt(raw, init_device_mesh(device.type, (world,)), param_dtype)
        # fully_shard swapped every Parameter for a sharded DTensor one: the optimizer must hold those.
        optimizer = type(optimizer)(_regroup(optimizer, old_names, dict(raw.named_parameters())),
                                    **_optimizer_kwargs(optimizer))
    core = torch.compile(raw) if compile else raw
    model = core
    if world > 1 and mode in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        # gradient_as_bucket_view: the gradients live in DDP's all-reduce buckets instead of beside a copy
        # of them there (4 bytes per parameter less: 6 GB at gpt2-xl)
        model = DDP(core, device_ids=[device.index] if device.type == "cuda" else None,
                    gradient_as_bucket_view=True)
    if world > 1 and mode == "zero1":
        names = {id(p): n for n, p in raw.named_parameters()}
        optimizer = _zero()(_regroup(optimizer, names, dict(raw.named_parameters())),
                            optimizer_class=type(optimizer), **_optimizer_kwargs(optimizer))
    if optimizer_state is not None:
        load_optimizer_state(raw, optimizer, optimizer_state)
    return model, core, optimizer


def check_same_start(step: int, device: torch.device) -> None:
    """Every rank resumed from the same step: on several machines a --log_dir that is not on shared storage
    lets rank 0 resume while the others start fresh, which would train a different model on each."""
    t = torch.tensor([step, -step], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise ValueError(f"ranks resumed from different steps (from {-int(t[1])} to {int(t[0])}): every rank must "
                         f"see the same checkpoints. On several machines, put --log_dir on storage they share "
                         f"(or copy the newest checkpoint to the same path on each).")


def defers_grad_sync(model: nn.Module) -> bool:
    """Whether `model.no_sync()` should skip the gradient all-reduce on all but the last micro-step."""
    return hasattr(model, "no_sync")


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_, returning the global norm as a plain tensor also for sharded (DTensor) grads."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ------------------------------------------------------------------------------------------------
# Full, plain state dicts
# ------------------------------------------------------------------------------------------------
def _zero():
    """torch's ZeroRedundancyOptimizer class; its module jit-scripts helpers at import, which warns of
    torch.jit's deprecation on every rank: internal to torch, and nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.distributed.optim import ZeroRedundancyOptimizer
    return ZeroRedundancyOptimizer


def _is_zero(optimizer: torch.optim.Optimizer) -> bool:
    return dist.is_initialized() and isinstance(optimizer, _zero())


def inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that updates this rank's tensors: the one ZeroRedundancyOptimizer wraps, else itself."""
    return getattr(optimizer, "optim", optimizer)


def _is_sharded(model: nn.Module) -> bool:
    if not dist.is_initialized():
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


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


def full_state_dicts(raw: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
    """(model state, optimizer state) as one process would save them, on CPU, on rank 0; (None, None) elsewhere.

    A collective under zero1 and fsdp: every rank must call it.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    if _is_sharded(raw):
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
    if _is_zero(optimizer):
        optimizer.consolidate_state_dict(to=0)
        if rank != 0:
            return None, None
        optim_sd = optimizer.state_dict()
    elif rank != 0:
        return None, None
    else:
        optim_sd = optimizer.state_dict()
    seen: dict = {}
    model_sd = to_cpu(raw.state_dict(), seen)  # one CPU copy per storage: the tied weight stays shared
    return model_sd, to_cpu(optim_sd, seen)


def load_optimizer_state(raw: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, integer-keyed optimizer state (any checkpoint) into the optimizer of any mode."""
    if _is_sharded(raw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = {id(p): n for n, p in raw.named_parameters()}
        fqns = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        groups = [dict(g, params=[fqns[i] for i in g["params"]]) for g in state["param_groups"]]
        osd = {"state": {fqns[i]: s for i, s in state["state"].items()}, "param_groups": groups}
        # Every rank holds the full state (it read the checkpoint) and keeps its own shard of each tensor.
        set_optimizer_state_dict(raw, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    elif _is_zero(optimizer):
        # ZeRO's load_state_dict blanks the entries other ranks own in the dict it is given
        optimizer.load_state_dict({"state": dict(state["state"]), "param_groups": state["param_groups"]})
    else:
        optimizer.load_state_dict(state)
