"""Numba intrinsics for the statistics, the finite check and bfloat16 slots: the bits of |x|, an unsigned
and, an unsigned max, bfloat16 to and from float32.

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
    intrinsic = abs_bits = uand = umax = bfloat_to_float = float_to_bfloat = None

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

    @intrinsic
    def bfloat_to_float(typingctx, h):
        """bfloat16 bits (uint16) to the float32 they are the top half of (exact)."""
        if h != types.uint16:
            return None

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)
            return builder.bitcast(builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), ir.FloatType())
        return types.float32(types.uint16), codegen

    @intrinsic
    def float_to_bfloat(typingctx, x):
        """float32 to bfloat16 bits (uint16), rounded to nearest even as ml_dtypes rounds (a carry into the
        exponent gives Inf); NaN becomes the canonical quiet NaN with its sign, as in ml_dtypes."""
        if x != types.float32:
            return None

        def codegen(context, builder, sig, args):
            i32 = ir.IntType(32)

            def k(v):
                return ir.Constant(i32, v)
            b = builder.bitcast(args[0], i32)
            top = builder.lshr(b, k(16))
            rounded = builder.lshr(builder.add(builder.add(b, k(0x7FFF)), builder.and_(top, k(1))), k(16))
            nan = builder.icmp_unsigned(">", builder.and_(b, k(0x7FFFFFFF)), k(0x7F800000))
            quiet = builder.or_(builder.and_(top, k(0x8000)), k(0x7FC0))
            return builder.trunc(builder.select(nan, quiet, rounded), ir.IntType(16))
        return types.uint16(types.float32), codegen
