"""The `fastgpt` command through `python -m fastgpt` (the installed console script calls the same main)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _train_util import SHAKESPEARE, env
from fastgpt import cli

FIXTURE = Path(__file__).parent / "data" / "hellaswag_fixture.jsonl"


def fastgpt(*args, cwd, check=True, timeout=300):
    r = subprocess.run([sys.executable, "-m", "fastgpt", *map(str, args)], capture_output=True, text=True,
                       cwd=cwd, env=env(), timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A fresh user's directory after a one-step `fastgpt train` with CPU defaults and nothing else (it
    prepares the packaged Tiny Shakespeare itself), and a `fastgpt prepare shakespeare` (no network)."""
    d = tmp_path_factory.mktemp("user")
    train = fastgpt("train", "--max_steps", "1", cwd=d)
    prep = fastgpt("prepare", "shakespeare", "--out", "prepared", cwd=d)
    return d, prep, train


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("hf")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64)).save_pretrained(d)
    return d


def test_prepare_prints_the_exact_counts(workdir):
    d, prep, _ = workdir
    assert "Saved 304,222 train tokens and 33,803 val tokens" in prep.stdout
    assert sorted(p.name for p in (d / "prepared").iterdir()) == ["manifest.json", "train_00000.npy", "val_00000.npy"]


def test_train_on_cpu_picks_the_cpu_preset_and_says_so(workdir):
    d, _, train = workdir
    out = train.stdout
    lines = out.splitlines()
    assert lines[0].startswith("no data in 'shakespeare_data': preparing the Tiny Shakespeare packaged with")
    assert lines[1] == "Saved 304,222 train tokens and 33,803 val tokens"
    assert lines[2:5] == ["found 1 shards for split train", "found 1 shards for split val", "using device: cpu"]
    assert sorted(p.name for p in (d / "shakespeare_data").iterdir()) == [".prepare.lock", "manifest.json", "train_00000.npy", "val_00000.npy"]
    assert "no GPU: using the CPU-sized preset 'tiny'" in out and "--model gpt2" in out
    assert "step 0 | loss: 10." in out and "val loss " in out
    assert "sample at step 1:\nROMEO:" in out  # a run ends with a sample of what it learned
    ckpt = torch.load(d / "log" / "model_00001.pt")
    assert ckpt["config"]["n_layer"] == 4 and ckpt["train_config"]["total_batch_size"] == 1024


def test_prepare_shakespeare_sources(tmp_path, capsys, monkeypatch):
    """--input reads a file; --download and --url fetch; two sources at once is a usage error."""
    from fastgpt import data

    fetched = []
    monkeypatch.setattr(data, "download", lambda url, *a: fetched.append(url) or SHAKESPEARE)
    assert cli.main(["prepare", "shakespeare", "--download", "--out", str(tmp_path / "d")]) == 0
    assert cli.main(["prepare", "shakespeare", "--url", "http://mirror/input.txt", "--out", str(tmp_path / "u")]) == 0
    assert cli.main(["prepare", "shakespeare", "--out", str(tmp_path / "p")]) == 0
    assert fetched == [data.SHAKESPEARE_URL, "http://mirror/input.txt"]
    assert cli.main(["prepare", "shakespeare", "--input", str(SHAKESPEARE), "--out", str(tmp_path / "a")]) == 0
    assert "Saved 304,222 train tokens and 33,803 val tokens" in capsys.readouterr().out
    assert cli.main(["prepare", "shakespeare", "--input", str(tmp_path / "nope.txt"), "--out", str(tmp_path)]) == 1
    assert "nope.txt: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["prepare", "shakespeare", "--download", "--input", str(SHAKESPEARE)])
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_lists_every_command(tmp_path):
    out = fastgpt("--help", cwd=tmp_path).stdout
    for cmd in ("prepare", "train", "generate", "eval", "validate", "plot", "export"):
        assert cmd in out
    assert "--total_batch_size" in fastgpt("train", "--help", cwd=tmp_path).stdout
    r = subprocess.run([sys.executable, "-m", "fastgpt.train", "--help"], capture_output=True, text=True,
                       cwd=tmp_path, env=env())
    assert r.returncode == 0 and "--micro_batch_size" in r.stdout


