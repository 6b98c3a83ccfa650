"""Dataset preparation and the shard loader: exact Shakespeare counts, every bad-shard case refused by
name, rank striding that reads the same data for any world size, and a resumable state."""
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from _train_util import SHAKESPEARE
from fastgpt import data
from fastgpt.data import DataError, ShardLoader
from fastgpt.tokenizer import get_encoding

V = 50257


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    out = tmp_path_factory.mktemp("shakespeare_data")
    counts = data.prepare_shakespeare(SHAKESPEARE, out)
    return out, counts


def test_prepare_shakespeare_exact_counts(shakespeare, capsys):
    out, counts = shakespeare
    assert counts == (304_222, 33_803)
    train = np.load(out / "train_00000.npy", allow_pickle=False)
    val = np.load(out / "val_00000.npy", allow_pickle=False)
    assert (len(train), len(val)) == (304_222, 33_803)
    assert train.dtype == val.dtype == np.uint16
    ids = get_encoding().encode_ordinary(SHAKESPEARE.read_text())
    assert train.tolist() == ids[:304_222] and val.tolist() == ids[304_222:]
    data.prepare_shakespeare(SHAKESPEARE, out)
    assert "Saved 304,222 train tokens and 33,803 val tokens" in capsys.readouterr().out


def _offline(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)


def test_prepare_shakespeare_needs_no_network(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch)
    assert data.PACKAGED_SHAKESPEARE.read_bytes() == SHAKESPEARE.read_bytes()
    assert data.prepare_shakespeare(None, tmp_path / "out") == (304_222, 33_803)
    assert "Saved 304,222 train tokens and 33,803 val tokens" in capsys.readouterr().out


def test_prepare_shakespeare_download_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTGPT_CACHE", str(tmp_path / "cache"))
    _offline(monkeypatch)
    with pytest.raises(DataError, match=r"could not download.*Drop --download/--url.*--input FILE"):
        data.prepare_shakespeare(None, tmp_path / "out", download_url=data.SHAKESPEARE_URL)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert not (tmp_path / "out").exists()


def test_prepare_shakespeare_url_is_cached_per_url(tmp_path, monkeypatch):
    """--url fetches through the cache; a second URL is fetched again, never served the first one's file."""
    import io

    monkeypatch.setenv("FASTGPT_CACHE", str(tmp_path / "cache"))
    texts = {"http://a/x.txt": "First Citizen:\nBefore we proceed.\n" * 30,
             "http://b/y.txt": "ROMEO:\nBut soft.\n" * 30}
    fetched = []

    def fake_urlopen(url, timeout):
        fetched.append(url)
        return io.BytesIO(texts[url].encode())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    for url in texts:
        n_train, n_val = data.prepare_shakespeare(None, tmp_path / "out", download_url=url)
        assert n_train + n_val == len(get_encoding().encode_ordinary(texts[url]))
    data.prepare_shakespeare(None, tmp_path / "out", download_url="http://a/x.txt")  # cached: no fetch
    assert fetched == ["http://a/x.txt", "http://b/y.txt"]


