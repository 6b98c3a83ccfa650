"""Per rank: train.py --shard <mode> at a world size, with or without activation checkpointing, and which
GPT-2 fits which card."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.utils.checkpoint

from . import common
from .common import BF16, MODELS, VOCAB, fmt_bytes
from .model import _global_peak, _step, build, run_one
from .policy import CudaAutocast, FastgptOps, _with_recompute_autocast


# ------------------------------------------------------------------------------------------------
# 4. Per rank: train.py --shard ddp|zero1|fsdp at a world size, with or without activation checkpointing.
# ------------------------------------------------------------------------------------------------
def _shard_modes() -> tuple[str, ...]:
    """train.py's --shard modes, from fastgpt.parallel.STRATEGIES (one file per mode)."""
    from fastgpt.parallel import STRATEGIES

    return tuple(STRATEGIES)


SHARD_MODES = _shard_modes()
CARDS_GB = (8, 12, 16, 24, 40, 80)
# A card of G GB fits a run whose modelled peak is <= G GiB - this: the CUDA context, cuBLAS and NCCL
# workspaces and allocator fragmentation are not modelled (they are what NVML shows on top).
CARD_MARGIN = 2 * 2**30
# fit_table's rows: every mode without activation checkpointing, these also with it.
AC_ROWS = {"ddp": (False, True), "fsdp": (False, True)}


@dataclass
class RankResult:
    mode: str
    model: str
    batch: int
    seq: int
    world: int
    activation_checkpointing: bool
    peak_bytes: int  # one rank's peak
    peak_phase: str
    breakdown: dict  # MemTracker's categories at the peak, bytes
    how: str


def _fsdp_tracker(model, opt):
    """FSDPMemTracker keeping only the global peak, with the phase it happened in."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    return _global_peak(FSDPMemTracker)(model, opt)


def run_fsdp(model_name: str, batch: int, seq: int, world: int, activation_checkpointing: bool = False) -> RankResult:
    """One rank of train.py --shard fsdp at `world` ranks: fastgpt.distributed.fully_shard_gpt (FSDP2 per block
    and root, bf16 gathers, fp32 reduce-scatter) on fake tensors, over a fake process group whose collectives
    move nothing, and kernels.FusedAdamW stepping the DTensor shards; FSDPMemTracker follows every storage."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from fastgpt.parallel import fully_shard_gpt

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))  # outside FakeTensorMode: the mesh reads real rank ids
        with FakeTensorMode(allow_non_fake_inputs=False):
            torch.manual_seed(0)
            model, fwd, make_opt, patch = build("fastgpt", MODELS[model_name], seq)
            model.activation_checkpointing = activation_checkpointing
            patch = _with_recompute_autocast(patch)
            fully_shard_gpt(model, mesh, BF16)  # as train.py does on CUDA
            opt = make_opt()
            idx = torch.randint(0, VOCAB, (batch, seq))

            # optimizer state now exists, as in every step after the first
            _step(fwd, idx, opt, patch, CudaAutocast(), FastgptOps(ce_chunk_rows=common.CE_CHUNK_ROWS))
            mt = _fsdp_tracker(model, opt)
            with mt:
                _step(fwd, idx, opt, patch, CudaAutocast(), FastgptOps(ce_chunk_rows=common.CE_CHUNK_ROWS), mt)
            peak = mt.peak_by_category()
    finally:
        dist.destroy_process_group()
    return RankResult("fsdp", model_name, batch, seq, world, activation_checkpointing, peak["Total"], mt.peak_phase,
                      peak, "an FSDP2 step on fake tensors over a fake process group of that many ranks")


