"""Sampling with and without the KV cache."""
import pytest
import torch

from _train_util import one_thread  # noqa: F401
from fastgpt import GPT, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=32, vocab_size=101, n_layer=2, n_head=2, n_embd=32, kernels="torch")).eval()
    with torch.no_grad():  # sharper logits than the 0.02 init, so greedy choices are far from ties
        m.transformer.wte.weight.mul_(10)
    return m


@pytest.mark.parametrize("prompt_len, new", [(1, 10), (7, 20), (5, 60), (40, 5)], ids=str)
@pytest.mark.filterwarnings("ignore::fastgpt.generate.PromptCroppedWarning")  # 40 > block 32 on purpose
def test_greedy_with_cache_equals_without(model, prompt_len, new):
    # (5, 60) and (40, 5) run past block_size=32: the window slides and the cache is rebuilt.
    idx = torch.randint(0, 101, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    a = model.generate(idx, new, temperature=0.0, use_cache=True)
    b = model.generate(idx, new, temperature=0.0, use_cache=False)
    assert a.shape == (3, prompt_len + new)
    assert torch.equal(a[:, :prompt_len], idx)
    assert torch.equal(a, b)


def test_cached_logits_match_full_forward(model):
    from fastgpt.generate import KVCache

    idx = torch.randint(0, 101, (2, 20), generator=torch.Generator().manual_seed(1))
    full, _ = model(idx)
    cache = KVCache(model.config, 2, 32, "cpu", torch.float32)
    first, _ = model(idx[:, :12], kv_cache=cache)
    steps = [model(idx[:, t:t + 1], kv_cache=cache)[0] for t in range(12, 20)]
    got = torch.cat([first] + steps, dim=1)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    idx = torch.zeros(2, 3, dtype=torch.long)
    s1 = model.generate(idx, 15, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    s2 = model.generate(idx, 15, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(s1, s2)
    k1 = model.generate(idx, 15, temperature=0.8, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(k1, model.generate(idx, 15, temperature=0.0))


def test_top_k_restricts_the_choices(model):
    idx = torch.zeros(64, 4, dtype=torch.long)
    logits, _ = model(idx[:1])
    allowed = set(torch.topk(logits[0, -1], 3).indices.tolist())
    out = model.generate(idx, 1, temperature=2.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(out[:, -1].tolist()) <= allowed


def test_bad_arguments(model):
    idx = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 1, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(idx, 1, top_k=0)


def test_generate_names_the_checkpoints_that_exist(tmp_path, capsys):
    from fastgpt import cli

    log = tmp_path / "log"
    log.mkdir()
    for step in (80, 160, 240):
        (log / f"model_{step:05d}.pt").write_bytes(b"")
    assert cli.main(["generate", "--checkpoint", str(log / "model_00320.pt")]) == 1
    err = capsys.readouterr().err
    assert "model_00320.pt" in err and f"the newest in {log}/ is {log / 'model_00240.pt'}" in err
    assert "model_00080.pt" in err
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "empty" / "m.pt")]) == 1
    assert "holds no .pt files" in capsys.readouterr().err
