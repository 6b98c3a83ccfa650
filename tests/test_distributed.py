"""--shard ddp|zero1|fsdp and --activation_checkpointing on CPU (gloo, torchrun, 2 ranks): the same losses as
DDP and as one process, checkpoints that are the same full plain state whatever made them, resuming across
modes and world sizes, fastgpt's Triton kernels inside sharded models, and the per-rank memory model."""
import json
import math
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from _train_util import NANO, ROOT, env, log_records, nano_args, one_thread, run_train, steps  # noqa: F401
from fastgpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 20
CKPT = 5  # checkpoints at 5, 10, 15 and 20
# nano with a 1,001-token vocabulary: steps of a few ms, and the embedding's 1,001 rows split unevenly
PICO = dict(NANO, vocab_size=1001)
PRE = f"PRESETS['pico'] = GPTConfig(**{PICO!r})"


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    """Token shards the nano model can learn: 200 random 17-token phrases in random order."""
    out = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    phrases = rng.integers(0, PICO["vocab_size"], (200, 17))
    stream = phrases[rng.integers(0, 200, 3_000)].reshape(-1).astype(np.uint16)
    np.save(out / "train_00000.npy", stream[:45_000])
    np.save(out / "val_00000.npy", stream[45_000:])
    return out


def _args(data, log, *extra, steps_=STEPS):
    # 512 tokens per step of 2 x 64-token micro-batches: 2 micro-steps per rank at 2 ranks (gradient
    # accumulation under every mode), 4 in one process
    a = nano_args(data, log, "--checkpoint_interval", str(CKPT), *extra, steps_=steps_)
    a[a.index("nano")] = "pico"
    a[a.index("--micro_batch_size") + 1] = "2"
    return a


def _run(tmp_path, args, nproc=1):
    return run_train(tmp_path, args, pre=PRE, nproc=nproc)


RUNS = {  # name -> (ranks, extra flags)
    "one": (1, ()),
    "ddp": (2, ("--shard", "ddp")),
    "zero1": (2, ("--shard", "zero1")),
    "fsdp": (2, ("--shard", "fsdp")),
}


