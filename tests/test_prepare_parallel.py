"""Data preparation in pieces: worker processes give byte-identical shards, the pieces' tokens are the
whole text's tokens, and an interrupted preparation resumes."""
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fastgpt import data
from fastgpt.tokenizer import EOT_TOKEN, get_encoding

# Whitespace runs, spaces before newlines, CRLF, tabs, non-ASCII and digits around line ends: the places
# where cutting the text could change the tokens if the cut were in the wrong spot.
TRICKY = ("KING:\nWe are  glad.\n\n\nQUEEN:  \n  Aye, 1234\n5678 \n\tthou\r\nart\u00a0here\u3000 \n"
          "caf\u00e9\n\u00e9t\u00e9 'll\n've\nend.\n")


def _text(n: int = 400) -> str:
    import random

    r = random.Random(1)
    parts = [TRICKY]
    for _ in range(n):
        parts.append(r.choice(["\n", "\n\n", " \n", "\n ", ""]) + r.choice(["Sir", "my lord", "42", "!", "'s"])
                     + r.choice([" ", "\n", ".\n", ",\n\n"]))
    return "".join(parts)


def _shards(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.glob("*.npy"))}


def _tokens(d: Path) -> np.ndarray:
    return np.concatenate([np.load(p) for p in sorted(d.glob("train_*.npy")) + sorted(d.glob("val_*.npy"))])


def test_num_proc_2_gives_byte_identical_shards_equal_to_whole_text_encoding(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data.prepare, "PIECE_CHARS", 300)  # many pieces: many cuts to get wrong
    src = tmp_path / "a.txt"
    src.write_text(_text() * 3, encoding="utf-8")
    assert len(data.prepare._cut_points(src.read_text(), 300)) > 10
    data.prepare_texts([src, src], tmp_path / "one", shard_tokens=700, num_proc=1)
    data.prepare_texts([src, src], tmp_path / "two", shard_tokens=700, num_proc=2)
    one, two = _shards(tmp_path / "one"), _shards(tmp_path / "two")
    assert len(one) > 3 and one == two
    whole = get_encoding().encode_ordinary(src.read_text() + "\n" + src.read_text())
    assert _tokens(tmp_path / "one").tolist() == whole
    assert not (tmp_path / "one" / data.prepare.SPOOL).exists()  # the spool is gone once the shards are written


def test_an_interrupted_preparation_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data.prepare, "PIECE_CHARS", 300)
    src = tmp_path / "a.txt"
    src.write_text(_text(), encoding="utf-8")
    data.prepare_texts([src], tmp_path / "ref")
    real, calls = data.prepare._encode_text, []

    def dies_after_3(piece):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(piece)
        return real(piece)

    monkeypatch.setattr(data.prepare, "_encode_text", dies_after_3)
    with pytest.raises(KeyboardInterrupt):
        data.prepare_texts([src], tmp_path / "out")
    assert len(list((tmp_path / "out" / data.prepare.SPOOL).glob("piece_*.npy"))) == 3
    monkeypatch.setattr(data.prepare, "_encode_text", real)
    capsys.readouterr()
    n_pieces = len(data.prepare._cut_points(src.read_text(), 300)) - 1
    data.prepare_texts([src], tmp_path / "out")
    assert f"resuming an interrupted preparation: 3 of {n_pieces} pieces already tokenized" in capsys.readouterr().out
    assert _shards(tmp_path / "out") == _shards(tmp_path / "ref")
    # Interrupted again, then the input changes: the old pieces are not reused.
    monkeypatch.setattr(data.prepare, "_encode_text", dies_after_3)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        data.prepare_texts([src], tmp_path / "out")
    monkeypatch.setattr(data.prepare, "_encode_text", real)
    src.write_text(_text().upper(), encoding="utf-8")
    capsys.readouterr()
    data.prepare_texts([src], tmp_path / "out")
    assert "resuming" not in capsys.readouterr().out
    assert _tokens(tmp_path / "out").tolist() == get_encoding().encode_ordinary(src.read_text())


def test_prepare_hf_in_pieces_with_workers(tmp_path, monkeypatch, capsys):
    docs = [f"Document {i}.\nIt says {'hi ' * (i % 7)}there." for i in range(50)]

    class FakeDataset:  # the slice of datasets.Dataset that prepare_hf uses
        column_names = ["text"]

        def __len__(self):
            return len(docs)

        def __getitem__(self, s):
            return {"text": docs[s]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: FakeDataset()))
    monkeypatch.setattr(data.prepare, "DOCS_PER_PIECE", 8)
    data.prepare_hf("fake", tmp_path / "one", num_proc=1, limit=45)
    data.prepare_hf("fake", tmp_path / "two", num_proc=2, limit=45)
    assert _shards(tmp_path / "one") == _shards(tmp_path / "two")
    enc, want = get_encoding(), []
    for i, doc in enumerate(docs[:45]):
        want += ([EOT_TOKEN] if i else []) + enc.encode_ordinary(doc)
    assert _tokens(tmp_path / "one").tolist() == want


def test_bad_num_proc_is_named(tmp_path):
    src = tmp_path / "a.txt"
    src.write_text("hello there\n")
    with pytest.raises(data.DataError, match="--num_proc must be positive, got 0"):
        data.prepare_texts([src], tmp_path / "o", num_proc=0)
