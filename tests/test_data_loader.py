"""The loader's manifest (ids checked once, a changed shard checked again and refused by name) and the
shuffled order (every chunk once per epoch, the same at any world size, exact resume)."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from fastgpt.data import DataError, ShardLoader, shards

V = 50257


@pytest.fixture
def sharded(tmp_path):
    """Three shards of different lengths holding the ids 0, 1, 2, ... in order."""
    d = tmp_path / "sharded"
    d.mkdir()
    start = 0
    for i, n in enumerate([1000, 700, 1300]):
        np.save(d / f"train_{i:05d}.npy", np.arange(start, start + n, dtype=np.uint16))
        start += n
    return d


def _count_checks(monkeypatch):
    calls = []
    real = shards.check_ids

    def counting(path, arr, vocab_size):
        calls.append(path.name)
        return real(path, arr, vocab_size)

    monkeypatch.setattr(shards, "check_ids", counting)
    return calls


def test_ids_are_checked_once_then_vouched_for_by_the_manifest(sharded, monkeypatch):
    calls = _count_checks(monkeypatch)
    ShardLoader(sharded, "train", 2, 32, verbose=False)
    assert sorted(calls) == ["train_00000.npy", "train_00001.npy", "train_00002.npy"]
    entries = json.loads((sharded / shards.MANIFEST).read_text())["shards"]
    assert entries["train_00002.npy"][2] == 2999  # the largest id
    calls.clear()
    ShardLoader(sharded, "train", 2, 32, verbose=False)
    assert calls == []
    # A smaller vocabulary than the largest recorded id is not vouched for: checked, and refused.
    with pytest.raises(DataError, match=r"train_00002\.npy: token id 2000 .* outside the vocabulary \[0, 2000\)"):
        ShardLoader(sharded, "train", 2, 32, vocab_size=2000, verbose=False)


def test_a_changed_shard_is_checked_again_and_refused_by_name(sharded, monkeypatch):
    ShardLoader(sharded, "train", 2, 32, verbose=False)
    bad = np.arange(1000, 1700, dtype=np.uint16)
    bad[0] = 60000  # in the first block the hash samples
    np.save(sharded / "train_00001.npy", bad)
    calls = _count_checks(monkeypatch)
    with pytest.raises(DataError, match=r"train_00001\.npy: token id 60000 at index 0"):
        ShardLoader(sharded, "train", 2, 32, verbose=False)
    assert calls == ["train_00001.npy"]


def test_a_damaged_manifest_only_costs_a_full_check(sharded, monkeypatch):
    (sharded / shards.MANIFEST).write_text("{not json")
    calls = _count_checks(monkeypatch)
    a = ShardLoader(sharded, "train", 2, 32, verbose=False)
    assert len(calls) == 3 and a.total == 15 + 10 + 20
    assert set(json.loads((sharded / shards.MANIFEST).read_text())["shards"]) == {f"train_0000{i}.npy" for i in range(3)}


def test_prepared_shards_need_no_check_at_first_start(tmp_path, monkeypatch):
    from _train_util import SHAKESPEARE
    from fastgpt import data

    data.prepare_shakespeare(SHAKESPEARE, tmp_path / "d")
    calls = _count_checks(monkeypatch)
    ShardLoader(tmp_path / "d", "train", 4, 64, vocab_size=50304, verbose=False)
    ShardLoader(tmp_path / "d", "val", 1, 64, vocab_size=50304, verbose=False)
    assert calls == []


def test_missing_custom_data_root_names_the_out_form(tmp_path):
    with pytest.raises(DataError, match=r"fastgpt prepare shakespeare --out .*nowhere"):
        ShardLoader(tmp_path / "nowhere", "train", 2, 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"fastgpt prepare shakespeare --out .*empty"):
        ShardLoader(tmp_path / "empty", "train", 2, 32)


def _epoch(loader):
    return [int(loader.next_batch()[0][0, 0]) for _ in range(loader.total)]


def test_shuffled_reads_every_chunk_once_per_epoch_in_a_new_order(sharded):
    # B=1: a batch is one row, so an epoch of the shuffled order is `total` batches
    seq = ShardLoader(sharded, "train", 1, 32, verbose=False)
    shuf = ShardLoader(sharded, "train", 1, 32, verbose=False, order="shuffled", seed=3)
    first = [int(seq.next_batch()[0][0, 0]) for _ in range(seq.total)]
    e0, e1 = _epoch(shuf), _epoch(shuf)
    assert sorted(e0) == sorted(e1) == sorted(first) and e0 != first and e0 != e1
    other = ShardLoader(sharded, "train", 1, 32, verbose=False, order="shuffled", seed=4)
    assert _epoch(other) != e0
    again = ShardLoader(sharded, "train", 1, 32, verbose=False, order="shuffled", seed=3)
    assert _epoch(again) == e0


@pytest.mark.parametrize("order", ["shuffled", "windows"])
def test_shuffled_ranks_read_the_chunks_one_process_reads(sharded, order):
    B, T, W = 2, 32, 2
    single = ShardLoader(sharded, "train", B, T, verbose=False, order=order, seed=1)
    ranks = [ShardLoader(sharded, "train", B, T, rank=r, world=W, verbose=False, order=order, seed=1)
             for r in range(W)]
    for _ in range(20):  # across epochs
        for r in range(W):
            x1, y1 = single.next_batch()
            xr, yr = ranks[r].next_batch()
            assert torch.equal(x1, xr) and torch.equal(y1, yr) and torch.equal(y1, x1 + 1)


def test_shuffled_state_resumes_exactly_and_refuses_another_order(sharded):
    a = ShardLoader(sharded, "train", 3, 16, rank=1, world=2, verbose=False, order="shuffled", seed=5)
    for _ in range(37):
        a.next_batch()
    state = a.state_dict()
    assert isinstance(state["shard"], int) and isinstance(state["position"], int)
    b = ShardLoader(sharded, "train", 3, 16, rank=1, world=2, verbose=False, order="shuffled", seed=5)
    b.load_state_dict(state)
    for _ in range(70):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    seq = ShardLoader(sharded, "train", 3, 16, verbose=False)
    with pytest.raises(DataError, match="--data_order shuffled"):
        seq.load_state_dict(state)
    with pytest.raises(DataError, match="--data_order sequential"):
        b.load_state_dict(seq.state_dict())
    c = ShardLoader(sharded, "train", 3, 16, verbose=False, order="shuffled", seed=6)
    with pytest.raises(DataError, match="seed 5"):
        c.load_state_dict(state)
    with pytest.raises(DataError, match="--data_order must be one of"):
        ShardLoader(sharded, "train", 3, 16, verbose=False, order="random")


_RESUMER = textwrap.dedent("""
    import sys, torch
    from fastgpt.data import ShardLoader
    root, state_file, out, steps, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    ld = ShardLoader(root, "train", 2, 32, verbose=False, order=sys.argv[6], seed=9)
    import os
    if os.path.exists(state_file):
        ld.load_state_dict(torch.load(state_file, weights_only=True))
    with open(out, "a") as f:
        for i in range(steps):
            x, _ = ld.next_batch()
            f.write(f"{int(x[0, 0])}\\n"); f.flush()
            torch.save(ld.state_dict(), state_file + ".tmp"); os.replace(state_file + ".tmp", state_file)
            if i + 1 == kill_at:
                os.kill(os.getpid(), 9)
