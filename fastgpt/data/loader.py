"""ShardLoader: (x, y) batches of shape (B, T) from one split's shards.

Each shard is cut into consecutive chunks of B*T+1 tokens (inputs and targets shifted by one) and the
chunks of all shards are numbered in one sequence 0..C-1. The loader walks a global index i = 0, 1,
2, ...; index i reads chunk order_e[i mod C] of epoch e = i // C, where order_e is

- `sequential`: the identity (today's order: shard 0 front to back, then shard 1, ...);
- `shuffled`: a permutation of the split's rows (T+1-token windows at multiples of T, U of them) drawn
  from numpy's PCG64 seeded with (seed, e), a new one each epoch of U rows; index i reads rows
  i*B .. i*B+B-1 of that sequence, so every row is read once per epoch;
- `windows`: nanoGPT's sampler: row j starts at a random token position of the split (any of the sum
  over shards of len-T starts) drawn from PCG64 seeded with (seed, j).

Both go by row, not by chunk, so a micro-batch split over ranks (B=8 on 1 rank = B=4 on 2, as the CPU
defaults do) reads the same rows: at W ranks of B rows, ranks 0..W-1 read indices kW..kW+W-1, rows
kWB .. (k+1)WB-1, the rows one process of W*B rows reads at index k.

Rank r of a world of W ranks reads indices r, r+W, r+2W, ...: a step of W ranks reads exactly the
chunks one process would read in W consecutive micro-steps, so the data of a run does not depend on
how many processes share it, in either order. The state is the global index (plus, for display and
for older checkpoints, the next chunk as (shard, position)); checkpoints save it, so a resume reads
the same chunks as an uninterrupted run.

Startup reads each shard's .npy header and, via the manifest (see shards.py), checks its ids only if
they were never checked at this size and hash. A rank memory-maps a shard only when it reads from it.
"""
from __future__ import annotations

import bisect
import sys
from pathlib import Path

import numpy as np
import torch

from .shards import DataError, find_shards, load_shard, numbering_gaps, open_shard, read_manifest, record_checked

DATA_ORDERS = ("shuffled", "sequential", "windows")
_OPEN_MAPS = 4  # memory maps a loader keeps open at once (a rank reads one shard at a time in order)


