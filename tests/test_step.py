"""The optimizer step of the training loop (fastgpt.train.Trainer.train_step and what surrounds it): one
host read per step, device-side skips of non-finite and spiking updates, fp16 with loss scaling, only
healthy checkpoints, the attention configs a run launched recorded and reused."""
import contextlib
import math
import re
import shutil
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from _train_util import SHAKESPEARE, log_records, nano_args, one_thread, steps  # noqa: F401
from fastgpt import data, train
from fastgpt.config import PRESETS, GPTConfig, TrainConfig
from fastgpt.train import Trainer, TrainError, choose_dtype, get_lr, main

pytestmark = pytest.mark.usefixtures("one_thread")

# Characters of Tiny Shakespeare as token ids (all < 128): a 2-layer model over 128 ids runs a step in
# milliseconds with torch and in about a second through the Triton interpreter.
MICRO = GPTConfig(block_size=32, vocab_size=128, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
    out = tmp_path_factory.mktemp("chars")
    ids = np.frombuffer(SHAKESPEARE.read_bytes()[:60_000], dtype=np.uint8).astype(np.uint16)
    assert ids.max() < 128
    np.save(out / "train_00000.npy", ids[:50_000])
    np.save(out / "val_00000.npy", ids[50_000:])
    return out


@pytest.fixture
def micro(monkeypatch):
    monkeypatch.setitem(PRESETS, "micro", MICRO)


def micro_cfg(data_root, log_dir, **kw) -> TrainConfig:
    base = dict(data_root=str(data_root), log_dir=str(log_dir), model="micro", kernels="torch", device="cpu",
                total_batch_size=128, micro_batch_size=4, seq_len=32, max_lr=3e-3, warmup_steps=2, max_steps=8,
                eval_interval=1000, eval_steps=2, checkpoint_interval=1000)
    return TrainConfig(**{**base, **kw})


def run(cfg: TrainConfig) -> int:
    return Trainer(cfg, set(TrainConfig.field_names())).run()


class CurrentStep:
    """Which optimizer step the trainer is in, for faults injected at given steps."""

    def __init__(self, monkeypatch):
        self.step = -1
        real = Trainer.train_step

        def tracked(trainer, step):
            self.step = step
            return real(trainer, step)

        monkeypatch.setattr(Trainer, "train_step", tracked)


def poison_loss(monkeypatch, at_steps, fn):
    """Replace the training loss by fn(loss) during the given optimizer steps."""
    from fastgpt.model import GPT

    now = CurrentStep(monkeypatch)
    real = GPT.forward

    def forward(self, *a, **k):
        logits, loss = real(self, *a, **k)
        if self.training and loss is not None and now.step in at_steps:
            loss = fn(loss)
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)


# ------------------------------------------------------------------------------------------------
# One host read per optimizer step
# ------------------------------------------------------------------------------------------------
HOST_READS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_reads(monkeypatch, host_resident=lambda: ()):
    """Count every call that reads a tensor's value on the host (on a GPU: a device->host sync), and
    torch.cuda.synchronize. Calls on tensors in host_resident() are skipped: tensors that live on the
    host on a GPU too (FusedAdamW's step counts), so reading them waits for nothing. The Triton
    interpreter reads its CPU tensors through data_ptr/numpy, so it adds nothing here."""
    calls: list[str] = []
    state = {"on": True}

    def wrap(owner, name):
        real = getattr(owner, name)

        def counted(*a, **k):
            f = sys._getframe(1)
            # kernels.linear_cross_entropy validates targets on the host only for CPU tensors (the
            # interpreter), where the host is the device; on CUDA that check is opt-in and off in training.
            cpu_only_check = f.f_code.co_name == "_check_targets"
            if state["on"] and not cpu_only_check and not (a and any(a[0] is t for t in host_resident())):
                calls.append(f"{name} at {f.f_code.co_filename}:{f.f_lineno}")
            return real(*a, **k)

        monkeypatch.setattr(owner, name, counted)

    for name in HOST_READS:
        wrap(torch.Tensor, name)
    wrap(torch.cuda, "synchronize")
    try:
        yield calls, state
    finally:
        state["on"] = False  # the wrappers stay until monkeypatch's teardown, counting nothing


def fused_adamw_steps(trainer):
    """FusedAdamW's step counts: CPU tensors on a GPU too (its bias corrections are computed on the host)."""
    if type(trainer.optimizer).__name__ != "FusedAdamW":
        return lambda: ()
    return lambda: [st["step"] for st in trainer.optimizer.state.values() if "step" in st]