def test_a_built_wheel_carries_the_packaged_shakespeare(tmp_path):
    """A non-editable install has the text too: it is package data in the wheel."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from _train_util import ROOT

    src = tmp_path / "src"  # build from a copy: setuptools writes build/ and *.egg-info beside the sources
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("fastgpt", "kernels", "bench"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "--no-index", "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("fastgpt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert z.read("fastgpt/assets/tinyshakespeare.txt") == SHAKESPEARE.read_bytes()


def test_default_data_is_prepared_only_when_missing(tmp_path, capsys):
    root = tmp_path / "shakespeare_data"
    assert data.prepare_default_data(root) is True
    out = capsys.readouterr().out
    assert "preparing the Tiny Shakespeare packaged with fastgpt" in out and "Saved 304,222 train tokens" in out
    assert sorted(p.name for p in root.iterdir()) == [".prepare.lock", "manifest.json", "train_00000.npy", "val_00000.npy"]
    np.save(root / "val_00000.npy", np.arange(100, dtype=np.uint16))  # the user's own shards are kept
    assert data.prepare_default_data(root) is False
    assert len(np.load(root / "val_00000.npy")) == 100 and capsys.readouterr().out == ""


def test_prepare_text_shards_and_fraction(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("To be, or not to be, that is the question.\n" * 40)
    b.write_text("Whether 'tis nobler in the mind to suffer.\n" * 40)
    n_train, n_val = data.prepare_texts([a, b], tmp_path / "out", val_fraction=0.25, shard_tokens=200)
    total = len(get_encoding().encode_ordinary(a.read_text() + "\n" + b.read_text()))
    assert n_train + n_val == total and n_train == int(total * 0.75)
    shards = data.find_shards(tmp_path / "out", "train")
    assert [p.name for p in shards][:2] == ["train_00000.npy", "train_00001.npy"]
    assert sum(len(np.load(p)) for p in shards) == n_train
    assert all(len(np.load(p)) <= 200 for p in shards)
    with pytest.raises(DataError, match="val_fraction"):
        data.prepare_texts([a], tmp_path / "o2", val_fraction=1.5)
    with pytest.raises(DataError, match="missing.txt"):
        data.prepare_texts([tmp_path / "missing.txt"], tmp_path / "o3")


def test_prepare_hf_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match=r"fastgpt\[hf\]"):
        data.prepare_hf("wikitext", tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# Shard validation
# ----------------------------------------------------------------------------------------------
def _dir_with(tmp_path, train, val=None):
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    np.save(d / "train_00000.npy", train, allow_pickle=True)
    np.save(d / "val_00000.npy", np.arange(100, dtype=np.uint16) if val is None else val)
    return d


@pytest.mark.parametrize("case, array, pattern", [
    ("float", np.linspace(0, 100, 500).astype(np.float32), r"dtype float32 is not an integer type"),
    ("bool", np.ones(500, dtype=bool), r"dtype bool is not an integer type"),
    ("2d", np.zeros((10, 50), dtype=np.uint16), r"shape \(10, 50\) is not 1-D"),
    ("too_large", np.concatenate([np.zeros(300, np.int32), [V], np.zeros(10, np.int32)]),
     r"token id 50257 at index 300 is outside the vocabulary \[0, 50257\)"),
    ("negative", np.concatenate([np.zeros(7, np.int64), [-3], np.zeros(300, np.int64)]),
     r"token id -3 at index 7 is outside"),
    ("too_short", np.zeros(64, dtype=np.uint16), r"64 tokens is too short for one batch of 129"),
    ("pickled", np.array([{"a": 1}] * 300, dtype=object), r"cannot be loaded without pickle"),
])
def test_bad_shard_is_refused_by_name(tmp_path, case, array, pattern):
    d = _dir_with(tmp_path, array)
    with pytest.raises(DataError, match=pattern) as e:
        ShardLoader(d, "train", B=2, T=64, vocab_size=V, verbose=False)
    assert str(d / "train_00000.npy") in str(e.value)


def test_not_an_npy_file_is_refused_by_name(tmp_path):
    d = _dir_with(tmp_path, np.zeros(500, np.uint16))
    (d / "train_00000.npy").write_bytes(b"definitely not numpy")
    with pytest.raises(DataError, match="train_00000.npy: not a readable .npy"):
        ShardLoader(d, "train", B=2, T=64, verbose=False)


def test_missing_data_dir_gives_the_prepare_hint(tmp_path):
    with pytest.raises(DataError, match=r"run `fastgpt prepare shakespeare --out .*shakespeare_data` first"):
        ShardLoader(tmp_path / "shakespeare_data", "train", B=2, T=8, verbose=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no val shards"):
        ShardLoader(tmp_path / "empty", "val", B=2, T=8, verbose=False)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16, np.uint32])
def test_any_integer_dtype_loads(tmp_path, dtype):
    tokens = np.arange(1000) % V
    d = _dir_with(tmp_path, tokens.astype(dtype))
    loader = ShardLoader(d, "train", B=2, T=16, verbose=False)
    x, y = loader.next_batch()
    assert x.dtype == torch.long and x.shape == (2, 16)
    assert x.flatten().tolist() == tokens[:32].tolist() and y.flatten().tolist() == tokens[1:33].tolist()


# ----------------------------------------------------------------------------------------------
# Loader
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def sharded(tmp_path):
    """Three shards of different lengths holding the ids 0, 1, 2, ... in order."""
    d = tmp_path / "sharded"
    d.mkdir()
    start = 0
    for i, n in enumerate([1000, 700, 1300]):
        np.save(d / f"train_{i:05d}.npy", np.arange(start, start + n, dtype=np.int32))
        start += n
    return d


def test_loader_prints_shard_count(sharded, capsys):
    ShardLoader(sharded, "train", B=2, T=32)
    assert capsys.readouterr().out.strip() == "found 3 shards for split train"


def test_ranks_read_the_chunks_one_process_reads(sharded):
    B, T, W = 2, 32, 2
    single = ShardLoader(sharded, "train", B, T, verbose=False)
    ranks = [ShardLoader(sharded, "train", B, T, rank=r, world=W, verbose=False) for r in range(W)]
    for _ in range(20):  # past the end of every shard and around the epoch
        for r in range(W):
            x1, y1 = single.next_batch()
            xr, yr = ranks[r].next_batch()
            assert torch.equal(x1, xr) and torch.equal(y1, yr)
            # Each chunk lies inside one shard: consecutive ids, target = input + 1.
            assert torch.equal(y1, x1 + 1)
            assert torch.all(x1.flatten().diff() == 1)


def test_loader_state_resumes_exactly(sharded):
    B, T = 3, 16
    a = ShardLoader(sharded, "train", B, T, rank=1, world=2, verbose=False)
    for _ in range(37):
        a.next_batch()
    state = a.state_dict()
    assert set(state) >= {"shard", "position"}
    b = ShardLoader(sharded, "train", B, T, rank=1, world=2, verbose=False)
    b.load_state_dict(state)
    for _ in range(25):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])
    with pytest.raises(DataError, match="shard 9"):
        b.load_state_dict({"shard": 9, "position": 0})


# Each process starts its preparation at the same moment (a barrier), as two `train.py` runs started at once.
_RACER = """
import sys, time
from fastgpt import data
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
data.prepare_default_data(sys.argv[1])
"""


def test_default_data_prepared_once_by_two_processes_at_once(tmp_path):
    import subprocess
    import sys
    import time

    root = tmp_path / "shakespeare_data"
    start = time.time() + 3.0  # both interpreters are up by then
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(root), str(start)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    prepared = [o for o in outs if "Saved 304,222 train tokens and 33,803 val tokens" in o]
    waited = [o for o in outs if "waiting for it" in o and "using its shards" in o]
    assert len(prepared) == 1 and len(waited) == 1, outs  # one prepared, the other said it waited
    assert sorted(p.name for p in root.iterdir()) == [".prepare.lock", "manifest.json", "train_00000.npy", "val_00000.npy"]
    ref = tmp_path / "ref"
    data.prepare_shakespeare(None, ref)
    for name in ("train_00000.npy", "val_00000.npy"):
        assert (root / name).read_bytes() == (ref / name).read_bytes()
    train = ShardLoader(root, "train", 4, 8, 0, 1, V)  # the manifest vouches for the shards: they load
    assert train.next_batch()[0].shape == (4, 8)
