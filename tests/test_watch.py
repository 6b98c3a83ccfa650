"""Watching a run: the step line's ETA/MFU, the summary and final lines, metrics.jsonl (one record per
step after kill -9 or a fallback resume), samples and HellaSwag that never change the training result,
`fastgpt plot`, `fastgpt export` to transformers, --init_from."""
import json
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _train_util import add_nano, env, log_records, nano_args, one_thread, write_entry  # noqa: F401
from fastgpt import data
from fastgpt.metrics import read_metrics
from fastgpt.train import main

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURE = Path(__file__).parent / "data" / "hellaswag_fixture.jsonl"
ETA = r"elapsed: (\d+h)?(\d+m)?\d+s \| eta: (\?|(\d+h)?(\d+m)?\d+s)"


def make_corpus(path: Path, lines: int = 3000) -> Path:
    """Play-like English text: enough tokens for nano runs, made here so the tests need no download."""
    r = random.Random(0)
    words = ("the king queen lord sword crown night day love death speak hath thou thee my good sir fair gentle "
             "heart blood war peace honour").split()
    text = "\n".join(f"{r.choice(['ROMEO', 'JULIET', 'KING', 'LORD'])}:\n"
                     + " ".join(r.choice(words) for _ in range(r.randint(4, 14))).capitalize() + ".\n"
                     for _ in range(lines))
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    data.prepare_texts([make_corpus(d / "play.txt")], d / "data")
    return d / "data"


def _train(capsys, args):
    capsys.readouterr()
    assert main(args) == 0
    return capsys.readouterr().out


def train_records(log_dir: Path) -> list[dict]:
    return [r for r in read_metrics(log_dir) if r["type"] == "train"]


@pytest.fixture(scope="module")
def plain_run(corpus, tmp_path_factory):
    """8 nano steps without samples: the reference losses."""
    import _pytest.monkeypatch

    mp = _pytest.monkeypatch.MonkeyPatch()
    add_nano(mp)
    d = tmp_path_factory.mktemp("plain")
    assert main(nano_args(corpus, d, "--sample_interval", "0")) == 0
    mp.undo()
    return d


@pytest.fixture(scope="module")
def watched_run(corpus, tmp_path_factory):
    """The same run with samples every 3 steps and HellaSwag every 4, output captured."""
    import contextlib
    import io

    import _pytest.monkeypatch

    mp = _pytest.monkeypatch.MonkeyPatch()
    add_nano(mp)
    mp.setenv("FASTGPT_PEAK_TFLOPS", "1")  # an MFU figure on the CPU: 1 TFLOP/s as its "peak"
    d = tmp_path_factory.mktemp("watched")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(nano_args(corpus, d, "--sample_interval", "3", "--hellaswag_interval", "4",
                              "--hellaswag_data", str(FIXTURE))) == 0
    mp.undo()
    return d, out.getvalue()


# ------------------------------------------------------------------------------------------------
def test_step_lines_summary_and_final_line(watched_run):
    d, out = watched_run
    lines = re.findall(r"^step (\d+) \| .*$", out, re.M)
    assert len(lines) == 8
    for line in out.splitlines():
        if line.startswith("step "):
            assert re.search(r"\| dt: \d+ms \| tok/s: [\d,]+ \| " + ETA + r" \| mfu: \d+\.\d%$", line), line
    assert re.search(r"^step 7 .*\| eta: 0s \|", out, re.M)  # nothing left after the last step
    assert re.search(r"^run: 8 steps x 512 tokens = 4,096 tokens \| data: [\d,]+ train tokens in 1 shard\(s\) -> "
                     r"\d+\.\d\d epochs \| dtype: fp32$", out, re.M)
    final, after = out.strip().splitlines()[-2:]
    assert re.fullmatch(r"done: 8 steps \(0 -> 8\), 4,096 tokens in \d+s \| final train loss \d+\.\d{4} \| "
                        r"val loss \d+\.\d{4} at step 8 \| last checkpoint: .*model_00008\.pt", final), final
    # The done line's val loss names its step, and the next commands follow it, ready to paste.
    assert re.fullmatch(r"next: fastgpt generate --checkpoint \S*model_00008\.pt --prompt ROMEO: \(sample from it\) "
                        r"\| fastgpt plot \S+ \(loss curves\)", after), after
    # The MFU printed is the model's convention (6N + 12LCT FLOPs per token) over the given peak.
    from fastgpt import GPT
    from fastgpt.config import GPTConfig
    from _train_util import NANO

    m = GPT(GPTConfig(**NANO))
    for rec in train_records(d):
        want = m.flops_per_token(64) * rec["tok_s"] / 1e12
        assert rec["mfu"] == pytest.approx(want, rel=1e-9)


