"""Exact floating-point semantics: formats, underflow modes, and ops that apply them bit for bit.

Why this module exists: a deep linear network is only nonlinear *as executed*. Which function it
computes depends on details that frameworks hide: whether tiny results are flushed to zero (FTZ),
whether tiny inputs are read as zero (DAZ), and whether the matmul flushes too. Every other module
asks this one, so each fact (a format's constants, the tiny-ness rule) lives here once.

The x86 rule, measured: a result is "tiny" (and flushed under FTZ) when the exact result, rounded
to the format's precision with an *unbounded* exponent, is below the smallest normal. For float32
that is ``|exact| < min * (1 - 2**-25)``; a tie rounds to even, i.e. up to ``min``, so the tie is
not tiny. The IEEE result equals ``min`` in a whole band of exact values on both sides of that
threshold, and only there the IEEE result alone cannot decide; we resolve it in float64, where
products and quotients of float32 operands are exact or decided correctly (float64 operands: the
op recomputed 2**64 times larger, where its rounding is the unbounded-exponent one).

Operands of another type are rounded to the format once, by :func:`deeplinear.formats.cast`, not
by torch's casts (which saturate float8_e4m3fn and round float64 to bfloat16 through float32).
"""

from __future__ import annotations

import contextlib
import math
import operator
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar

import torch
from torch import Tensor

P = ParamSpec("P")
R = TypeVar("R")

# torch's CPU sqrt, exp, log, ... call MKL's vector math (VML) on tensors above 2,048 elements,
# and VML picks a function's kernel on its first call; when that first call runs on two threads
# at once, one thread can keep a less accurate kernel for its half of the tensor (oneMKL 2024.2,
# bundled with torch 2.13: pytorch/pytorch#188792, fixed from oneMKL 2025.0). Seen here in ES's
# first Adam step (``sqrt`` of the second moment): a seeded run now and then ended elsewhere
# (how often a first call differs, with and without this: benchmarks/vml_first_call.py).
# One serial one-element call per function when deeplinear is imported picks the kernels first.
VECTOR_MATH = ("sqrt", "rsqrt", "exp", "expm1", "log", "log1p", "log2", "log10", "sin", "cos",
               "tan", "tanh", "sinh", "cosh", "asin", "acos", "atan", "erf", "erfc", "erfinv")


def _pick_vector_math_kernels() -> None:
    for name in VECTOR_MATH:
        for dtype in (torch.float32, torch.float64):
            getattr(torch, name)(torch.full((1,), 0.5, dtype=dtype))


_pick_vector_math_kernels()

Underflow = Literal["ieee", "ftz", "ftz_daz"]
Scope = Literal["elementwise", "all"]
Overflow = Literal["ieee", "saturate"]


@dataclass(frozen=True)
class Format:
    """A binary floating-point format; every constant comes from ``torch.finfo``."""

    name: str
    dtype: torch.dtype
    bits: int
    precision: int  # significand bits including the implicit one (float32: 24)
    min_normal: float
    min_subnormal: float
    max: float
    eps: float
    has_inf: bool = True  # float8_e4m3fn spends the infinity encodings on finite values
    overflow: Literal["inf", "nan"] = "inf"  # what a non-saturating cast gives beyond max

    @classmethod
    def from_torch(cls, name: str, dtype: torch.dtype, has_inf: bool = True) -> Format:
        """``has_inf=False`` (OCP FP8 E4M3, the "fn" = finite formats) means overflow gives NaN."""
        fi = torch.finfo(dtype)
        return cls(
            name=name,
            dtype=dtype,
            bits=fi.bits,
            precision=round(-math.log2(fi.eps)) + 1,
            min_normal=fi.smallest_normal,
            min_subnormal=fi.smallest_normal * fi.eps,
            max=fi.max,
            eps=fi.eps,
            has_inf=has_inf,
            overflow="inf" if has_inf else "nan",
        )

    @property
    def exponent_bits(self) -> int:
        return self.bits - self.precision  # sign + exponent + (precision - 1) stored bits

    @property
    def min_exp(self) -> int:
        """The exponent of the smallest normal (float32: -126); the bias is ``1 - min_exp``."""
        return round(math.log2(self.min_normal))

    @property
    def max_exp(self) -> int:
        """The exponent of the largest finite value (float32: 127). From ``frexp``, not ``log2``:
        float64's max rounds to 2**1024 in ``log2``."""
        return math.frexp(self.max)[1] - 1

    @property
    def tiny_threshold(self) -> float:
        """Largest magnitude that is still tiny *before* rounding: ``min * (1 - 2**-(p+1))``.

        An exact result is flushed iff its magnitude is strictly below this value (the tie
        rounds to even, i.e. up to ``min``). Exact in float64 for every format narrower than it.
        """
        return self.min_normal * (1.0 - 2.0 ** -(self.precision + 1))

    @property
    def normal_gap_ratio(self) -> int:
        """How much wider the gap 0 -> min is than the gap min -> next float: ``2**(p-1)``.

        The 2017 blog post says 2**20 for float32; it is 2**23.
        """
        return round(self.min_normal / (self.min_normal * self.eps))


