"""Package, tokenizer, config and model basics."""
import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastgpt import GPT, GPTConfig, PRESETS, get_encoding

# ids published for tiktoken's "gpt2" encoding (tiktoken README / OpenAI cookbook / build-nanogpt).
KNOWN_IDS = {
    "hello world": [31373, 995],
    "Hello, world!": [15496, 11, 995, 0],
    "tiktoken is great!": [83, 1134, 30001, 318, 1049, 0],
    "First Citizen:\n": [5962, 22307, 25, 198],
    " the": [262],
}


def test_tokenizer_is_gpt2():
    enc = get_encoding()
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    for text, ids in KNOWN_IDS.items():
        assert enc.encode_ordinary(text) == ids, text
        assert enc.decode(ids) == text


def test_config_round_trip_and_presets():
    for name, cfg in PRESETS.items():
        assert GPTConfig(**dataclasses.asdict(cfg)) == cfg, name
    assert GPTConfig.preset("gpt2-xl").n_embd == 1600
    assert GPTConfig.preset("tiny", kernels="torch").kernels == "torch"


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_embd=100, n_head=3), "n_embd=100"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-5), "vocab_size"),
    (dict(block_size=1.5), "block_size"),
    (dict(kernels="cuda"), "kernels"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="gpt3.*gpt2-medium"):
        GPTConfig.preset("gpt3")


def test_gpt2_small_parameter_count():
    # wte (tied with lm_head, counted once) + wpe + 12 blocks + ln_f; vocabulary not padded.
    assert GPT(GPTConfig.preset("gpt2")).num_params() == 124_439_808


def _small(**kw):
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=101, block_size=16, kernels="torch", **kw))


def test_forward_shapes_and_input_errors():
    model = _small()
    idx = torch.randint(0, 101, (3, 16))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 101) and loss is None
    with pytest.raises(ValueError, match="17 exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="101 is outside the vocabulary \\[0, 101\\)"):
        model(torch.full((1, 4), 101))
    with pytest.raises(ValueError, match="-3"):
        model(torch.full((1, 4), -3))


def test_fused_loss_matches_full_logits_loss():
    torch.manual_seed(0)
    model = _small()
    idx = torch.randint(0, 101, (2, 16))
    tgt = torch.randint(0, 101, (2, 16))
    tgt[0, :5] = -1
    _, full = model(idx, tgt)
    none, fused = model(idx, tgt, return_logits=False)
    assert none is None
    assert torch.allclose(full, fused, atol=1e-6)


def test_weights_tied_and_init():
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=1000, block_size=32, kernels="torch"))
    assert model.lm_head.weight is model.transformer.wte.weight
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / (2 * 8) ** 0.5) < 0.001  # residual projections scaled by 1/sqrt(2 n_layer)
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


def test_configure_optimizers_decays_2d_only():
    model = _small()
    opt = model.configure_optimizers(weight_decay=0.1, lr=1e-3, device_type="cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_params()


def test_flops_and_mfu():
    model = GPT(GPTConfig.preset("gpt2"))
    n = model.num_params(non_embedding=True)
    assert model.flops_per_token(1024) == 6 * n + 6 * 12 * 768 * 1024  # causal attention (model.FLOP_CONVENTION)
    # 1 token/s at a peak equal to one token's FLOPs is 100% utilisation.
    assert model.estimate_mfu(1.0, model.flops_per_token(1024), T=1024) == pytest.approx(1.0)


def test_kernels_package_not_mistaken_for_huggingface_kernels():
    code = ("import fastgpt, kernels; from transformers.utils import is_kernels_available; "
            "print(is_kernels_available())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_console_script_help():
    exe = shutil.which("fastgpt")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("the `fastgpt` console script is not installed in CI")
        pytest.skip("fastgpt is not pip-installed here")
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
    for cmd in ("prepare", "train", "generate", "eval", "validate"):
        assert cmd in out.stdout


def test_fastgpt_modules_import_without_cycles():
    """No two fastgpt modules import each other, directly or around a loop (function-level imports count;
    imports under `if TYPE_CHECKING:` never run and do not)."""
    import ast
    from pathlib import Path

    pkg = Path(__file__).resolve().parents[1] / "fastgpt"
    graph = {}
    for f in pkg.glob("*.py"):
        tree = ast.parse(f.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module] if node.module else [a.name for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastgpt."):
                deps.add(node.module.split(".")[1])
        graph[f.stem] = {d.split(".")[0] for d in deps} - {f.stem, "__init__"}
    graph.pop("__init__", None)

    def cycle_from(start, node, path):
        for nxt in graph.get(node, ()):
            if nxt == start:
                return path + [nxt]
            if nxt not in path:
                found = cycle_from(start, nxt, path + [nxt])
                if found:
                    return found
        return None

    cycles = [c for m in graph if (c := cycle_from(m, m, [m]))]
    assert not cycles, f"import cycles among fastgpt modules: {cycles}"