@pytest.mark.parametrize("kernels,accum", [("torch", 1), ("torch", 4), ("triton", 2)])
def test_one_host_read_per_optimizer_step(chars, tmp_path, micro, monkeypatch, kernels, accum):
    """Steps 1..N of run()'s loop (step 0 fills one-time caches; evals and checkpoints are excluded, they
    come every N steps) read the device once per step, whatever the accumulation count: the read of
    loss, norm and flags after the update."""
    n = 2 if kernels == "triton" else 6
    cfg = micro_cfg(chars, tmp_path, kernels=kernels, total_batch_size=accum * 2 * 16, micro_batch_size=2,
                    seq_len=16, max_steps=1 + n, eval_steps=1)
    trainer = Trainer(cfg, set(TrainConfig.field_names()))
    with count_host_reads(monkeypatch, fused_adamw_steps(trainer)) as (calls, state):
        state["on"] = False
        real_step, real_eval, real_save = trainer.train_step, trainer.log_eval, trainer.save

        def step(s):
            state["on"] = s >= 1
            return real_step(s)

        def paused(fn):
            def call(*a):
                state["on"] = False
                return fn(*a)
            return call

        trainer.train_step, trainer.log_eval, trainer.save = step, paused(real_eval), paused(real_save)
        assert trainer.run() == 0
    assert trainer.accum == accum
    if kernels == "triton":
        import kernels as k

        assert k.launches("adamw") > 0 and k.launches("layer_norm_fwd") > 0  # the kernels really ran
    print(f"\n{kernels}, {accum} micro-steps: {len(calls)} host reads in {n} steps, from {sorted(set(calls))}")
    assert len(calls) <= n, calls


def test_ddp_stop_flag_rides_on_the_loss_all_reduce(tmp_path):
    """SIGTERM to rank 1 alone, mid-step: its flag reaches rank 0 through that step's all-reduce, both ranks
    stop after the same step with one checkpoint, and no rank read the device more than once per step."""
    from _train_util import run_train

    pre = """
import atexit, os, signal, torch
from fastgpt.model import GPT
from fastgpt.train import Trainer
_real, _calls = GPT.forward, [0]
def _forward(self, *a, **k):
    if self.training and os.environ["RANK"] == "1":
        _calls[0] += 1
        if _calls[0] == 5:  # step 4 (one micro-step per rank and step)
            os.kill(os.getpid(), signal.SIGTERM)
    return _real(self, *a, **k)
GPT.forward = _forward
_reads, _on, _steps = [], [False], set()
def _counted(real, name):
    def call(*a, **k):
        if _on[0]:
            _reads.append(name)
        return real(*a, **k)
    return call
for _name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__"):
    setattr(torch.Tensor, _name, _counted(getattr(torch.Tensor, _name), _name))
def _step(real):
    def call(self, step):  # steps 1, 2, ... count until an eval or checkpoint pauses it
        _on[0] = step >= 1
        _steps.add(step)
        return real(self, step)
    return call
def _paused(real):
    def call(self, *a):
        _on[0] = False
        return real(self, *a)
    return call
Trainer.train_step = _step(Trainer.train_step)
Trainer.log_eval, Trainer.save = _paused(Trainer.log_eval), _paused(Trainer.save)
atexit.register(lambda: print(f"rank {os.environ['RANK']}: {len(_reads)} host reads in {len(_steps) - 1} steps"))
"""
    shards = tmp_path / "data"
    data.prepare_shakespeare(SHAKESPEARE, shards)
    r = run_train(tmp_path, nano_args(shards, tmp_path / "log", "--eval_interval", "100", "--checkpoint_interval",
                                      "100", steps_=50), pre=pre, nproc=2)
    assert max(steps(r.stdout)) == 4
    assert f"stopped at step 5: checkpoint saved to {tmp_path / 'log' / 'model_00005.pt'}" in r.stdout
    assert "SIGTERM received" in r.stderr
    assert torch.load(tmp_path / "log" / "model_00005.pt")["step"] == 5
    for rank in (0, 1):
        assert f"rank {rank}: 4 host reads in 4 steps" in r.stdout, r.stdout


def test_generation_reads_the_prompt_once(monkeypatch):
    from fastgpt import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**MICRO.__dict__, "kernels": "torch"})).eval()
    idx = torch.randint(0, 128, (1, 5))
    with count_host_reads(monkeypatch) as (calls, _):
        out = model.generate(idx, 40, temperature=1.0, top_k=10)  # past block_size: the window slides
    assert out.shape == (1, 45)
    assert len(calls) == 1, calls  # the prompt's range check; none per generated token
    with pytest.raises(ValueError, match="128 is outside the vocabulary"):
        model.generate(torch.full((1, 3), 128), 2)
    assert model.check_ids  # restored after generation


