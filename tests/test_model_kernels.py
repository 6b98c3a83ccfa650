"""The `tiny` preset trained with every Triton kernel on (interpreter) against the PyTorch reference."""
import pytest
import torch

import kernels
from fastgpt import GPT, GPTConfig

ALL_KERNELS = ("layer_norm_fwd", "layer_norm_bwd", "gelu_fwd", "gelu_bwd", "attention_fwd",
               "attention_bwd_dkdv", "attention_bwd_dq", "cross_entropy", "adamw")


def _losses(mode, device, steps=5):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("tiny", kernels=mode)).to(device)
    opt = model.configure_optimizers(weight_decay=0.1, lr=3e-3, device_type=device)
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 50257, (steps, 2, 33), generator=g).to(device)
    losses = []
    for step in range(steps):
        x, y = data[step, :, :-1], data[step, :, 1:]
        _, loss = model(x, y, return_logits=False)  # the training path: fused linear cross-entropy
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


def test_tiny_preset_all_kernels_match_torch(kernel_device, expect_launch):
    if not kernels.can_launch(torch.empty(0, device=kernel_device)):
        pytest.skip(kernels.why_not(torch.empty(0, device=kernel_device)))
    ref = _losses("torch", kernel_device)
    with expect_launch(*ALL_KERNELS):
        ours = _losses("triton", kernel_device)
    assert ref[-1] < ref[0]
    for step, (a, b) in enumerate(zip(ref, ours)):
        assert abs(a - b) <= 1e-4, f"step {step}: torch {a:.6f} vs triton {b:.6f}"
