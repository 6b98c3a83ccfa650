"""Training: `python train.py`, `fastgpt train`, `python -m fastgpt.train`, `torchrun --standalone
--nproc_per_node=N train.py`.

    options.py   TrainConfig: one field per flag (help, choices, resume-relevance), the parser generated from it
    plan.py      resolve(cfg, given, env) -> RunPlan: device, world, CPU defaults, model, accumulation, dtype
    setup.py     process group, data loaders, model and optimizer, kernel warm-up, startup summary
    loop.py      Trainer: run / train_step / evaluate, periodic hooks in one table
    guard.py     skipped updates (Skip), spike guard, divergence stop, checkpoint health, resume advice
    state.py     Checkpointer over named stateful parts: save (health, atomic, retention), resume
    report.py    the step / val / sample / done lines and metrics.jsonl
    ../parallel  one Strategy per --shard mode, and the rank watchdog

Checkpoints (`log/model_00050.pt`, the state after 50 optimizer steps) hold model, optimizer, loader and RNG
states, so a run resumed from one continues with the very losses the uninterrupted run had.

The names below load lazily, so `from fastgpt.train.options import TrainConfig` (what `import fastgpt` does)
imports neither torch.distributed nor the data pipeline.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "options", "TrainError": "options", "build_parser": "options", "parse_args": "options",
    "SPIKE_WINDOW": "options", "SPIKE_MIN_HISTORY": "options", "MAX_NONFINITE": "options", "MAX_OVERFLOWS": "options",
    "RunPlan": "plan", "Env": "plan", "resolve": "plan", "CPU_DEFAULTS": "plan", "grad_accum_steps": "plan",
    "choose_dtype": "plan", "attention_line": "setup", "Trainer": "loop", "get_lr": "plan", "StepResult": "guard",
    "Skip": "guard", "StopRequest": "watchdog", "main": "cli", "train": "cli",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    where = _EXPORTS[name]
    module = importlib.import_module(f"..parallel.{where}" if where == "watchdog" else f".{where}", __name__)
    return getattr(module, name)


__all__ = list(_EXPORTS)