@pytest.fixture(scope="module")
def runs(tokens, tmp_path_factory):
    """Each run of RUNS for 20 steps: {name: (log dir, stdout)}."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, (nproc, extra) in RUNS.items():
        r = _run(root, _args(tokens, root / name, *extra), nproc=nproc)
        out[name] = (root / name, r.stdout)
    return out


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel)


def test_zero1_and_fsdp_losses_equal_ddp_over_20_steps(runs):
    ref, ref_val = log_records(runs["ddp"][0])
    one, one_val = log_records(runs["one"][0])
    assert sorted(ref) == list(range(STEPS))
    assert "sharding: fsdp over 2 ranks" in runs["fsdp"][1] and "sharding: zero1 over 2 ranks" in runs["zero1"][1]
    printed = {name: steps(out) for name, (_, out) in runs.items()}
    print("\nstep | " + " | ".join(printed))
    for s in range(STEPS):
        print(f"{s:4d} | " + " | ".join(printed[n][s][0] for n in printed))
    for name in ("one", "zero1", "fsdp"):
        got, got_val = log_records(runs[name][0])
        assert sorted(got) == list(range(STEPS)), name
        for s in range(STEPS):
            loss, norm, lr = got[s]
            assert _close(loss, ref[s][0]), (name, s, loss, ref[s][0])
            assert lr == ref[s][2], (name, s)
            assert _close(norm, ref[s][1]), (name, s, norm, ref[s][1])
        assert got_val.keys() == ref_val.keys() and all(_close(got_val[k], ref_val[k]) for k in ref_val), name
    assert all(_close(one[s][0], ref[s][0]) for s in ref)


def _plain_gpt(path: Path) -> tuple[GPT, dict]:
    ckpt = torch.load(path, weights_only=True)
    model = GPT(GPTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])  # strict: every key, nothing extra
    return model, ckpt


def test_checkpoints_are_the_same_full_plain_state_whatever_the_mode(runs):
    import kernels

    for step in (CKPT, STEPS):
        _, ref = _plain_gpt(runs["ddp"][0] / f"model_{step:05d}.pt")
        for name in ("one", "zero1", "fsdp"):
            path = runs[name][0] / f"model_{step:05d}.pt"
            model, ckpt = _plain_gpt(path)
            nproc, flags = RUNS[name]
            assert ckpt["step"] == step and ckpt["shard"] == (flags[1] if flags else "ddp")
            assert ckpt["world_size"] == nproc
            assert ckpt["loader"] == ref["loader"], (name, ckpt["loader"], ref["loader"])  # the global position
            # one tensor for the tied wte / lm_head, as a single process saves it
            assert ckpt["model"]["lm_head.weight"].data_ptr() == ckpt["model"]["transformer.wte.weight"].data_ptr()
            # zero1 keeps DDP's gradients: the very same values. One process sums its 4 micro-batches'
            # gradients in another order than 2 ranks x 2 micro-steps do, and fsdp reduce-scatters every
            # micro-step: rounding differences (measured: < 3e-6 after 20 steps)
            tol = dict(rtol=0, atol=0) if name == "zero1" else dict(rtol=1e-4, atol=1e-5)
            for k, v in ref["model"].items():
                torch.testing.assert_close(ckpt["model"][k], v, **tol, msg=f"{name} {k}")
            osd = ckpt["optimizer"]
            assert osd["param_groups"] == ref["optimizer"]["param_groups"], name
            assert osd["state"].keys() == ref["optimizer"]["state"].keys(), name
            for i, st in ref["optimizer"]["state"].items():
                for k, v in st.items():
                    assert osd["state"][i][k].shape == v.shape, (name, i, k)
                    torch.testing.assert_close(osd["state"][i][k], v, **tol, msg=f"{name} {i} {k}")
            # loads into torch's AdamW and fastgpt's FusedAdamW on one process
            groups = model.configure_optimizers(0.1, 1e-3).param_groups
            for cls in (torch.optim.AdamW, kernels.FusedAdamW):
                opt = cls([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups])
                opt.load_state_dict(osd)
                p = groups[0]["params"][0]
                assert torch.equal(opt.state[p]["exp_avg"], osd["state"][0]["exp_avg"])


def test_resume_across_modes_and_world_sizes_continues_as_one_uninterrupted_run(runs, tokens, tmp_path):
    """fsdp@2 saves at step 5 -> one process (ddp) resumes to 20 -> from its step 10, fsdp@2 with activation
    checkpointing resumes to 20, and from its step 15 zero1@2: every segment has the losses of the
    uninterrupted one-process run, its data continuing where the checkpoint left it."""
    ref, ref_val = log_records(runs["one"][0])
    chain = [("ddp1", runs["fsdp"][0], CKPT, 1, ()),
             ("fsdp2_ac", tmp_path / "ddp1", 2 * CKPT, 2, ("--shard", "fsdp", "--activation_checkpointing")),
             ("zero1_2", tmp_path / "ddp1", 3 * CKPT, 2, ("--shard", "zero1"))]
    for name, src, start, nproc, extra in chain:
        d = tmp_path / name
        d.mkdir()
        shutil.copy(src / f"model_{start:05d}.pt", d)
        out = _run(tmp_path, _args(tokens, d, *extra), nproc=nproc).stdout
        assert f"resuming from {d / f'model_{start:05d}.pt'} (step {start}" in out
        got, val = log_records(d)
        assert sorted(got) == list(range(start, STEPS)), name
        for s in got:
            assert _close(got[s][0], ref[s][0]), (name, s, got[s], ref[s])
        assert val and all(_close(val[k], ref_val[k]) for k in val), name
        _plain_gpt(d / f"model_{STEPS:05d}.pt")


def test_activation_checkpointing_gives_identical_losses_and_gradients_and_keeps_no_block_internals():
    torch.manual_seed(0)
    cfg = GPTConfig(**PICO, kernels="torch")
    base = GPT(cfg)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, cfg.vocab_size, (2, 32), generator=g),
                torch.randint(0, cfg.vocab_size, (2, 32), generator=g)) for _ in range(3)]
    results = {}
    for ac in (False, True):
        model = GPT(cfg)
        model.load_state_dict(base.state_dict())
        model.activation_checkpointing = ac
        opt = model.configure_optimizers(0.1, 3e-3)
        # elements autograd keeps for the backward, inside transformer blocks and elsewhere
        where, saved = ["outside"], {"inside": 0, "outside": 0}
        for block in model.transformer.h:
            block.register_forward_pre_hook(lambda m, a: where.__setitem__(0, "inside"))
            block.register_forward_hook(lambda m, a, o: where.__setitem__(0, "outside"))

        def pack(t):
            saved[where[0]] += t.numel()
            return t

        losses, grads = [], []
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            where[0] = "outside"  # a recompute in the backward stops early, before the block's forward hook
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                _, loss = model(x, y, return_logits=False)
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            losses.append(loss.item())
        results[ac] = losses, grads, saved
    assert results[True][0] == results[False][0]  # bitwise
    for ga, gb in zip(results[True][1], results[False][1]):
        assert all(torch.equal(a, b) for a, b in zip(ga, gb))
    # With checkpointing the graph keeps nothing from inside the blocks, only each block's input (B, T, C),
    # and the inside is recomputed in the backward; everything else is kept as before.
    without, with_ = results[False][2], results[True][2]
    inputs = len(batches) * cfg.n_layer * batches[0][0].numel() * cfg.n_embd
    assert with_["inside"] == 0 and with_["outside"] == without["outside"] + inputs, (with_, without)
    assert without["inside"] > 10 * inputs, without


def test_shard_flag_choices_and_one_process(tokens, tmp_path, capsys, monkeypatch):
    from fastgpt.config import PRESETS
    from fastgpt.train import main

    monkeypatch.setitem(PRESETS, "pico", GPTConfig(**PICO))
    with pytest.raises(SystemExit) as e:
        main(["--shard", "zero3"])
    assert e.value.code == 2 and "invalid choice: 'zero3'" in capsys.readouterr().err
    rc = main(_args(tokens, tmp_path, "--shard", "fsdp", "--activation_checkpointing", steps_=2))
    out = capsys.readouterr().out
    assert rc == 0 and "--shard fsdp with a single process: nothing to shard" in out
    assert sorted(steps(out)) == [0, 1]
    assert "--shard {ddp,zero1,fsdp}" in subprocess.run(
        [sys.executable, "-m", "fastgpt.train", "--help"], capture_output=True, text=True, env=env()).stdout


def test_triton_kernels_and_fused_adamw_inside_fsdp_and_zero1():
    """kernels.FusedAdamW steps FSDP2's DTensor shards (one launch per step) and serves as ZeRO-1's
    optimizer_class; the model's Triton ops see plain tensors inside the FSDP2 model (interpreter, 2 ranks)."""
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(Path(__file__).with_name("_sharded_kernels.py"))],
                       capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print(f"\n{res}")
    assert res["fsdp_param_is_dtensor"] == "DTensor"
    assert all(n > 0 for n in res["fsdp_kernel_launches"].values()), res["fsdp_kernel_launches"]
    assert res["fsdp_adamw_launches"] == res["fsdp_classes"] and set(res["fsdp_classes"]) <= {1, 2}
    assert res["zero1_adamw_launches"] == [1, 1, 1]  # rank 0's partition, one launch each step
    for mode in ("fsdp", "zero1"):
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(res[f"{mode}_fused"], res[f"{mode}_torch"]))
        assert res[f"{mode}_param_maxdiff"] < 1e-4