# ------------------------------------------------------------------------------------------------
# Skipped updates: non-finite, fp16 overflow, spikes
# ------------------------------------------------------------------------------------------------
def snapshot(trainer):
    params = [p.detach().clone() for p in trainer.raw.parameters()]
    state = [{k: v.clone() for k, v in st.items()} for st in trainer.optimizer.state.values()]
    return params, state


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and len(a[1]) == len(b[1]) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a[1], b[1]))


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_nonfinite_step_leaves_weights_and_optimizer_state_unchanged(chars, tmp_path, micro, kernels):
    cfg = micro_cfg(chars, tmp_path, kernels=kernels, total_batch_size=32, micro_batch_size=2, seq_len=16)
    trainer = Trainer(cfg, set(TrainConfig.field_names()))
    trainer.wrap_model()
    assert trainer.train_step(0).skip == ""
    before = snapshot(trainer)
    trainer.params[3].register_hook(lambda g: g * float("nan"))  # one NaN gradient
    r = trainer.train_step(1)
    assert r.skip == "nonfinite" and not math.isfinite(r.norm) and "weights unchanged" in r.note
    assert same(before, snapshot(trainer))  # weights, moments and step counts, bitwise
    assert trainer.recent_losses == [trainer.recent_losses[0]]  # a skipped loss does not enter the guard


def test_fp16_overflow_is_the_scalers_skip_and_does_not_stop_the_run(chars, tmp_path, micro, monkeypatch, capsys):
    class InfGrad(torch.autograd.Function):  # the value passes; its gradient overflows
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    poison_loss(monkeypatch, {2, 3, 4, 5}, InfGrad.apply)  # more in a row than MAX_NONFINITE
    assert run(micro_cfg(chars, tmp_path, dtype="fp16", max_steps=8, checkpoint_interval=8)) == 0
    out = capsys.readouterr().out
    assert "dtype: fp16 with loss scaling" in out
    lines = {int(line.split()[1]): line for line in out.splitlines() if line.startswith("step ")}
    scales = [float(lines[s].rsplit("loss scale now ", 1)[1]) for s in (2, 3, 4, 5)]
    assert scales == [32768.0, 16384.0, 8192.0, 4096.0]  # GradScaler halves its scale per overflow
    assert all("skipped by the fp16 loss scaler" in lines[s] for s in (2, 3, 4, 5))
    assert not any("| skipped" in lines[s] for s in (0, 1, 6, 7))
    ckpt = torch.load(tmp_path / "model_00008.pt")
    assert ckpt["scaler"]["scale"] == 4096.0 and ckpt["train_config"]["dtype"] == "fp16"


def test_fp16_tiny_learns_and_resumes_bit_exactly(tmp_path, capsys, monkeypatch):
    shards = tmp_path / "data"
    data.prepare_shakespeare(SHAKESPEARE, shards)
    args = lambda d: ["--data_root", str(shards), "--log_dir", str(d), "--model", "tiny", "--kernels", "torch",  # noqa
                      "--device", "cpu", "--dtype", "fp16", "--total_batch_size", "128", "--micro_batch_size", "1",
                      "--seq_len", "128", "--max_steps", "20", "--warmup_steps", "5", "--max_lr", "3e-3",
                      "--eval_interval", "20", "--eval_steps", "2", "--checkpoint_interval", "10"]
    assert main(args(tmp_path / "ref")) == 0
    ref, ref_val = log_records(tmp_path / "ref")
    first, last = ref[0][0], sum(ref[s][0] for s in range(15, 20)) / 5
    print(f"\ntiny under fp16 autocast + GradScaler, 20 steps: loss {first:.4f} -> {last:.4f}")
    assert first - last > 1.5, (first, last)
    ckpt = torch.load(tmp_path / "ref" / "model_00010.pt")
    assert ckpt["scaler"]["scale"] > 0 and "_growth_tracker" in ckpt["scaler"]
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "ref" / "model_00010.pt", tmp_path / "resumed")
    capsys.readouterr()
    assert main(args(tmp_path / "resumed")) == 0
    assert "resuming from" in capsys.readouterr().out
    got, got_val = log_records(tmp_path / "resumed")
    assert sorted(got) == list(range(10, 20))
    assert all(got[s] == ref[s] for s in got), [(s, got[s], ref[s]) for s in got if got[s] != ref[s]]
    assert got_val == ref_val