FORMATS: dict[str, Format] = {
    name: Format.from_torch(name, dtype, has_inf)
    for name, dtype, has_inf in [
        ("float64", torch.float64, True),
        ("float32", torch.float32, True),
        ("float16", torch.float16, True),
        ("bfloat16", torch.bfloat16, True),
        ("float8_e4m3fn", torch.float8_e4m3fn, False),
        ("float8_e5m2", torch.float8_e5m2, True),
    ]
}


def get_format(name: str) -> Format:
    if not isinstance(name, str) or name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[name]


@dataclass(frozen=True)
class Semantics:
    """How arithmetic in one format treats results and inputs below the smallest normal.

    underflow: ``ieee`` keeps subnormals (gradual underflow); ``ftz`` flushes tiny results to a
    signed zero; ``ftz_daz`` also reads subnormal inputs as zero. scope: ``elementwise`` applies the
    flush to elementwise ops only while matmul keeps subnormals (cuBLAS, under TensorFlow's
    flushing GPU kernels); ``all`` flushes matmul too, as x86 with FTZ/DAZ set
    (``torch.set_flush_denormal(True)``) does, though by a definition (inputs and output flushed,
    see :func:`matmul`), not MKL's flushes inside its sums: with zero biases a net under
    ``CPU_FTZ_DAZ`` then computes what it does under ``TF_GPU``. overflow: ``ieee`` gives what
    the format defines beyond max (inf, or NaN for float8_e4m3fn); ``saturate`` clamps
    elementwise results and casts to +-max (OCP FP8's saturating mode, NVIDIA's ``.satfinite``),
    infinities included.
    """

    format: str = "float32"
    underflow: Underflow = "ieee"
    scope: Scope = "elementwise"
    overflow: Overflow = "ieee"

    def __post_init__(self) -> None:
        get_format(self.format)
        if self.underflow not in ("ieee", "ftz", "ftz_daz"):
            raise ValueError(f"unknown underflow {self.underflow!r}; use ieee, ftz or ftz_daz")
        if self.scope not in ("elementwise", "all"):
            raise ValueError(f"unknown scope {self.scope!r}; use elementwise or all")
        if self.overflow not in ("ieee", "saturate"):
            raise ValueError(f"unknown overflow {self.overflow!r}; use ieee or saturate")

    @property
    def fmt(self) -> Format:
        return FORMATS[self.format]

    @property
    def flushes(self) -> bool:
        return self.underflow != "ieee"

    @property
    def daz(self) -> bool:
        return self.underflow == "ftz_daz"

    @property
    def matmul_flush(self) -> bool:
        """Whether a matmul's subnormal results reach the next op as zero: flushed by the matmul
        itself (scope ``all``) or read as zero by it (DAZ)."""
        return self.flushes and (self.daz or self.scope == "all")

    @property
    def saturates(self) -> bool:
        return self.overflow == "saturate"


TF_GPU = Semantics("float32", "ftz", "elementwise")
IEEE = Semantics("float32", "ieee", "elementwise")
CPU_FTZ_DAZ = Semantics("float32", "ftz_daz", "all")
PRESETS: dict[str, Semantics] = {"TF_GPU": TF_GPU, "IEEE": IEEE, "CPU_FTZ_DAZ": CPU_FTZ_DAZ}


