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
products and quotients of float32 operands are exact or decided correctly.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Underflow = Literal["ieee", "ftz", "ftz_daz"]
Scope = Literal["elementwise", "all"]


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

    @classmethod
    def from_torch(cls, name: str, dtype: torch.dtype) -> Format:
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
        )

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
    name: Format.from_torch(name, dtype)
    for name, dtype in [
        ("float64", torch.float64),
        ("float32", torch.float32),
        ("float16", torch.float16),
        ("bfloat16", torch.bfloat16),
    ]
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}") from None


@dataclass(frozen=True)
class Semantics:
    """How arithmetic in one format treats results and inputs below the smallest normal.

    underflow: ``ieee`` keeps subnormals (gradual underflow); ``ftz`` flushes tiny results to a
    signed zero; ``ftz_daz`` also reads subnormal inputs as zero. scope: ``elementwise`` applies the
    flush to elementwise ops only while matmul keeps subnormals (cuBLAS, under TensorFlow's
    flushing GPU kernels); ``all`` flushes matmul too (x86 with FTZ/DAZ set, as
    ``torch.set_flush_denormal(True)`` does).
    """

    format: str = "float32"
    underflow: Underflow = "ieee"
    scope: Scope = "elementwise"

    def __post_init__(self) -> None:
        get_format(self.format)
        if self.underflow not in ("ieee", "ftz", "ftz_daz"):
            raise ValueError(f"unknown underflow {self.underflow!r}; use ieee, ftz or ftz_daz")
        if self.scope not in ("elementwise", "all"):
            raise ValueError(f"unknown scope {self.scope!r}; use elementwise or all")

    @property
    def fmt(self) -> Format:
        return FORMATS[self.format]

    @property
    def flushes(self) -> bool:
        return self.underflow != "ieee"

    @property
    def daz(self) -> bool:
        return self.underflow == "ftz_daz"


TF_GPU = Semantics("float32", "ftz", "elementwise")
IEEE = Semantics("float32", "ieee", "elementwise")
CPU_FTZ_DAZ = Semantics("float32", "ftz_daz", "all")
PRESETS: dict[str, Semantics] = {"TF_GPU": TF_GPU, "IEEE": IEEE, "CPU_FTZ_DAZ": CPU_FTZ_DAZ}


def get_semantics(name: str) -> Semantics:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown semantics {name!r}; choose one of {', '.join(PRESETS)}"
        ) from None


def _signed_zero_where(mask: Tensor, x: Tensor) -> Tensor:
    """x with the masked entries replaced by a zero of the same sign (what x86 FTZ/DAZ return)."""
    return torch.where(mask, x * 0, x)


def daz(x: Tensor, sem: Semantics) -> Tensor:
    """Read subnormal inputs as zero when the semantics says DAZ; otherwise return x unchanged."""
    if not sem.daz:
        return x
    return _signed_zero_where(x.abs() < sem.fmt.min_normal, x)


def ftz(result: Tensor, exact: Callable[[], Tensor], sem: Semantics) -> Tensor:
    """Flush the tiny entries of an IEEE-rounded ``result`` (no-op under ``ieee``).

    ``|result| < min`` is tiny for sure, ``|result| > min`` is not; ``|result| == min`` is decided
    by ``exact()``, the op recomputed in float64, against :attr:`Format.tiny_threshold`.
    """
    if not sem.flushes:
        return result
    fmt = sem.fmt
    mag = result.abs()
    tiny = mag < fmt.min_normal
    boundary = mag == fmt.min_normal
    if boundary.any():
        tiny = tiny | (boundary & (exact().abs() < fmt.tiny_threshold))
    return _signed_zero_where(tiny, result)


def _elementwise(op: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor | float,
                 sem: Semantics) -> Tensor:
    dtype = sem.fmt.dtype
    a = daz(torch.as_tensor(a, dtype=dtype), sem)
    b = daz(torch.as_tensor(b, dtype=dtype), sem)
    if dtype == torch.float32 or dtype == torch.float64:
        r = op(a, b)
    else:  # correctly rounded via float64: double rounding is innocuous for p <= 25
        r = op(a.double(), b.double()).to(dtype)
    return ftz(r, lambda: op(a.double(), b.double()), sem)


