"""Checkpoints of a run: a Checkpointer over named stateful parts, each with state_dict() / load_state_dict().

    model, optimizer     full, plain state whatever --shard made them (Strategy.full_state_dicts, collective)
    loader               the training loader's position (ShardLoader.state_dict), for an exact resume
    rng                  Python, NumPy and torch generators
    guard                the spike guard's recent losses and skip counters
    scaler               the fp16 loss scaler (None without one)
    attention_configs    the attention kernels this process launched, so a resumed one launches the same

save: health check (guard.unhealthy) -> gather -> atomic write (checkpoint.save_atomic) -> retention.
resume: pick (--resume_from or the newest usable in log_dir) -> same-model and same-run checks -> move newer
files aside -> apply each part. The file format is plain dicts and CPU tensors (torch.load weights_only=True).
"""
from __future__ import annotations

import math
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch.distributed as dist

from .. import checkpoint as ckpt_io
from .. import fingerprint
from ..metrics import LOG_TXT, METRICS
from .options import TrainError
from .plan import get_lr, preset_of


class RNG:
    """Python, NumPy and torch generator states as one part."""

    def state_dict(self) -> dict:
        return ckpt_io.rng_state()

    def load_state_dict(self, state: dict) -> None:
        ckpt_io.set_rng_state(state)


class Scaler:
    """The fp16 GradScaler, or nothing (its entry is None)."""

    def __init__(self, scaler):
        self.scaler = scaler

    def state_dict(self):
        return self.scaler.state_dict() if self.scaler is not None else None

    def load_state_dict(self, state) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class AttentionConfigs:
    """The attention launch configs this process chose (kernels.attention_configs); none when the kernels were
    never imported. Loading installs them instead of autotuning afresh: the resumed run uses the same kernels."""

    def __init__(self, log):
        self.log = log

    def state_dict(self) -> list[dict]:
        read = getattr(sys.modules.get("kernels"), "attention_configs", None)
        return list(read()) if read is not None else []

    def load_state_dict(self, entries) -> None:
        n = install_attention_configs(entries)
        if n:
            self.log(f"attention: launching the {n} kernel configs recorded in the checkpoint (no autotuning)")


def sane_loss(loss, vocab_size: int) -> bool:
    """A loss that weights which learned nothing wrong can give: finite and under 2x a uniform guess's."""
    return loss is not None and math.isfinite(loss) and loss <= 2 * math.log(vocab_size)


def install_attention_configs(entries) -> int:
    """kernels.install_attention_configs(entries) where triton is present; how many were installed."""
    if not entries:
        return 0
    try:
        import kernels
    except Exception:  # no triton here: nothing to install into (the run uses PyTorch attention)
        return 0
    install = getattr(kernels, "install_attention_configs", None)
    return int(install(entries)) if install is not None else 0


def check_resume_config(path: Path, saved: dict, wanted, model_name: str) -> None:
    want = asdict(wanted)
    diffs = [f"{k}={saved.get(k)!r} (now {want[k]!r})" for k in want
             if k != "kernels" and saved.get(k) != want[k]]  # kernels choose code paths, not weights
    if diffs:
        preset = preset_of(saved)
        how = f"pass --model {preset} to continue it" if preset else "train with the model it was made with"
        raise TrainError(f"{path} holds a different model than --model {model_name}: {', '.join(diffs)}. "
                         f"To resume it, {how}; to start a new run, pass another --log_dir.")


