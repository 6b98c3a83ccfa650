"""main(): flags -> Trainer -> exit code, with a user's errors printed as one line instead of a traceback."""
from __future__ import annotations

import sys

from .options import TrainConfig, TrainError, parse_args
from .plan import CPU_DEFAULTS, check_before_torch


def main(argv=None, prog: str = "train.py") -> int:
    cpu = " ".join(f"--{k} {v}" for k, v in CPU_DEFAULTS.items())
    epilog = (f"Without a GPU and without --model, flags you do not give default to: {cpu}. "
              f"An existing checkpoint in --log_dir is resumed.")
    try:  # flags first: an error in them is printed before torch is imported (parsing imports none)
        cfg, given = parse_args(argv, prog, epilog)
        check_before_torch(cfg)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    import torch
    import torch.distributed as dist

    from ..checkpoint import CheckpointError
    from ..lock import LockError
    from .setup import DataError

    try:
        return train(cfg, given)
    except (TrainError, DataError, CheckpointError, LockError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    except torch.OutOfMemoryError as e:
        print(f"error: CUDA out of memory ({str(e).splitlines()[0]})\n"
              f"  Lower --micro_batch_size (now {cfg.micro_batch_size}; try {max(1, cfg.micro_batch_size // 2)} "
              f"or {max(1, cfg.micro_batch_size // 4)}): gradient accumulation keeps the total batch of "
              f"{cfg.total_batch_size} tokens per step unchanged. A smaller --model or --seq_len also helps.",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def train(cfg: TrainConfig, given=frozenset()) -> int:
    """Set up, resume, and run the loop; returns the process exit code."""
    import torch.distributed as dist

    from ..parallel.watchdog import is_collective_timeout
    from .loop import Trainer

    trainer = Trainer(cfg, given)
    try:
        rc = trainer.run()
        if trainer.ddp:
            # Every rank past its last collective before any tears gloo down: without it a rank sometimes
            # aborted at exit ("terminate called without an active exception") after all its work was done.
            dist.barrier()
        return rc
    except RuntimeError as e:
        if trainer.ddp and is_collective_timeout(e):
            raise TrainError(trainer.watchdog.timeout_message(e, trainer.step)) from None
        raise
