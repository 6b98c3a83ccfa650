"""Device-side helpers shared by the kernel families (@triton.jit functions, inlined into callers).

`store_cast(x, dtype)`: the interpreter's fp32 -> bf16 cast truncates (it drops the low 16 bits),
while compiled code rounds to nearest even (cvt.rn.bf16.f32). Truncation doubles the bf16 error, so
interpreter parity tests would measure the interpreter, not the kernel. Under TRITON_INTERPRET=1 this
rounds the fp32 bits to nearest-even first, which makes the truncating cast exact; compiled code gets
the plain cast (INTERPRETING is a compile-time False there, the branch is not emitted).
"""
import triton
import triton.language as tl

from ._launch import interpreting

# Fixed at import, as @triton.jit itself decides interpreted vs compiled at decoration time.
INTERPRETING = tl.constexpr(interpreting())


@triton.jit
def store_cast(x, dtype: tl.constexpr):
    """fp32 tensor `x` converted to `dtype` with round-to-nearest-even, also under the interpreter."""
    if INTERPRETING:
        if dtype == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            u = u + (0x7FFF + ((u >> 16) & 1))  # round half to even at bit 16
            x = (u & 0xFFFF0000).to(tl.float32, bitcast=True)
    return x.to(dtype)
