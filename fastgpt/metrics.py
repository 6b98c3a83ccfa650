"""What a run writes about itself: `log/log.txt`, `log/metrics.jsonl`, the ETA and MFU of the step line.

log.txt keeps its format (`12 train <loss> norm <norm> lr <lr>`, `25 val <loss>`) at full precision;
metrics.jsonl holds one JSON object per event with every number the step line prints:

    {"type": "train", "step": 12, "tokens": 12288, "loss": ..., "lr": ..., "norm": ..., "dt": ..., "tok_s": ...}
    {"type": "val", "step": 25, "tokens": 25600, "loss": ...}
    {"type": "hellaswag", "step": 25, "tokens": 25600, "acc": ..., "acc_norm": ..., "examples": ...}
    {"type": "sample", "step": 25, "tokens": 25600, "prompt": ..., "text": ...}

`step` of a train record is the step index the log line prints (0-based): its loss is measured with the
weights after `step` updates, on a batch not yet trained on. Val, HellaSwag and sample records carry the
number of updates done when they were taken, which is also the step of the checkpoint written right
after. So every record's `step` counts the updates behind its numbers, and `tokens` is that many steps'
tokens: curves of train and val loss line up on either axis.

Writing: every record is one `os.write` of a complete line to the file opened with O_APPEND, so a process
killed at any moment leaves whole lines (a torn last line, possible only if the machine itself goes
down, is dropped on the next start). Both files are fsynced whenever a checkpoint is written and at the
end of the run, so whatever a checkpoint covers is on disk with it.

Resume: a run resumed from the checkpoint after k steps first rewrites both files (atomically) to what
the run had logged up to that checkpoint: train records of steps < k and the other records of steps <= k.
Lines a killed run wrote after its last checkpoint, or a newer checkpoint that a fallback skipped, would
otherwise appear twice; with this the files hold exactly one record per step.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

LOG_TXT = "log.txt"
METRICS = "metrics.jsonl"

# torch.cuda.get_device_name() fragments -> (HBM bytes/s, dense bf16 tensor-core FLOP/s), for the training log's MFU
# and bench's roofline and report; the longest fragment in the name wins
# ("GH200" over "H200", "L40S" over "L40" over "L4", "H100 PCIe" over "H100").
KNOWN_GPUS = [
    ("H100 PCIe", (2.0e12, 756e12)),
    ("H100 NVL", (3.9e12, 835e12)),
    ("H100", (3.35e12, 989e12)),  # "NVIDIA H100 80GB HBM3" is the SXM part
    ("H200", (4.8e12, 989e12)),
    ("GH200", (4.0e12, 989e12)),
    ("A100-SXM4-40GB", (1.555e12, 312e12)),
    ("A100-PCIE-40GB", (1.555e12, 312e12)),
    ("A100 80GB PCIe", (1.935e12, 312e12)),
    ("A100", (2.039e12, 312e12)),
    ("L40S", (0.864e12, 362e12)),
    ("L40", (0.864e12, 181e12)),
    ("L4", (0.3e12, 121e12)),
    ("A10", (0.6e12, 125e12)),
    ("RTX 4090", (1.008e12, 165e12)),
    ("RTX 3090", (0.936e12, 71e12)),
]


def gpu_peaks(name: str) -> tuple[float, float] | None:
    """(HBM bytes/s, bf16 FLOP/s) for a torch.cuda.get_device_name(), or None if unknown."""
    hits = [(len(frag), peaks) for frag, peaks in KNOWN_GPUS if _contains_word(name, frag)]
    return max(hits, key=lambda h: h[0])[1] if hits else None


def _contains_word(name: str, frag: str) -> bool:
    """`frag` in `name`, case-insensitive, not running on into a letter or digit: "L4" is in "NVIDIA L4"
    but not in "NVIDIA L40S", "A10" not in "A100"."""
    name, frag = name.lower(), frag.lower()
    start = name.find(frag)
    while start >= 0:
        end = start + len(frag)
        if end == len(name) or not name[end].isalnum():
            return True
        start = name.find(frag, start + 1)
    return False


def peak_flops(device) -> float | None:
    """This GPU's dense bf16 peak in FLOP/s (or $FASTGPT_PEAK_TFLOPS), else None: no MFU is printed."""
    env = os.environ.get("FASTGPT_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    import torch

    if getattr(device, "type", device) != "cuda" or not torch.cuda.is_available():
        return None
    peaks = gpu_peaks(torch.cuda.get_device_name(device))
    return peaks[1] if peaks else None


def fmt_duration(seconds: float) -> str:
    """3725.2 -> '1h02m05s', 65 -> '1m05s', 7.4 -> '7s'."""
    s = int(round(max(0.0, seconds)))
    h, m, s = s // 3600, s // 60 % 60, s % 60
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


class Progress:
    """Elapsed wall time and the ETA of the remaining steps from a moving average of step times.

    The first step of a process is left out of the average: it includes warm-up (allocations,
    torch.compile, Triton's compile cache) that later steps do not pay."""

    def __init__(self, start_step: int, max_steps: int, window: int = 20):
        self.t0 = time.perf_counter()
        self.first = start_step
        self.max_steps = max_steps
        self.dts: deque[float] = deque(maxlen=window)

    def update(self, step: int, dt: float) -> None:
        if step > self.first:
            self.dts.append(dt)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self, step: int) -> float | None:
        """Seconds left after step `step` (0-based) is done; None until a step time is known."""
        left = self.max_steps - step - 1
        if left <= 0:
            return 0.0
        if not self.dts:
            return None
        return left * sum(self.dts) / len(self.dts)

    def fields(self, step: int) -> str:
        eta = self.eta(step)
        return f"elapsed: {fmt_duration(self.elapsed)} | eta: {'?' if eta is None else fmt_duration(eta)}"