class Checkpointer:
    """Saves and resumes one run's checkpoints in plan.cfg.log_dir. `parts`: name -> stateful part."""

    def __init__(self, plan, strategy, raw, parts: dict, data_paths: dict, log):
        self.plan, self.cfg, self.strategy, self.raw, self.parts, self.log = plan, plan.cfg, strategy, raw, parts, log
        self.log_dir = Path(plan.cfg.log_dir)
        self.data_paths = data_paths
        self.fingerprint: dict | None = None  # computed once, on first use (it hashes the shards)
        self.resumed_from: Path | None = None
        # A checkpoint is judged by the weights it holds: model_{k}.pt is confirmed healthy once the loss those
        # weights give is known sane (step k's own loss, one step later, or a val loss at step k). Until then
        # it is pending and retention keeps the previous confirmed one, whatever --keep_checkpoints says.
        self.last_healthy: Path | None = None  # the newest confirmed checkpoint (or the one resumed from)
        self.healthy_step: int | None = None
        self.healthy_lr: float | None = None  # the lr of the update that made the confirmed checkpoint's weights
        self.pending: tuple[int, Path, int] | None = None  # (step whose loss judges it, file, its step)
        self.finished_changes: dict[str, str] = {}  # settings that differ from a finished checkpoint's run

    def data_fingerprint(self) -> dict:
        if self.fingerprint is None:
            self.fingerprint = fingerprint.data_fingerprint(self.data_paths)
        return self.fingerprint

    # -- resume ------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Rank 0: remove temporaries of an interrupted write; under --restart, move the old run aside."""
        if not self.plan.master:
            return
        for p in ckpt_io.remove_stale_temporaries(self.log_dir):
            print(f"removed {p}, left by an interrupted checkpoint write")
        if self.cfg.restart:
            old = [p for _, p in ckpt_io.list_checkpoints(self.log_dir)]
            old += [self.log_dir / n for n in (LOG_TXT, METRICS)]
            dest = ckpt_io.move_aside(self.log_dir, old, "restart")
            if dest:
                self.log(f"--restart: moved the previous run's files to {dest}; starting a new run")

    def check(self, optimizer):
        """The check of a candidate file: another model is a TrainError, a damaged file a CheckpointError."""
        def check(path: Path, state: dict) -> None:
            if not isinstance(state.get("config"), dict):
                raise ckpt_io.CheckpointError(f"{path}: incomplete checkpoint, no model 'config'")
            check_resume_config(path, state["config"], self.plan.gcfg, self.plan.model_name)
            ckpt_io.check_state(state, path, self.raw, optimizer)
        return check

    def pick(self, optimizer) -> tuple[Path | None, dict | None]:
        cfg, check = self.cfg, self.check(optimizer)
        if cfg.resume_from:
            path = Path(cfg.resume_from)
            state = ckpt_io.load(path)
            check(path, state)
            return path, state
        return ckpt_io.load_latest(self.log_dir, warn=self.plan.master, check=check)

    def resume(self, optimizer) -> dict | None:
        """Load the newest usable checkpoint, if any, into the model and the parts; returns it (its
        "optimizer" entry is loaded by Strategy.wrap, into the sharded optimizer if any), or None."""
        path, state = self.pick(optimizer)
        if state is None:
            return None
        self.resumed_from = self.last_healthy = path
        step = self.healthy_step = int(state["step"])
        saved = state.get("train_config") or {}  # the schedule of the run that wrote it, not this run's
        then = replace(self.cfg, **{k: saved[k] for k in ("max_lr", "min_lr_ratio", "warmup_steps", "max_steps")
                                    if k in saved})
        self.healthy_lr = get_lr(step - 1, then) if step > 0 else None
        if step < self.cfg.max_steps:
            self.check_same_run(path, state)
        else:  # nothing will train: the differences are only reported (nothing_to_do)
            self.finished_changes = self.changes(state)
        if self.cfg.resume_from and self.plan.master:
            # Newer checkpoints in log_dir (a diverged continuation, say) would be picked over the files
            # this run writes next: keep them, out of the way.
            newer = [p for s_, p in ckpt_io.list_checkpoints(self.log_dir)
                     if s_ >= step and p.resolve() != path.resolve()]
            dest = ckpt_io.move_aside(self.log_dir, newer, "superseded")
            if dest:
                self.log(f"--resume_from: moved {len(newer)} checkpoint(s) at step >= {step} to {dest}")
        if self.cfg.resume_from and self.plan.ddp:
            dist.barrier()
        try:
            self.raw.load_state_dict(state["model"])
            state["optimizer"]  # noqa: B018 (a missing entry is reported here, with the others)
            for name, part in self.parts.items():  # the loader's and RNG's states must be there
                part.load_state_dict(state[name] if name in ("loader", "rng") else state.get(name))
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as e:
            raise ckpt_io.CheckpointError(f"{path}: cannot be applied to this run ({type(e).__name__}: "
                                          f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
        return state

    def changes(self, state: dict) -> dict[str, str]:
        """{flag or 'data': description} of what differs between the checkpoint's run and this one."""
        return fingerprint.resume_changes(state.get("train_config"), state.get("data_fingerprint"), self.cfg,
                                          self.data_fingerprint())

    def nothing_to_do(self, step: int) -> str:
        """The line for a checkpoint already at --max_steps, naming the settings that differ from its run (a run
        that trained with them would be refused), so a changed flag is not silently ignored."""
        msg = (f"{self.resumed_from} is already at step {step} >= --max_steps {self.cfg.max_steps}: nothing to do "
               f"(to train further, raise --max_steps and add --allow_changed max_steps)")
        differ = {k: v for k, v in self.finished_changes.items() if k != "max_steps"}
        if differ:
            msg += (f". Note: this command's settings differ from that run's: {'; '.join(differ.values())}; training "
                    f"from it with them would be refused unless --allow_changed {','.join(differ)} is given")
        return msg

    def check_same_run(self, path: Path, state: dict) -> None:
        """Refuse to resume with flags or data that differ from the checkpoint's run, unless allowed."""
        cfg, step = self.cfg, int(state["step"])
        changes = self.changes(state)
        lr_note = ""
        if "max_steps" in changes:
            old = replace(cfg, max_steps=state["train_config"]["max_steps"])
            lr_note = (f"A changed --max_steps re-plans the cosine decay to end at step {cfg.max_steps} instead of "
                       f"{old.max_steps} (warmup and peak unchanged)")
            if get_lr(step, cfg) != get_lr(step, old):
                lr_note += (f": the learning rate at step {step} becomes {get_lr(step, cfg):.6f} instead of "
                            f"{get_lr(step, old):.6f}")
            lr_note += "."
        refused = {k: v for k, v in changes.items() if k not in cfg.allowed_changes}
        if refused:
            names = ",".join(refused)
            raise TrainError(
                f"{path} belongs to a run with other settings: {'; '.join(refused.values())}. Resuming would not "
                f"continue that run. Pass the checkpoint's values to continue it, --allow_changed {names} to "
                f"continue with the new ones, or another --log_dir (or --restart) to start over. {lr_note}".strip())
        for k, v in changes.items():
            self.log(f"note: resuming with a change you allowed: {v}")
        if lr_note:
            self.log(f"note: {lr_note}")

    # -- save --------------------------------------------------------------------------------------
    def state(self, step: int, optimizer, val: tuple) -> dict | None:
        """Every rank calls this (gathering sharded state is collective); rank 0 gets the dict, others None."""
        model_sd, optim_sd = self.strategy.full_state_dicts(self.raw, optimizer)
        if not self.plan.master:
            return None
        parts = {name: part.state_dict() for name, part in self.parts.items()}
        return {"config": asdict(self.raw.config), "model": model_sd, "optimizer": optim_sd, "step": step,
                "val_loss": val[0], "val_step": val[1], **parts, "train_config": asdict(self.cfg),
                "world_size": self.plan.world,
                "shard": self.cfg.shard, "data_fingerprint": self.data_fingerprint()}

    def save(self, step: int, optimizer, val: tuple, problem: str | None) -> Path | None:
        """Rank 0 writes model_{step}.pt atomically and applies --keep_checkpoints; all ranks wait for it.
        `val`: (the last val loss, its step). An unhealthy state (`problem`, from guard.unhealthy) is never
        written: returns None and deletes nothing, so retention never removes the newest healthy checkpoint."""
        if problem:
            self.pending, path = None, self.last_healthy
            self.log(f"not writing a checkpoint at step {step}: {problem}. "
                     f"{f'The newest healthy one is {path}' if path else 'No healthy checkpoint exists yet'}.")
            return None
        p = ckpt_io.checkpoint_path(self.log_dir, step)
        state = self.state(step, optimizer, val)
        if self.plan.master:
            try:
                ckpt_io.save_atomic(state, p)
            except (OSError, RuntimeError) as e:  # disk full, read-only, a directory in the way, ...
                prev = [q for _, q in ckpt_io.list_checkpoints(self.log_dir) if q != p]
                kept = f"; the previous checkpoint {prev[-1]} is intact" if prev else ""
                raise TrainError(ckpt_io.describe_write_error(p, e) + kept +
                                 ". Free space or fix the directory, then run the same command to resume.") from None
        if self.plan.ddp:
            dist.barrier()
        self.pending = (step, p, step)
        if val[1] == step and sane_loss(val[0], self.raw.config.vocab_size):  # a val loss of these very weights
            self.judge(step, val[0])
        else:
            self.retain()
        return p

    def judge(self, step: int, loss: float, skipped: bool = False) -> None:
        """Called with the loss computed with the weights after `step` updates (the next step's training loss):
        confirms the pending checkpoint of that step, or rejects it (never named healthy). `skipped`: that
        step's update was not applied, so the next step's loss sees the same weights.

        A rejected file is renamed model_NNNNN.pt.unhealthy, kept but out of the way of a resume (which picks
        the newest). A finite loss that high may be one bad batch rather than the weights: when the update
        was skipped (the spike guard), the next batch judges the same weights again before anything moves."""
        if self.pending is None or self.pending[0] != step:
            return
        _, p, made = self.pending
        if sane_loss(loss, self.raw.config.vocab_size):
            self.pending = None
            self.last_healthy, self.healthy_step, self.healthy_lr = p, made, get_lr(made - 1, self.cfg)
        elif skipped and math.isfinite(loss):
            self.pending = (step + 1, p, made)  # unless a checkpoint of step + 1 (the same weights) takes its place
            return
        else:
            self.pending = None
            aside = p.with_name(p.name + ".unhealthy")
            if self.plan.master:
                p.replace(aside)
            healthy = self.last_healthy
            self.log(f"{p} is not healthy: its weights give loss {loss:.4g}; moved to {aside}, so a resume never "
                     f"picks it. {f'The newest healthy one is {healthy}' if healthy else 'No healthy checkpoint exists yet'}.")
        self.retain()

    def retain(self) -> None:
        """--keep_checkpoints: delete all but the newest N, never the confirmed-healthy or the pending one."""
        if not self.plan.master or self.cfg.keep_checkpoints <= 0:
            return
        keep = {self.last_healthy, self.pending[1] if self.pending else None}
        for _, old in ckpt_io.list_checkpoints(self.log_dir)[:-self.cfg.keep_checkpoints]:
            if old not in keep:
                old.unlink(missing_ok=True)