def add(a: Tensor, b: Tensor | float, sem: Semantics) -> Tensor:
    return _elementwise(torch.add, a, b, sem)


def sub(a: Tensor, b: Tensor | float, sem: Semantics) -> Tensor:
    return _elementwise(torch.sub, a, b, sem)


def mul(a: Tensor, b: Tensor | float, sem: Semantics) -> Tensor:
    return _elementwise(torch.mul, a, b, sem)


def div(a: Tensor, b: Tensor | float, sem: Semantics) -> Tensor:
    return _elementwise(torch.div, a, b, sem)


def bias_add(x: Tensor, bias: Tensor, sem: Semantics) -> Tensor:
    """``x + bias`` broadcast over rows: an elementwise op, so it flushes under any FTZ."""
    return add(x, bias, sem)


def scale(x: Tensor, exp: int, sem: Semantics) -> Tensor:
    """Multiply by ``2**exp`` (exactly representable), the op that moves values near min."""
    return mul(x, 2.0**exp, sem)


def matmul(a: Tensor, b: Tensor, sem: Semantics) -> Tensor:
    """Matrix product under ``sem``.

    scope ``elementwise``: plain IEEE matmul, subnormals kept (cuBLAS). scope ``all``: inputs read
    through DAZ and the output flushed where ``|r| < min``. This is a *definition*: a BLAS kernel
    with FTZ/DAZ set also flushes its partial sums inside the accumulation, which no emulation can
    reproduce bit for bit (see ``tests/test_arithmetic.py`` for the measured agreement).
    """
    dtype = sem.fmt.dtype
    a, b = a.to(dtype), b.to(dtype)
    if sem.scope == "elementwise" or not sem.flushes:
        return a @ b
    r = daz(a, sem) @ daz(b, sem)
    return _signed_zero_where(r.abs() < sem.fmt.min_normal, r)


# --- hardware FTZ/DAZ on this CPU --------------------------------------------------------------
#
# torch.set_flush_denormal sets FTZ and DAZ in the *calling thread's* MXCSR. OpenMP worker threads
# copy the MXCSR of the thread that creates them, once; setting the flag after the pool exists
# therefore flushes only in some threads (measured: half the outputs with 2 threads). libgomp
# keeps one pool per master thread, so a fresh Python thread that sets the flag *before* its first
# parallel op gets a pool in which every worker flushes. That is what run_with_hardware_ftz does.


@contextlib.contextmanager
def hardware_ftz(enabled: bool = True) -> Iterator[None]:
    """Set hardware FTZ+DAZ in this thread and run single-threaded inside, restoring both after.

    One thread is the only way to be sure inside the *current* thread's existing OpenMP pool;
    use :func:`run_with_hardware_ftz` for multi-threaded work.
    """
    threads = torch.get_num_threads()
    if not torch.set_flush_denormal(enabled):
        raise RuntimeError("this CPU does not support flush-to-zero (needs SSE3 on x86)")
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def run_with_hardware_ftz(fn: Callable[..., object], *args: object, **kwargs: object) -> object:
    """Call ``fn`` in a fresh thread with FTZ+DAZ set before its OpenMP pool exists.

    Every worker of that pool then flushes, so multi-threaded ops are reliable. The calling
    thread's state is untouched.
    """
    box: dict[str, object] = {}

    def target() -> None:
        try:
            if not torch.set_flush_denormal(True):
                raise RuntimeError("this CPU does not support flush-to-zero (needs SSE3 on x86)")
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # re-raised in the caller
            box["error"] = e
        finally:
            torch.set_flush_denormal(False)

    t = threading.Thread(target=target, name="deeplinear-ftz")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]


def hardware_ftz_coverage(n: int = 1 << 22) -> float:
    """Fraction of a large multi-threaded elementwise op that the hardware flushed, in this thread.

    1.0 means FTZ is active in every thread that took part; 0.0 means it is off everywhere; in
    between is the partial state of a flag set after the thread pool was created. The input is
    normal (so DAZ cannot interfere) and every exact product is subnormal.
    """
    x = torch.full((n,), 2.0**-100, dtype=torch.float32)
    y = x * (2.0**-30)
    return float((y == 0).double().mean())