def _step_of(line: str) -> tuple[str, int] | None:
    """(kind, step) of a log.txt line, None for a line that does not parse (a torn write)."""
    parts = line.split()
    if len(parts) < 3 or not parts[0].isdigit():
        return None
    return parts[1], int(parts[0])


def _record_of(line: str) -> tuple[str, int] | None:
    try:
        rec = json.loads(line)
        return str(rec["type"]), int(rec["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _keep(kind: str, step: int, resume_step: int) -> bool:
    # A train record is written for step s before the step-(s+1) checkpoint; evals, samples and
    # HellaSwag after k steps come before the checkpoint after k steps.
    return step < resume_step if kind == "train" else step <= resume_step


def _rewrite(path: Path, resume_step: int, parse) -> int:
    """Keep the lines of `path` that the resumed run had logged; returns how many were dropped."""
    if not path.exists():
        return 0
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
    kept = []
    for line in lines:
        key = parse(line) if line.endswith("\n") else None  # a line without its newline is torn
        if key is not None and _keep(*key, resume_step):
            kept.append(line)
    if len(kept) == len(lines):
        return 0
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(lines) - len(kept)


class RunLog:
    """log.txt and metrics.jsonl of one run (rank 0 only); see the module docstring."""

    def __init__(self, log_dir: str | Path, resume_step: int, tokens_per_step: int):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tokens_per_step = tokens_per_step
        self.txt_path, self.jsonl_path = self.dir / LOG_TXT, self.dir / METRICS
        self.dropped = _rewrite(self.txt_path, resume_step, _step_of) + _rewrite(self.jsonl_path, resume_step,
                                                                                 _record_of)

    @staticmethod
    def _write(path: Path, line: str) -> None:
        # Opened per record (a few microseconds): no descriptor outlives a run, however it ends.
        data = line.encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            n = os.write(fd, data)
        finally:
            os.close(fd)
        if n != len(data):  # regular files take all of it or raise; a short write means a full disk
            raise OSError(f"{path}: short write ({n} of {len(data)} bytes): is the disk full?")

    def _record(self, kind: str, step: int, tokens_step: int, **values) -> None:
        rec = {"type": kind, "step": step, "tokens": tokens_step * self.tokens_per_step, **values}
        # NaN/inf are written as null: JSON has no spelling for them and every reader chokes on NaN.
        rec = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in rec.items()}
        self._write(self.jsonl_path, json.dumps(rec, ensure_ascii=False) + "\n")

    def train(self, step: int, loss: float, norm: float, lr: float, dt: float, **extra) -> None:
        self._write(self.txt_path, f"{step} train {loss!r} norm {norm!r} lr {lr!r}\n")
        self._record("train", step, step, loss=loss, lr=lr, norm=norm, dt=dt,
                     tok_s=self.tokens_per_step / dt if dt > 0 else None, **extra)

    def val(self, done: int, loss: float) -> None:
        self._write(self.txt_path, f"{done} val {loss!r}\n")
        self._record("val", done, done, loss=loss)

    def hellaswag(self, done: int, result: dict) -> None:
        self._record("hellaswag", done, done, acc=result["acc"], acc_norm=result["acc_norm"],
                     examples=result["examples"])

    def sample(self, done: int, prompt: str, text: str) -> None:
        self._record("sample", done, done, prompt=prompt, text=text)

    def sync(self) -> None:
        for path in (self.txt_path, self.jsonl_path):
            if path.exists():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl (or of DIR/metrics.jsonl); a torn last line is skipped."""
    p = Path(path)
    if p.is_dir():
        p = p / METRICS
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such metrics file (a run writes LOG_DIR/{METRICS})")
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class Counter:
    """A progress display for long preparations: tqdm on a terminal, a line every few seconds otherwise."""

    def __init__(self, total: int | None, desc: str, unit: str = "it", stream=None, every_s: float = 10.0):
        self.stream = stream or sys.stderr
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n = 0
        self._bar = None
        self._last = time.monotonic()
        self._t0 = self._last
        if getattr(self.stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit=unit, file=self.stream)
            except ImportError:
                pass

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            self._print()

    def _print(self) -> None:
        of = f"/{self.total:,}" if self.total is not None else ""
        print(f"{self.desc}: {self.n:,}{of} {self.unit} ({fmt_duration(time.monotonic() - self._t0)})",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._print()
