"""A kernel's facts live in its file: compile signatures derived from the kernel, workspace sizes."""
import pytest

import kernels  # noqa: F401  (registers every family's builds)
from kernels import _launch
from kernels.gelu import _gelu_fwd_kernel


def test_signature_follows_the_kernel_arguments():
    sig = _launch.signature(_gelu_fwd_kernel, {"X": "*bf16", "Y": "*bf16"}, default="i32")
    assert list(sig.items()) == [("X", "*bf16"), ("Y", "*bf16"), ("n_elements", "i32"), ("BLOCK", "constexpr")]


def test_signature_refuses_a_stale_name_or_an_untyped_argument():
    with pytest.raises(ValueError, match="no argument.*'Z'"):
        _launch.signature(_gelu_fwd_kernel, {"X": "*bf16", "Z": "*bf16"}, default="i32")
    with pytest.raises(ValueError, match="no type for argument 'n_elements'"):
        _launch.signature(_gelu_fwd_kernel, {"X": "*bf16", "Y": "*bf16"})
    with pytest.raises(ValueError, match="no argument"):
        _launch.aligned(_gelu_fwd_kernel, "X", "W")


def test_every_build_signature_names_its_kernel_arguments_in_order():
    for b in _launch.all_builds():
        assert list(b.signature) == list(b.fn.arg_names), b.kernel
        for name, is_constexpr in zip(b.fn.arg_names, _launch.constexpr_flags(b.fn)):
            if is_constexpr:
                assert b.signature[name] == "constexpr", (b.kernel, name)
            elif b.signature[name] == "constexpr":  # a runtime argument specialised to a value (T=1)
                assert name in b.constexprs, (b.kernel, b.config, name)
