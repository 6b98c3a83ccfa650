"""`import fastgpt`, `fastgpt --help` and the flag errors that need no model import no torch (nor triton,
transformers, numpy): torch alone takes seconds to import, and these used to wait for it. Each case runs in a
fresh interpreter, which reports the heavy modules it ended up with."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "triton", "transformers", "numpy", "kernels", "huggingface_hub")
PROBE = """
import runpy, sys
argv = sys.argv[1:]
sys.argv = argv
try:
    if argv[0] == "import":
        import fastgpt
        assert fastgpt.__version__ and "TrainConfig" in dir(fastgpt)
    elif argv[0].endswith(".py"):
        runpy.run_path(argv[0], run_name="__main__")
    else:
        runpy.run_module("fastgpt", run_name="__main__", alter_sys=True)
except SystemExit:
    pass
print("HEAVY", *sorted({m.split(".")[0] for m in sys.modules} & set(%r)), file=sys.stderr)
""" % (HEAVY,)


def probe(tmp_path, *argv):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the tests' conftest sets it
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("HEAVY"), r.stderr[-2000:]
    return r.stdout, "\n".join(lines[:-1]), lines[-1].split()[1:]


@pytest.mark.parametrize("argv, says", [
    (("import",), ""),
    (("fastgpt", "--help"), "usage: fastgpt"),
    (("fastgpt", "train", "--help"), "usage: fastgpt train"),
    ((str(ROOT / "train.py"), "--kernels", "triton", "--device", "cpu"),
     "error: --kernels triton: kernels='triton' was requested but Triton cannot run here: tensors are on the CPU "
     "and TRITON_INTERPRET=1 is not set"),
    ((str(ROOT / "train.py"), "--log_dir", str(ROOT / "README.md" / "log")),
     f"error: --log_dir {ROOT / 'README.md' / 'log'} is not a writable directory (Not a directory: "),
    (("fastgpt", "generate", "--checkpoint", "log/model_00320.pt"), "error: no such checkpoint log/model_00320.pt"),
])
def test_no_heavy_import_before_it_is_needed(tmp_path, argv, says):
    out, err, heavy = probe(tmp_path, *argv)
    assert says in out + err, (out, err)
    assert heavy == [], f"{' '.join(argv)} imported {heavy}"


def test_public_names_still_load(tmp_path):
    """The lazy names are the real objects, and loading one imports what it needs (here: torch)."""
    code = ("import sys, fastgpt, fastgpt.model as m; from fastgpt import GPT, GPTConfig, TrainConfig, PRESETS, "
            "get_encoding; assert GPT is m.GPT and 'torch' in sys.modules; "
            "assert fastgpt.ops.use_triton('torch') is False; "
            "assert GPTConfig.preset('tiny').n_layer > 0 and 'gpt2' in PRESETS and TrainConfig().max_steps > 0; "
            "assert get_encoding().decode(get_encoding().encode_ordinary('hi')) == 'hi'; "
            "ns = {}; exec('from fastgpt import *', ns); assert ns['GPT'] is GPT; "
            "print(hasattr(fastgpt, 'no_such_name'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]


def test_spelled_out_choices_match_the_registries():
    """options.py names the --shard / --data_order / --recipe choices without importing their packages."""
    from fastgpt.data import DATA_ORDERS
    from fastgpt.data.recipes import RECIPES
    from fastgpt.parallel import STRATEGIES
    from fastgpt.train import options

    assert options.SHARD_MODES == tuple(STRATEGIES)
    assert options.DATA_ORDERS == tuple(DATA_ORDERS)
    assert options.RECIPES == tuple(sorted(RECIPES))


def test_a_new_strategy_file_is_a_new_shard_choice(tmp_path):
    """Adding a sharding mode is adding one file: its class's `name` and `order` become a --shard choice."""
    import shutil

    from fastgpt.train import options

    parallel = ROOT / "fastgpt" / "parallel"
    shutil.copytree(parallel, tmp_path / "parallel")
    (tmp_path / "parallel" / "pipeline.py").write_text(
        "from .common import Strategy\n\n\nclass Pipeline(Strategy):\n    name = \"pipeline\"\n    order = 1\n")
    assert options._declared_strategies(parallel) == ("ddp", "zero1", "fsdp")
    assert options._declared_strategies(tmp_path / "parallel") == ("ddp", "pipeline", "zero1", "fsdp")