def test_spike_is_skipped_logged_and_resumes_exactly(chars, tmp_path, micro, monkeypatch, capsys):
    monkeypatch.setattr(train.options, "SPIKE_MIN_HISTORY", 3)
    poison_loss(monkeypatch, {6}, lambda loss: loss * 10)
    cfg = micro_cfg(chars, tmp_path / "ref", max_steps=9, checkpoint_interval=1)
    assert run(cfg) == 0
    out = capsys.readouterr().out
    ref, _ = log_records(tmp_path / "ref")
    line = next(x for x in out.splitlines() if x.startswith("step 6 |"))
    assert "skipped: loss spike, above 3 x the recent mean" in line and "weights unchanged" in line
    assert ref[6][0] > 3 * sum(ref[s][0] for s in range(6)) / 6
    assert out.count("| skipped") == 1
    # Step 6's loss was too high for model_00006.pt's weights to be called healthy, but the update was skipped:
    # step 7 sees the same weights (and a sane loss), so the file is not moved aside as wrecked.
    assert "is not healthy" not in out and not list((tmp_path / "ref").glob("*.unhealthy"))
    # The skipped update changed nothing: the same checkpoint contents before and after step 6.
    a, b = torch.load(tmp_path / "ref" / "model_00006.pt"), torch.load(tmp_path / "ref" / "model_00007.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert b["guard"]["recent_losses"] == a["guard"]["recent_losses"] and b["guard"]["skips_in_row"] == {"spike": 1}
    # Resumed before the spike, the guard has the same history and skips the same step.
    for k in (4, 6, 7):
        d = tmp_path / f"resume{k}"
        d.mkdir()
        shutil.copy(tmp_path / "ref" / f"model_{k:05d}.pt", d)
        assert run(micro_cfg(chars, d, max_steps=9, checkpoint_interval=1)) == 0
        got, _ = log_records(d)
        assert all(got[s] == ref[s] for s in got) and sorted(got) == list(range(k, 9)), k


def test_a_skipped_spike_defers_the_checkpoint_judgement_to_the_same_weights_next_step(chars, tmp_path, micro,
                                                                                      monkeypatch, capsys):
    """model_00006.pt is judged by step 6's loss, a spike the guard skipped: step 7 sees the same weights, and its
    sane loss confirms the file. When the run later stops on repeated spikes (steps 8-10), the advice names
    model_00006.pt, not model_00004.pt (what judging by the spike alone would leave as the newest healthy)."""
    monkeypatch.setattr(train.options, "SPIKE_MIN_HISTORY", 3)
    poison_loss(monkeypatch, {6, 8, 9, 10}, lambda loss: loss * 10)
    with pytest.raises(TrainError) as e:
        run(micro_cfg(chars, tmp_path, max_steps=20, checkpoint_interval=2))
    out = capsys.readouterr().out
    assert "skipped: loss spike" in next(x for x in out.splitlines() if x.startswith("step 6 |"))
    assert "3 steps in a row had a loss spike" in str(e.value)
    assert f"--resume_from {tmp_path / 'model_00006.pt'} " in str(e.value), str(e.value)
    assert not list(tmp_path.glob("*.unhealthy"))  # finite spikes the guard skipped move nothing aside


def test_repeated_spikes_stop_with_the_advice(chars, tmp_path, micro, monkeypatch, capsys):
    monkeypatch.setattr(train.options, "SPIKE_MIN_HISTORY", 3)
    poison_loss(monkeypatch, {5, 6, 7}, lambda loss: loss * 10)
    with pytest.raises(TrainError) as e:
        run(micro_cfg(chars, tmp_path, max_steps=12, checkpoint_interval=4))
    msg = str(e.value)
    assert "3 steps in a row had a loss spike (above 3 x the recent mean loss)" in msg
    assert "--max_lr 0.0015" in msg and f"--resume_from {tmp_path / 'model_00004.pt'}" in msg
    assert "--spike_guard 0" in msg


def test_spike_guard_off_and_bad_values(chars, tmp_path, micro, monkeypatch, capsys):
    monkeypatch.setattr(train.options, "SPIKE_MIN_HISTORY", 3)
    poison_loss(monkeypatch, {5}, lambda loss: loss * 10)
    assert run(micro_cfg(chars, tmp_path, max_steps=7, spike_guard=0)) == 0
    assert "| skipped" not in capsys.readouterr().out
    for bad in (1.0, -2.0, float("nan")):
        with pytest.raises(TrainError, match="--spike_guard must be 0 \\(off\\) or a factor above 1"):
            Trainer(micro_cfg(chars, tmp_path, spike_guard=bad), set())


# ------------------------------------------------------------------------------------------------
# Healthy checkpoints only
# ------------------------------------------------------------------------------------------------
def finite_state(ckpt) -> bool:
    tensors = list(ckpt["model"].values()) + [t for st in ckpt["optimizer"]["state"].values() for t in st.values()]
    return all(bool(torch.isfinite(t).all()) for t in tensors) and (
        ckpt["val_loss"] is None or math.isfinite(ckpt["val_loss"]))


def test_weight_blowup_writes_no_checkpoint_and_names_the_healthy_one(chars, tmp_path, micro, monkeypatch, capsys):
    """Weights blown up (finite, 1e30) by the update of step 5: the loss and val loss turn non-finite, no
    checkpoint is written from then on, --keep_checkpoints 1 keeps the last healthy one, and the abort
    message names it and how to resume from it."""
    real = Trainer.apply_update

    def blow_up(trainer, skip):
        real(trainer, skip)
        if trainer.optimizer.state and len(trainer.recent_losses) == 5:  # the update of step 5
            with torch.no_grad():
                for p in trainer.raw.parameters():
                    p.mul_(1e30)

    monkeypatch.setattr(Trainer, "apply_update", blow_up)
    with pytest.raises(TrainError) as e:
        run(micro_cfg(chars, tmp_path, max_steps=20, eval_interval=2, checkpoint_interval=2, keep_checkpoints=1))
    out = capsys.readouterr().out
    assert "saved checkpoint" in out and "not writing a checkpoint at step" in out
    assert [p.name for p in tmp_path.glob("model_*.pt")] == ["model_00004.pt"]
    assert finite_state(torch.load(tmp_path / "model_00004.pt"))
    healthy = tmp_path / "model_00004.pt"
    val4 = torch.load(healthy)["val_loss"]  # read now: the resumed run below retires this file (keep 1)
    assert f"The newest healthy one is {healthy}" in out
    assert f"resume from the newest healthy checkpoint, {healthy}" in str(e.value)
    assert f"--resume_from {healthy}" in str(e.value)
    # The advice, pasted: it resumes from that checkpoint with the lower learning rate.
    monkeypatch.setattr(Trainer, "apply_update", real)
    import re
    import shlex

    from fastgpt.train import parse_args

    advice = re.search(r"run the same command with (--resume_from \S+ --max_lr \S+ --allow_changed max_lr)\.",
                       str(e.value)).group(1)
    flags, given = parse_args(shlex.split(advice))
    cfg = micro_cfg(chars, tmp_path, max_steps=20, eval_interval=2, checkpoint_interval=2, keep_checkpoints=1)
    assert run(replace(cfg, **{k: getattr(flags, k) for k in given})) == 0
    resumed = capsys.readouterr().out
    assert f"resuming from {healthy} (step 4" in resumed
    # the val loss it shows is labelled with the step it was measured at (step 4's eval, before the save)
    assert f"resuming from {healthy} (step 4, val loss {val4:.4f} at step 4)" in resumed


def test_sample_of_wrecked_weights_is_skipped_not_a_crash():
    """A sample due right after an update that wrecked finite weights (--max_lr 1e6 from a checkpoint, sample
    every 5 steps: the logits overflow, the probabilities are NaN) is skipped with a line, so the run goes on
    to the checkpoint judgement and the divergence advice instead of ending in torch.multinomial's traceback."""
    from types import SimpleNamespace

    from fastgpt.model import GPT
    from fastgpt.train.report import Reporter

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16, kernels="torch"))
    lines = []
    hook = SimpleNamespace(cfg=SimpleNamespace(sample_prompt="ROMEO:", sample_tokens=4, seed=0), raw=model,
                           log=lines.append, runlog=None)
    Reporter.sample(hook, 5)
    assert lines[-1].startswith("sample at step 5:\nROMEO:"), lines
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e30)
    Reporter.sample(hook, 6)
    assert lines[-1].startswith("sample at step 6 skipped: the model's next-token probabilities are not finite"), lines


