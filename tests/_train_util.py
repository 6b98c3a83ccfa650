"""Shared by the data / training / checkpoint / CLI tests: the standard data file, a very small model
preset for fast runs, and a way to run the trainer in a fresh process (also under torchrun). Also the
in-process training loop the kernel tests compare Triton and PyTorch with."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The copy packaged with fastgpt: tests read nothing outside the repository.
SHAKESPEARE = ROOT / "fastgpt" / "assets" / "tinyshakespeare.txt"

# Two layers of width 32 over the full GPT-2 vocabulary (the shards hold GPT-2 ids): a step of
# 256 tokens takes a few tens of milliseconds, so resume tests can checkpoint every step.
NANO = dict(block_size=64, vocab_size=50257, n_layer=2, n_head=2, n_embd=32)

# A trainer entry that knows the "nano" preset; also a torchrun script.
ENTRY = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from fastgpt.config import PRESETS, GPTConfig
PRESETS["nano"] = GPTConfig(**{NANO!r})
from fastgpt.train import main
{{pre}}
sys.exit(main(sys.argv[1:]))
"""

STEP_RE = re.compile(r"^step (\d+) \| loss: (\S+) \| lr: (\S+) \| norm: (\S+) \| dt: \d+ms \| tok/s: [\d,]+", re.M)


def add_nano(monkeypatch) -> None:
    from fastgpt.config import PRESETS, GPTConfig

    monkeypatch.setitem(PRESETS, "nano", GPTConfig(**NANO))


def env() -> dict:
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)  # --kernels torch everywhere; no need for the interpreter
    e["OMP_NUM_THREADS"] = "1"  # torchrun's workers get 1 thread; single runs match it
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def write_entry(tmp_path: Path, pre: str = "") -> Path:
    script = tmp_path / "train_entry.py"
    script.write_text(ENTRY.replace("{pre}", pre))
    return script


def run_train(tmp_path: Path, args: list[str], pre: str = "", nproc: int = 1, timeout: int = 300, check=True,
              **popen) -> subprocess.CompletedProcess:
    script = write_entry(tmp_path, pre)
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), *args]
    else:
        cmd = [sys.executable, str(script), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(), cwd=tmp_path, **popen)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def steps(output: str) -> dict[int, tuple[str, str, str]]:
    """step -> (loss, lr, norm) strings as printed."""
    return {int(m.group(1)): m.group(2, 3, 4) for m in STEP_RE.finditer(output)}


def nano_args(data: Path, log: Path, *extra: str, steps_: int = 8) -> list[str]:
    return ["--data_root", str(data), "--log_dir", str(log), "--model", "nano", "--kernels", "torch",
            "--device", "cpu", "--total_batch_size", "512", "--micro_batch_size", "4", "--seq_len", "64",
            "--max_steps", str(steps_), "--warmup_steps", "2", "--max_lr", "3e-3", "--eval_interval", "4",
            "--eval_steps", "2", "--checkpoint_interval", "2", *extra]


def log_records(log_dir: Path) -> tuple[dict[int, tuple[float, float, float]], dict[int, float]]:
    """log.txt at full precision: ({step: (loss, norm, lr)}, {step: val_loss})."""
    train, val = {}, {}
    for line in (Path(log_dir) / "log.txt").read_text().splitlines():
        parts = line.split()
        if parts[1] == "train":
            train[int(parts[0])] = (float(parts[2]), float(parts[4]), float(parts[6]))
        else:
            val[int(parts[0])] = float(parts[2])
    return train, val


@pytest.fixture(scope="module", autouse=False)
def one_thread():
    """Run the module's in-process training on one thread: on a shared 2-core runner, two spinning
    OpenMP threads per process make small CPU steps several times slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_losses(cfg, batches, device="cpu", return_logits=True, lr=1e-3, grad_clip=None) -> list[float]:
    """Per-step losses of one AdamW step per (x, y) batch, from seed 0: two runs that differ only in
    which kernels they use must print the same losses."""
    from fastgpt import GPT

    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = model.configure_optimizers(weight_decay=0.1, lr=lr, device_type=device)
    losses = []
    for x, y in batches:
        _, loss = model(x.to(device), y.to(device), return_logits=return_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses
