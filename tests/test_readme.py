"""Every ```python block of README.md runs as pasted on this (CPU) machine (issue 15, item 12).

The blocks run in a fresh interpreter without TRITON_INTERPRET (as in a user's shell), in a directory
holding what README's earlier commands would have left there: the quick start's last checkpoint
(log/model_NNNNN.pt, NNNNN the CPU default's max_steps)."""
import re
import subprocess
import sys
from dataclasses import asdict

from _train_util import ROOT, env
from fastgpt import GPT, GPTConfig
from fastgpt import checkpoint as ck

README = ROOT / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.M | re.S)


def test_readme_python_blocks_run_as_pasted(tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 2 and any("kernels.attention" in b for b in blocks)
    cfg = GPTConfig.preset("tiny")
    from fastgpt.train import CPU_DEFAULTS

    last = ck.checkpoint_path(tmp_path / "log", CPU_DEFAULTS["max_steps"])
    ck.save_atomic({"config": asdict(cfg), "model": GPT(cfg).state_dict()}, last)
    # One interpreter runs them in order, each in a fresh namespace (the imports are paid once).
    driver = "\n".join(f"exec(compile({b!r}, 'README.md block {i + 1}', 'exec'), {{'__name__': '__main__'}})"
                       for i, b in enumerate(blocks))
    e = env()
    assert "TRITON_INTERPRET" not in e
    e["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, env=e, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Hello world" in r.stdout and (tmp_path / "my_gpt2" / "config.json").exists()