def test_max_lr_1e6_never_writes_a_checkpoint(chars, tmp_path, micro, capsys):
    with pytest.raises(TrainError) as e:
        run(micro_cfg(chars, tmp_path, max_lr=1e6, max_steps=20, eval_interval=1, checkpoint_interval=1,
                      keep_checkpoints=1))
    assert not list(tmp_path.glob("model_*.pt"))
    assert "no healthy checkpoint was written yet" in str(e.value)
    assert "not writing a checkpoint at step 1" in capsys.readouterr().out


def test_checkpoint_named_healthy_is_judged_by_the_weights_it_holds(chars, tmp_path, micro, capsys):
    """--max_lr 1e6 from a good checkpoint: the update of step 4 wrecks finite weights, model_00005.pt is
    written from them (its step's loss, 10.8-ish, came from the weights before). Step 5's loss, computed
    with those weights, rejects it; --keep_checkpoints 1 still keeps model_00004.pt (confirmed), the stop
    message names that one with a sane --max_lr, and the pasted advice resumes into the pre-divergence loss."""
    import re
    import shlex

    from fastgpt.train import parse_args

    base = dict(checkpoint_interval=1, keep_checkpoints=1, max_steps=20)
    # From scratch (the repro): model_00001.pt holds wrecked weights; it must not be called healthy.
    with pytest.raises(TrainError) as e:
        run(micro_cfg(chars, tmp_path / "fresh", max_lr=1e6, **base))
    assert "model_00001.pt" not in str(e.value) and "no healthy checkpoint was written yet" in str(e.value)
    assert "model_00001.pt is not healthy: its weights give loss" in capsys.readouterr().out

    d = tmp_path / "run"
    assert run(micro_cfg(chars, d, **{**base, "max_steps": 4})) == 0
    before, _ = log_records(d)
    good = d / "model_00004.pt"
    with pytest.raises(TrainError) as e:
        run(replace(micro_cfg(chars, d, max_lr=1e6, **base), allow_changed="max_steps,max_lr"))
    msg = str(e.value)
    assert f"--resume_from {good} " in msg, msg
    assert good.exists() and finite_state(torch.load(good))
    # The rejected one is kept aside, where a plain rerun (which resumes from the newest) does not find it.
    assert sorted(p.name for p in d.glob("model_*")) == ["model_00004.pt", "model_00005.pt.unhealthy"]
    assert "model_00005.pt is not healthy: its weights give loss" in capsys.readouterr().out
    # The lr of the update that made model_00004.pt (under its own run's schedule), not 1e6 / 2.
    assert f"--max_lr {get_lr(3, micro_cfg(chars, d, **{**base, 'max_steps': 4})):g} --allow_changed" in msg, msg
    advice = re.search(r"run the same command with (--resume_from \S+ --max_lr \S+ --allow_changed \S+)\.",
                       msg).group(1)
    flags, given = parse_args(shlex.split(advice))
    # The pasted --allow_changed replaces the command's own: it keeps max_steps (the checkpoint's run had 4)
    # and adds max_lr once, so the command with the advice pasted is accepted as it stands.
    assert flags.allow_changed == "max_steps,max_lr", advice
    cfg = micro_cfg(chars, d, max_lr=1e6, allow_changed="max_steps,max_lr", **{**base, "max_steps": 8})
    assert run(replace(cfg, **{k: getattr(flags, k) for k in given})) == 0
    after, _ = log_records(d)
    assert abs(after[4][0] - before[3][0]) < 0.5, (before, after)  # resumed into the pre-divergence loss
    assert all(math.isfinite(after[s][0]) and after[s][0] < before[0][0] for s in range(4, 8)), after


