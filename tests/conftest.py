"""Test setup shared by every test file.

Without a GPU, Triton kernels run through the interpreter on CPU tensors. `@triton.jit` picks
interpreted or compiled at decoration time, so TRITON_INTERPRET must be set before `kernels` is
imported: here, before any test module loads. With a GPU the kernels compile and the `gpu`-marked
tests run on CUDA tensors (`pytest -m gpu`).
"""
import contextlib
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Decorated now, while the flag is set: a test that switches the interpreter off (the memory model's)
    # must not be the first to import kernels, or every later interpreter test would get compiled kernels.
    import kernels  # noqa: E402, F401


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def expect_launch():
    """`with expect_launch("layer_norm_fwd"): ...` fails unless that Triton kernel launched inside."""
    import kernels

    @contextlib.contextmanager
    def _expect(*names):
        before = {n: kernels.launches(n) for n in names}
        yield
        for n in names:
            assert kernels.launches(n) > before[n], f"Triton kernel {n!r} did not launch"

    return _expect


@pytest.fixture
def kernel_device():
    """Where Triton kernels run in this session: CPU under the interpreter, else CUDA."""
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """The packaged Tiny Shakespeare as token shards, prepared once per test module (tests only read them)."""
    from _train_util import SHAKESPEARE
    from fastgpt import data

    out = tmp_path_factory.mktemp("shakespeare_data")
    data.prepare_shakespeare(SHAKESPEARE, out)
    return out
