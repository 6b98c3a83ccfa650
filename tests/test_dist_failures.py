"""Under torchrun: a frozen rank ends the job with a message naming the step and rank (item 5), and what a
SIGTERM to the launcher does (item 6). Two gloo ranks on CPU, bounded by seconds."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _train_util import env, nano_args, write_entry

# Each worker writes its pid to pid_RANK so the test can signal one of them.
PIDFILE = "import os; open(f'pid_{os.environ[\"RANK\"]}', 'w').write(str(os.getpid()))"


def torchrun(tmp_path, args):
    script = write_entry(tmp_path, PIDFILE)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=tmp_path,
                            start_new_session=True)


def wait_for_step(p, n: int) -> list[str]:
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith(f"step {n} |"):
            return lines
    raise AssertionError("".join(lines) + p.stderr.read())


def test_frozen_rank_ends_the_job_naming_step_and_rank(shakespeare, tmp_path):
    args = nano_args(shakespeare, tmp_path / "log", "--dist_timeout", "4", steps_=10_000)
    args[args.index("--checkpoint_interval") + 1] = "10000"
    p = torchrun(tmp_path, args)
    frozen = None
    try:
        wait_for_step(p, 2)
        frozen = int((tmp_path / "pid_1").read_text())
        os.kill(frozen, signal.SIGSTOP)
        t0 = time.monotonic()
        err = []
        for line in p.stderr:  # rank 0 gives up after --dist_timeout; torchrun then tears the job down
            err.append(line)
            if line.startswith("error: rank 0"):
                break
        waited = time.monotonic() - t0
    finally:
        if frozen:
            os.kill(frozen, signal.SIGKILL)
        os.killpg(p.pid, signal.SIGKILL) if p.poll() is None and frozen is None else None
        p.wait(timeout=120)
    line = err[-1]
    print(f"\n{line.strip()} (after {waited:.1f} s)")
    assert re.match(r"error: rank 0 waited more than 4 s \(--dist_timeout\) for the other ranks in a collective at "
                    r"step (\d+); rank 1 \(last finished step (\d+)\) has not responded for \d+ s\. A rank is frozen",
                    line), "".join(err)
    assert 4 <= waited < 60
    assert p.returncode != 0


TRAINING_DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"  # "Resuming safely"


@pytest.mark.parametrize("target", ["launcher", "workers"])
def test_sigterm_under_torchrun_saves_once_and_exits_as_readme_says(shakespeare, tmp_path, target):
    """torchrun forwards a signal it gets to the workers (they finish the step, save once, exit 0), then
    re-raises it itself: a SignalException traceback and exit 1, which is torchrun's own behaviour and
    what docs/training.md says. A SIGTERM to the workers themselves ends the job with exit 0."""
    args = nano_args(shakespeare, tmp_path / "log", steps_=10_000)
    args[args.index("--checkpoint_interval") + 1] = "10000"
    p = torchrun(tmp_path, args)
    try:
        lines = wait_for_step(p, 2)
        if target == "launcher":  # `kill PID`, a scheduler, or Ctrl+C in a terminal (which reaches torchrun only)
            p.send_signal(signal.SIGTERM)
        else:
            for r in (0, 1):
                os.kill(int((tmp_path / f"pid_{r}").read_text()), signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    out = "".join(lines) + out
    saved = re.findall(r"^stopped at step (\d+): checkpoint saved to (\S+)\. Run the same command to resume\.$", out,
                       re.M)
    assert len(saved) == 1, out + err  # rank 0 writes one checkpoint, once
    step, path = saved[0]
    assert torch.load(path)["step"] == int(step)
    assert [q.name for q in (tmp_path / "log").glob("*.pt")] == [Path(path).name]
    assert "ChildFailedError" not in err  # no worker failed
    readme = " ".join(TRAINING_DOC.read_text().split())
    if target == "launcher":
        assert p.returncode == 1
        launcher = re.search(r"torch\.distributed\.elastic\.multiprocessing\.api\.SignalException: "
                             r"Process \d+ got signal: 15", err)
        assert launcher, err
        # docs/training.md quotes the launcher's last line and its exit code.
        assert "SignalException: Process PID got signal: 15" in readme and "torchrun itself exits 1" in readme
    else:
        assert p.returncode == 0, err
        assert "SIGTERM to the worker processes" in readme and "exits 0" in readme