def test_train_without_data_gives_the_prepare_hint(tmp_path):
    """Only the default --data_root is prepared automatically: a missing other one may be a typo."""
    r = fastgpt("train", "--max_steps", "1", "--data_root", "my_data", cwd=tmp_path, check=False)
    assert r.returncode == 1
    assert "'my_data' not found" in r.stderr and "run `fastgpt prepare shakespeare --out my_data` first" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "my_data").exists()


def test_generate_from_a_checkpoint_cache_equals_no_cache(workdir):
    d, _, _ = workdir
    args = ["generate", "--checkpoint", "log/model_00001.pt", "--prompt", "ROMEO:", "--max_new_tokens", "12",
            "--temperature", "0"]
    a = fastgpt(*args, cwd=d).stdout
    b = fastgpt(*args, "--no_cache", cwd=d).stdout
    assert a.startswith("ROMEO:") and a == b
    s = fastgpt("generate", "--checkpoint", "log/model_00001.pt", "--num_samples", "2", "--max_new_tokens", "5",
                "--seed", "1", cwd=d).stdout
    assert s.count("--- sample") == 2


def test_eval_hellaswag_on_the_fixture(workdir, hf_dir):
    d, _, _ = workdir
    out = fastgpt("eval", "hellaswag", "--checkpoint", "log/model_00001.pt", "--data", FIXTURE, cwd=d).stdout
    assert "5 examples | acc: " in out and "acc_norm: " in out
    out = fastgpt("eval", "hellaswag", "--model", hf_dir, "--data", FIXTURE, "--limit", "3", cwd=d).stdout
    assert "3 examples" in out
    bad = d / "bad.jsonl"
    bad.write_text(FIXTURE.read_text() + "{oops\n")
    r = fastgpt("eval", "hellaswag", "--checkpoint", "log/model_00001.pt", "--data", bad, cwd=d, check=False)
    assert r.returncode == 1 and "bad.jsonl:6: not valid JSON" in r.stderr


def test_validate_against_transformers(hf_dir, tmp_path):
    r = fastgpt("validate", "--model", hf_dir, "--prompt", "Hello world", "--kernels", "torch", cwd=tmp_path)
    out = r.stdout
    assert "max |logit difference|:" in out and "fastgpt greedy:" in out and "transformers greedy:" in out
    assert "continuations match" in out and out.strip().endswith("OK")
    r = fastgpt("validate", "--model", tmp_path / "nowhere", cwd=tmp_path, check=False)
    assert r.returncode == 1 and "nowhere" in r.stderr


def test_validate_fails_beyond_tolerance(hf_dir, monkeypatch, capsys):
    from fastgpt.model import GPT

    real = GPT.forward

    def off_by_a_bit(self, *a, **k):
        logits, loss = real(self, *a, **k)
        return logits + 0.01, loss

    monkeypatch.setattr(GPT, "forward", off_by_a_bit)
    rc = cli.main(["validate", "--model", str(hf_dir), "--kernels", "torch", "--device", "cpu"])
    assert rc == 1
    assert "FAIL: logits differ by 1.000e-02" in capsys.readouterr().out


def test_generate_needs_a_model(tmp_path, capsys):
    assert cli.main(["generate", "--prompt", "hi"]) == 1
    assert "--checkpoint" in capsys.readouterr().err


def test_validate_hub_name_offline_fails_with_the_generate_message(tmp_path):
    """The hub is unreachable here (as on the GPU image): validate must say so, as generate does."""
    r = fastgpt("validate", "--model", "gpt2", cwd=tmp_path, check=False, timeout=120)
    assert r.returncode == 1 and "could not fetch 'gpt2' from the HuggingFace hub" in r.stderr, r.stderr
    assert "Pass a local directory instead" in r.stderr and r.stdout == ""