def _sharded_from(ddp: RankResult, mode: str, world: int) -> RankResult:
    """A rank of `mode` modelled from the one-process step: less (world-1)/world of each category the mode's
    Strategy shards (`sharded_state`). Exact for zero1 (ZeroRedundancyOptimizer: a rank keeps the AdamW
    moments of its 1/world of the parameters, resident all step long); for a mode that also shards weights it
    leaves out the gathered blocks in flight, which only an exact run (fsdp's) counts."""
    from fastgpt.parallel import STRATEGIES

    categories = STRATEGIES[mode].sharded_state
    breakdown, total = dict(ddp.breakdown), ddp.peak_bytes
    for c in categories:
        dropped = breakdown.get(c, 0) * (world - 1) // world
        breakdown[c] = breakdown.get(c, 0) - dropped
        total -= dropped
    breakdown["Total"] = total
    what = ", ".join(categories) or "nothing"
    return RankResult(mode, ddp.model, ddp.batch, ddp.seq, world, ddp.activation_checkpointing, total,
                      ddp.peak_phase, breakdown, f"the one-process step less (world-1)/world of {what}")


# Modes whose rank is measured by a run of its own at world > 1 (the others: _sharded_from the ddp step).
EXACT_RUNS = {"fsdp": run_fsdp}


def run_rank(mode: str, model_name: str, batch: int, seq: int, world: int,
             activation_checkpointing: bool = False) -> RankResult:
    """One rank's peak under train.py --shard `mode` at `world` ranks (one process for world 1)."""
    if mode not in SHARD_MODES:
        raise ValueError(f"unknown --shard {mode!r}; choose from {SHARD_MODES}")
    if mode in EXACT_RUNS and world > 1:
        return EXACT_RUNS[mode](model_name, batch, seq, world, activation_checkpointing)
    r = run_one("fastgpt", model_name, batch, seq, activation_checkpointing)
    ddp = RankResult("ddp", model_name, batch, seq, world, activation_checkpointing, r.peak_bytes, r.peak_phase,
                     dict(r.peak_breakdown), "the one-process step (DDP with gradient_as_bucket_view keeps the "
                     "gradients in its buckets: no second copy)")
    return _sharded_from(ddp, mode, world) if mode != "ddp" and world > 1 else ddp


def _card_holds(g: int, peak: int) -> bool:
    """A card of `g` GB holds a modelled peak of `peak` bytes (with CARD_MARGIN to spare)."""
    return peak <= g * 2**30 - CARD_MARGIN


def _fits(peak: int) -> str:
    return next((f"{g} GB" for g in CARDS_GB if _card_holds(g, peak)), "none listed")


def fit_table(batch: int, seq: int, models=("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"),
              worlds=(2, 4, 8), log=None) -> tuple[str, list[RankResult]]:
    """Which GPT-2 fits which card: per model and mode, the fewest GPUs of each size that hold a rank's peak."""
    rows, results = [], []
    for m in models:
        ddp = {}
        for mode, ac in ((mode, ac) for mode in SHARD_MODES for ac in AC_ROWS.get(mode, (False,))):
            if ac not in ddp:
                ddp[ac] = run_rank("ddp", m, batch, seq, 1, ac)
            if mode == "ddp":
                rs = [ddp[ac]]
            elif mode in EXACT_RUNS:
                rs = [run_rank(mode, m, batch, seq, w, ac) for w in worlds]
            else:
                rs = [_sharded_from(ddp[ac], mode, w) for w in worlds]
            for r in rs:
                if log:
                    log(f"{m} {mode}{' + AC' if ac else ''} x{r.world}: {fmt_bytes(r.peak_bytes)}")
            results += rs
            cells = []
            for g in CARDS_GB:
                w = next((r.world for r in rs if _card_holds(g, r.peak_bytes)), None)
                cells.append("-" if w is None else ("any" if mode == "ddp" else f"{w}+"))
            peaks = " / ".join(fmt_bytes(r.peak_bytes) for r in rs)
            rows.append(f"| {m} | {mode}{' + AC' if ac else ''} | {peaks} | " + " | ".join(cells) + " |")
    head = [f"| model | --shard | peak per rank at {' / '.join(map(str, worlds))} GPUs (ddp: any number) | "
            + " | ".join(f"{g} GB" for g in CARDS_GB) + " |",
            "|---|---|---|" + "---|" * len(CARDS_GB)]
    return "\n".join(head + rows), results
