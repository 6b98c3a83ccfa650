"""What a run tells its user: the step line, val loss, samples, HellaSwag and the final `done:` line, on
stdout (rank 0) and in log.txt / metrics.jsonl (metrics.RunLog). Samples and HellaSwag are computed here too:
they are what the run shows, not part of training."""
from __future__ import annotations

import shlex

from ..metrics import Progress, RunLog, fmt_duration, peak_flops


class Reporter:
    def __init__(self, plan, raw, log_dir, log):
        self.plan, self.cfg, self.raw, self.log_dir, self.log = plan, plan.cfg, raw, log_dir, log
        self.last_loss: float | None = None
        self.runlog: RunLog | None = None
        self.progress: Progress | None = None
        self.peak = None
        self.device = None

    def start(self, start_step: int, device) -> None:
        self.device = device
        if self.plan.master:
            # Drops what a killed run logged past the checkpoint it resumes from: one record per step.
            self.runlog = RunLog(self.log_dir, start_step, self.cfg.total_batch_size)
        self.peak = peak_flops(device)
        self.progress = Progress(start_step, self.cfg.max_steps)

    def step(self, r) -> None:
        tok_s = self.cfg.total_batch_size / r.dt
        self.progress.update(r.step, r.dt)
        self.last_loss = r.loss
        line = (f"step {r.step} | loss: {r.loss:.4f} | lr: {r.lr:.6f} | norm: {r.norm:.4f} | "
                f"dt: {r.dt * 1000:.0f}ms | tok/s: {tok_s:,.0f} | {self.progress.fields(r.step)}")
        extra = {}
        if self.peak is not None:
            # Per GPU: this rank's share of the tokens against one GPU's peak.
            extra["mfu"] = self.raw.estimate_mfu(tok_s / self.plan.world, self.peak, T=self.cfg.seq_len)
            line += f" | mfu: {100 * extra['mfu']:.1f}%"
        if r.note:
            line += f" | {r.note}"
            extra["skipped"] = r.skip.value
        self.log(line)
        if self.runlog is not None:
            self.runlog.train(r.step, r.loss, r.norm, r.lr, r.dt, **extra)

    def val(self, done: int, loss: float) -> None:
        self.log(f"val loss {loss:.4f}")
        if self.runlog is not None:
            self.runlog.val(done, loss)

    def sample(self, done: int) -> None:
        """A seeded continuation of --sample_prompt, printed by rank 0. Its own generator (seeded by --seed and
        the step) draws the tokens, so the training RNG streams, and with them resume, stay untouched. Every
        rank generates the same tokens: a model sharded across ranks needs all of them in each forward."""
        from ..generate import sample_text

        prompt = self.cfg.sample_prompt
        try:
            text = sample_text(self.raw, prompt, self.cfg.sample_tokens, temperature=1.0, top_k=50,
                               seed=self.cfg.seed + done)
        except ValueError as e:  # weights wrecked by the last update: the checkpoint judgement and guard follow
            self.log(f"sample at step {done} skipped: {e}")
            return
        self.log(f"sample at step {done}:\n{prompt + text}")
        if self.runlog is not None:
            self.runlog.sample(done, prompt, text)

    def hellaswag(self, done: int) -> None:
        """HellaSwag acc / acc_norm on rank-sharded examples, the same computation as `fastgpt eval hellaswag`."""
        from ..hellaswag import evaluate_examples

        # The uncompiled model: every batch has another length, which would recompile a compiled one.
        res = evaluate_examples(self.raw, self.plan.hellaswag_examples, device=self.device, rank=self.plan.rank,
                                world=self.plan.world)
        self.raw.train()
        self.log(f"hellaswag: {res['examples']} examples | acc: {res['acc']:.4f} | acc_norm: {res['acc_norm']:.4f}")
        if self.runlog is not None:
            self.runlog.hellaswag(done, res)

    def sync(self) -> None:
        if self.runlog is not None:
            self.runlog.sync()  # the logs are on disk as far as the checkpoint goes

    def end(self, start_step: int, done: int, val: tuple, last_ckpt) -> None:
        """The one line that says what the run did, and the commands that come next."""
        steps = done - start_step
        train = f"{self.last_loss:.4f}" if self.last_loss is not None else "n/a"
        self.log(f"done: {steps:,} steps ({start_step} -> {done}), {steps * self.cfg.total_batch_size:,} tokens "
                 f"in {fmt_duration(self.progress.elapsed)} | final train loss {train} | "
                 f"{val_text(*val) or 'val loss n/a'} | last checkpoint: {last_ckpt or 'none'}")
        if last_ckpt:
            self.log(f"next: fastgpt generate --checkpoint {shlex.quote(str(last_ckpt))} --prompt "
                     f"{shlex.quote(self.cfg.sample_prompt)} (sample from it) | fastgpt plot "
                     f"{shlex.quote(str(self.log_dir))} (loss curves)")


def val_text(loss: float | None, step: int | None) -> str:
    """`val loss 6.8418 at step 50` (the step where known: older checkpoints lack it); "" without a val loss."""
    if loss is None:
        return ""
    return f"val loss {loss:.4f}" + (f" at step {step}" if step is not None else "")
