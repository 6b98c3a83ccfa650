"""The training loop on CPU: learning, exact resume, DDP equivalence, LR schedule, error handling."""
import math
import re
import shutil

import pytest
import torch

from _train_util import add_nano, log_records, nano_args, one_thread, run_train, steps  # noqa: F401
from fastgpt.config import TrainConfig
from fastgpt.train import get_lr, grad_accum_steps, main

pytestmark = pytest.mark.usefixtures("one_thread")
LINE = r"step \d+ \| loss: \d+\.\d{4} \| lr: \d\.\d{6} \| norm: \d+\.\d{4} \| dt: \d+ms \| tok/s: [\d,]+"


def _train(capsys, args):
    capsys.readouterr()
    rc = main(args)
    assert rc == 0
    return capsys.readouterr().out


def test_tiny_preset_loses_two_nats_in_40_steps(shakespeare, tmp_path, capsys):
    out = _train(capsys, ["--data_root", str(shakespeare), "--log_dir", str(tmp_path / "log"), "--model", "tiny",
                          "--kernels", "torch", "--device", "cpu", "--total_batch_size", "512",
                          "--micro_batch_size", "4", "--seq_len", "128", "--max_steps", "40", "--warmup_steps", "5",
                          "--max_lr", "3e-3", "--eval_interval", "40", "--eval_steps", "4",
                          "--checkpoint_interval", "40"])
    train, val = log_records(tmp_path / "log")
    assert sorted(train) == list(range(40))
    first, last = train[0][0], train[39][0]
    print(f"\ntiny, 40 steps x 512 tokens: loss {first:.4f} -> {last:.4f} (val {val[40]:.4f})")
    assert first - last >= 2.0, (first, last)
    assert "using device: cpu" in out and "found 1 shards for split train" in out
    import re

    assert len(re.findall(LINE, out)) == 40
    assert re.search(r"^val loss \d+\.\d{4}$", out, re.M)
    assert (tmp_path / "log" / "model_00040.pt").exists()


