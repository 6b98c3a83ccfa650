"""Nothing lost, nothing silent: one run per log directory, damaged checkpoints, changed flags or data,
write failures, and a stop request during evaluation (issue 15, items 2, 3, 4, 7, 9)."""
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from _train_util import add_nano, env, nano_args, one_thread, steps, write_entry  # noqa: F401
from fastgpt import checkpoint as ck
from fastgpt.train import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_run(shakespeare, tmp_path_factory):
    """A finished 4-step nano run with checkpoints at steps 2 and 4."""
    from fastgpt.config import PRESETS, GPTConfig
    from _train_util import NANO

    d = tmp_path_factory.mktemp("base")
    PRESETS["nano"] = GPTConfig(**NANO)
    try:
        assert main(nano_args(shakespeare, d, steps_=4)) == 0
    finally:
        del PRESETS["nano"]
    return d


def copy_run(base_run, tmp_path):
    d = tmp_path / "log"
    shutil.copytree(base_run, d)
    return d


def run(capsys, args):
    """(exit code, stdout, stderr) of one in-process run."""
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------------------
# Item 3: damaged checkpoints fall back by name; all damaged is refused; --restart, --resume_from
# ------------------------------------------------------------------------------------------------
def _damage(path, how):
    if how == "empty":
        path.write_bytes(b"")
        return re.escape("empty file (0 bytes)")
    state = torch.load(path)
    if how == "missing_key":
        del state["optimizer"]
        torch.save(state, path)
        return "missing 'optimizer'"
    if how == "wrong_shape":
        state["model"]["transformer.wpe.weight"] = torch.zeros(3, 5)
        torch.save(state, path)
        return r"model weight transformer.wpe.weight has shape \(3, 5\), the model needs \(64, 32\)"
    if how == "nan_weights":
        state["model"]["lm_head.weight"][0, 0] = float("nan")
        torch.save(state, path)
        return "non-finite values"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["empty", "missing_key", "wrong_shape", "nan_weights"])
def test_damaged_newest_checkpoint_falls_back_by_name(base_run, tmp_path, capsys, monkeypatch, how):
    add_nano(monkeypatch)
    d = copy_run(base_run, tmp_path)
    why = _damage(d / "model_00004.pt", how)
    rc, out, err = run(capsys, nano_args(SH[0], d, steps_=4))
    assert rc == 0, err
    assert re.search(rf"^warning: checkpoint \S*model_00004.pt is unusable \(.*{why}.*\); falling back to "
                     rf"\S*model_00002.pt$", err, re.M), err
    assert "Traceback" not in err and f"resuming from {d / 'model_00002.pt'} (step 2" in out
    assert set(steps(out)) == {2, 3}
    assert ck.newest_healthy(d) == d / "model_00004.pt"  # rewritten by the resumed run


def test_healthy_checkpoints_skip_nonfinite_and_broken_ones(base_run, tmp_path):
    d = copy_run(base_run, tmp_path)
    assert [s for s, _ in ck.healthy_checkpoints(d)] == [4, 2]
    _damage(d / "model_00004.pt", "nan_weights")
    assert [s for s, _ in ck.healthy_checkpoints(d)] == [2] and ck.newest_healthy(d) == d / "model_00002.pt"
    _damage(d / "model_00002.pt", "empty")
    assert ck.newest_healthy(d) is None


