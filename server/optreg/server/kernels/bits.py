"""Numba intrinsics for the statistics and the finite check: the bits of |x|, an unsigned and, an unsigned max.

Why not numba's own operations: numba widens integer arithmetic on uint32 to 64 bits, so a max over
float32 bits ran in 64-bit lanes (half the vector width), and inside a kernel's loop it kept LLVM
from vectorizing the loop at all. These emit the 32-bit (or 64-bit) IR directly: a bitcast, an
`and`, and an icmp/select that LLVM's vectorizer takes as an unsigned max reduction.
For floats of one width, the order of the sign-cleared bits is the order of |x|, with +inf above
every finite value and NaN above +inf: max |g| and "is there a NaN or Inf" in one reduction.
"""
from __future__ import annotations

try:  # pragma: no cover - whichever environment runs
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic
except ImportError:  # pragma: no cover - no numba: nothing compiles, nothing calls these
    intrinsic = abs_bits = uand = umax = None

# float32 bits at and above this are +inf or NaN (sign cleared); float64 likewise
NONFINITE32 = 0x7F800000
NONFINITE64 = 0x7FF0000000000000

if intrinsic is not None:
    @intrinsic
    def abs_bits(typingctx, x):
        """The bits of |x| (float32 or float64) as an unsigned integer of the same width."""
        if not isinstance(x, types.Float) or x.bitwidth not in (32, 64):
            return None
        width = x.bitwidth

        def codegen(context, builder, sig, args):
            it = ir.IntType(width)
            return builder.and_(builder.bitcast(args[0], it), ir.Constant(it, (1 << (width - 1)) - 1))
        return (types.uint32 if width == 32 else types.uint64)(x), codegen

    @intrinsic
    def uand(typingctx, a, b):
        """a & b for two unsigned integers of one type, in that width (numba's & widens to 64 bits)."""
        if not (isinstance(a, types.Integer) and not a.signed and a == b):
            return None

        def codegen(context, builder, sig, args):
            return builder.and_(args[0], args[1])
        return a(a, b), codegen

    @intrinsic
    def umax(typingctx, a, b):
        """max(a, b) for two unsigned integers of one type, in that width."""
        if not (isinstance(a, types.Integer) and not a.signed and a == b):
            return None

        def codegen(context, builder, sig, args):
            return builder.select(builder.icmp_unsigned(">", args[0], args[1]), args[0], args[1])
        return a(a, b), codegen