def test_metrics_jsonl_matches_log_txt(watched_run):
    d, out = watched_run
    recs = read_metrics(d)
    train, val = log_records(d)
    assert [r["step"] for r in recs if r["type"] == "train"] == list(range(8))
    for r in recs:
        if r["type"] == "train":
            assert (r["loss"], r["norm"], r["lr"]) == train[r["step"]]
            assert r["tokens"] == 512 * r["step"] and r["tok_s"] == pytest.approx(512 / r["dt"])
    assert {r["step"]: r["loss"] for r in recs if r["type"] == "val"} == val == {4: val[4], 8: val[8]}
    assert [r["step"] for r in recs if r["type"] == "sample"] == [3, 6, 8]  # and one at the end
    assert [r["step"] for r in recs if r["type"] == "hellaswag"] == [4, 8]


def test_samples_and_hellaswag_do_not_change_the_losses(plain_run, watched_run):
    ref, ref_val = log_records(plain_run)
    got, got_val = log_records(watched_run[0])
    assert got == ref and got_val == ref_val  # bitwise
    samples = [r for r in read_metrics(watched_run[0]) if r["type"] == "sample"]
    assert all(r["prompt"] == "ROMEO:" and len(r["text"]) > 0 for r in samples)
    assert f"sample at step 3:\nROMEO:{samples[0]['text']}" in watched_run[1]