def test_all_checkpoints_unusable_is_refused_then_restart_moves_them_aside(base_run, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    d = copy_run(base_run, tmp_path)
    _damage(d / "model_00004.pt", "empty")
    _damage(d / "model_00002.pt", "missing_key")
    before = {p.name: p.read_bytes() for p in d.glob("model_*.pt")}
    rc, out, err = run(capsys, nano_args(SH[0], d, steps_=4))
    assert rc == 1 and "Traceback" not in err
    assert f"error: no usable checkpoint in {d}" in err and "--restart" in err and "--resume_from" in err
    assert "model_00004.pt: empty file" in err and "model_00002.pt: incomplete checkpoint" in err
    assert steps(out) == {} and {p.name: p.read_bytes() for p in d.glob("model_*.pt")} == before  # untouched

    rc, out, err = run(capsys, nano_args(SH[0], d, "--restart", steps_=2))
    assert rc == 0, err
    moved = re.search(r"--restart: moved the previous run's files to (\S+); starting a new run", out)
    assert moved and set(steps(out)) == {0, 1}
    aside = d / os.path.basename(moved.group(1))
    assert {p.name: p.read_bytes() for p in aside.glob("model_*.pt")} == before and (aside / "log.txt").exists()
    assert sorted(p.name for p in d.glob("model_*.pt")) == ["model_00002.pt"]


def test_resume_from_a_named_checkpoint_moves_newer_ones_aside(base_run, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    d = copy_run(base_run, tmp_path)
    old4 = (d / "model_00004.pt").read_bytes()
    rc, out, err = run(capsys, nano_args(SH[0], d, "--resume_from", str(d / "model_00002.pt"), steps_=4))
    assert rc == 0, err
    assert f"resuming from {d / 'model_00002.pt'} (step 2" in out and set(steps(out)) == {2, 3}
    assert re.search(r"--resume_from: moved 1 checkpoint\(s\) at step >= 2 to \S+superseded_", out)
    assert sorted(p.name for p in d.glob("model_*.pt")) == ["model_00002.pt", "model_00004.pt"]
    assert [p.read_bytes() for p in d.glob("superseded_*/model_00004.pt")] == [old4]
    # A named checkpoint that is unusable is an error, not a fallback.
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    rc, _, err = run(capsys, nano_args(SH[0], d, "--resume_from", str(bad), steps_=5))
    assert rc == 1 and f"error: {bad}: empty file" in err


# ------------------------------------------------------------------------------------------------
# Item 4: changed flags or data are refused unless allowed
# ------------------------------------------------------------------------------------------------
def test_changed_flags_are_refused_unless_allowed(base_run, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    d = copy_run(base_run, tmp_path)
    (d / "model_00004.pt").unlink()  # resume from step 2 of 4
    args = nano_args(SH[0], d, "--max_lr", "1e-3", "--seed", "7", "--total_batch_size", "1024", steps_=4)
    rc, out, err = run(capsys, args)
    assert rc == 1 and steps(out) == {}
    for what in ("--max_lr 0.003 (now 0.001)", "--seed 1337 (now 7)", "--total_batch_size 512 (now 1024)",
                 "--allow_changed total_batch_size,max_lr,seed"):
        assert what in err, (what, err)
    rc, _, err = run(capsys, args + ["--allow_changed", "max_lr"])
    assert rc == 1 and "--allow_changed total_batch_size,seed" in err  # only what is still refused
    rc, _, err = run(capsys, nano_args(SH[0], d, "--allow_changed", "max_lr,colour", steps_=4))
    assert rc == 1 and "--allow_changed max_lr,colour: unknown colour" in err
    rc, out, err = run(capsys, args + ["--allow_changed", "max_lr,seed,total_batch_size"])
    assert rc == 0, err
    assert "note: resuming with a change you allowed: --max_lr 0.003 (now 0.001)" in out
    assert set(steps(out)) == {2, 3} and steps(out)[2][1] != "0.003000"
    assert torch.load(d / "model_00004.pt")["train_config"]["max_lr"] == 1e-3  # the new run's values from now on


def test_changed_data_is_refused_but_a_moved_copy_is_not(base_run, shakespeare, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    d = copy_run(base_run, tmp_path)
    (d / "model_00004.pt").unlink()
    same = tmp_path / "moved_data"
    shutil.copytree(shakespeare, same)
    rc, out, err = run(capsys, nano_args(same, d, steps_=4))  # the same shards elsewhere: fine
    assert rc == 0 and set(steps(out)) == {2, 3}, err
    (d / "model_00004.pt").unlink()
    changed = tmp_path / "changed_data"
    shutil.copytree(shakespeare, changed)
    tokens = np.load(changed / "train_00000.npy")
    tokens[len(tokens) // 2] = (int(tokens[len(tokens) // 2]) + 1) % 50257  # one token, same size
    np.save(changed / "train_00000.npy", tokens)
    rc, out, err = run(capsys, nano_args(changed, d, steps_=4))
    assert rc == 1 and steps(out) == {}
    assert "the training data changed" in err and "train shards changed: train_00000.npy" in err
    assert f"--data_root {shakespeare}, now {changed}" in err and "--allow_changed data" in err
    rc, out, err = run(capsys, nano_args(changed, d, "--allow_changed", "data", steps_=4))
    assert rc == 0 and set(steps(out)) == {2, 3}, err


# ------------------------------------------------------------------------------------------------
# Item 2: one run per log directory
# ------------------------------------------------------------------------------------------------
def test_a_second_run_on_a_log_dir_is_refused_and_a_crashed_holder_is_stale(shakespeare, tmp_path, capsys,
                                                                             monkeypatch):
    add_nano(monkeypatch)
    log = tmp_path / "log"
    cmd = [sys.executable, str(write_entry(tmp_path)), *nano_args(shakespeare, log, steps_=10_000)]
    cmd[cmd.index("--checkpoint_interval") + 1] = "10000"
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env(), cwd=tmp_path)
    try:
        for line in p.stdout:
            if line.startswith("step 1 |"):
                break
        rc, out, err = run(capsys, nano_args(shakespeare, log, steps_=2))
        assert rc == 1 and steps(out) == {}
        assert re.search(rf"error: --log_dir {re.escape(str(log))} is in use by another training run "
                         rf"\(pid {p.pid} on host \S+, started [\d\-T:]+\)", err), err
    finally:
        p.kill()  # kill -9: no chance to release anything
        p.wait(timeout=60)
    rc, out, err = run(capsys, nano_args(shakespeare, log, steps_=2))
    assert rc == 0, err
    assert f"note: took over {log / '.lock'} from a run that ended without releasing it (pid={p.pid}" in out
    assert (log / ".lock").read_text() == ""  # released at exit


# ------------------------------------------------------------------------------------------------
# Item 7: an unwritable --log_dir before step 0; a failed checkpoint write is one error line
# ------------------------------------------------------------------------------------------------
def test_log_dir_that_is_a_file_is_refused_before_step_0(shakespeare, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    f = tmp_path / "notadir"
    f.write_text("x")
    rc, out, err = run(capsys, nano_args(shakespeare, f, steps_=2))
    assert rc == 1 and steps(out) == {} and "Traceback" not in err
    assert f"error: --log_dir {f} is not a writable directory" in err


@pytest.mark.parametrize("exc, cause", [
    (OSError(28, "No space left on device"), "No space left on device"),
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4416 vs 4310"),
     "unexpected pos 4416 vs 4310"),
])
def test_failed_checkpoint_write_is_one_error_line(shakespeare, tmp_path, capsys, monkeypatch, exc, cause):
    add_nano(monkeypatch)
    real = torch.save

    def full_disk(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 4:
            f.write(b"partial")
            raise exc
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    rc, out, err = run(capsys, nano_args(shakespeare, tmp_path, steps_=6))
    assert rc == 1 and "Traceback" not in err and "enforce fail" not in err
    line = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(line) == 1, err
    assert line[0].startswith(f"error: could not write checkpoint {tmp_path / 'model_00004.pt'}: {cause}")
    assert f"the previous checkpoint {tmp_path / 'model_00002.pt'} is intact" in line[0]
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".pt" or ".tmp" in p.name) == ["model_00002.pt"]
    torch.load(tmp_path / "model_00002.pt")


# ------------------------------------------------------------------------------------------------
# Item 9: a stop request during evaluation stops at the next eval batch
# ------------------------------------------------------------------------------------------------
def test_signal_during_eval_stops_at_the_next_eval_batch(shakespeare, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    from fastgpt.model import GPT

    real = GPT.forward
    evals = {"n": 0}

    def signal_in_eval(self, *a, **k):
        if not self.training:
            evals["n"] += 1
            if evals["n"] == 1:
                os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)

    monkeypatch.setattr(GPT, "forward", signal_in_eval)
    args = nano_args(shakespeare, tmp_path, steps_=100)
    args[args.index("--eval_steps") + 1] = "60"
    rc, out, err = run(capsys, args)
    assert rc == 0, err
    assert evals["n"] == 1  # the other 59 eval batches were not run
    assert "evaluation at step 4 abandoned for the stop request (no val loss)" in out
    assert f"stopped at step 4: checkpoint saved to {tmp_path / 'model_00004.pt'}" in out
    assert torch.load(tmp_path / "model_00004.pt")["step"] == 4


SH = []


@pytest.fixture(autouse=True)
def _shakespeare_path(shakespeare):
    SH[:] = [shakespeare]


def test_unwritable_log_dir_is_refused_before_data_and_model(tmp_path, capsys):
    """The --log_dir check comes with the other flag checks, before data is read or a model built: here the data
    directory does not exist either, and the error names the log directory (before: the missing data)."""
    f = tmp_path / "notadir"
    f.write_text("x")
    for log_dir in (f, f / "sub"):
        with pytest.raises(SystemExit):
            main(["--data_root", str(tmp_path / "no_data"), "--log_dir", str(log_dir), "--max_steps", "1"])
        out, err = capsys.readouterr()
        assert err.strip() == (f"error: --log_dir {log_dir} is not a writable directory (Not a directory: {f}); "
                               f"pass a --log_dir you can write to"), err
        assert "model:" not in out and "shards" not in out


def test_changed_flags_against_a_finished_checkpoint_are_named(shakespeare, tmp_path, capsys, monkeypatch):
    """A checkpoint at --max_steps and a rerun with other settings: nothing trains, and the line says which
    settings differ from that run's (they would be refused if it trained) instead of a bare `nothing to do`."""
    add_nano(monkeypatch)
    rc, out, err = run(capsys, nano_args(shakespeare, tmp_path, steps_=2))
    assert rc == 0, err
    rc, out, err = run(capsys, nano_args(shakespeare, tmp_path, "--max_lr", "1e-3", "--seed", "7", steps_=2))
    assert rc == 0 and steps(out) == {}, err
    line = next(x for x in out.splitlines() if "nothing to do" in x)
    assert "settings differ from that run's: --max_lr 0.003 (now 0.001); --seed 1337 (now 7)" in line, line
    assert "unless --allow_changed max_lr,seed is given" in line, line
    rc, out, err = run(capsys, nano_args(shakespeare, tmp_path, steps_=2))  # the same flags: no note
    assert "nothing to do" in out and "differ" not in out
