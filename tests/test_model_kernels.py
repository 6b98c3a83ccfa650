"""The `tiny` preset trained with every Triton kernel on (interpreter) against the PyTorch reference."""
import pytest
import torch

import kernels
from _train_util import train_losses
from fastgpt import GPT, GPTConfig

ALL_KERNELS = ("layer_norm_fwd", "layer_norm_bwd", "gelu_fwd", "gelu_bwd", "attention_fwd",
               "attention_bwd_dkdv", "attention_bwd_dq", "cross_entropy", "adamw")


def _losses(mode, device, steps=5):
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 50257, (steps, 2, 33), generator=g)
    batches = [(seq[:, :-1], seq[:, 1:]) for seq in data]
    # return_logits=False: the training path, through the fused linear cross-entropy
    return train_losses(GPTConfig.preset("tiny", kernels=mode), batches, device, return_logits=False, lr=3e-3,
                        grad_clip=1.0)


def test_tiny_preset_all_kernels_match_torch(kernel_device, expect_launch):
    if not kernels.can_launch(torch.empty(0, device=kernel_device)):
        pytest.skip(kernels.why_not(torch.empty(0, device=kernel_device)))
    ref = _losses("torch", kernel_device)
    with expect_launch(*ALL_KERNELS):
        ours = _losses("triton", kernel_device)
    assert ref[-1] < ref[0]
    for step, (a, b) in enumerate(zip(ref, ours)):
        assert abs(a - b) <= 1e-4, f"step {step}: torch {a:.6f} vs triton {b:.6f}"


@pytest.mark.gpu
def test_gpt2_shaped_bf16_training_step_matches_torch_on_cuda():
    """The real training configuration on a GPU: GPT-2 widths (768, 12 heads of 64), T = 1024, bf16
    autocast, fused linear cross-entropy, FusedAdamW, every Triton kernel compiled. Two layers keep it
    quick; losses and the first step's gradients are held to the PyTorch path within bf16 noise."""
    cfg = dict(n_layer=2, n_head=12, n_embd=768, block_size=1024)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 50257, (3, 4, 1025), generator=g).cuda()

    def run(mode):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**cfg, kernels=mode)).cuda()
        opt = model.configure_optimizers(weight_decay=0.1, lr=6e-4, device_type="cuda")
        losses, grads = [], None
        for step in range(3):
            x, y = data[step, :, :-1], data[step, :, 1:]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                _, loss = model(x, y, return_logits=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grads is None:
                grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
            opt.step()
            losses.append(loss.item())
        return losses, grads, type(opt).__name__

    ref, ref_grads, ref_opt = run("torch")
    with_kernels = kernels.launches()
    ours, our_grads, our_opt = run("triton")
    assert kernels.launches() > with_kernels and our_opt == "FusedAdamW" and ref_opt == "AdamW"
    for step, (a, b) in enumerate(zip(ref, ours)):
        assert abs(a - b) <= 2e-2, f"step {step}: torch {a:.5f} vs triton {b:.5f}"
    for name, g_ref in ref_grads.items():
        rel = (our_grads[name] - g_ref).norm() / g_ref.norm().clamp_min(1e-12)
        assert rel.item() <= 5e-2, f"{name}: relative gradient difference {rel.item():.3e}"