def test_finite_wrecked_checkpoint_is_moved_aside_so_a_plain_rerun_skips_it(chars, tmp_path, micro, monkeypatch,
                                                                           capsys):
    """model_00004.pt's weights give a finite loss 1e6 x too high (as --max_lr 1e6 leaves them: 1.6e12 on
    GPT-2's vocabulary) and step 4's update is applied (spike guard off). The file is renamed .unhealthy, so
    the same command run again resumes from the confirmed model_00003.pt, not from the wrecked weights."""
    from fastgpt.model import GPT

    real = GPT.forward
    poison_loss(monkeypatch, {4}, lambda loss: loss * 1e6)
    cfg = micro_cfg(chars, tmp_path, max_steps=5, checkpoint_interval=1, keep_checkpoints=1, spike_guard=0)
    assert run(cfg) == 0
    monkeypatch.setattr(GPT, "forward", real)
    out = capsys.readouterr().out
    wrecked = tmp_path / "model_00004.pt"
    assert f"{wrecked} is not healthy: its weights give loss" in out and f"moved to {wrecked}.unhealthy" in out
    assert "not writing a checkpoint at step 5" in out  # the update from that loss is not trusted either
    assert sorted(p.name for p in tmp_path.glob("model_*")) == ["model_00003.pt", "model_00004.pt.unhealthy"]
    # The same command again resumes from the confirmed checkpoint and finishes the run.
    assert run(cfg) == 0
    assert f"resuming from {tmp_path / 'model_00003.pt'} (step 3" in capsys.readouterr().out
    assert (tmp_path / "model_00005.pt").exists()


