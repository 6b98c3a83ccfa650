"""Placeholder until the Triton kernel lands (see the open issue). Raises, never falls back."""


def attention(q, k, v, causal=True, scale=None):
    raise NotImplementedError("kernels.attention: the Triton kernel is not written yet")
