"""The training loop: `Trainer.run()` reads top to bottom like nanoGPT's `while True:`.

One optimizer step sees `total_batch_size` tokens: micro-batches of (micro_batch_size, seq_len) on each of
`world` ranks, accumulated over `total / (micro x seq x world)` micro-steps. Under DDP gradients are
all-reduced only on the last micro-step; the logged loss is the mean over micro-steps and ranks. Rank 0 alone
prints and writes. The parts it calls: plan, setup, parallel (Strategy), guard, state (checkpoints), report.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..lock import RunLock
from ..parallel import check_same_start, strategy
from ..parallel.watchdog import StopRequest, Watchdog
from . import guard as guards
from . import setup
from .guard import Guard, Skip, StepResult
from .options import TrainConfig, TrainError
from .plan import Env, get_lr, resolve
from . import report
from .state import RNG, AttentionConfigs, Checkpointer, Scaler


class EvalInterrupted(Exception):
    """A stop request arrived during evaluation: abandoned, so the checkpoint comes sooner."""


class Trainer:
    """One training run: __init__ sets up (plan, process group, data, model; nothing trained yet), run() trains."""

    def __init__(self, cfg: TrainConfig, given=frozenset(), env: Env | None = None):
        self.plan = plan = resolve(cfg, given, env)
        self.cfg, self.accum, self.world, self.rank = plan.cfg, plan.accum, plan.world, plan.rank
        self.master, self.ddp, self.cuda = plan.master, plan.ddp, plan.cuda
        self.device = setup.setup_distributed(plan)
        self.strategy = strategy(plan.cfg.shard, plan.world)
        self.train_loader, self.val_loader = setup.build_data(plan, self.log)
        self.log(f"using device: {self.device.type}")
        for n in plan.notes:
            self.log(n)
        self.raw, self.optimizer = setup.build_model(plan, self.device, self.log)
        self.model = self.core = self.raw  # wrap_model puts the Strategy's wrappers around it
        # fp16's narrow range needs the loss scaled up for backward (and the gradients unscaled before clipping)
        self.scaler = torch.amp.GradScaler(self.device.type) if plan.dtype == "fp16" else None
        why = " (auto)" if cfg.dtype == "auto" else ""
        self.log(f"dtype: {plan.dtype}{why}{' with loss scaling' if self.scaler else ''}")
        self.guard = Guard(plan.cfg.spike_guard)
        self.train_loader.follow_saved_seed = True  # Checkpointer.resume judges a changed --seed first
        self.ckpt = Checkpointer(plan, self.strategy, self.raw, {
            "loader": self.train_loader, "rng": RNG(), "scaler": Scaler(self.scaler), "guard": self.guard,
            "attention_configs": AttentionConfigs(self.log)},
            {"train": self.train_loader.paths, "val": self.val_loader.paths}, self.log)
        self.log_dir = Path(plan.cfg.log_dir)
        self.start_step = self.step = 0
        self.val: tuple[float | None, int | None] = (None, None)  # the last val loss and its step
        self.last_loss: float | None = None
        self.optimizer_state: dict | None = None  # a resumed optimizer state, until wrap_model loads it
        self.stop: StopRequest | None = None  # while run() loops
        self.stop_all = False  # under DDP: the stop flag all ranks agreed on at the last step
        self.watchdog: Watchdog | None = None
        self.report = report.Reporter(plan, self.raw, self.log_dir, self.log)

    def log(self, *a) -> None:
        if self.master:
            print(*a, flush=True)

    @property
    def recent_losses(self) -> list[float]:  # the spike guard's
        return self.guard.recent

    def unhealthy(self) -> str | None:  # guard.unhealthy on this rank's weights and optimizer state
        return guards.unhealthy(self.guard, self.val[0], self.plan.gcfg.vocab_size, self.raw,
                                self.strategy.inner(self.optimizer), self.device, self.ddp)

    def save(self, step: int) -> Path | None:
        return self.ckpt.save(step, self.optimizer, self.val, self.unhealthy())

    # --------------------------------------------------------------------------------------------
    def run(self) -> int:
        """The whole run under the log directory's lock, released however the run ends (an error included)."""
        # One run per log directory; taking the lock also proves the directory is writable before step 0.
        lock = RunLock(self.log_dir).acquire() if self.master else None
        try:
            if lock is not None and lock.took_over:
                self.log(f"note: took over {lock.path} from a run that ended without releasing it ({lock.took_over})")
            return self.train_loop()
        finally:
            if lock is not None:
                lock.release()

    def resume(self) -> None:
        self.ckpt.prepare()
        if self.ddp:
            self.watchdog = Watchdog(self.rank, self.world, self.cfg.dist_timeout)
            self.watchdog.start()
            dist.barrier()  # rank 0 has moved files; everyone now sees the same checkpoints
        state = self.ckpt.resume(self.optimizer)
        if state is None:
            return
        self.optimizer_state = state["optimizer"]
        self.start_step = self.step = int(state["step"])
        self.val = state.get("val_loss"), state.get("val_step")
        vl = report.val_text(*self.val)
        self.log(f"resuming from {self.ckpt.resumed_from} (step {self.start_step}{', ' + vl if vl else ''})")

    def wrap_model(self) -> None:
        """The Strategy's wrappers (and torch.compile) around the raw model; `core` is what evaluation calls.
        zero1 and fsdp replace the optimizer by a sharded one; a resumed state goes into it."""
        if self.ddp:
            try:
                check_same_start(self.start_step, self.device)
            except ValueError as e:
                raise TrainError(str(e)) from None
        self.model, self.core, self.optimizer = self.strategy.wrap(
            self.raw, self.optimizer, self.device, compile=self.cfg.compile,
            param_dtype=setup.AUTOCAST.get(self.plan.dtype) if self.cuda else None,  # FSDP2 computes in --dtype
            optimizer_state=self.optimizer_state)
        self.optimizer_state = None
        self.params = [p for p in self.raw.parameters() if p.requires_grad]  # fsdp's are new (sharded) ones
        if self.ddp:
            self.log(self.strategy.describe(self.cuda))

    def train_loop(self) -> int:
        cfg = self.cfg
        self.resume()
        if self.start_step >= cfg.max_steps:
            self.log(self.ckpt.nothing_to_do(self.start_step))
            return 0
        self.wrap_model()
        if self.cuda or setup.uses_triton(self.plan, self.device):
            setup.warm_up_kernels(self.plan, self.device, self.model, self.core, self.strategy, self.optimizer,
                                  self.skipped_update, self.log)
        self.report.start(self.start_step, self.device)
        setup.log_summary(self.plan, self.train_loader, self.log_dir, self.log)
        # What runs after a step, and when: (every N steps, hook, skipped by a stopping run); each also runs at
        # the last step. The stop check comes before the first skippable one: those are collective extras.
        hooks = [(cfg.eval_interval, self.log_eval, False),
                 (cfg.hellaswag_interval if self.plan.hellaswag_examples else 0, self.report.hellaswag, True),
                 (self.plan.sample_every, self.report.sample, True)]  # the run's last word: a sample of what it learned
        p = None
        with StopRequest() as stop:
            self.stop = stop
            for step in range(self.start_step, cfg.max_steps):
                self.step = step
                r = self.train_step(step)
                self.report.step(r)
                self.ckpt.judge(step, r.loss, r.skip is not Skip.NONE)  # r.loss came from model_{step}.pt's weights
                self.guard.check_divergence(r, self.resume_lr(), self.advice)
                done, stopping = step + 1, None
                for every, hook, extra in hooks:
                    if extra and stopping is None:
                        stopping = self.stop_requested(stop)  # agreed by all ranks
                    if every and (done % every == 0 or done == cfg.max_steps) and not (extra and stopping):
                        hook(done)
                if done % cfg.checkpoint_interval == 0 or done == cfg.max_steps or stopping:
                    p = self.save(done)
                    self.report.sync()
                    if stopping:
                        saved = f"checkpoint saved to {p}" if p else "no checkpoint written (see above)"
                        self.log(f"stopped at step {done}: {saved}. Run the same command to resume.")
                        self.report.end(self.start_step, done, self.val, p or self.ckpt.last_healthy)
                        return 0
                    if p:
                        self.log(f"saved checkpoint {p}")
        self.report.end(self.start_step, cfg.max_steps, self.val, p or self.ckpt.last_healthy)
        return 0

    # --------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> StepResult:
        """accum micro-steps of forward/backward, clip, then the update, skipped on the device when the loss or
        gradient norm is non-finite or the loss spikes (weights and optimizer state unchanged). The host reads
        the device once per step, after the update: loss, norm and flags in one transfer, which also ends the
        step's timing (it waits for the GPU to finish the step)."""
        t0 = time.perf_counter()
        cfg, model, optimizer, device = self.cfg, self.model, self.optimizer, self.device
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for micro in range(self.accum):
            x, y = self.train_loader.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with self.strategy.micro_step(model, last=micro == self.accum - 1):
                with setup.autocast(self.plan):
                    _, loss = model(x, y, return_logits=False)
                loss = loss / self.accum
                loss_sum += loss.detach().float()
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        stop = torch.zeros((), device=device)
        if self.ddp:
            # One all-reduce carries the loss and each rank's stop flag (a signal may reach some ranks only).
            asked = self.stop is not None and self.stop.requested
            packed = torch.stack([loss_sum, torch.full((), float(asked), device=device)])
            dist.all_reduce(packed)
            loss_sum, stop = packed[0] / self.world, packed[1]
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clip (and log) the true gradient norm
        norm = self.strategy.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        lr = get_lr(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        finite = torch.isfinite(loss_sum) & torch.isfinite(norm)
        limit = self.guard.spike_limit()
        spike = loss_sum > limit
        self.apply_update(~finite | spike)
        scale = torch.zeros((), device=device)
        if self.scaler is not None:
            self.scaler.update()  # halves the scale after an overflow, grows it after a run of good steps
            scale = self.scaler._get_scale_async()  # the device tensor get_scale() would read on its own
        # The one host read of the step.
        loss_v, norm_v, finite_v, spike_v, stop_v, scale_v = torch.stack(
            [loss_sum, norm.float(), finite.float(), spike.float(), stop, scale.to(device)]).tolist()
        dt = time.perf_counter() - t0
        skip, note = self.guard.classify(loss_v, bool(finite_v), bool(spike_v), self.scaler is not None, limit,
                                         scale_v)
        if skip:
            self.undo_step_count()
        else:
            self.guard.accept(loss_v)
        self.stop_all = stop_v > 0
        return StepResult(step, loss_v, norm_v, lr, dt, skip, note)

    def apply_update(self, skip: torch.Tensor) -> None:
        """optimizer.step(), a no-op where the device flag `skip` holds. The flag goes in as `found_inf`, the
        AMP protocol of torch's fused AdamW and of kernels.FusedAdamW: the update kernels read it on the
        device, so the host never waits for it."""
        inner = self.strategy.inner(self.optimizer)
        if getattr(inner, "_step_supports_amp_scaling", False):  # torch's flag on optimizer classes
            inner.found_inf, inner.grad_scale = skip.float(), None
            try:
                self.optimizer.step()
            finally:
                del inner.found_inf, inner.grad_scale
        elif not bool(skip):  # an optimizer without found_inf costs one more host read per step
            self.optimizer.step()

    def undo_step_count(self) -> None:  # FusedAdamW counts steps on the host, blind to the device-side skip
        inner = self.strategy.inner(self.optimizer)
        if hasattr(inner, "undo_step_count"):
            inner.undo_step_count()

    def resume_lr(self) -> float:
        """The --max_lr the divergence advice gives: the smaller of the lr of the last update before the newest
        healthy checkpoint, the default max_lr (the CPU default on a CPU) and half the current --max_lr, so a
        wild --max_lr (1e6) leads back to a known-good one rather than to 500000."""
        from .plan import CPU_DEFAULTS
        default = CPU_DEFAULTS["max_lr"] if self.device.type == "cpu" else TrainConfig.max_lr
        at = self.ckpt.healthy_lr  # under the schedule of the run that wrote it (the checkpoint's own flags)
        return min(at if at is not None else self.cfg.max_lr, default, self.cfg.max_lr / 2)

    def advice(self, lower_lr: str) -> str:
        return guards.resume_advice(self.ckpt.last_healthy, self.log_dir, lower_lr, self.cfg.allow_changed)

    def skipped_update(self, skip: torch.Tensor) -> None:  # the warm-up's: the kernels run, nothing changes
        self.apply_update(skip)
        self.undo_step_count()

    def evaluate(self) -> float:
        """Mean validation loss over the first eval_steps x eval_batch sequences of the val split, whatever
        the world size: each rank takes every world-th sequence, in micro-batches of micro_batch_size."""
        core, world, B = self.core, self.world, self.cfg.micro_batch_size
        n_seq = min(self.cfg.eval_steps * self.plan.eval_batch, self.val_loader.total)
        mine = len(range(self.rank, n_seq, world))  # this rank's share
        core.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.device)  # sum over sequences of their mean token loss
        with torch.no_grad():
            for start in self.interruptible(range(0, mine, B)):
                rows = [self.val_loader.next_batch() for _ in range(min(B, mine - start))]
                x = torch.cat([r[0] for r in rows])  # (b, T)
                y = torch.cat([r[1] for r in rows])
                with setup.autocast(self.plan):
                    _, loss = core(x.to(self.device), y.to(self.device), return_logits=False)
                total += loss.float() * x.shape[0]
        if self.ddp:
            dist.all_reduce(total)
        core.train()
        return (total / n_seq).item()

    def log_eval(self, done: int) -> None:
        try:
            self.val = self.evaluate(), done
        except EvalInterrupted:
            self.core.train()
            self.stop_all = True  # every rank agreed to stop (stop_agreed), after the step's own vote
            self.log(f"evaluation at step {done} abandoned for the stop request (no val loss)")
            return
        self.report.val(done, self.val[0])

    def stop_requested(self, stop: StopRequest) -> bool:
        if self.ddp:  # a signal may reach some ranks only; all must stop at the same step: the flag they
            self.watchdog.finished(self.step)  # agreed on in the last step's all-reduce (no extra sync per step)
            return self.stop_all
        return stop.requested

    def interruptible(self, batches):
        """Evaluation batches, abandoned (EvalInterrupted) once any rank got a stop request (DDP: one all-reduce)."""
        for b in batches:
            if self.stop is not None:
                stopping = self.stop.requested
                if self.ddp:
                    flag = torch.tensor(float(stopping), device=self.device)
                    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                    stopping = bool(flag.item())
                if stopping:
                    raise EvalInterrupted
            yield b
