"""HellaSwag scoring on a small fixture in the official jsonl format (tests/data/hellaswag_fixture.jsonl)."""
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _train_util import one_thread  # noqa: F401
from fastgpt import GPT, GPTConfig, hellaswag
from fastgpt.data import DataError
from fastgpt.hellaswag import HellaSwagFormatError, evaluate, load_examples, score_batch
from fastgpt.tokenizer import get_encoding

pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURE = Path(__file__).parent / "data" / "hellaswag_fixture.jsonl"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, kernels="torch")).eval()


def test_fixture_is_in_the_official_format():
    for line in FIXTURE.read_text().splitlines():
        ex = json.loads(line)
        assert {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "split_type", "label", "endings",
                "source_id"} <= set(ex)
        assert ex["ctx"] == f"{ex['ctx_a']} {ex['ctx_b']}" and len(ex["endings"]) == 4
    assert len(load_examples(FIXTURE)) == 5 and len(load_examples(FIXTURE, limit=2)) == 2


def test_batched_scores_equal_one_row_at_a_time(model):
    enc = get_encoding()
    examples = load_examples(FIXTURE)
    total, mean = score_batch(model, examples, enc, "cpu")  # (5, 4) each, padded batch of 20 rows
    for i, ex in enumerate(examples):
        ctx = enc.encode_ordinary(ex["ctx"])
        for j, ending in enumerate(ex["endings"]):
            end = enc.encode_ordinary(" " + ending)
            row = torch.tensor([ctx + end])
            logits, _ = model(row)
            # Loss of each ending token given everything before it.
            losses = F.cross_entropy(logits[0, len(ctx) - 1:-1], row[0, len(ctx):], reduction="none")
            torch.testing.assert_close(total[i, j], losses.sum(), atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(mean[i, j], losses.mean(), atol=1e-5, rtol=1e-5)


def test_accuracy_from_the_scores(model, monkeypatch, capsys):
    # A model that prefers the labelled ending gets 1.0; the counts come from argmin of each score.
    def oracle(m, examples, enc, device, cut=None):
        total = torch.ones(len(examples), 4)
        mean = torch.ones(len(examples), 4)
        for i, ex in enumerate(examples):
            total[i, ex["label"]] = 0.0
            mean[i, (ex["label"] + 1) % 4] = 0.0  # acc_norm deliberately wrong
        return total, mean

    monkeypatch.setattr(hellaswag, "score_batch", oracle)
    r = evaluate(model, FIXTURE, batch_size=2)
    assert r == {"examples": 5, "acc": 1.0, "acc_norm": 0.0}
    assert "5 examples | acc: 1.0000 | acc_norm: 0.0000" in capsys.readouterr().out


def test_batch_size_does_not_change_the_result(model):
    a = evaluate(model, FIXTURE, batch_size=1, verbose=False)
    b = evaluate(model, FIXTURE, batch_size=4, verbose=False)
    assert a == b and a["examples"] == 5


def test_ranks_split_the_examples_and_sum_counts(model, monkeypatch):
    import torch.distributed as dist

    parts = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: parts.append(t.clone()))
    for rank in range(2):
        evaluate(model, FIXTURE, rank=rank, world=2, verbose=False)
    counts = sum(parts)  # what the all-reduce would have produced
    assert [int(p[2]) for p in parts] == [3, 2]
    full = evaluate(model, FIXTURE, verbose=False)
    assert int(counts[2]) == 5
    assert (int(counts[0]) / 5, int(counts[1]) / 5) == (full["acc"], full["acc_norm"])


GOOD = json.loads(FIXTURE.read_text().splitlines()[0])


@pytest.mark.parametrize("bad, pattern", [
    ("{not json", r"not valid JSON"),
    (json.dumps([1, 2]), r"expected a JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "endings"}), r"missing field 'endings'"),
    (json.dumps({**GOOD, "endings": GOOD["endings"][:3]}), r"'endings' must be a list of 4 strings"),
    (json.dumps({**GOOD, "label": 4}), r"'label' must be an integer 0-3"),
    (json.dumps({**GOOD, "ctx": None}), r"'ctx' must be a string"),
])
def test_malformed_file_names_file_and_line(tmp_path, bad, pattern):
    p = tmp_path / "broken.jsonl"
    lines = FIXTURE.read_text().splitlines()
    lines.insert(2, bad)
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(HellaSwagFormatError, match=rf"broken.jsonl:3: {pattern}"):
        load_examples(p)


def test_download_uses_the_official_url_and_fails_clearly_offline(tmp_path, monkeypatch):
    assert hellaswag.HELLASWAG_URL == "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
    monkeypatch.setenv("FASTGPT_CACHE", str(tmp_path))
    seen = []

    def offline(url, *a, **k):
        seen.append(url)
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError, match=r"Offline\? .*--data FILE"):
        hellaswag.default_file()
    assert seen == [hellaswag.HELLASWAG_URL]
    # A cached copy is used without the network.
    cached = tmp_path / "hellaswag" / "hellaswag_val.jsonl"
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(FIXTURE.read_text())
    assert hellaswag.default_file() == cached
