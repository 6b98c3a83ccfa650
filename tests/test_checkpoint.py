"""Checkpoints: atomic writes that survive kill -9, weights_only loading, discovery by integer step."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from _train_util import log_records, nano_args, run_train, steps
from fastgpt import GPT, GPTConfig
from fastgpt import checkpoint as ck


def test_save_atomic_round_trip_and_no_leftovers(tmp_path):
    obj = {"model": {"w": torch.arange(6.0).view(2, 3)}, "step": 3, "val_loss": None, "cfg": {"a": [1, 2]}}
    p = ck.save_atomic(obj, tmp_path / "model_00003.pt")
    assert sorted(os.listdir(tmp_path)) == ["model_00003.pt"]
    back = torch.load(p)  # weights_only=True is torch's default
    assert torch.equal(back["model"]["w"], obj["model"]["w"]) and back["cfg"] == {"a": [1, 2]}


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = ck.save_atomic({"model": {}, "step": 1}, tmp_path / "model_00001.pt")

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="No space"):
        ck.save_atomic({"model": {}, "step": 2}, p)
    assert sorted(os.listdir(tmp_path)) == ["model_00001.pt"]
    assert torch.load(p)["step"] == 1


class Payload:
    def __reduce__(self):  # what a malicious pickle would do on load
        return (os.system, ("echo pwned",))


def test_checkpoint_holding_a_pickled_object_is_refused(tmp_path):
    p = tmp_path / "model_00010.pt"
    torch.save({"model": {}, "step": 10, "extra": Payload()}, p)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(p, weights_only=True)
    with pytest.raises(ck.CheckpointError, match=r"model_00010.pt: cannot be loaded safely"):
        ck.load(p)
    # ...and resume refuses it rather than executing it (or starting fresh over it).
    with pytest.raises(ck.UnusableCheckpoints, match=r"model_00010.pt: cannot be loaded safely \(it holds pickled"):
        ck.load_latest(tmp_path)


def test_checkpoints_are_ordered_by_integer_step(tmp_path):
    for s in (5, 100000, 99999, 50):
        ck.save_atomic({"model": {}, "step": s}, ck.checkpoint_path(tmp_path, s))
    (tmp_path / "model_final.pt").write_bytes(b"ignored")
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [5, 50, 99999, 100000]
    path, state = ck.load_latest(tmp_path)
    assert path.name == "model_100000.pt" and state["step"] == 100000


def test_rng_state_round_trips_through_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    ck.save_atomic({"model": {}, "rng": ck.rng_state()}, tmp_path / "model_00001.pt")
    expect = (random.random(), np.random.rand(), torch.rand(1).item())
    ck.set_rng_state(torch.load(tmp_path / "model_00001.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expect


def test_training_checkpoint_has_the_documented_keys(shakespeare, tmp_path):
    run_train(tmp_path, nano_args(shakespeare, tmp_path / "log", steps_=2))
    ckpt = torch.load(tmp_path / "log" / "model_00002.pt")
    assert set(ckpt) >= {"config", "model", "optimizer", "step", "val_loss", "loader", "rng", "train_config"}
    assert set(ckpt["rng"]) == {"python", "numpy", "torch", "cuda"}
    assert ckpt["step"] == 2 and isinstance(ckpt["val_loss"], float)
    # the default --data_order shuffled: 2 steps of 2 micro-batches of 4x64 tokens read = 4 chunks
    loader = ckpt["loader"]
    assert loader["order"] == "shuffled" and loader["index"] == 4 and loader["epoch"] == 0
    assert loader["chunks"] == (304_222 - 1) // 256  # the packaged Shakespeare's train tokens in 4x64 rows
    assert ckpt["train_config"]["total_batch_size"] == 512
    model = GPT(GPTConfig(**ckpt["config"]))  # the guide's snippet
    model.load_state_dict(ckpt["model"])
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


# Killed by SIGKILL halfway through writing the bytes of model_00004.pt.
KILL_DURING_WRITE = """
import io, os, signal, torch
_save = torch.save
def save_then_die(obj, f, *a, **k):
    if obj.get("step") == 4:
        buf = io.BytesIO()
        _save(obj, buf, *a, **k)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *a, **k)
torch.save = save_then_die
"""


def test_kill_9_during_a_checkpoint_write(shakespeare, tmp_path):
    ref = run_train(tmp_path, nano_args(shakespeare, tmp_path / "ref", steps_=6))
    log = tmp_path / "log"
    killed = run_train(tmp_path, nano_args(shakespeare, log, steps_=6), pre=KILL_DURING_WRITE, check=False)
    assert killed.returncode == -9, killed.stderr
    names = sorted(os.listdir(log))
    temps = [n for n in names if n.startswith(".model_00004.pt.tmp")]
    assert "model_00002.pt" in names and "model_00004.pt" not in names and len(temps) == 1
    for n in names:  # every checkpoint on disk loads; the half-written bytes are only in the temporary
        if n.endswith(".pt"):
            torch.load(log / n)
    with pytest.raises(Exception):
        torch.load(log / temps[0])

    again = run_train(tmp_path, nano_args(shakespeare, log, steps_=6))
    assert f"removed {log / temps[0]}" in again.stdout
    assert f"resuming from {log / 'model_00002.pt'} (step 2" in again.stdout
    assert set(steps(again.stdout)) == {2, 3, 4, 5}
    assert not [n for n in os.listdir(log) if n.startswith(".model_")]  # .lock is the run lock
    for n in os.listdir(log):
        if n.endswith(".pt"):
            torch.load(log / n)
    # The resumed steps are the uninterrupted run's, bit for bit.
    a, _ = log_records(tmp_path / "ref")
    b, _ = log_records(log)
    assert all(b[s] == a[s] for s in (2, 3, 4, 5))
    assert steps(ref.stdout)[5] == steps(again.stdout)[5]


def test_tied_weights_are_copied_once_for_saving():
    """On CUDA each tensor is copied to the CPU before saving; the tied wte/lm_head weight must stay
    one tensor (one storage in the file), not two copies."""
    from fastgpt.parallel import to_cpu as _to_cpu

    sd = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=100, block_size=8, kernels="torch")).state_dict()
    out = _to_cpu({"model": sd})["model"]
    assert out["lm_head.weight"] is out["transformer.wte.weight"]
    assert out["transformer.wpe.weight"] is not out["transformer.wte.weight"]