""")


@pytest.mark.parametrize("order", ["shuffled", "windows"])
def test_shuffled_order_survives_kill_9(sharded, tmp_path, order):
    """A process killed with SIGKILL after saving its state resumes the exact sequence."""
    script = tmp_path / "resumer.py"
    script.write_text(_RESUMER)
    run = lambda *a: subprocess.run([sys.executable, str(script), str(sharded), *map(str, a), order],
                                    capture_output=True)
    ref = run(tmp_path / "ref.pt", tmp_path / "ref.txt", 40, 0)
    assert ref.returncode == 0, ref.stderr
    killed = run(tmp_path / "s.pt", tmp_path / "got.txt", 40, 17)
    assert killed.returncode == -signal.SIGKILL
    rest = run(tmp_path / "s.pt", tmp_path / "got.txt", 23, 0)
    assert rest.returncode == 0, rest.stderr
    assert (tmp_path / "got.txt").read_text() == (tmp_path / "ref.txt").read_text()
    assert len((tmp_path / "ref.txt").read_text().split()) == 40


def test_windows_are_random_starts_across_shards_and_resume_exactly(sharded):
    """nanoGPT's sampler: rows start anywhere (not at chunk bounds), stay inside one shard, and a loaded
    state continues the same windows; another seed draws others."""
    B, T = 4, 16
    a = ShardLoader(sharded, "train", B, T, verbose=False, order="windows", seed=2)
    starts = set()
    for _ in range(50):
        x, y = a.next_batch()
        assert x.shape == y.shape == (B, T) and torch.equal(y, x + 1)  # one contiguous run of a shard
        starts.update(x[:, 0].tolist())
    assert any(s % (B * T) for s in starts) and max(starts) >= 1700  # off chunk bounds, into the last shard
    state = a.state_dict()
    b = ShardLoader(sharded, "train", B, T, verbose=False, order="windows", seed=2)
    b.load_state_dict(state)
    for _ in range(30):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    c = ShardLoader(sharded, "train", B, T, verbose=False, order="windows", seed=3)
    assert not torch.equal(c.next_batch()[0], ShardLoader(sharded, "train", B, T, verbose=False,
                                                          order="windows", seed=2).next_batch()[0])


@pytest.mark.parametrize("order", ["shuffled", "windows"])
def test_a_micro_batch_split_over_ranks_reads_the_same_rows(sharded, order):
    """The CPU defaults split B=8 into B=4 on each of 2 ranks: the step's rows must stay the same."""
    T = 16
    one = ShardLoader(sharded, "train", 8, T, verbose=False, order=order, seed=7)
    two = [ShardLoader(sharded, "train", 4, T, rank=r, world=2, verbose=False, order=order, seed=7) for r in range(2)]
    for _ in range(60):  # past an epoch of rows (185 of 16 tokens)
        x1, _ = one.next_batch()
        assert torch.equal(x1, torch.cat([two[0].next_batch()[0], two[1].next_batch()[0]]))
