"""A run that ends cleanly however it is stopped: a stop request (SIGINT/SIGTERM) finishes the step and
checkpoints; a frozen or stuck rank ends the job naming that rank.

Each rank records in the process group's store its last finished step and, from a background thread, the
time it was last alive (a stopped process's threads stop too), so the rank whose collective times out can
name the rank that stopped responding.
"""
from __future__ import annotations

import datetime
import signal
import sys
import threading
import time

import torch.distributed as dist


class StopRequest:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, checkpoints and exits. A second Ctrl+C aborts."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              f"(Ctrl+C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


def is_collective_timeout(e: BaseException) -> bool:
    """gloo: "Timed out waiting Nms for recv operation"; also its peer-gone variants, which follow a timeout."""
    text = str(e)
    signs = ("Timed out", "timed out", "Connection closed by peer")
    return isinstance(e, dist.DistError) or any(m in text for m in signs)


class Watchdog:
    """The heartbeat of one rank in a job of `world` ranks, and the diagnosis when a collective times out."""

    def __init__(self, rank: int, world: int, timeout: float):
        self.rank, self.world, self.timeout = rank, world, timeout
        try:
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:  # private API: without it the message names no other rank
            self.store = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if self.store is None or self.thread is not None:
            return
        store, every, key = self.store, min(5.0, self.timeout / 4), f"fastgpt/alive/{self.rank}"

        def beat():
            while True:
                try:
                    store.set(key, repr(time.time()))
                except Exception:
                    return  # the store is gone: the job is ending
                time.sleep(every)

        self.thread = threading.Thread(target=beat, name="fastgpt-heartbeat", daemon=True)
        self.thread.start()

    def finished(self, step: int) -> None:
        """Record that this rank is past `step` (checked once per step, with the stop flag)."""
        if self.store is not None:
            try:
                self.store.set(f"fastgpt/finished/{self.rank}", str(step + 1))
            except Exception:
                pass

    def timeout_message(self, e: BaseException, step: int) -> str:
        finished, alive = {}, {}
        store = self.store
        if store is not None:
            try:
                store.set_timeout(datetime.timedelta(seconds=5))
                for r in range(self.world):
                    for table, key in ((finished, f"fastgpt/finished/{r}"), (alive, f"fastgpt/alive/{r}")):
                        if store.check([key]):
                            table[r] = float(store.get(key))
            except Exception:
                pass
        cause = " ".join(str(e).split())
        cause = cause[cause.find("]") + 1:].strip() if cause.startswith("[") else cause
        what = (f"waited more than {self.timeout:g} s (--dist_timeout) for the other ranks"
                if "imed out" in cause else f"lost contact with the other ranks ({cause[:160]})")
        msg = f"rank {self.rank} {what} in a collective at step {step}"
        now, quiet = time.time(), []
        for r in range(self.world):
            if r == self.rank:
                continue
            silent = now - alive[r] if r in alive else None
            if silent is None or silent > min(10.0, self.timeout / 2):
                done = int(finished.get(r, 0))
                last = f"last finished step {done - 1}" if done else "finished no step"
                quiet.append(f"rank {r} ({last}) has not responded for {silent:.0f} s" if silent is not None
                             else f"rank {r} ({last}) never reported")
        if quiet:
            msg += "; " + "; ".join(quiet)
        return (msg + ". A rank is frozen or stuck (a stopped process, a hung GPU, a lost node): the job ends "
                "instead of waiting forever. Check that rank's machine, then run the same command to resume from "
                "the last checkpoint.")
