"""Bad input is one `error:` line naming the flag or file (issue 15, item 8): training flags, generate's
sampling flags, HellaSwag files and flags, `prepare text` inputs and damaged shards."""
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgpt import GPT, GPTConfig, checkpoint as ck, cli, data
from fastgpt.hellaswag import HellaSwagFormatError, evaluate, load_examples
from fastgpt.train import main

FIXTURE = Path(__file__).parent / "data" / "hellaswag_fixture.jsonl"


@pytest.mark.parametrize("flag, value, message", [
    ("--max_lr", "-1", "--max_lr must be a positive number, got -1.0"),
    ("--max_lr", "nan", "--max_lr must be a positive number, got nan"),
    ("--max_lr", "inf", "--max_lr must be a positive number, got inf"),
    ("--max_lr", "0", "--max_lr must be a positive number, got 0.0"),
    ("--seed", "-1", "--seed must be in [0, 2**32), got -1"),
    ("--min_lr_ratio", "-1", "--min_lr_ratio must be in [0, 1], got -1.0"),
    ("--weight_decay", "-1", "--weight_decay must be a number >= 0, got -1.0"),
    ("--grad_clip", "-1", "--grad_clip must be a number >= 0 (0: no clipping), got -1.0"),
    ("--grad_clip", "nan", "--grad_clip must be a number >= 0 (0: no clipping), got nan"),
    ("--allow_changed", "lr", "--allow_changed lr: unknown lr; choose from total_batch_size"),
])
def test_bad_training_flag_is_one_error_line(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--data_root", str(tmp_path / "none"), "--log_dir", str(tmp_path / "log"),
              flag, value])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "log").exists()


def test_kernels_triton_on_cpu_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import kernels._launch as launch

    monkeypatch.setattr(launch, "interpreting", lambda: False)  # the interpreter was read at import time
    with pytest.raises(SystemExit) as e:
        main(["--device", "cpu", "--kernels", "triton", "--data_root", str(tmp_path), "--log_dir", str(tmp_path)])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert re.match(r"error: --kernels triton: .*Triton cannot run here: tensors are on the CPU and "
                    r"TRITON_INTERPRET=1 is not set", err) and "Traceback" not in err, err


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    cfg = GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=16, kernels="torch")
    from dataclasses import asdict

    ck.save_atomic({"config": asdict(cfg), "model": GPT(cfg).state_dict()}, d / "model_00001.pt")
    (d / "log.txt").write_text("0 train 10.9 norm 1.0 lr 0.0001\n")
    return d


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "nan", "--temperature must be a finite number >= 0 (0: greedy), got nan"),
    ("--temperature", "inf", "--temperature must be a finite number >= 0 (0: greedy), got inf"),
    ("--temperature", "-1", "--temperature must be a finite number >= 0 (0: greedy), got -1.0"),
    ("--top_k", "-2", "--top_k must be >= 0 (0: all tokens), got -2"),
])
def test_generate_names_the_bad_sampling_flag(tiny_ckpt, capsys, flag, value, message):
    rc = cli.main(["generate", "--checkpoint", str(tiny_ckpt / "model_00001.pt"), "--device", "cpu",
                   "--max_new_tokens", "2", flag, value])
    assert rc == 1 and capsys.readouterr().err == f"error: {message}\n"


def test_generate_from_a_log_file_says_not_a_checkpoint(tiny_ckpt, capsys):
    rc = cli.main(["generate", "--checkpoint", str(tiny_ckpt / "log.txt"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"error: {tiny_ckpt / 'log.txt'}: not a checkpoint") and "weights_only" not in err


# ------------------------------------------------------------------------------------------------
# HellaSwag
# ------------------------------------------------------------------------------------------------
def test_hellaswag_non_utf8_names_file_and_line(tmp_path):
    lines = FIXTURE.read_bytes().splitlines(keepends=True)
    bad = tmp_path / "h.jsonl"
    bad.write_bytes(lines[0] + lines[1].replace(b'"ctx": "', b'"ctx": "\xff', 1) + lines[2])
    with pytest.raises(HellaSwagFormatError, match=rf"^{re.escape(str(bad))}:2: not UTF-8 \(byte 0xff at byte \d+"):
        load_examples(bad)


@pytest.mark.parametrize("flag, value", [("--batch_size", "0"), ("--limit", "0")])
def test_hellaswag_zero_batch_or_limit_is_an_error(tiny_ckpt, capsys, flag, value):
    rc = cli.main(["eval", "hellaswag", "--checkpoint", str(tiny_ckpt / "model_00001.pt"), "--device", "cpu",
                   "--data", str(FIXTURE), flag, value])
    assert rc == 1 and capsys.readouterr().err.startswith(f"error: {flag} must be a positive number of examples, got 0")


def test_hellaswag_warns_when_endings_do_not_fit_the_block(tmp_path, capsys):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, kernels="torch")).eval()
    f = tmp_path / "h.jsonl"
    import json

    long = " ".join(["word"] * 30)  # ~30 tokens > 16
    f.write_text(json.dumps({"ctx": "A man", "endings": ["runs.", long, "sits.", "eats."], "label": 0}) + "\n")
    evaluate(model, f, batch_size=1)
    err = capsys.readouterr().err
    assert "warning: rank 0: 1 ending(s) of up to 30 tokens do not fit the model's 16-token block; only their " \
           "last 15 tokens were scored" in err


# ------------------------------------------------------------------------------------------------
# prepare text and shards
# ------------------------------------------------------------------------------------------------
def test_prepare_text_on_a_directory_says_so(tmp_path, capsys):
    (tmp_path / "texts").mkdir()
    rc = cli.main(["prepare", "text", str(tmp_path / "texts"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    d = tmp_path / "texts"
    assert rc == 1 and err == f"error: {d}: is a directory; pass the text files in it (e.g. {d}/*.txt)\n"


def test_shard_numbering_gap_warns(tmp_path, capsys):
    for i in (0, 1, 3):
        np.save(tmp_path / f"train_{i:05d}.npy", np.arange(300, dtype=np.uint16))
    loader = data.ShardLoader(tmp_path, "train", B=2, T=8, verbose=True)
    assert len(loader.paths) == 3
    err = capsys.readouterr().err
    assert err == (f"warning: {tmp_path}: train shards are not numbered consecutively: missing train_00002.npy; "
                   f"training on the 3 present\n")


def test_truncated_shard_says_truncated(tmp_path):
    np.save(tmp_path / "train_00000.npy", np.arange(1000, dtype=np.uint16))
    p = tmp_path / "train_00000.npy"
    p.write_bytes(p.read_bytes()[:700])
    with pytest.raises(data.DataError, match=rf"^{re.escape(str(p))}: truncated: its header promises 1,000 values "
                                             r"\(2,128 bytes\) but the file has 700 bytes"):
        data.ShardLoader(tmp_path, "train", B=2, T=8, verbose=False)
