"""fastgpt's Triton kernels, usable on their own: `import kernels`.

Each family lives in its own file (design docstring, @triton.jit kernels, launchers, custom op with
autograd, PyTorch reference). Every public function is a `torch.library` custom op in the
"fastgpt" namespace with a fake implementation and a registered autograd formula.

    kernels.layer_norm(x, weight, bias, eps=1e-5)       == F.layer_norm over the last dim (weight/bias may be None;
                                                         under autocast the output is in the autocast dtype)
    kernels.gelu(x)                                      == F.gelu(x, approximate="tanh")
    kernels.attention(q, k, v, causal=True, scale=None)  == F.scaled_dot_product_attention, (B, H, T, D)
    kernels.linear_cross_entropy(x, weight, targets)     == F.cross_entropy(x @ weight.T, targets)
    kernels.FusedAdamW(params, lr, betas, eps, weight_decay) == torch.optim.AdamW

Dtypes, one rule for all: fp32, bf16 or fp16 storage (`kernels.DTYPES`), math in fp32; any other dtype (float64
included) raises `kernels.DtypeError` (a TypeError and a ValueError) naming it.

Per GPU: `kernels.arch_plan((major, minor))` / `kernels.device_plan(device)` give the attention config
table, default training dtype, attention route (Triton or SDPA) and a one-line reason;
`kernels.attention_configs()` / `kernels.install_attention_configs(entries)` read and pin the attention
launch configs (FASTGPT_ATTENTION_CONFIGS=fixed pins them to each table's first candidate).
"""

from ._launch import DTYPES, DtypeError, arch_plan, attention_route, can_launch, device_plan, interpreting, launches, why_not
from .adamw import FusedAdamW
from .attention import HEAD_DIMS as ATTENTION_HEAD_DIMS
from .attention import (
    attention,
    attention_config_mode,
    attention_configs,
    clear_attention_configs,
    install_attention_configs,
    set_attention_config_mode,
)
from .cross_entropy import linear_cross_entropy
from .gelu import gelu
from .layer_norm import layer_norm

__all__ = [
    "layer_norm",
    "gelu",
    "attention",
    "ATTENTION_HEAD_DIMS",
    "attention_configs",
    "install_attention_configs",
    "clear_attention_configs",
    "set_attention_config_mode",
    "attention_config_mode",
    "arch_plan",
    "device_plan",
    "attention_route",
    "linear_cross_entropy",
    "FusedAdamW",
    "DTYPES",
    "DtypeError",
    "can_launch",
    "interpreting",
    "launches",
    "why_not",
]
