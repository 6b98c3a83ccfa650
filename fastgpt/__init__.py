"""fastgpt: GPT-2 trained from scratch on hand-written Triton kernels.

    from fastgpt import GPT, GPTConfig, get_encoding
    model = GPT(GPTConfig.preset("gpt2"))
    logits, loss = model(idx, targets)

The names load on first use (module __getattr__), so `import fastgpt` and the `fastgpt` command's
--help and flag errors do not pay for importing torch (seconds) until a model is needed.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {"GPT": "model", "GPTConfig": "config", "PRESETS": "config", "TrainConfig": "train.options",
            "get_encoding": "tokenizer"}


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    else:  # a submodule (fastgpt.ops, fastgpt.checkpoint), as the eager imports used to leave them bound
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = ["GPT", "GPTConfig", "TrainConfig", "PRESETS", "get_encoding", "__version__"]
