"""Round-to-nearest-even casts to every format, computed from the format's constants alone.

Why this module exists: the implicit activations of a "linear" network are roundings: to the
subnormal grid, to zero under FTZ, to the ulp of a large constant (absorption), to +-max
(saturation). To study them in any format we need one rounding function whose every bit we can
account for, instead of whatever a framework's cast does in its current version (PyTorch 2.13's
``float8_e4m3fn`` cast saturates on overflow where ml_dtypes, the OCP definition and earlier PyTorch
give NaN; the two libraries also encode NaN differently). The tests check it bit for bit against
both, on every value of each 8- and 16-bit format and on millions of float32 inputs.

How: in float64, which holds every float32 and float64 input exactly. For ``|x| = m 2**e`` the ulp
of the target at ``x`` is ``2**q`` with ``q = max(e, min_exp) - (p - 1)``; ``x / 2**q`` is exact
(a power-of-two scale), ``torch.round`` rounds it half to even, and multiplying back is exact.
Below ``min_exp`` the ulp stops shrinking: that is gradual underflow. Overflow is decided on the
result rounded with an unbounded exponent (IEEE 754 7.4), tiny-ness for FTZ likewise (the x86 rule,
:attr:`~deeplinear.arithmetic.Format.tiny_threshold`). Powers of two are built from their bits, so
no step relies on a library's ``exp2`` or cast.

NaN: the result keeps the input's sign and the top bits of its payload, with the quiet bit set
(IEEE 754 6.2.3's recommendation; what x86's ``vcvtps2ph`` and PyTorch's float16 cast do); a
"cast" to the input's own format leaves a NaN's bits alone. float8_e4m3fn has one NaN per sign.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deeplinear.arithmetic import Format, Semantics, as_semantics, get_format, require_subnormals

_F64_MANTISSA = 52
_VIEW = {8: torch.uint8, 16: torch.int16, 32: torch.int32}  # same-width integer dtypes


def _format(fmt: Format | str) -> Format:
    return fmt if isinstance(fmt, Format) else get_format(fmt)


def _float64(x: Tensor) -> Tensor:
    """``x`` in float64, where every rounding here starts. Refused under hardware FTZ: DAZ would
    read a subnormal input as 0 and the float64 ops that follow would flush by themselves."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {type(x).__name__}"
                         f"{'' if not isinstance(x, Tensor) else ' of ' + str(x.dtype)}")
    require_subnormals()
    return x.double()


def _pow2(e: Tensor | int) -> Tensor:
    """Exactly ``2**e`` in float64 for integer ``e`` in [-1022, 1023], built from its bits."""
    return ((torch.as_tensor(e, dtype=torch.int64) + 1023) << _F64_MANTISSA).view(torch.float64)


def _exponent(a: Tensor, floor: int) -> Tensor:
    """``max(floor(log2(a)), floor)`` for float64 ``a >= 0``, read from the exponent field.

    Exact for normal ``a``; float64 subnormals (field 0) and zero land on ``floor`` (every format
    narrower than float64 has its ``min_exp`` far above theirs); inf and NaN give 1024.
    """
    return ((a.view(torch.int64) >> _F64_MANTISSA) - 1023).clamp_min_(floor)


def _round_magnitude(a: Tensor, fmt: Format, ftz: bool, saturate: bool) -> Tensor:
    """``|x|`` (float64) rounded to ``fmt``: finite, +inf or NaN per the overflow rule."""
    r = a
    if fmt.precision < 53:  # float64 is the widest container: nothing to round
        q = _exponent(a, fmt.min_exp) - (fmt.precision - 1)  # the ulp at a is 2**q
        r = (a * _pow2(-q)).round_() * _pow2(q)  # inf and NaN pass through
    if ftz:
        r = torch.where(a < fmt.tiny_threshold, 0.0, r)
    over = r > fmt.max  # includes +inf
    if saturate:
        return torch.where(over, fmt.max, r)
    return torch.where(over, torch.inf if fmt.overflow == "inf" else torch.nan, r)


def round_to(x: Tensor, fmt: Format | str, *, ftz: bool = False,
             saturate: bool = False) -> Tensor:
    """``x`` rounded to nearest-even in ``fmt``, as float64 (float64 input) or float32 (other).

    Every value of a format up to float32 is a float32, so the result is exact in its container.
    ``ftz`` flushes results that are tiny before rounding (x86); ``saturate`` maps overflow and
    infinities to +-max instead of the format's own rule (inf, or NaN for float8_e4m3fn).
    """
    fmt = _format(fmt)
    x64 = _float64(x)
    r = torch.copysign(_round_magnitude(x64.abs(), fmt, ftz, saturate), x64)
    return r if x.dtype == torch.float64 else r.float()


def round_precision(x: Tensor, fmt: Format | str) -> Tensor:
    """``x`` (float64) rounded to nearest-even to ``fmt``'s significand bits with an unbounded
    exponent: the format's rounding without its range (no subnormal grid, flush or overflow).

    Why: scaling by a power of two commutes with it, so it is the part of a cast that a regime
    at any scale shares, and what is left is the regime's own effect (:mod:`deeplinear.regimes`).
    """
    fmt = _format(fmt)
    x64 = _float64(x)
    mantissa, exponent = torch.frexp(x64)  # x = mantissa * 2**exponent, |m| in [0.5, 1)
    # inf and NaN pass through the products below with any exponent in range; frexp leaves theirs
    # unspecified (C's frexp, CUDA's), so it is set here
    e = torch.where(torch.isfinite(x64), exponent.long(), 0) - fmt.precision
    half = e.div(2, rounding_mode="floor")  # two exact scalings: 2**e alone may leave float64
    return torch.round(mantissa * 2.0**fmt.precision) * _pow2(half) * _pow2(e - half)


