"""The CPU defaults under torchrun (issue 15 item 10): any rank count README shows works, the notice says
how the batch was split, and the validation loss does not depend on the number of ranks."""
import math

import pytest

from _train_util import log_records, run_train


def test_cpu_defaults_on_two_ranks_split_the_batch_and_evaluate_the_same_tokens(shakespeare, tmp_path):
    args = lambda d: ["--data_root", str(shakespeare), "--log_dir", str(d), "--max_steps", "1",  # noqa: E731
                      "--eval_steps", "2"]
    one = run_train(tmp_path, args(tmp_path / "one"))
    two = run_train(tmp_path, args(tmp_path / "two"), nproc=2)
    assert "--micro_batch_size 8" in one.stdout and "1,024 tokens per step = 8 x 128 x 1 x 1" in one.stdout
    assert "--micro_batch_size 4" in two.stdout and "micro-batch 8 split over 2 ranks" in two.stdout
    assert "1,024 tokens per step = 4 x 128 x 2 x 1" in two.stdout
    a, a_val = log_records(tmp_path / "one")
    b, b_val = log_records(tmp_path / "two")
    # The same 1,024 training tokens (rows 0-3 on rank 0, 4-7 on rank 1) and the same 16 val sequences.
    assert math.isclose(a[0][0], b[0][0], rel_tol=1e-5), (a, b)
    assert a_val.keys() == b_val.keys() == {1} and math.isclose(a_val[1], b_val[1], rel_tol=1e-5), (a_val, b_val)


def test_cpu_optimizer_is_torchs_fused_adamw():
    """The CPU step's AdamW is torch's fused one (5x faster than the default for-loop on CPU)."""
    import torch

    from fastgpt import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=16, kernels="torch"))
    opt = model.configure_optimizers(weight_decay=0.1, lr=1e-3, device_type="cpu")
    assert type(opt) is torch.optim.AdamW and all(g["fused"] for g in opt.param_groups)
