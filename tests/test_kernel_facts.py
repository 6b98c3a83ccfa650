"""A kernel's facts live in its file: compile signatures derived from the kernel, workspace sizes."""
import pytest
import torch

import kernels  # noqa: F401  (registers every family's builds)
from kernels import _launch
from kernels import cross_entropy as ce
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


def test_cross_entropy_forward_holds_no_more_than_its_registered_workspace(monkeypatch):
    """_forward's peak is its outputs plus the workspace its file registers: one chunk's logits at a time
    (before `del logits, xc` the next chunk's logits were computed while the previous ones were held)."""
    import torch
    from torch.distributed._tools.mem_tracker import MemTracker

    from kernels import cross_entropy as ce

    # the loss kernel writes in place; the interpreter's copies of its arguments are not CUDA's memory
    monkeypatch.setattr(ce, "_launch_loss_grad", lambda *a: None)
    N, C, V, rows = 64, 32, 256, 16
    x, w = torch.randn(N, C), torch.randn(V, C)
    t = torch.randint(0, V, (N,))
    args = dict(x=x, weight=w, targets=t, ignore_index=-1, reduction="mean", compute_dtype=torch.float32,
                chunk_rows=rows, need_dx=True, need_dw=True)
    work = sum(torch.empty(s, dtype=d).untyped_storage().nbytes() for s, d in _launch.workspace("linear_cross_entropy", args))
    assert work >= rows * V * 4  # one chunk's logits are in it
    mt = MemTracker()
    with mt:
        mt.track_external(x, w, t)
        base = mt.get_tracker_snapshot("current")
        out = ce._forward(**args)
        peak = mt.get_tracker_snapshot("peak")
    dev = x.device
    grown = peak[dev]["Total"] - base[dev]["Total"]
    outputs = N * C * 4 + V * C * 4  # dx, the fp32 dweight accumulator (dweight is a view of it)
    assert grown <= outputs + work + 8 * 512, (grown, outputs, work)  # + a few 512 B scalars (loss, scale)
    del out


def test_cross_entropy_workspace_counts_a_bf16_dweight_product_only_on_the_fallback(monkeypatch):
    """On CUDA with addmm(..., out_dtype) the bf16 dweight product goes straight into the fp32 accumulator:
    no (V_pad, C) temporary; only the fallback (a torch build without it) makes one."""
    x, w, t = torch.empty(1024, 768, dtype=torch.bfloat16), torch.empty(50257, 768), torch.empty(1024, dtype=torch.long)
    args = dict(x=x, weight=w, targets=t, ignore_index=-1, reduction="mean", compute_dtype=torch.bfloat16,
                chunk_rows=0, need_dx=True, need_dw=True)
    direct = _launch.workspace("linear_cross_entropy", args)
    assert ((50304, 768), torch.bfloat16) in direct  # the padded weight copy
    assert direct.count(((50304, 768), torch.bfloat16)) == 1
    monkeypatch.setattr(ce, "_OUT_DTYPE_ADDMM", [False])
    assert _launch.workspace("linear_cross_entropy", args).count(((50304, 768), torch.bfloat16)) == 2