def test_ranks_that_resume_from_different_steps_stop_with_a_clear_error(runs, tokens, tmp_path):
    """As on two machines whose --log_dir is not shared: rank 1 finds no checkpoint, rank 0 finds step 20."""
    shutil.copy(runs["one"][0] / f"model_{STEPS:05d}.pt", tmp_path)
    pre = PRE + ("\nimport os\nimport fastgpt.checkpoint as c\nif os.environ['RANK'] == '1':\n"
                 "    c.load_latest = lambda *a, **k: (None, None)")
    r = run_train(tmp_path, _args(tokens, tmp_path, "--shard", "fsdp", "--allow_changed", "max_steps",
                                  steps_=STEPS + 2), pre=pre, nproc=2, check=False)
    assert r.returncode != 0
    assert "ranks resumed from different steps (from 0 to 20)" in r.stderr and "--log_dir" in r.stderr
    assert 'fastgpt/train/' not in r.stderr  # no traceback from the trainer (torchrun prints its own)


def test_memory_model_per_rank(tmp_path, capsys):
    """bench.memory --shard: fsdp holds 1/world of the weights, gradients and AdamW state (FSDP2 on fake
    tensors), zero1 1/world of the AdamW state; activation checkpointing lowers every peak."""
    from bench import memory

    out = tmp_path / "ranks.json"
    assert memory.main(["--model", "tiny", "--batch", "2", "--seq", "128", "--shard", "fsdp", "--world", "2",
                        "--activation_checkpointing", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| fsdp | 2 | yes |" in text and "Per-rank memory model: tiny" in text
    rows = {(r["world"], r["activation_checkpointing"]): r for r in json.loads(out.read_text())}
    rows[(4, False)] = asdict(memory.run_rank("fsdp", "tiny", 2, 128, 4))
    ddp = memory.run_rank("ddp", "tiny", 2, 128, 1)
    zero1 = memory._sharded_from(ddp, "zero1", 4)
    size = memory.MODELS["tiny"]
    n = memory.gpt2_params(size["n_layer"], size["n_embd"])
    opt = ddp.breakdown["Optstate"]
    assert opt == pytest.approx(8 * n, rel=1e-4)  # allocations rounded to 512 bytes
    assert zero1.breakdown["Optstate"] == opt - opt * 3 // 4 and zero1.peak_bytes == ddp.peak_bytes - opt * 3 // 4
    for world in (2, 4):
        b = rows[(world, False)]["breakdown"]
        # FSDP2 pads each tensor's dim 0 to a multiple of world: within 1% of an exact 1/world
        assert b["Sharded Param"] == pytest.approx(4 * n / world, rel=0.01)
        assert b["OptState"] == pytest.approx(8 * n / world, rel=0.01)
        assert rows[(world, False)]["peak_bytes"] < ddp.peak_bytes
    assert rows[(2, True)]["peak_bytes"] < rows[(2, False)]["peak_bytes"]
    assert rows[(4, False)]["peak_bytes"] < rows[(2, False)]["peak_bytes"]


def test_cpu_defaults_keep_their_steps_on_several_ranks(tokens, monkeypatch):
    """`torchrun --nproc_per_node=2 train.py` on a CPU: the preset's 1,024-token steps, 4 sequences per rank;
    where its 8 sequences do not split over the ranks, one per rank and a larger step, said in the notice."""
    from fastgpt.train.options import parse_args
    from fastgpt.train.plan import Env, resolve

    for world, micro, total in ((1, 8, 1024), (2, 4, 1024), (8, 1, 1024), (16, 1, 2048)):
        cfg, given = parse_args(["--data_root", str(tokens)])
        plan = resolve(cfg, given, Env(world=world))
        assert (plan.cfg.total_batch_size, plan.cfg.micro_batch_size, plan.accum) == (total, micro, 1)
        if total != 1024:
            assert any("does not split over 16 ranks" in n for n in plan.notes), plan.notes


def test_hellaswag_in_training_is_refused_under_fsdp_with_several_ranks(tmp_path):
    """FSDP2's forward is collective and HellaSwag's per-rank shards differ in length, so training would
    hang: the flags are refused before anything starts (checked on the trainer's flag check alone)."""
    from fastgpt.config import TrainConfig
    from fastgpt.train import TrainError
    from fastgpt.train.plan import check_watch_flags

    fixture = Path(__file__).parent / "data" / "hellaswag_fixture.jsonl"
    cfg = TrainConfig(hellaswag_interval=5, hellaswag_data=str(fixture), shard="fsdp")
    with pytest.raises(TrainError, match="--hellaswag_interval does not run under --shard fsdp"):
        check_watch_flags(cfg, GPTConfig(), 2)
    for shard, world in (("ddp", 2), ("zero1", 2), ("fsdp", 1)):
        _, examples = check_watch_flags(TrainConfig(hellaswag_interval=5, hellaswag_data=str(fixture), shard=shard),
                                        GPTConfig(), world)
        assert examples


def test_kernel_warm_up_runs_under_fsdp(tmp_path, monkeypatch):
    """The warm-up (one dummy forward/backward, a skipped update and an eval forward before step 0) skips the
    gradient sync only where the Strategy defers it: an FSDP2 module has no no_sync, and the warm-up raised
    AttributeError there on several GPUs. Run on CPU (gloo, one rank) under the fsdp Strategy."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from fastgpt.config import TrainConfig
    from fastgpt.parallel import FSDP, fully_shard_gpt
    from fastgpt.train.plan import RunPlan
    from fastgpt.train.setup import warm_up_kernels

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        model = GPT(GPTConfig(**PICO, kernels="torch"))
        fully_shard_gpt(model, init_device_mesh("cpu", (1,)), None)
        assert not hasattr(model, "no_sync")
        plan = RunPlan(TrainConfig(micro_batch_size=2, seq_len=16), frozenset(), "cpu", 0, 0, 1, "pico",
                       model.config, 1, 2, "fp32", 0)
        logs, skips = [], []
        warm_up_kernels(plan, torch.device("cpu"), model, model, FSDP(2), torch.optim.SGD(model.parameters(), lr=0.1),
                        lambda skip: skips.append(bool(skip)), logs.append)
        assert all(p.grad is None for p in model.parameters())  # the dummy batch's gradients are dropped
        assert skips == [True]  # the update ran with its skip flag set
        assert logs and logs[-1].startswith("kernel warm-up")
    finally:
        dist.destroy_process_group()


def test_strategies_are_the_package_modules_strategy_classes(tmp_path, monkeypatch):
    """STRATEGIES holds exactly the Strategy subclasses the package's modules define, in --shard order; a new
    module file in a package is picked up by the same discovery, with nothing else to edit."""
    import importlib
    import inspect
    import pkgutil
    import sys

    from fastgpt import parallel
    from fastgpt.parallel import common

    defined = {}
    for info in pkgutil.iter_modules(parallel.__path__):
        mod = importlib.import_module(f"fastgpt.parallel.{info.name}")
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, parallel.Strategy) and cls.__module__ == mod.__name__ and cls.__dict__.get("name"):
                defined[cls.name] = cls
    assert parallel.STRATEGIES == defined
    assert tuple(parallel.STRATEGIES) == parallel.SHARD_MODES == ("ddp", "zero1", "fsdp")

    pkg = tmp_path / "morepar"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tp.py").write_text("from fastgpt.parallel import Strategy\n\n\nclass TP(Strategy):\n"
                               "    name = 'tp'\n    order = 3\n    sharded_state = ('Gradient', 'Optstate')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(common, "REGISTRY", dict(common.REGISTRY))
    try:
        parallel.import_modules("morepar", [str(pkg)])
        assert tuple(parallel.discovered()) == ("ddp", "zero1", "fsdp", "tp")
        # bench.memory models the new mode from its file alone: the one-process step less 3/4 of what it shards
        from bench.memory import RankResult, _sharded_from

        monkeypatch.setattr(parallel, "STRATEGIES", parallel.discovered())
        one = RankResult("ddp", "tiny", 2, 128, 1, False, 2000, "backward",
                         {"Parameter": 400, "Gradient": 400, "Optstate": 800, "Activation": 400, "Total": 2000}, "")
        tp = _sharded_from(one, "tp", 4)
        assert (tp.mode, tp.world, tp.peak_bytes) == ("tp", 4, 2000 - 300 - 600)
        assert tp.breakdown == {"Parameter": 400, "Gradient": 100, "Optstate": 200, "Activation": 400, "Total": 1100}
    finally:
        sys.modules.pop("morepar.tp", None)
        sys.modules.pop("morepar", None)
