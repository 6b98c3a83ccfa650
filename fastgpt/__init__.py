"""fastgpt: GPT-2 trained from scratch on hand-written Triton kernels.

    from fastgpt import GPT, GPTConfig, get_encoding
    model = GPT(GPTConfig.preset("gpt2"))
    logits, loss = model(idx, targets)
"""
from .config import PRESETS, GPTConfig
from .train.options import TrainConfig
from .model import GPT
from .tokenizer import get_encoding

__version__ = "0.1.0"

__all__ = ["GPT", "GPTConfig", "TrainConfig", "PRESETS", "get_encoding", "__version__"]
