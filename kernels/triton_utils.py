"""Helpers shared by the Triton kernels.

``dot``: Triton 3.9's interpreter computes ``tl.dot`` on bfloat16 operands wrongly (errors of 1e10
on a 16x32x16 product of N(0, 1) inputs, measured on this repo's CI machine; fp32, fp16 and fp8
operands are right). Under the interpreter we therefore widen bfloat16 operands to fp32 before the
dot. That is exact: a product of two bf16 values (8-bit significands) fits fp32's 24-bit significand,
and the hardware MMA accumulates those products in fp32 too, so the interpreted kernel computes what
the compiled one does, up to summation order. Compiled kernels keep the native bf16 MMA.

Imports Triton, so only the ``*_triton.py`` kernel modules import this one: the op modules and launchers
must import without Triton (host-side grid math is in ``launch_math.py``; see ``dispatch.py``).
"""


import triton
import triton.language as tl

from .dispatch import interpreting

# Read once at import, like Triton itself decides interpretation at decoration time, and the way Triton reads
# it ('on'/'yes' interpret too): a different reading left bf16 dots unwidened under the interpreter.
INTERPRET = tl.constexpr(interpreting())


@triton.jit
def dot(a, b, acc):
    """``acc + a @ b`` with fp32 accumulation, correct under the interpreter for bf16 operands.

    fp32 operands multiply in IEEE fp32, not ``tl.dot``'s default TF32 (10-bit mantissa): an fp32 model's
    rollout log-probs must equal the trainer's fp32 recomputation, or on-policy importance ratios drift
    from 1 and inflate clip_frac.
    """
    if INTERPRET:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    if a.dtype == tl.float32 and b.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def cast_rne(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest even also under the interpreter.

    Triton 3.9's interpreter truncates fp32 -> bf16 (measured: half of a GEMM's outputs 1 ulp low);
    compiled kernels round to nearest even. Under the interpreter we round the fp32 bits first
    (add 0x7FFF plus the lowest kept bit, clear the low 16 bits), so the cast itself is exact.
    """
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