class ShardLoader:
    """(x, y) batches of shape (B, T) from one split, strided across DDP ranks (see module docstring)."""

    def __init__(self, data_root: str | Path, split: str, B: int, T: int, rank: int = 0, world: int = 1,
                 vocab_size: int = 50257, verbose: bool = True, pin_memory: bool = False,
                 order: str = "sequential", seed: int = 0):
        if order not in DATA_ORDERS:
            raise DataError(f"--data_order must be one of {', '.join(DATA_ORDERS)}, got {order!r}")
        self.B, self.T, self.rank, self.world = B, T, rank, world
        self.order, self.seed = order, int(seed)
        self.pin_memory = pin_memory  # page-locked batches: a non_blocking copy to the GPU is then asynchronous
        self.root = Path(data_root)
        self.paths = find_shards(data_root, split)
        if verbose:
            print(f"found {len(self.paths)} shards for split {split}")
            if gaps := numbering_gaps(self.paths, split):  # a shard lost in a copy would go unnoticed
                more = f" and {len(gaps) - 5} more" if len(gaps) > 5 else ""
                print(f"warning: {data_root}: {split} shards are not numbered consecutively: missing "
                      f"{', '.join(gaps[:5])}{more}; training on the {len(self.paths)} present", file=sys.stderr)
        known = read_manifest(self.root)
        before = dict(known)
        lengths = [len(load_shard(p, vocab_size, B * T + 1, known)) for p in self.paths]
        if known != before:
            record_checked(self.root, {k: v for k, v in known.items() if before.get(k) != v})
        counts = [(n - 1) // (B * T) for n in lengths]  # whole chunks per shard
        self.starts = np.cumsum([0] + counts).tolist()  # chunk index where each shard begins
        self.total = self.starts[-1]
        # shuffled: rows per shard (row u of a shard: tokens u*T .. u*T+T), numbered across shards
        self.ustarts = np.cumsum([0] + [(n - 1) // T for n in lengths]).tolist()
        # windows: window starts per shard (a window is T+1 tokens), numbered across shards
        self.wstarts = np.cumsum([0] + [max(n - T, 0) for n in lengths]).tolist()
        self._perms: dict[int, np.ndarray] = {}
        # A resumed run sets this: its resume check has already refused a --seed change not allowed (compared with
        # the checkpoint's train_config), and the order's seed is the loader's state, so it follows the saved one.
        self.follow_saved_seed = False
        self.next = 0  # the global index rank 0 reads next; rank r reads next + r
        self._maps: dict[int, np.ndarray] = {}

    # -- which chunk an index reads --------------------------------------------------------------
    def _chunk(self, index: int) -> int:  # sequential
        return index % self.total

    def _locate(self, chunk: int) -> tuple[int, int]:
        shard = bisect.bisect_right(self.starts, chunk) - 1
        return shard, (chunk - self.starts[shard]) * self.B * self.T

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._maps:
            if len(self._maps) >= _OPEN_MAPS:
                self._maps.pop(next(iter(self._maps)))  # the oldest map: its pages go with it
            self._maps[k] = open_shard(self.paths[k])
        return self._maps[k]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = self.next + self.rank
        self.next += self.world
        if self.order != "sequential":
            return self._rows(index)
        shard, pos = self._locate(self._chunk(index))
        n = self.B * self.T
        buf = torch.from_numpy(self._shard(shard)[pos:pos + n + 1].astype(np.int64))
        if self.pin_memory:
            buf = buf.pin_memory()
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def _row(self, j: int) -> tuple[int, int]:
        """(shard, token position) of row j of the shuffled or windows sequence."""
        if self.order == "windows":
            w = int(np.random.default_rng([self.seed, j]).integers(0, self.wstarts[-1]))
            shard = bisect.bisect_right(self.wstarts, w) - 1
            return shard, w - self.wstarts[shard]
        epoch, u = divmod(j, self.ustarts[-1])
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.ustarts[-1])
        unit = int(self._perms[epoch][u])
        shard = bisect.bisect_right(self.ustarts, unit) - 1
        return shard, (unit - self.ustarts[shard]) * self.T

    def _rows(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows index*B .. index*B+B-1, (B, T+1) -> x, y of (B, T)."""
        rows = []
        for j in range(index * self.B, (index + 1) * self.B):
            shard, pos = self._row(j)
            rows.append(self._shard(shard)[pos:pos + self.T + 1].astype(np.int64))
        buf = torch.from_numpy(np.stack(rows))
        if self.pin_memory:
            buf = buf.pin_memory()
        return buf[:, :-1], buf[:, 1:]

    def reset(self) -> None:
        self.next = 0

    # -- checkpoint state ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        epoch, index = divmod(self.next, self.total)
        shard, pos = self._locate(self._chunk(self.next)) if self.order == "sequential" else self._row(self.next * self.B)
        state = {"shard": shard, "position": pos, "epoch": epoch}
        if self.order != "sequential":
            state.update(order=self.order, seed=self.seed, index=index, chunks=self.total)
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("order", "sequential")
        if saved != self.order:
            raise DataError(f"the checkpoint's data was read in --data_order {saved}, this run asks for "
                            f"{self.order}: pass --data_order {saved} to continue it exactly")
        if self.order == "sequential":
            shard, pos = int(state["shard"]), int(state["position"])
            if not 0 <= shard < len(self.paths):
                raise DataError(f"loader state points at shard {shard} but only {len(self.paths)} shards exist")
            # position // (B*T) also maps a state saved with another batch shape to a whole chunk.
            self.next = int(state.get("epoch", 0)) * self.total + self.starts[shard] + pos // (self.B * self.T)
            return
        if int(state["chunks"]) == self.total and int(state["seed"]) != self.seed and self.follow_saved_seed:
            self.seed = int(state["seed"])  # the order continues the checkpoint's, and so do later checkpoints
            self._perms.clear()
        if int(state["seed"]) != self.seed or int(state["chunks"]) != self.total:
            raise DataError(f"the checkpoint's shuffled order (seed {state['seed']}, {state['chunks']} chunks) is "
                            f"not this run's (seed {self.seed}, {self.total} chunks of {self.B}x{self.T}): "
                            f"the same --seed, shards and batch shape are needed to continue it")
        self.next = int(state["epoch"]) * self.total + int(state["index"])
