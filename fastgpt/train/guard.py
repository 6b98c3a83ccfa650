"""What keeps a run from wrecking itself: which updates are skipped (on the device, weights unchanged), when
the run is diverging and must stop, whether a state may become a checkpoint, and how to go on afterwards.

    Skip           why an update was skipped: NONFINITE loss or norm, fp16 OVERFLOW, loss SPIKE (NONE: applied)
    Guard          the spike guard's recent losses and the consecutive-skip counters; state_dict for resume
    unhealthy()    why the current weights / optimizer state must not be saved (None: they may)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch
import torch.distributed as dist

from . import options
from .options import TrainError


class Skip(str, Enum):
    NONE = ""
    NONFINITE = "nonfinite"
    OVERFLOW = "overflow"  # the fp16 loss scaler's own skip
    SPIKE = "spike"


@dataclass
class StepResult:
    """What one optimizer step reports (host values: read once, after the update)."""

    step: int
    loss: float
    norm: float
    lr: float
    dt: float
    skip: Skip = Skip.NONE
    note: str = ""  # what the log line says about a skipped update

    @property
    def finite(self) -> bool:
        return self.skip not in (Skip.NONFINITE, Skip.OVERFLOW)


class Guard:
    """The spike guard (--spike_guard K: skip an update whose loss exceeds K x the mean of the recent accepted
    losses) and the divergence stop (MAX_NONFINITE skips in a row, MAX_OVERFLOWS for fp16 overflows)."""

    def __init__(self, factor: float):
        self.factor = factor
        self.recent: list[float] = []  # accepted steps' losses
        self.in_row: dict[Skip, int] = {}  # consecutive skipped updates by kind, reset by an applied one

    def spike_limit(self) -> float:
        """Losses above this are spikes (inf while the guard is off or has seen too few). Computed on the host
        from losses it has already read, so the comparison itself runs on the device."""
        h = self.recent
        if self.factor <= 0 or len(h) < options.SPIKE_MIN_HISTORY:
            return math.inf
        return self.factor * sum(h) / len(h)

    def classify(self, loss: float, finite: bool, spike: bool, scaled: bool, limit: float, scale: float):
        """(Skip, note) of a step from its host-read flags; `scaled`: an fp16 loss scaler is in use."""
        if not finite and scaled and math.isfinite(loss):
            return Skip.OVERFLOW, f"skipped by the fp16 loss scaler: gradient overflow, loss scale now {scale:g}"
        if not finite:
            return Skip.NONFINITE, "skipped: non-finite loss or gradient norm, weights unchanged"
        if spike:
            return Skip.SPIKE, (f"skipped: loss spike, above {self.factor:g} x the recent mean "
                                f"{limit / self.factor:.4f}; weights unchanged")
        return Skip.NONE, ""

    def accept(self, loss: float) -> None:
        self.recent = (self.recent + [loss])[-options.SPIKE_WINDOW:]

    def check_divergence(self, r: StepResult, lower_lr: float, advice) -> None:
        """Raise TrainError when updates keep being skipped; `lower_lr`: the --max_lr to go on with,
        `advice(lower_lr)` says how to go on."""
        if not r.skip:
            self.in_row.clear()
            return
        n = self.in_row[r.skip] = self.in_row.get(r.skip, 0) + 1
        if n < (options.MAX_OVERFLOWS if r.skip is Skip.OVERFLOW else options.MAX_NONFINITE):
            return
        what = {Skip.NONFINITE: "had a non-finite loss or gradient norm",
                Skip.SPIKE: f"had a loss spike (above {self.factor:g} x the recent mean loss)",
                Skip.OVERFLOW: "overflowed in fp16 although the loss scaler kept lowering its scale"}[r.skip]
        extra = (" If the data changed on purpose (a new dataset or task), the guard is comparing with the old "
                 "losses: pass --spike_guard 0 for the first steps." if r.skip is Skip.SPIKE else "")
        lower = f"{lower_lr:g}"
        raise TrainError(f"{n} steps in a row {what}; the run is diverging. Lower the learning rate (e.g. "
                         f"--max_lr {lower}) and {advice(lower)}.{extra}")

    def state_dict(self) -> dict:
        return {"recent_losses": list(self.recent), "skips_in_row": {k.value: v for k, v in self.in_row.items()}}

    def load_state_dict(self, state: dict | None) -> None:
        state = state or {}
        self.recent = [float(v) for v in state.get("recent_losses", [])][-options.SPIKE_WINDOW:]
        self.in_row = {Skip(str(k)): int(v) for k, v in state.get("skips_in_row", {}).items()}


def resume_advice(healthy, log_dir, lower_lr: str, allow_changed: str = "") -> str:
    """How to go on after a divergence: from the newest healthy checkpoint, named, with flags that the
    changed-run check accepts (a new --max_lr must be allowed explicitly). `allow_changed`: the run's own
    --allow_changed; the advice's flag replaces it when pasted, so it keeps those names and adds max_lr."""
    if healthy is None:
        return f"start over (no healthy checkpoint was written yet): remove {log_dir} or pass a new --log_dir"
    names = [v.strip().lstrip("-") for v in allow_changed.split(",") if v.strip()] + ["max_lr"]
    allowed = ",".join(dict.fromkeys(names))  # the user's order, each name once
    return (f"resume from the newest healthy checkpoint, {healthy}: run the same command with "
            f"--resume_from {healthy} --max_lr {lower_lr} --allow_changed {allowed}")


def unhealthy(guard: Guard, last_val: float | None, vocab_size: int, raw, optimizer, device, ddp: bool) -> str | None:
    """Why the current state must not become a checkpoint (None: it may): a non-finite last step, val loss,
    weight or optimizer tensor, or a loss far above what uniform guessing scores (weights blown up while
    still finite). One host read (plus one all-reduce under DDP), at checkpoint time only. `optimizer`: the
    one that holds this rank's state (Strategy.inner)."""
    if guard.in_row.get(Skip.NONFINITE):
        return "the last step had a non-finite loss or gradient norm"
    uniform = math.log(vocab_size)  # a fresh model's loss; no model that learned anything is at 2x
    last = guard.recent[-1] if guard.recent else None
    for what, v in (("val loss", last_val), ("last applied step's loss", last)):
        if v is not None and not math.isfinite(v):
            return f"the {what} is {v}"
        if v is not None and v > 2 * uniform:
            return f"the {what} {v:.4g} is far above a uniform guess's {uniform:.2f}: the weights have blown up"
    named = [(f"weight {n}", p) for n, p in raw.named_parameters()]
    named += [(f"optimizer {k} of tensor {i}", t) for i, st in enumerate(optimizer.state.values())
              for k, t in st.items() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    local = [t.to_local() if hasattr(t, "to_local") else t for _, t in named]  # a sharded tensor's own part
    ok = torch.stack([torch.isfinite(t.detach()).all().to(device) for t in local])
    bad = (~ok).sum()
    if ddp:  # each rank checks what it holds (sharded optimizer states differ)
        dist.all_reduce(bad)
    flags = torch.cat([ok.float(), bad.float().view(1)]).tolist()
    if flags[-1] == 0:
        return None
    names = [name for (name, _), f in zip(named, flags[:-1]) if not f] or ["tensors of another rank"]
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"non-finite values in {', '.join(names[:3])}{more}"
