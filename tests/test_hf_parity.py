"""fastgpt's GPT-2 against HuggingFace transformers on the same random weights (CPU, fp32)."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fastgpt import GPT

SHAPES = [
    # (n_layer, n_head, n_embd, vocab_size, n_positions)
    (2, 4, 64, 50257, 64),
    (3, 3, 96, 1001, 32),  # odd vocabulary, head size 32
    (1, 1, 48, 50257, 16),  # a single head
]


def _hf_model(n_layer, n_head, n_embd, vocab, n_pos, seed=0):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab, n_positions=n_pos,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make biases and LayerNorm affine non-trivial so every copy is checked
        for name, p in hf.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "L{}h{}C{}V{}".format(*s[:4]))
def test_from_pretrained_matches_hf(tmp_path, shape):
    hf = _hf_model(*shape)
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path), kernels="torch").eval()
    vocab, n_pos = shape[3], shape[4]

    torch.manual_seed(1)
    idx = torch.randint(0, vocab, (2, n_pos))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -1  # HF's labels= drops the last position; so do we (ignore_index -1)
    logits, loss = ours(idx, targets)
    out = hf(idx, labels=idx)

    assert logits.shape == out.logits.shape == (2, n_pos, vocab)
    assert (logits - out.logits).abs().max().item() <= 1e-4
    assert abs(loss.item() - out.loss.item()) <= 1e-5

    loss.backward()
    out.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        if name == "lm_head.weight":
            continue
        g_hf = hf_params[name].grad
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            g_hf = g_hf.t()
        rel = (p.grad - g_hf).norm() / g_hf.norm().clamp_min(1e-12)
        assert rel.item() <= 1e-4, f"{name}: relative gradient error {rel.item():.2e}"


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    from fastgpt import GPTConfig

    ours = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=503, block_size=24, kernels="torch")).eval()
    ours.save_pretrained(str(tmp_path))
    hf = GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    idx = torch.randint(0, 503, (3, 24))
    with torch.no_grad():
        assert (ours(idx)[0] - hf(idx).logits).abs().max().item() <= 1e-5
    from fastgpt.hf import to_hf

    with torch.no_grad():  # the in-memory export gives the same model
        assert (ours(idx)[0] - to_hf(ours)(idx).logits).abs().max().item() <= 1e-5
    back = GPT.from_pretrained(str(tmp_path), kernels="torch").eval()
    for (k, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), k


def test_offline_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="local directory"):
        GPT.from_pretrained("gpt2-xl")


def test_missing_local_dir_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        GPT.from_pretrained(str(tmp_path / "nope"))