def preset_name(sem: Semantics) -> str | None:
    """The name under which ``sem`` is a preset, else None (callers choose what to show)."""
    return next((name for name, preset in PRESETS.items() if preset == sem), None)


def get_semantics(name: str) -> Semantics:
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown semantics {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def as_semantics(sem: Semantics | str) -> Semantics:
    """A :class:`Semantics`, or the name of a preset (``"TF_GPU"``, ``"IEEE"``, ...)."""
    return sem if isinstance(sem, Semantics) else get_semantics(sem)


def integer(value: Any) -> int | None:
    """``value`` as a Python int if it is an integer (numpy and torch integers too, not bools),
    else None: for exponents, where 2.5 or "125" must be an error, not silently truncated."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _cast(x: Tensor, fmt: Format, **flags: bool) -> Tensor:
    """:func:`deeplinear.formats.cast`, imported here on use: formats builds on this module."""
    from deeplinear.formats import cast

    return cast(x, fmt, **flags)


def _signed_zero_where(mask: Tensor, x: Tensor) -> Tensor:
    """x with the masked entries replaced by a zero of the same sign (what x86 FTZ/DAZ return)."""
    return torch.where(mask, x * 0, x)


def daz(x: Tensor, sem: Semantics) -> Tensor:
    """Read subnormal inputs as zero when the semantics says DAZ; otherwise return x unchanged."""
    if not sem.daz:
        return x
    if x.element_size() == 1:  # torch has no float8 arithmetic: decide in float32, exactly
        return daz(x.float(), sem).to(x.dtype)
    return _signed_zero_where(x.abs() < sem.fmt.min_normal, x)


_UNIT = 2.0**64  # lifts a float64 result near min into the normal range, where rounding is exact


def ftz(result: Tensor, exact: Callable[[], Tensor], sem: Semantics, unit: float = 1.0) -> Tensor:
    """Flush the tiny entries of an IEEE-rounded ``result`` (no-op under ``ieee``).

    ``|result| < min`` is tiny for sure, ``|result| > min`` is not; ``|result| == min`` is decided
    by ``exact()``, the op recomputed ``unit`` times larger where it is exact (float64 for
    float32 operands) or rounded with an in-effect unbounded exponent (float64 operands, lifted by
    2**64), against :attr:`Format.tiny_threshold`.
    """
    if not sem.flushes:
        return result
    fmt = sem.fmt
    mag = result.abs()
    tiny = mag < fmt.min_normal
    boundary = mag == fmt.min_normal
    if boundary.any():
        tiny = tiny | (boundary & (exact().abs() < fmt.tiny_threshold * unit))
    return _signed_zero_where(tiny, result)


def _operand(x: Tensor | float, fmt: Format) -> Tensor:
    """``x`` in the format: rounded once by :func:`deeplinear.formats.cast` where it is another
    type, because torch's casts saturate float8_e4m3fn and round float64 to bfloat16 twice."""
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise ValueError(f"expected a tensor or a number, got {type(x).__name__} (a number "
                             "must fit float64)") from None
    if x.dtype == fmt.dtype:
        return x
    if x.is_complex():
        raise ValueError(f"complex operands are not supported, got {x.dtype}")
    return _cast(x if x.is_floating_point() else x.double(), fmt)


def _elementwise(op: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor | float,
                 sem: Semantics | str) -> Tensor:
    sem = as_semantics(sem)
    require_subnormals()
    fmt = sem.fmt
    a, b = _operand(a, fmt), _operand(b, fmt)
    if fmt.dtype not in (torch.float32, torch.float64):
        # Exact in float64 (+, -, *), or rounded there innocuously (/, p <= 25); then one rounding
        # to the format, which also decides tiny-ness and overflow (torch has no float8 kernels).
        a64, b64 = daz(a.double(), sem), daz(b.double(), sem)
        return _cast(op(a64, b64), fmt, ftz=sem.flushes, saturate=sem.saturates)
    a, b = daz(a, sem), daz(b, sem)
    r = op(a, b)
    if fmt.dtype == torch.float32:
        r = ftz(r, lambda: op(a.double(), b.double()), sem)
    elif op in (torch.mul, torch.div):  # float64: lift the product or quotient by 2**64
        r = ftz(r, lambda: op(a * _UNIT, b), sem, _UNIT)
    else:  # a float64 sum within a few ulps of min is exact: the result decides
        r = ftz(r, lambda: r, sem)
    return r.clamp(-fmt.max, fmt.max) if sem.saturates else r


def add(a: Tensor, b: Tensor | float, sem: Semantics | str) -> Tensor:
    """``a + b`` in ``sem``'s format, rounded once, with its underflow and overflow rules."""
    return _elementwise(torch.add, a, b, sem)


def sub(a: Tensor, b: Tensor | float, sem: Semantics | str) -> Tensor:
    """``a - b`` in ``sem``'s format, rounded once, with its underflow and overflow rules."""
    return _elementwise(torch.sub, a, b, sem)


def mul(a: Tensor, b: Tensor | float, sem: Semantics | str) -> Tensor:
    """``a * b`` in ``sem``'s format, rounded once, with its underflow and overflow rules."""
    return _elementwise(torch.mul, a, b, sem)


def div(a: Tensor, b: Tensor | float, sem: Semantics | str) -> Tensor:
    """``a / b`` in ``sem``'s format, rounded once, with its underflow and overflow rules."""
    return _elementwise(torch.div, a, b, sem)


def bias_add(x: Tensor, bias: Tensor, sem: Semantics | str) -> Tensor:
    """``x + bias`` broadcast over rows: an elementwise op, so it flushes under any FTZ."""
    return add(x, bias, sem)


def scale(x: Tensor, exp: int, sem: Semantics | str) -> Tensor:
    """Multiply by ``2**exp`` with one rounding: the op that moves values near min.

    ``2**exp`` need not be a normal number of the format (float32's 2**149 overflows, its 2**-130
    is subnormal and DAZ would read it as zero), so the product is formed in float64, where it is
    exact, and rounded once; where ``2**exp`` is normal that is bit for bit the format's multiply.
    Beyond the format's whole exponent span every nonzero finite value overflows or rounds to
    zero, so larger exponents are clamped to it (``2**exp`` stays a float64). float64 itself
    takes exponents for which ``2**exp`` is a float64.
    """
    sem, k = as_semantics(sem), integer(exp)
    if k is None:
        raise ValueError("scale takes an integer exponent, like -125")
    require_subnormals()
    fmt = sem.fmt
    x = daz(_operand(x, fmt), sem)
    if fmt.dtype == torch.float64:
        if not -1074 <= k <= 1023:
            raise ValueError(f"2**{k} is no float64: float64 scale takes -1074 <= exp <= 1023")
        r = ftz(x * 2.0**k, lambda: x * 2.0 ** (k + 64), sem, _UNIT)
    else:
        span = fmt.max_exp - round(math.log2(fmt.min_subnormal)) + 2
        exact = x.double() * 2.0 ** max(-span, min(k, span))
        if fmt.dtype != torch.float32:
            return _cast(exact, fmt, ftz=sem.flushes, saturate=sem.saturates)
        r = ftz(exact.to(fmt.dtype), lambda: exact, sem)
    return r.clamp(-fmt.max, fmt.max) if sem.saturates else r


def matmul(a: Tensor, b: Tensor, sem: Semantics | str) -> Tensor:
    """Matrix product under ``sem``.

    scope ``elementwise``: plain IEEE matmul, subnormals kept (cuBLAS). scope ``all``: inputs read
    through DAZ and each output flushed where it is tiny after rounding, as x86 decides for one
    product (:func:`ftz`: ``|r| < min``, and at ``|r| == min`` the sum recomputed in float64; so
    an output that is a single product is bit for bit the hardware's). For longer sums this is a
    *definition*: a BLAS kernel with FTZ/DAZ set also flushes its partial sums inside the
    accumulation, which no emulation can reproduce bit for bit (see ``tests/test_arithmetic.py``
    for the measured agreement).

    Formats narrower than float32 accumulate in float32 and round each output once to the format
    (what torch's float16 and bfloat16 CPU matmuls do, checked bit for bit on small products; on
    larger ones torch's kernels sum otherwise and its result depends on the shape: 3 of 512
    float16 outputs of a 1x784 @ 784x512 product differ by one ulp), with the format's own
    overflow (NaN for float8_e4m3fn, where torch's float8 matmul saturates) and, for scope
    ``all``, the tiny-after-rounding flush.
    """
    sem = as_semantics(sem)
    require_subnormals()
    fmt = sem.fmt
    a, b = _operand(a, fmt), _operand(b, fmt)
    flush = sem.flushes and sem.scope == "all"
    if fmt.dtype not in (torch.float32, torch.float64):
        r = (daz(a, sem) if flush else a).float() @ (daz(b, sem) if flush else b).float()
        return _cast(r, fmt, ftz=flush, saturate=sem.saturates)
    if not flush:
        return a @ b
    a, b = daz(a, sem), daz(b, sem)
    if fmt.dtype == torch.float32:  # products exact in float64, sums all but exact
        return ftz(a @ b, lambda: a.double() @ b.double(), sem)
    return ftz(a @ b, lambda: (a * _UNIT) @ b, sem, _UNIT)


# --- hardware FTZ/DAZ on this CPU --------------------------------------------------------------
#
# torch.set_flush_denormal sets FTZ and DAZ in the *calling thread's* MXCSR. OpenMP worker threads
# copy the MXCSR of the thread that creates them, once; setting the flag after the pool exists
# therefore flushes only in some threads (measured: half the outputs with 2 threads). libgomp
# keeps one pool per master thread, so a fresh Python thread that sets the flag *before* its first
# parallel op gets a pool in which every worker flushes. That is what run_with_hardware_ftz does.

NO_FTZ = "this CPU does not support flush-to-zero (needs SSE3 on x86)"


@contextlib.contextmanager
def hardware_ftz(enabled: bool = True) -> Iterator[None]:
    """Set hardware FTZ+DAZ in this thread and run single-threaded inside, restoring both after.

    One thread is the only way to be sure inside the *current* thread's existing OpenMP pool;
    use :func:`run_with_hardware_ftz` for multi-threaded work.
    """
    threads, before = torch.get_num_threads(), ftz_is_on()
    if not torch.set_flush_denormal(enabled):
        raise RuntimeError(NO_FTZ)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
        torch.set_num_threads(threads)


def ftz_is_on() -> bool:
    """Whether this thread flushes now (torch can set the flag but not read it): a one-element
    product, computed in this thread, whose exact value is subnormal."""
    return bool(torch.tensor([2.0**-100]) * (2.0**-30) == 0)


def require_subnormals() -> None:
    """Refuse to emulate while this thread's hardware flushes subnormals.

    Why: every semantics here is built from IEEE float ops on a CPU that keeps subnormals; with
    ``torch.set_flush_denormal(True)`` in effect those ops flush by themselves and every result
    near min is silently another semantics (IEEE included). Checked in the calling thread only
    (10 us); a worker of an OpenMP pool created while the flag was on keeps flushing after it is
    cleared (see :func:`run_with_hardware_ftz`), which no cheap check can see.
    """
    if ftz_is_on():
        raise RuntimeError("hardware flush-to-zero is on in this thread "
                           "(torch.set_flush_denormal(True)): deeplinear emulates each semantics "
                           "with subnormals kept; call torch.set_flush_denormal(False) first")


def run_with_hardware_ftz(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """Call ``fn`` in a fresh thread with FTZ+DAZ set before its OpenMP pool exists.

    Every worker of that pool then flushes, so multi-threaded ops are reliable. The calling
    thread's state is untouched.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            if not torch.set_flush_denormal(True):
                raise RuntimeError(NO_FTZ)
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller
            box["error"] = e
        finally:
            torch.set_flush_denormal(False)

    t = threading.Thread(target=target, name="deeplinear-ftz")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    value: R = box["value"]
    return value


def hardware_ftz_coverage(n: int = 1 << 22) -> float:
    """Fraction of a large multi-threaded elementwise op that the hardware flushed, in this thread.

    1.0 means FTZ is active in every thread that took part; 0.0 means it is off everywhere; in
    between is the partial state of a flag set after the thread pool was created. The input is
    normal (so DAZ cannot interfere) and every exact product is subnormal.
    """
    x = torch.full((n,), 2.0**-100, dtype=torch.float32)
    y = x * (2.0**-30)
    return float((y == 0).double().mean())