def test_resume_across_a_sample_is_exact(corpus, plain_run, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    ref, ref_val = log_records(plain_run)
    shutil.copy(plain_run / "model_00002.pt", tmp_path)
    _train(capsys, nano_args(corpus, tmp_path, "--sample_interval", "3"))  # samples at 3 and 6 on the way
    got, got_val = log_records(tmp_path)
    assert sorted(got) == list(range(2, 8)) and all(got[s] == ref[s] for s in got)
    assert got_val == ref_val


def test_hellaswag_in_training_equals_fastgpt_eval(watched_run, capsys):
    from fastgpt import cli

    d, _ = watched_run
    hs = {r["step"]: r for r in read_metrics(d) if r["type"] == "hellaswag"}
    for step in (4, 8):
        capsys.readouterr()
        assert cli.main(["eval", "hellaswag", "--checkpoint", str(d / f"model_{step:05d}.pt"), "--data",
                         str(FIXTURE), "--kernels", "torch", "--device", "cpu"]) == 0
        m = re.search(r"(\d+) examples \| acc: (\S+) \| acc_norm: (\S+)", capsys.readouterr().out)
        assert (int(m[1]), float(m[2]), float(m[3])) == (hs[step]["examples"], round(hs[step]["acc"], 4),
                                                         round(hs[step]["acc_norm"], 4))


def test_hellaswag_interval_needs_a_readable_file(corpus, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    for extra, msg in ((["--hellaswag_interval", "2"], "--hellaswag_interval needs --hellaswag_data"),
                       (["--hellaswag_interval", "2", "--hellaswag_data", str(tmp_path / "no.jsonl")],
                        "no.jsonl: no such HellaSwag file")):
        with pytest.raises(SystemExit):
            main(nano_args(corpus, tmp_path, *extra))
        assert msg in capsys.readouterr().err
    assert not list(tmp_path.glob("model_*.pt"))


# ------------------------------------------------------------------------------------------------
def _one_record_per_step(d: Path, steps: int) -> None:
    recs = read_metrics(d)
    assert [r["step"] for r in recs if r["type"] == "train"] == list(range(steps))
    for kind in ("val", "sample"):
        s = [r["step"] for r in recs if r["type"] == kind]
        assert s == sorted(set(s)), (kind, s)
    txt = [line.split()[:2] for line in (d / "log.txt").read_text().splitlines()]
    assert [int(s) for s, k in txt if k == "train"] == list(range(steps))
    vals = [int(s) for s, k in txt if k == "val"]
    assert vals == sorted(set(vals))


def test_one_record_per_step_after_kill_9_and_resume(corpus, plain_run, tmp_path):
    script = write_entry(tmp_path)  # knows the nano preset
    log = tmp_path / "log"
    args = nano_args(corpus, log, "--checkpoint_interval", "3", "--sample_interval", "2")
    p = subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, text=True, env=env(),
                         cwd=tmp_path)
    try:
        for line in p.stdout:  # checkpoint 3 is written; steps 3-5, val 4 and sample 4 follow it
            if line.startswith("step 5 "):
                p.send_signal(signal.SIGKILL)
                break
    finally:
        p.wait(timeout=120)
    assert p.returncode == -signal.SIGKILL
    before = [r["step"] for r in read_metrics(log) if r["type"] == "train"]
    assert before[-1] >= 4 and not (log / "model_00006.pt").exists()  # records past checkpoint 3 to drop
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env(),
                       cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    _one_record_per_step(log, 8)
    ref, _ = log_records(plain_run)
    got, _ = log_records(log)
    assert got == ref


@pytest.mark.filterwarnings("ignore")
def test_one_record_per_step_after_a_fallback_resume(corpus, plain_run, tmp_path, capsys, monkeypatch):
    add_nano(monkeypatch)
    shutil.copytree(plain_run, tmp_path / "log")
    log = tmp_path / "log"
    newest = log / "model_00008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a corrupt newest checkpoint: resume falls back to 6
    out = _train(capsys, nano_args(corpus, log, "--sample_interval", "0", steps_=8))
    assert "model_00006.pt (step 6" in out
    _one_record_per_step(log, 8)
    assert log_records(log) == log_records(plain_run)


def test_torn_last_lines_are_dropped_on_resume(tmp_path):
    from fastgpt.metrics import RunLog

    (tmp_path / "log.txt").write_text("0 train 1.0 norm 1.0 lr 0.1\n1 train 0.9 norm 1.0 lr 0.1\n2 val 0.8\n2 tr")
    (tmp_path / "metrics.jsonl").write_text('{"type": "train", "step": 0}\n{"type": "train", "step": 1}\n'
                                            '{"type": "val", "step": 2}\n{"type": "train", "step": 2}\n{"typ')
    RunLog(tmp_path, 2, 512)
    assert (tmp_path / "log.txt").read_text() == "0 train 1.0 norm 1.0 lr 0.1\n1 train 0.9 norm 1.0 lr 0.1\n2 val 0.8\n"
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


# ------------------------------------------------------------------------------------------------
def test_plot_draws_the_jsonl_points(watched_run, plain_run, tmp_path):
    import matplotlib.image

    from fastgpt import cli
    from fastgpt.plot import plot_runs

    out = tmp_path / "loss.png"
    fig = plot_runs([watched_run[0], plain_run], out, ["watched", "plain"])
    recs = read_metrics(watched_run[0])
    step_ax, token_ax, hs_ax = fig.axes
    train, val = step_ax.lines[0], step_ax.lines[1]
    assert list(train.get_xdata()) == [r["step"] for r in recs if r["type"] == "train"]
    assert list(train.get_ydata()) == [r["loss"] for r in recs if r["type"] == "train"]
    assert list(val.get_ydata()) == [r["loss"] for r in recs if r["type"] == "val"]
    assert list(token_ax.lines[0].get_xdata()) == [r["tokens"] for r in recs if r["type"] == "train"]
    assert list(hs_ax.lines[0].get_ydata()) == [r["acc_norm"] for r in recs if r["type"] == "hellaswag"]
    assert len(step_ax.lines) == 4  # two runs overlaid
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 200 and img.shape[1] > 600 and img[..., :3].std() > 0.05  # not a blank canvas
    assert cli.main(["plot", str(plain_run), "--out", str(tmp_path / "cli.png")]) == 0
    assert (tmp_path / "cli.png").stat().st_size > 10_000


# ------------------------------------------------------------------------------------------------
def test_export_hf_loads_in_transformers_offline(plain_run, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from fastgpt import cli
    from fastgpt.checkpoint import load_model
    from fastgpt.tokenizer import get_encoding

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "my_gpt2"
    assert cli.main(["export", "--checkpoint", str(plain_run / "model_00008.pt"), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt", "tokenizer_config.json"} <= \
        {p.name for p in out.iterdir()}
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("Hello world")["input_ids"]
    assert ids == get_encoding().encode_ordinary("Hello world") == [15496, 995]
    assert tok.decode(ids) == "Hello world"
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ours = load_model(plain_run / "model_00008.pt", kernels="torch")
    x = torch.tensor([get_encoding().encode_ordinary("ROMEO: my good lord, the king hath")])
    with torch.no_grad():
        diff = (hf(x).logits - ours(x)[0]).abs().max().item()
        gen = hf.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert diff < 1e-4, diff
    assert torch.equal(gen, ours.generate(x, 4, temperature=0))  # same greedy tokens


def test_export_safetensors_round_trips(plain_run, tmp_path):
    from fastgpt import cli
    from fastgpt.checkpoint import load_model
    from fastgpt.export import load_safetensors

    f = tmp_path / "w.safetensors"
    assert cli.main(["export", "--checkpoint", str(plain_run / "model_00004.pt"), "--out", str(f),
                     "--format", "safetensors"]) == 0
    a, b = load_model(plain_run / "model_00004.pt", kernels="torch"), load_safetensors(f, kernels="torch")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


# ------------------------------------------------------------------------------------------------
def test_init_from_a_local_hf_model_starts_at_its_loss(corpus, tmp_path, capsys, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fastgpt import GPT
    from fastgpt.data import ShardLoader
    from fastgpt.train.options import TrainConfig

    add_nano(monkeypatch)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64))
    with torch.no_grad():
        hf.transformer.wte.weight.mul_(20)  # far from a fresh init's loss of ~ln(50257)
    hf.save_pretrained(tmp_path / "hf")

    def run(log, *extra, steps="2"):
        return _train(capsys, ["--data_root", str(corpus), "--log_dir", str(tmp_path / log), "--kernels", "torch",
                               "--device", "cpu", "--total_batch_size", "512", "--micro_batch_size", "4",
                               "--seq_len", "64", "--max_steps", steps, "--eval_interval", "2",
                               "--sample_interval", "0", "--checkpoint_interval", "2", *extra])

    out = run("ft", "--init_from", str(tmp_path / "hf"))
    assert "init_from: HuggingFace GPT-2 weights" in out and "-> nano (block_size 64)" in out
    # The first step's loss is the HF model's loss on the first two micro-batches.
    model = GPT.from_pretrained(str(tmp_path / "hf"), kernels="torch")
    loader = ShardLoader(corpus, "train", 4, 64, verbose=False, order=TrainConfig.data_order, seed=TrainConfig.seed)
    with torch.no_grad():
        want = sum(model(*loader.next_batch())[1].item() for _ in range(2)) / 2
    first = train_records(tmp_path / "ft")[0]["loss"]
    assert first == pytest.approx(want, abs=1e-4)
    fresh = run("fresh", "--model", "nano")
    assert "init_from:" not in fresh
    assert abs(train_records(tmp_path / "fresh")[0]["loss"] - first) > 1.0
    # A fastgpt checkpoint as the start: step 0 again, from that checkpoint's weights.
    out = run("ft2", "--init_from", str(tmp_path / "ft" / "model_00002.pt"))
    assert "fastgpt checkpoint" in out and re.search(r"^step 0 \|", out, re.M)
    # Resuming an init_from run works like any other.
    run("ft3", "--init_from", str(tmp_path / "hf"), steps="4")
    (tmp_path / "ft3" / "model_00004.pt").unlink()
    out = run("ft3", "--init_from", str(tmp_path / "hf"), steps="4")
    assert "resuming from" in out and re.search(r"^step 2 \|", out, re.M)
    assert train_records(tmp_path / "ft3")[0]["loss"] == first


def test_init_from_errors_name_the_source(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for src, msg in ((str(tmp_path / "nothing"), "not a directory holding config.json"),
                     ("gpt2", "could not fetch 'gpt2' from the HuggingFace hub")):
        with pytest.raises(SystemExit):
            main(["--data_root", str(corpus), "--log_dir", str(tmp_path / "l"), "--init_from", src,
                  "--device", "cpu"])
        err = capsys.readouterr().err
        assert f"error: --init_from {src}: " in err and msg in err, err


def test_a_prompt_longer_than_the_block_is_cropped_with_a_warning(plain_run, capsys):
    from fastgpt import cli
    from fastgpt.checkpoint import load_model
    from fastgpt.generate import PromptCroppedWarning

    from fastgpt.tokenizer import get_encoding

    prompt = "my good lord " * 30  # nano's block is 64 tokens
    n = len(get_encoding().encode_ordinary(prompt))
    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", str(plain_run / "model_00008.pt"), "--prompt", prompt,
                     "--max_new_tokens", "2", "--kernels", "torch", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert n > 64 and err == (f"warning: the prompt is {n} tokens, longer than the model's block_size 64: only its last 64 "
                   "tokens are used\n")
    model = load_model(plain_run / "model_00008.pt", kernels="torch")
    with pytest.warns(PromptCroppedWarning, match="prompt of 90 tokens is longer than block_size 64"):
        model.generate(torch.zeros(1, 90, dtype=torch.long), 1, temperature=0)


def test_two_ranks_shard_hellaswag_and_log_once(corpus, tmp_path, capsys):
    """Under torchrun each rank scores every other example; the summed counts equal one process's eval of
    the same checkpoint, and rank 0 alone writes one record per step."""
    from _train_util import run_train

    from fastgpt import cli

    log = tmp_path / "log"
    r = run_train(tmp_path, nano_args(corpus, log, "--hellaswag_interval", "2", "--hellaswag_data", str(FIXTURE),
                                      "--sample_interval", "2", steps_=2), nproc=2)
    assert "2 rank(s)" in r.stdout
    recs = read_metrics(log)
    assert [(x["type"], x["step"]) for x in recs] == [("train", 0), ("train", 1), ("val", 2), ("hellaswag", 2),
                                                      ("sample", 2)]
    hs = recs[3]
    capsys.readouterr()
    assert cli.main(["eval", "hellaswag", "--checkpoint", str(log / "model_00002.pt"), "--data", str(FIXTURE),
                     "--kernels", "torch", "--device", "cpu"]) == 0
    m = re.search(r"(\d+) examples \| acc: (\S+) \| acc_norm: (\S+)", capsys.readouterr().out)
    assert (int(m[1]), float(m[2]), float(m[3])) == (hs["examples"], round(hs["acc"], 4), round(hs["acc_norm"], 4))


@pytest.mark.gpu
def test_cuda_step_lines_carry_mfu(corpus, tmp_path, capsys, monkeypatch):
    from fastgpt.metrics import peak_flops

    add_nano(monkeypatch)
    if peak_flops(torch.device("cuda")) is None:
        monkeypatch.setenv("FASTGPT_PEAK_TFLOPS", "100")  # a GPU missing from the table
    args = nano_args(corpus, tmp_path, steps_=4)
    args[args.index("--device") + 1] = "cuda"
    args[args.index("--kernels") + 1] = "auto"
    out = _train(capsys, args)
    lines = [x for x in out.splitlines() if x.startswith("step ")]
    assert len(lines) == 4 and all(re.search(ETA + r" \| mfu: \d+\.\d%$", x) for x in lines), lines
    assert all(0 < r["mfu"] < 1 for r in train_records(tmp_path))


def test_samples_need_the_gpt2_vocabulary(corpus, tmp_path, capsys, monkeypatch):
    from fastgpt.config import PRESETS, GPTConfig

    monkeypatch.setitem(PRESETS, "small_vocab", GPTConfig(block_size=64, vocab_size=50000, n_layer=1, n_head=2,
                                                           n_embd=32))
    args = nano_args(corpus, tmp_path, steps_=2)
    args[args.index("--model") + 1] = "small_vocab"
    with pytest.raises(SystemExit):
        main(args + ["--sample_interval", "1"])
    assert "--sample_interval needs the GPT-2 vocabulary; this model has 50000 tokens" in capsys.readouterr().err