def quantize(x: Tensor, sem: Semantics | str) -> Tensor:
    """:func:`round_to` under a :class:`~deeplinear.arithmetic.Semantics` (or a preset's name):
    its format, its underflow (any flushing mode flushes; DAZ cannot matter for a cast to a
    format no wider than the input) and its overflow."""
    sem = as_semantics(sem)
    return round_to(x, sem.fmt, ftz=sem.flushes, saturate=sem.saturates)


def to_bits(x: Tensor, fmt: Format | str, *, ftz: bool = False,
            saturate: bool = False) -> Tensor:
    """The encoding of ``round_to(x, fmt, ...)`` as int64 in ``[0, 2**bits)`` (formats <= 32 bits).

    ``sign | biased exponent | stored significand``, the exponent field all ones for inf and NaN
    (float8_e4m3fn: NaN only, as ``S.1111.111``).
    """
    fmt = _format(fmt)
    if fmt.bits > 32:
        raise ValueError(f"to_bits covers formats up to 32 bits, not {fmt.name}: "
                         "a float64 tensor's .view(torch.int64) is its encoding")
    x64 = _float64(x)
    r = _round_magnitude(x64.abs(), fmt, ftz, saturate)
    stored = fmt.precision - 1
    e = _exponent(r, fmt.min_exp)
    # significand as an integer (implicit bit included for normals, which carries into the field)
    significand = (r * _pow2(stored - e)).to(torch.int64)
    bits = ((e - fmt.min_exp) << stored) + significand
    top = ((1 << fmt.exponent_bits) - 1) << stored  # exponent field all ones: inf and NaN
    if fmt.has_inf:
        payload = (x64.view(torch.int64) & ((1 << _F64_MANTISSA) - 1)) >> (_F64_MANTISSA - stored)
        special = torch.where(torch.isnan(x64), top | payload | (1 << (stored - 1)), top)
    else:  # the only special value is NaN, S.1111.111
        special = torch.tensor(top | ((1 << stored) - 1))
    bits = torch.where(e == 1024, special, bits)  # r is inf or NaN
    bits |= torch.signbit(x64).to(torch.int64) << (fmt.bits - 1)
    if x.dtype == fmt.dtype:  # no conversion happens, so a NaN keeps its bits, even signalling
        own = x.view(_VIEW[fmt.bits]).to(torch.int64) & ((1 << fmt.bits) - 1)
        bits = torch.where(torch.isnan(x64), own, bits)
    return bits


def from_bits(bits: Tensor, fmt: Format | str) -> Tensor:
    """Decode encodings (integers in ``[0, 2**bits)``) of a format up to 32 bits to float64.

    Exact; a NaN keeps its sign and payload (a signalling NaN stays signalling).
    """
    fmt = _format(fmt)
    if fmt.bits > 32:
        raise ValueError(f"from_bits covers formats up to 32 bits, not {fmt.name}")
    b = torch.as_tensor(bits)
    if b.is_floating_point() or b.is_complex() or b.dtype == torch.bool:
        raise ValueError(f"encodings must be integers, got {b.dtype} (a float would be truncated)")
    b = b.to(torch.int64)
    if ((b < 0) | (b >= 1 << fmt.bits)).any():
        raise ValueError(f"{fmt.name} encodings are integers in [0, 2**{fmt.bits})")
    stored = fmt.precision - 1
    top = (1 << fmt.exponent_bits) - 1
    field = (b >> stored) & top
    mant = b & ((1 << stored) - 1)
    sign = (b >> (fmt.bits - 1)) & 1
    normal = field > 0
    significand = torch.where(normal, mant | (1 << stored), mant).double()
    mag = significand * _pow2(torch.where(normal, field + fmt.min_exp - 1, fmt.min_exp) - stored)
    if fmt.has_inf:
        mag = torch.where((field == top) & (mant == 0), torch.inf, mag)
        nan = (field == top) & (mant != 0)
    else:
        nan = (field == top) & (mant == (1 << stored) - 1)
    value = torch.where(sign == 1, -mag, mag)
    nan_bits = (sign << 63) | (0x7FF << _F64_MANTISSA) | (mant << (_F64_MANTISSA - stored))
    return torch.where(nan, nan_bits.view(torch.float64), value)


def cast(x: Tensor, fmt: Format | str, *, ftz: bool = False, saturate: bool = False) -> Tensor:
    """``x`` converted to ``fmt.dtype`` by :func:`round_to`'s rounding, without torch's casts."""
    fmt = _format(fmt)
    if fmt.bits > 32:
        return round_to(_float64(x), fmt, ftz=ftz, saturate=saturate)
    bits = to_bits(x, fmt, ftz=ftz, saturate=saturate)
    signed = bits - ((bits >> (fmt.bits - 1)) << fmt.bits) if fmt.bits > 8 else bits
    return signed.to(_VIEW[fmt.bits]).view(fmt.dtype)