def test_resume_is_exact_from_every_checkpoint(shakespeare, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    ref_dir = tmp_path / "ref"
    _train(capsys, nano_args(shakespeare, ref_dir, "--checkpoint_interval", "1"))
    ref, ref_val = log_records(ref_dir)
    assert sorted(ref) == list(range(8))
    for k in range(1, 8):
        d = tmp_path / f"resume{k}"
        d.mkdir()
        shutil.copy(ref_dir / f"model_{k:05d}.pt", d)
        out = _train(capsys, nano_args(shakespeare, d, "--checkpoint_interval", "1"))
        assert f"resuming from {d / f'model_{k:05d}.pt'} (step {k}" in out
        got, got_val = log_records(d)
        assert sorted(got) == list(range(k, 8))
        for s in got:  # bitwise: full-precision loss, gradient norm and learning rate
            assert got[s] == ref[s], (k, s, got[s], ref[s])
        assert all(got_val[s] == ref_val[s] for s in got_val)


def test_finished_run_does_nothing_and_more_steps_continue(shakespeare, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    _train(capsys, nano_args(shakespeare, tmp_path, steps_=4))
    out = _train(capsys, nano_args(shakespeare, tmp_path, steps_=4))
    assert "nothing to do" in out and "--allow_changed max_steps" in out and steps(out) == {}
    # A longer run re-plans the cosine: refused until the user says so, with what it does to the LR.
    with pytest.raises(SystemExit):
        main(nano_args(shakespeare, tmp_path, steps_=6))
    err = capsys.readouterr().err
    assert "--max_steps 4 (now 6)" in err and "--allow_changed max_steps" in err
    assert "the learning rate at step 4 becomes 0.001650 instead of 0.000300" in err
    out = _train(capsys, nano_args(shakespeare, tmp_path, "--allow_changed", "max_steps", steps_=6))
    assert set(steps(out)) == {4, 5} and "note: resuming with a change you allowed: --max_steps 4 (now 6)" in out
    assert steps(out)[4][1] == f"{get_lr(4, TrainConfig(max_lr=3e-3, warmup_steps=2, max_steps=6)):.6f}" == "0.001650"


def test_resume_with_another_model_is_an_error(shakespeare, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    _train(capsys, nano_args(shakespeare, tmp_path, steps_=2))
    args = nano_args(shakespeare, tmp_path, steps_=4)
    args[args.index("nano")] = "tiny"
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "model_00002.pt holds a different model than --model tiny" in err
    assert "n_layer=2 (now 4)" in err and "--log_dir" in err


def test_corrupt_latest_checkpoint_falls_back_with_a_warning(shakespeare, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    _train(capsys, nano_args(shakespeare, tmp_path, steps_=4))
    latest = tmp_path / "model_00004.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as a full disk would leave it
    capsys.readouterr()
    assert main(nano_args(shakespeare, tmp_path, "--allow_changed", "max_steps", steps_=6)) == 0
    out, err = capsys.readouterr()
    # One plain line naming the file (not Python's warnings module with its source line).
    assert re.search(r"^warning: checkpoint \S*model_00004.pt is unusable \(cannot be loaded safely \(truncated or "
                     r"corrupt: incomplete zip archive\)\); falling back to \S*model_00002.pt$",
                     err, re.M), err
    assert "UserWarning" not in err and "warnings.warn" not in err
    assert "resuming from" in out and "model_00002.pt (step 2" in out
    assert set(steps(out)) == {2, 3, 4, 5}


def test_nonfinite_updates_are_skipped_then_the_run_stops(shakespeare, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    from fastgpt.model import GPT

    real = GPT.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        logits, loss = real(self, *a, **k)
        calls["n"] += 1
        if self.training and calls["n"] > 4 and loss is not None:  # from step 2 on (2 micro-steps per step)
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(SystemExit) as e:
        main(nano_args(shakespeare, tmp_path, steps_=8))
    assert e.value.code == 1
    cap = capsys.readouterr()
    assert cap.out.count("skipped: non-finite loss or gradient norm") == 3
    assert "3 steps in a row had a non-finite loss" in cap.err and "--max_lr 0.0015" in cap.err


def test_cuda_oom_prints_the_advice(shakespeare, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    from fastgpt.model import GPT

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GPT, "forward", oom)
    with pytest.raises(SystemExit) as e:
        main(nano_args(shakespeare, tmp_path, steps_=2))
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "CUDA out of memory" in err and "--micro_batch_size" in err and "gradient accumulation" in err


def test_lr_schedule_warmup_then_cosine_to_a_tenth():
    cfg = TrainConfig(max_lr=6e-4, warmup_steps=100, max_steps=1000)
    assert get_lr(0, cfg) == pytest.approx(6e-6)
    assert get_lr(99, cfg) == pytest.approx(6e-4)
    assert get_lr(100, cfg) == pytest.approx(6e-4)
    assert get_lr(550, cfg) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))
    assert get_lr(1000, cfg) == pytest.approx(6e-5)
    lrs = [get_lr(s, cfg) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_grad_accumulation_and_indivisible_totals():
    assert grad_accum_steps(TrainConfig(), 1) == 8  # 32768 / (16 x 256)
    assert grad_accum_steps(TrainConfig(), 4) == 2
    with pytest.raises(Exception, match=r"30000 is not a multiple of .* = 4096. Values that divide: "
                                        r"--total_batch_size 28672 or 32768") as e:
        grad_accum_steps(TrainConfig(total_batch_size=30_000), 1)
    # Every value the hint suggests pastes back into the parser and divides.
    from fastgpt.train import parse_args
    import re

    for value in re.findall(r"--total_batch_size (\d[\d,]*)", str(e.value).split("Values that divide:")[1]):
        cfg, _ = parse_args(["--total_batch_size", value])
        assert grad_accum_steps(cfg, 1) >= 1
    with pytest.raises(Exception, match=r"--micro_batch_size 1 or 2 or 4"):
        grad_accum_steps(TrainConfig(total_batch_size=1024, micro_batch_size=16, seq_len=256), 1)


def test_torchrun_two_ranks_match_one_process(shakespeare, tmp_path):
    args = lambda d: nano_args(shakespeare, d, steps_=6)  # noqa: E731
    one = run_train(tmp_path, args(tmp_path / "one"))
    two = run_train(tmp_path, args(tmp_path / "two"), nproc=2)
    assert "2 rank(s)" in two.stdout and "1 rank(s)" in one.stdout
    assert two.stdout.count("using device: cpu") == 1  # rank 0 alone prints
    a, a_val = log_records(tmp_path / "one")
    b, b_val = log_records(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(6))
    for s in a:
        for x, y in zip(a[s], b[s]):
            assert math.isclose(x, y, rel_tol=1e-5), (s, a[s], b[s])
    assert a_val.keys() == b_val.keys() and all(math.isclose(a_val[s], b_val[s], rel_tol=1e-5) for s in a_val)
    ckpt = torch.load(tmp_path / "two" / "model_00006.pt")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])
    print(f"\n1 process vs 2 ranks, final loss {a[5][0]!r} vs {b[5][0]!r}")


def test_sigterm_finishes_the_step_checkpoints_and_exits_0(shakespeare, tmp_path):
    import signal
    import subprocess
    import sys

    from _train_util import env, write_entry

    script = write_entry(tmp_path)
    cmd = [sys.executable, str(script), *nano_args(shakespeare, tmp_path / "log", steps_=10_000)]
    cmd[cmd.index("--checkpoint_interval") + 1] = "10000"
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=tmp_path)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("step 2 |"):
            p.send_signal(signal.SIGTERM)
            break
    out, err = p.communicate(timeout=120)
    out = "".join(lines) + out
    assert p.returncode == 0, err
    done = max(steps(out)) + 1
    path = tmp_path / "log" / f"model_{done:05d}.pt"
    assert f"checkpoint saved to {path}" in out
    assert torch.load(path)["step"] == done
    assert "SIGTERM received" in err


def test_ctrl_c_mid_step_finishes_that_step_then_saves(shakespeare, tmp_path, capsys, monkeypatch):
    import os
    import signal

    add_nano(monkeypatch)
    from fastgpt.model import GPT

    real = GPT.forward
    calls = {"n": 0}

    def interrupt_in_step_3(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 7:  # first micro-step of step 3 (2 micro-steps per step)
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *a, **k)

    monkeypatch.setattr(GPT, "forward", interrupt_in_step_3)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest itself runs as a background job
    out = _train(capsys, nano_args(shakespeare, tmp_path, steps_=100))
    assert max(steps(out)) == 3  # step 3 completed, nothing after it
    path = tmp_path / "model_00004.pt"
    assert f"stopped at step 4: checkpoint saved to {path}" in out
    assert torch.load(path)["step"] == 4
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_keep_checkpoints_prunes_the_oldest(shakespeare, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    _train(capsys, nano_args(shakespeare, tmp_path, "--keep_checkpoints", "2", steps_=6))
    assert sorted(p.name for p in tmp_path.glob("model_*.pt")) == ["model_00004.pt", "model_00006.pt"]
