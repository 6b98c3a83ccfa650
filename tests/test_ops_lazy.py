"""fastgpt.ops imports `kernels` (and triton) only when a CUDA tensor or TRITON_INTERPRET=1 needs it, and
decides that outside any torch.compile region. Each check runs in a fresh interpreter: the test session
itself has imported kernels long ago."""
import subprocess
import sys

from _train_util import env

SETUP = r"""
import sys
import torch
from fastgpt import GPT, GPTConfig

torch.manual_seed(0)
cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32)
x = torch.randint(0, 64, (2, 16))
"""
EAGER = r"""
model = GPT(cfg)
for return_logits in (False, True):
    _, loss = model(x, x, return_logits=return_logits)
    loss.backward()
print("after forward+backward:", "triton" in sys.modules, "kernels" in sys.modules)
model.configure_optimizers(0.1, 1e-3).step()  # torch.optim itself imports torch._dynamo, and that triton
print("after optimizer step:", "kernels" in sys.modules)
"""
COMPILE = r"""
print("before compile:", "kernels" in sys.modules)
explained = torch._dynamo.explain(GPT(cfg))(x, x, return_logits=False)
print("graph breaks:", explained.graph_break_count, "graphs:", explained.graph_count)
print("fastgpt ops in graph:", any("fastgpt" in g.code for g in explained.graphs))
print("after compile:", "kernels" in sys.modules)
"""


def _run(script: str, interpret: bool) -> str:
    e = env()  # drops TRITON_INTERPRET
    if interpret:
        e["TRITON_INTERPRET"] = "1"
    r = subprocess.run([sys.executable, "-c", SETUP + script], capture_output=True, text=True, env=e, timeout=300)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_cpu_run_never_imports_triton_and_compiles_without_graph_breaks():
    out = _run(EAGER + COMPILE, interpret=False)
    assert "after forward+backward: False False" in out
    assert "after optimizer step: False" in out
    assert "graph breaks: 0 graphs: 1" in out
    assert "fastgpt ops in graph: False" in out and "after compile: False" in out


def test_interpreter_choice_is_made_while_tracing_not_in_the_graph():
    """With TRITON_INTERPRET=1 and kernels not yet imported, tracing imports them (outside the graph):
    still one graph, calling the fastgpt:: custom ops."""
    out = _run(COMPILE, interpret=True)
    assert "before compile: False" in out
    assert "graph breaks: 0 graphs: 1" in out
    assert "fastgpt ops in graph: True" in out and "after compile: True" in out