def test_resume_advice_keeps_the_runs_own_allow_changed():
    """The advice's --allow_changed, pasted, replaces the command's: it must still allow what the command did
    (a raised --max_steps, new data) plus max_lr, each name once, or the pasted command is refused."""
    from fastgpt.train.guard import resume_advice

    def allowed(own):
        return resume_advice("log/model_00004.pt", "log", "0.003", own).rsplit("--allow_changed ", 1)[1]

    assert allowed("") == "max_lr"
    assert allowed("max_steps") == "max_steps,max_lr"
    assert allowed("--max_steps, data") == "max_steps,data,max_lr"
    assert allowed("max_lr,seed") == "max_lr,seed"
    assert "start over" in resume_advice(None, "log", "0.003", "max_steps")


def test_nonfinite_optimizer_state_is_not_saved(chars, tmp_path, micro, capsys):
    trainer = Trainer(micro_cfg(chars, tmp_path, max_steps=2), set(TrainConfig.field_names()))
    trainer.wrap_model()
    trainer.train_step(0)
    assert trainer.unhealthy() is None
    next(iter(trainer.optimizer.state.values()))["exp_avg_sq"][0] = float("inf")
    assert trainer.unhealthy() == "non-finite values in optimizer exp_avg_sq of tensor 0"
    assert trainer.save(1) is None and not list(tmp_path.glob("model_*.pt"))


# ------------------------------------------------------------------------------------------------
# Precision choice
# ------------------------------------------------------------------------------------------------
def test_dtype_rule():
    assert choose_dtype("auto", "cuda", bf16_supported=True) == "bf16"  # Ampere and newer
    assert choose_dtype("auto", "cuda", bf16_supported=False) == "fp16"  # T4, V100: loss-scaled fp16
    assert choose_dtype("auto", "cpu") == "fp32"
    for d in ("bf16", "fp16", "fp32"):
        assert choose_dtype(d, "cpu") == d
        assert choose_dtype(d, "cuda", bf16_supported=True) == d
    assert choose_dtype("fp16", "cuda", bf16_supported=False) == "fp16"
    with pytest.raises(TrainError, match=r"--dtype bf16: Tesla T4 \(compute capability 7.5\) has no bf16 support.*"
                                         r"--dtype fp16"):
        choose_dtype("bf16", "cuda", bf16_supported=False, gpu="Tesla T4 (compute capability 7.5)")
    with pytest.raises(TrainError, match="--dtype must be one of auto, bf16, fp16, fp32"):
        choose_dtype("fp8", "cpu")


