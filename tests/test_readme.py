"""The README's and docs/ pages' examples run as pasted on this (CPU) machine, in reading order, in one
directory, so one example clobbering another's files shows (issue 15 item 12, issue 22 item 3, issue 24
item 5).

Every ```python block runs. Of the ```bash blocks, the commands in RUN run (the cheap ones that need
no GPU, network, training run or downloaded data); the others (training, torchrun, the hub, HellaSwag
downloads) are covered by their own tests. The directory starts as README's quick start leaves it:
its last checkpoint, log/model_NNNNN.pt with NNNNN the CPU default's max_steps. The blocks run in a fresh
interpreter without TRITON_INTERPRET, as in a user's shell."""
import json
import re
import subprocess
import sys
from dataclasses import asdict

from _train_util import ROOT, env
from fastgpt import GPT, GPTConfig
from fastgpt import checkpoint as ck

# Reading order: the front door, then the pages it links, in its table's order.
PAGES = ["README.md"] + [f"docs/{p}.md" for p in (
    "architecture", "training", "data", "multi-gpu", "kernels", "gpus", "benchmarks", "cpu", "troubleshooting")]

# Shell commands (by their start) that run: each takes seconds on a CPU with the quick start's checkpoint.
RUN = ("fastgpt --help", "fastgpt export ", "fastgpt validate --model my_gpt2", "fastgpt generate --checkpoint ",
       "python -c ")

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def shell_commands(block: str) -> list[str]:
    """The commands of a bash block: continuation lines joined, comments and blank lines dropped. A quoted
    argument that spans lines (python -c '...') stays one command."""
    cmds, cur = [], ""
    for line in block.splitlines():
        cur += line + "\n"
        if cur.count("'") % 2 or cur.rstrip().endswith("\\"):
            continue
        cmd = cur.strip()
        cur = ""
        if cmd and not cmd.startswith("#"):
            cmds.append(cmd)
    return cmds


def strip_comment(cmd: str) -> str:
    # A trailing "   # ..." after the command (two or more spaces before the #, outside quotes).
    return re.sub(r"\s{2,}#[^'\"]*$", "", cmd)


def doc_steps() -> list[tuple[str, str, str]]:
    """(kind, code, where) for every step that runs, in reading order."""
    steps = []
    for page in PAGES:
        text = (ROOT / page).read_text()
        for n, (lang, body) in enumerate(FENCE.findall(text)):
            where = f"{page} block {n + 1}"
            if lang == "python":
                steps.append(("python", body, where))
            elif lang == "bash":
                steps += [("shell", strip_comment(c), where) for c in shell_commands(body) if c.startswith(RUN)]
    return steps


def test_pages_exist_and_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for page in PAGES[1:]:
        assert (ROOT / page).exists(), page
        assert f"({page})" in readme, f"README does not link {page}"
    for cmd in ("prepare_shakespeare.py", "scripts.train", "scripts.generate", "scripts.eval_hellaswag",
                "scripts.validate", "from gpt.model import GPT"):
        assert cmd in readme, f"README's table lacks the training guide's {cmd}"


def test_shell_commands_are_parsed_whole():
    block = ("fastgpt export --checkpoint a.pt --out d    # a comment\n# a line comment\n\n"
             "fastgpt generate --checkpoint a.pt \\\n    --seed 1\n"
             "python -c 'import sys\nprint(1)'\n")
    assert [strip_comment(c) for c in shell_commands(block)] == [
        "fastgpt export --checkpoint a.pt --out d", "fastgpt generate --checkpoint a.pt \\\n    --seed 1",
        "python -c 'import sys\nprint(1)'"]


def written_paths(code: str) -> list[str]:
    """Directories and files an example writes by name: `--out X` and `save_pretrained("X")`."""
    return re.findall(r"--out (\S+)", code) + re.findall(r"save_pretrained\([\"']([^\"']+)", code)


def test_examples_write_distinct_paths():
    # In one directory an example that writes where another did clobbers it, whatever the order; the
    # Python API block once saved a random 2-layer model over the export section's my_gpt2.
    seen = {}
    for _, code, where in doc_steps():
        for path in written_paths(code):
            assert path not in seen, f"{where} writes {path}, which {seen[path]} writes too"
            seen[path] = where
    assert "my_gpt2" in seen


def test_doc_examples_run_in_order_in_one_directory(tmp_path):
    steps = doc_steps()
    kinds = {k for k, _, _ in steps}
    assert kinds == {"python", "shell"}
    assert any("kernels.attention" in code for _, code, _ in steps)
    assert any(code.startswith("fastgpt export") and "my_gpt2" in code for _, code, _ in steps)
    assert any(code.startswith("fastgpt validate --model my_gpt2") for _, code, _ in steps)

    cfg = GPTConfig.preset("tiny")
    from fastgpt.train import CPU_DEFAULTS

    last = ck.checkpoint_path(tmp_path / "log", CPU_DEFAULTS["max_steps"])
    ck.save_atomic({"config": asdict(cfg), "model": GPT(cfg).state_dict()}, last)
    # One interpreter runs them in order: python blocks each in a fresh namespace (the imports are paid
    # once), shell commands as subprocesses with `fastgpt` / `python` meaning this interpreter.
    py = sys.executable
    lines = ["import subprocess, sys"]
    for kind, code, where in steps:
        if kind == "python":
            lines.append(f"exec(compile({code!r}, {where!r}, 'exec'), {{'__name__': '__main__'}})")
        else:
            cmd = re.sub(r"^fastgpt ", f"{py} -m fastgpt ", re.sub(r"^python ", f"{py} ", code))
            lines.append(f"print('$ ' + {code!r}, flush=True)")
            lines.append(f"r = subprocess.run({cmd!r}, shell=True)")
            lines.append(f"if r.returncode: sys.exit('{where}: exit status %d: ' % r.returncode + {code!r})")
    e = env()
    assert "TRITON_INTERPRET" not in e
    e["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([py, "-c", "\n".join(lines)], cwd=tmp_path, env=e, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Hello world" in r.stdout
    # The exported directory still holds the quick start's model when validate reads it: no later or
    # earlier example wrote another model there (the Python API block once saved a random 2-layer one).
    exported = json.loads((tmp_path / "my_gpt2" / "config.json").read_text())
    assert (exported["n_layer"], exported["n_embd"]) == (cfg.n_layer, cfg.n_embd)
    assert (tmp_path / "api_demo_gpt2" / "config.json").exists()