def test_dtype_rule_agrees_with_the_kernels_arch_plan():
    """bf16 support is compute capability >= 8.0; kernels.arch_plan(capability) names the same default."""
    import kernels

    if not hasattr(kernels, "arch_plan"):
        pytest.skip("kernels has no arch_plan yet")
    for cap in [(7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]:
        assert choose_dtype("auto", "cuda", bf16_supported=cap >= (8, 0)) == kernels.arch_plan(cap).dtype, cap


def test_dtype_flag(capsys):
    cfg, given = train.parse_args(["--dtype", "fp16", "--spike_guard", "2.5"])
    assert cfg.dtype == "fp16" and cfg.spike_guard == 2.5 and {"dtype", "spike_guard"} <= given
    with pytest.raises(SystemExit):
        train.parse_args(["--dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


def test_bf16_autocast_on_cpu_when_asked(chars, tmp_path, micro, capsys):
    assert run(micro_cfg(chars, tmp_path, dtype="bf16", max_steps=2)) == 0
    out = capsys.readouterr().out
    assert "dtype: bf16" in out and "loss scaling" not in out


# ------------------------------------------------------------------------------------------------
# Attention configs: recorded in the checkpoint, installed on resume
# ------------------------------------------------------------------------------------------------
TABLE = [{"kernel": "fwd", "arch": "sm_90", "head_dim": 64, "dtype": "bf16", "t_bucket": 1024, "causal": True,
          "BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3, "max_head_dim": 128}]


def test_attention_configs_go_into_the_checkpoint_and_back(chars, tmp_path, micro, monkeypatch, capsys):
    import kernels

    installed = []
    monkeypatch.setattr(kernels, "attention_configs", lambda: [dict(e) for e in TABLE], raising=False)
    monkeypatch.setattr(kernels, "install_attention_configs", lambda t: installed.append(t) or len(t),
                        raising=False)
    assert run(micro_cfg(chars, tmp_path, max_steps=2, checkpoint_interval=2)) == 0
    assert torch.load(tmp_path / "model_00002.pt")["attention_configs"] == TABLE
    assert not installed
    capsys.readouterr()
    assert run(micro_cfg(chars, tmp_path, max_steps=3, checkpoint_interval=3, allow_changed="max_steps")) == 0
    assert installed == [TABLE]
    assert "attention: launching the 1 kernel configs recorded in the checkpoint" in capsys.readouterr().out


def test_recorded_attention_configs_reach_the_launcher(chars, tmp_path, micro, monkeypatch):
    """With the real kernels API (kernels.attention_configs / install_attention_configs): the interpreter's
    launches are recorded, saved, and on resume installed for the launcher."""
    import kernels

    if not hasattr(kernels, "install_attention_configs"):
        pytest.skip("kernels has no attention-config API yet")
    kernels.clear_attention_configs()
    cfg = micro_cfg(chars, tmp_path, kernels="triton", total_batch_size=32, micro_batch_size=2, seq_len=16,
                    max_steps=1, checkpoint_interval=1)
    assert run(cfg) == 0
    saved = torch.load(tmp_path / "model_00001.pt")["attention_configs"]
    assert saved and {e["kernel"] for e in saved} == {"fwd", "dkdv", "dq"}
    # Another valid forward tile than the interpreter's default, so what the launcher used is visible.
    ckpt = torch.load(tmp_path / "model_00001.pt")
    for e in ckpt["attention_configs"]:
        if e["kernel"] == "fwd":
            e["BLOCK_M"], e["BLOCK_N"] = 16, 16
    torch.save(ckpt, tmp_path / "model_00001.pt")
    saved = ckpt["attention_configs"]
    kernels.clear_attention_configs()
    seen = []
    real = kernels.install_attention_configs
    monkeypatch.setattr(kernels, "install_attention_configs", lambda t: seen.append(t) or real(t))
    assert run(micro_cfg(chars, tmp_path, kernels="triton", total_batch_size=32, micro_batch_size=2, seq_len=16,
                         max_steps=2, checkpoint_interval=2, allow_changed="max_steps")) == 0
    assert seen == [saved]
    assert kernels.attention_configs() == saved  # the resumed process launched exactly those
    kernels.clear_attention_configs()


def test_kernel_warm_up_runs_every_kernel_of_a_step_and_changes_nothing(chars, tmp_path, micro):
    """With Triton kernels (the interpreter here; a GPU compiles them there), the warm-up before step 0 launches
    every kernel a step launches: forward and backward, FusedAdamW's update (skipped on the device by its flag)
    and evaluation's loss-only cross-entropy (a no_grad forward). Weights, optimizer state and the RNG are left
    as they were, so the losses after it equal those of a run without it, bit for bit."""
    import kernels as k

    from fastgpt.train import setup

    cfg = micro_cfg(chars, tmp_path, kernels="triton", total_batch_size=32, micro_batch_size=2, seq_len=16)
    names = ("layer_norm_fwd", "layer_norm_bwd", "gelu_fwd", "gelu_bwd", "attention_fwd", "cross_entropy", "adamw")

    def losses(warm: bool) -> list[float]:
        trainer = Trainer(cfg, set(TrainConfig.field_names()))
        trainer.wrap_model()
        if warm:
            params = [p.detach().clone() for p in trainer.raw.parameters()]
            modes, real = [], trainer.core.forward

            def forward(*a, **kw):
                modes.append((trainer.core.training, torch.is_grad_enabled()))
                return real(*a, **kw)

            trainer.core.forward = forward
            before = {n: k.launches(n) for n in names}
            setup.warm_up_kernels(trainer.plan, trainer.device, trainer.model, trainer.core, trainer.strategy,
                                  trainer.optimizer, trainer.skipped_update, lambda *a: None)
            del trainer.core.forward
            assert {n: k.launches(n) - before[n] > 0 for n in names} == dict.fromkeys(names, True)
            assert modes == [(True, True), (False, False)]  # a training forward/backward, then an eval forward
            assert all(torch.equal(p, q) for p, q in zip(params, trainer.raw.parameters()))
            for st in trainer.optimizer.state.values():  # FusedAdamW's state, if the skipped step made one
                assert int(st.get("step", 0)) == 0
                assert all(not t.any() for n, t in st.items() if n != "step" and isinstance(t, torch.Tensor))
            assert all(p.grad is None for p in trainer.raw.parameters())
        return [trainer.train_step(s).loss for s in range(2)]

    assert losses(warm=True) == losses(warm=False)
