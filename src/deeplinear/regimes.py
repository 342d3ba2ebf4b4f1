"""Regimes: the places where a float format's rounding becomes the activation of a linear net.

Why this module exists: the 2017 trick (the float32 FTZ dead zone at scale 2^125) is one of
several ways float arithmetic acts as a nonlinearity. Each regime is an elementwise function of a
pre-activation ``u`` (float32, in the net's scaled units), given twice:

* :meth:`Regime.activation`: the implicit activation in units of the net (closed forms in
  float32, the format's own torch ops or :func:`deeplinear.formats.round_to` elsewhere), what
  :class:`~deeplinear.nets.DeepLinear` applies in scaled mode and trainers differentiate;
* :meth:`Regime.exact`: the float operations themselves, through :mod:`deeplinear.arithmetic` and
  :mod:`deeplinear.formats`, in tensors of the format's own dtype.

The tests check that the two agree bit for bit. With ``p`` the format's precision, ``min``,
``min_sub`` and ``max`` its smallest normal, smallest subnormal and largest value (the
:attr:`Regime.threshold`, the width at which each acts, is the second quantity named):

``ftz-deadzone`` (k)
    ``u 2^-k`` with flush-to-zero: ``|u| < min 2^k -> 0`` (float32, k = 125: ``|u| < 1/2``).
``subnormal-staircase`` (k)
    ``u 2^-k`` with IEEE gradual underflow: below ``min 2^k``, ``u`` rounds to multiples of
    ``min_sub 2^k`` (float32, k = 149: to integers).
``absorption`` (j)
    ``(u + c) - c`` in the format with ``c = 2^j``: ``u`` rounded to the ulp of ``c``,
    ``2^(j - p + 1)`` (T. Murphy VII, "GradIEEEnt half decent", SIGBOVIK 2023, in float16).
``saturation`` (k)
    ``u 2^k`` cast with saturation (OCP FP8's saturating mode): ``|u|`` clamps at ``max 2^-k``.

In a format narrower than float32 every regime also rounds ``u`` to ``p`` bits on the way.

A net is built under a regime with ``DeepLinear(sizes, regime=Regime(...))``. The two float32
underflow regimes are the 2017 layout itself (``scale_exp = k`` with FTZ or IEEE semantics), whose
exact mode runs the whole net at the true scale; the others apply their exact operation to float32
linear layers. Also here: strength sweeps on N(0,1) (``deeplinear probe --regime``), which regime
each backend exhibits by default (:func:`hardware_report`), and whether training can exploit each
regime (:func:`study`).
"""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from deeplinear import arithmetic as ar
from deeplinear import formats as fm
from deeplinear.arithmetic import FORMATS, Format, Semantics, get_format
from deeplinear.nets import SCALE_EXP, dead_zone, default_sizes, seeded, staircase
from deeplinear.surrogate import FLOAT_AWARE

Kind = Literal["ftz-deadzone", "subnormal-staircase", "absorption", "saturation"]
KINDS: tuple[Kind, ...] = ("ftz-deadzone", "subnormal-staircase", "absorption", "saturation")
_UNDERFLOW = ("ftz-deadzone", "subnormal-staircase")
_F32 = FORMATS["float32"]


def default_param(kind: str, fmt: Format | str) -> int:
    """Where each regime bites N(0,1) pre-activations at unit scale.

    ftz-deadzone: threshold 1/2 (float32: k = 125, the 2017 net); subnormal-staircase: step 1
    (float32: k = 149); absorption: ulp(c) = 1/2 (float16: c = 2^9); saturation: clamp in [1, 2)
    (float32: k = 127).
    """
    fmt = fmt if isinstance(fmt, Format) else get_format(fmt)
    _check_kind(kind)
    if kind == "ftz-deadzone":
        return -fmt.min_exp - 1
    if kind == "subnormal-staircase":
        return -round(math.log2(fmt.min_subnormal))
    if kind == "absorption":
        return fmt.precision - 2
    return fmt.max_exp


def default_sweep(kind: str, fmt: Format | str) -> list[int]:
    """Parameters from negligible to strong, around :func:`default_param`."""
    fmt = fmt if isinstance(fmt, Format) else get_format(fmt)
    d = default_param(kind, fmt)
    if kind == "ftz-deadzone":
        return list(range(d - 5, d + 4))
    if kind == "subnormal-staircase":  # no overflow for |u| <= 4 in the narrow formats
        return [k for k in (d - 24, d - 12, *range(d - 8, d + 1)) if 4 * 2.0**-k <= fmt.max]
    if kind == "absorption":
        return list(range(d - 4, d + 4))
    return list(range(d - 2, d + 4))


def param_range(kind: str, fmt: Format | str) -> tuple[int, int]:
    """The parameters :class:`Regime` accepts, ``lo <= param <= hi``: those whose scales in units
    of the net (:attr:`Regime.threshold` and :attr:`Regime.extent`) are normal float32 values,
    and for absorption whose ``c = 2^j`` is a normal value of the format. Computed from the
    exponents alone, so that checking a parameter such as 9999 never overflows."""
    fmt = fmt if isinstance(fmt, Format) else get_format(fmt)
    _check_kind(kind)
    if kind == "saturation":  # max 2^-k
        lo, hi = _exponents_within(fmt.max)
        return -hi, -lo
    scales = {"ftz-deadzone": (fmt.min_normal,), "absorption": (fmt.eps,),  # ulp(2^j) = eps 2^j
              "subnormal-staircase": (fmt.min_subnormal, fmt.min_normal)}[kind]
    bounds = [_exponents_within(c) for c in scales]
    if kind == "absorption":
        bounds.append((fmt.min_exp, fmt.max_exp))
    return max(lo for lo, _ in bounds), min(hi for _, hi in bounds)


def _exponents_within(c: float) -> tuple[int, int]:
    """The range of ``e`` for which ``c 2^e`` is a normal float32, exactly: compared as
    (mantissa, exponent) pairs from :func:`math.frexp`, since ``2^e`` itself may overflow."""
    mc, ec = math.frexp(c)
    ml, el = math.frexp(_F32.min_normal)
    mh, eh = math.frexp(_F32.max)
    return el - ec + (mc < ml), eh - ec - (mc > mh)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown regime {kind!r}; choose one of {', '.join(KINDS)}")


def _ldexp(x: Tensor, e: int) -> Tensor:
    """``x 2^e`` in two exact halves, so that float64 regimes (k near 1022) never form 2^1024."""
    return x * 2.0 ** (e // 2) * 2.0 ** (e - e // 2)


class _Step(torch.autograd.Function):
    """Forward: a piecewise-constant function of ``u``; backward: 0, its derivative almost
    everywhere (as ``torch.round`` gives). Float-aware training picks a surrogate instead."""

    @staticmethod
    def forward(ctx, u: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:  # type: ignore[override]
        return fn(u)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return torch.zeros_like(grad), None


@dataclass(frozen=True)
class Regime:
    """One regime: ``kind``, its parameter (k, or j for absorption) and the format it runs in."""

    kind: Kind
    param: int
    format: str = "float32"

    def __post_init__(self) -> None:
        _check_kind(self.kind)
        fmt = get_format(self.format)
        param = ar.integer(self.param)  # numpy and torch integers too, as scale() takes them
        if param is None:
            raise ValueError(f"regime parameter must be an integer exponent, got {self.param!r}")
        object.__setattr__(self, "param", param)
        lo, hi = param_range(self.kind, fmt)
        if not lo <= self.param <= hi:
            absorption = self.kind == "absorption"
            why = (f"c = 2^j must be a normal {self.format} and its ulp a normal float32"
                   if absorption else "its scale in units of the net must be a normal float32")
            name = "j" if absorption else "k"
            raise ValueError(f"{self.label} is out of range: {why}, so choose {name} in "
                             f"[{lo}, {hi}] (default {default_param(self.kind, fmt)})")

    @classmethod
    def parse(cls, text: str, format: str = "float32") -> Regime:
        """``"ftz-deadzone"`` (default parameter) or ``"ftz-deadzone:126"``."""
        kind, _, param = text.partition(":")
        _check_kind(kind)
        get_format(format)  # its own error, not "bad regime"
        try:
            p = int(param) if param else default_param(kind, format)
        except ValueError:
            raise ValueError(f"bad regime {text!r}: use KIND or KIND:INTEGER, "
                             "e.g. ftz-deadzone:125") from None
        return cls(kind, p, format)  # type: ignore[arg-type]

    # -- what the regime is ----------------------------------------------------------------------
    @property
    def fmt(self) -> Format:
        return get_format(self.format)

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.param} ({self.format})"

    @property
    def semantics(self) -> Semantics:
        """The float semantics whose rounding the regime is."""
        if self.kind == "ftz-deadzone":
            return Semantics(self.format, "ftz")
        if self.kind == "saturation":
            return Semantics(self.format, overflow="saturate")
        return Semantics(self.format, "ieee")

    @property
    def native(self) -> bool:
        """True when :class:`~deeplinear.nets.DeepLinear`'s own layout executes the regime."""
        return self.kind in _UNDERFLOW and self.format == "float32"

    @property
    def scale_exp(self) -> int:
        """Hidden values are ``u 2^-scale_exp`` in the format (the 2017 layout's convention)."""
        if self.kind in _UNDERFLOW:
            return self.param
        return -self.param if self.kind == "saturation" else 0

    @property
    def threshold(self) -> float:
        """The width, in units of the net, at which the nonlinearity acts: the dead zone's
        half-width ``min 2^k``, the staircase's step ``min_sub 2^k``, the ulp of ``c``, or the
        clamp level ``max 2^-k``. Pre-activations a few thresholds wide feel it."""
        fmt = self.fmt
        if self.kind == "ftz-deadzone":
            return math.ldexp(fmt.min_normal, self.param)
        if self.kind == "subnormal-staircase":
            return math.ldexp(fmt.min_subnormal, self.param)
        if self.kind == "absorption":
            return math.ldexp(1.0, self.param - fmt.precision + 1)
        return math.ldexp(fmt.max, -self.param)

    @property
    def extent(self) -> float:
        """Where the nonlinearity stops: ``min 2^k`` for the underflow regimes (the staircase
        is the identity beyond it), the threshold otherwise."""
        return math.ldexp(self.fmt.min_normal, self.param) if self.kind in _UNDERFLOW else (
            self.threshold)

    # -- the function, twice ---------------------------------------------------------------------
    def activation(self, u: Tensor) -> Tensor:
        """The implicit activation in units of the net. Autograd gives its derivative almost
        everywhere: 1 or 0 for the dead zone and the clamp, 0 for roundings."""
        if self.format == "float32":
            if self.kind == "ftz-deadzone":
                return dead_zone(u, self.threshold)
            if self.kind == "subnormal-staircase":
                return staircase(u, self.extent, self.threshold)
            if self.kind == "saturation":
                return u.clamp(-self.threshold, self.threshold)
        if self.kind == "absorption" and self.format in ("float32", "float16", "bfloat16"):
            return _Step.apply(u, self._absorbed)
        return _Step.apply(u, self._rounded)

    def _absorbed(self, u: Tensor) -> Tensor:
        """``(u + c) - c`` in torch's own arithmetic of the format (fast, for training): float16
        and bfloat16 ops compute in float32 and round once more, innocuously for p <= 11."""
        c = 2.0**self.param
        return ((u.to(self.fmt.dtype) + c) - c).to(u.dtype)

    def _rounded(self, u: Tensor) -> Tensor:
        """The regime's rounding in float64 arithmetic (exact scalings, one rounding each)."""
        u64, fmt, k = u.double(), self.fmt, self.param
        if self.kind == "absorption":
            c = 2.0**k
            v = fm.round_to(u64, fmt)
            return fm.round_to(fm.round_to(v + c, fmt) - c, fmt).to(u.dtype)
        if self.kind in _UNDERFLOW:
            x = fm.round_to(_ldexp(u64, -k), fmt, ftz=self.kind == "ftz-deadzone")
            return _ldexp(x, k).to(u.dtype)
        return _ldexp(fm.round_to(_ldexp(u64, k), fmt, saturate=True), -k).to(u.dtype)

    @torch.no_grad()
    def exact(self, u: Tensor) -> Tensor:
        """The float operations themselves, returned in units of the net (``u``'s dtype).

        float32: :mod:`deeplinear.arithmetic`'s ops on float32 tensors (``u 2^-k`` under FTZ or
        IEEE, ``u 2^k`` saturating, ``(u + c) - c``). Other formats: the exact float64 value
        ``u 2^-+k`` cast to a tensor of the format's dtype (the mixed-precision store of a
        wider accumulator); ``(u + c) - c`` with arithmetic's ops in that dtype.
        """
        sem, k = self.semantics, self.param
        if self.kind == "absorption":
            c = 2.0**k
            return ar.sub(ar.add(fm.cast(u, self.fmt), c, sem), c, sem).to(u.dtype)
        e = -k if self.kind in _UNDERFLOW else k  # move to the format's scale and back
        if self.format == "float32":
            x = ar.scale(u.float(), e, sem)  # one float32 multiply, rounded once
        else:
            x = fm.cast(_ldexp(u.double(), e), self.fmt, ftz=sem.flushes, saturate=sem.saturates)
        return _ldexp(x.double(), -e).to(u.dtype)


# --- strength on N(0,1) pre-activations --------------------------------------------------------

@dataclass(frozen=True)
class Strength:
    """How far a regime's activation is from the identity on ``z ~ N(0,1)`` (float32).

    Measured against ``q``, ``z`` rounded to the format's significand bits
    (:func:`deeplinear.formats.round_precision`; ``z`` itself in float32): the identity *in that
    format* at any scale, so the figures are the regime's own effect, not the format's rounding
    (against ``z``, every float16 regime changed 99.98% of values).
    """

    regime: str
    kind: str
    format: str
    param: int
    threshold: float
    changed: float  # fraction of values the activation changes (f != q)
    zeroed: float  # fraction of all values that were nonzero and became zero
    # relative error of the best affine fit f ~ a q + b, sqrt(1 - R^2), as
    # probes.affine_fit_residual (0 if f is constant, NaN if f is not finite)
    residual: float
    max_error: float  # max |f(z) - q|

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def normal_sample(n: int = 1 << 20, seed: int = 0) -> Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def strength(regime: Regime, z: Tensor | None = None) -> Strength:
    """Residual of the best affine fit and the fractions changed and zeroed, on ``z``, each
    against ``z`` rounded to the format's precision (see :class:`Strength`)."""
    z = normal_sample() if z is None else z
    if z.numel() == 0:
        raise ValueError("no inputs: a regime's strength needs at least one value of z")
    f, q = regime.activation(z).double(), fm.round_precision(z.double(), regime.fmt)
    fc, qc = f - f.mean(), q - q.mean()
    var = float(fc @ fc)
    residual = 0.0 if math.isfinite(var) else math.nan  # overflowed: no affine fit to speak of
    if var > 0 and math.isfinite(var):
        a = float(qc @ fc) / float(qc @ qc)
        r = fc - a * qc
        residual = math.sqrt(float(r @ r) / var)
    return Strength(
        regime=regime.label, kind=regime.kind, format=regime.format, param=regime.param,
        threshold=regime.threshold, changed=float((f != q).double().mean()),
        zeroed=float(((f == 0) & (q != 0)).double().mean()), residual=residual,
        max_error=float((f - q).abs().max()),
    )


def sweep(kind: str, format: str = "float32", params: Sequence[int] | None = None,
          z: Tensor | None = None) -> list[Strength]:
    """:func:`strength` for each parameter (default: :func:`default_sweep`)."""
    z = normal_sample() if z is None else z
    params = default_sweep(kind, format) if params is None else params
    return [strength(Regime(kind, p, format), z) for p in params]  # type: ignore[arg-type]


def _row(s: Strength | Mapping[str, Any]) -> Mapping[str, Any]:
    return s.as_dict() if isinstance(s, Strength) else s


def format_sweep(rows: Sequence[Strength | Mapping[str, Any]]) -> str:
    """Aligned text: one line per parameter."""
    lines = [f"{'regime':<36}{'threshold':>12}{'changed':>10}{'zeroed':>10}"
             f"{'residual':>12}{'max |f-q|':>12}"]
    for s in map(_row, rows):
        lines.append(f"{s['regime']:<36}{s['threshold']:>12.4g}{s['changed']:>10.4f}"
                     f"{s['zeroed']:>10.4f}{s['residual']:>12.4g}{s['max_error']:>12.3g}")
    return "\n".join(lines)


def probe_report(spec: str = "all", format: str = "float32", n: int = 1 << 18,
                 seed: int = 0) -> dict[str, Any]:
    """Strength sweeps for ``deeplinear probe --regime``: ``all``, a kind (its default sweep) or
    ``KIND:PARAM`` (one parameter), on one N(0,1) sample. JSON-ready."""
    get_format(format)
    if ar.integer(n) is None or n < 1:
        raise ValueError(f"n must be a positive number of samples, got {n!r}")
    z = normal_sample(n, seed)
    sweeps: dict[str, list[Strength]]
    if spec == "all":
        sweeps = {kind: sweep(kind, format, z=z) for kind in KINDS}
    elif ":" in spec:
        r = Regime.parse(spec, format)
        sweeps = {r.kind: [strength(r, z)]}
    else:
        sweeps = {spec: sweep(spec, format, z=z)}
    return {"format": format, "n": n, "seed": seed, "inputs": "z ~ N(0,1), float32",
            "sweeps": {k: [s.as_dict() for s in rows] for k, rows in sweeps.items()}}


def format_probe_report(report: Mapping[str, Any]) -> str:
    fmt = report["format"]
    lines = [f"Implicit activations f in {fmt} on {report['n']} inputs ({report['inputs']}, "
             f"seed {report['seed']}), against q = z rounded to {fmt}'s precision:",
             "changed/zeroed = fractions of values f changes/zeroes; residual = sqrt(1 - R^2) "
             "of the best affine fit f ~ a q + b (as the net probe's); q has no subnormal "
             "grid, so values a regime's scale puts below the format's smallest normal count as "
             "changed (with a tiny max |f-q|)"]
    for kind, rows in report["sweeps"].items():
        lines += ["", kind, format_sweep(rows)]
    return "\n".join(lines)


def plot_sweeps(path: str | Path, sweeps: Mapping[str, Sequence[Strength | Mapping[str, Any]]],
                span: float = 3.0) -> Path:
    """One row per kind: the activation for each parameter on [-span, span], and its strength."""
    from matplotlib.ticker import MaxNLocator

    from deeplinear.report import plt, save_figure

    path = Path(path)
    fig, axes = plt.subplots(len(sweeps), 2, figsize=(10, 3.2 * len(sweeps)), squeeze=False,
                             layout="tight")
    u = torch.linspace(-span, span, 4001)
    for (name, given), (left, right) in zip(sweeps.items(), axes, strict=True):
        rows = [_row(s) for s in given]
        colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(rows)))  # one per parameter
        for s, colour in zip(rows, colours, strict=True):
            f = Regime(s["kind"], s["param"], s["format"]).activation(u)
            left.plot(u.numpy(), f.numpy(), lw=1, color=colour, label=f"{s['param']}")
        left.plot(u.numpy(), u.numpy(), "k:", lw=0.8)
        left.set_title(f"{name} ({rows[0]['format']}): implicit activation", fontsize=9)
        left.set_xlabel("z (pre-activation)")
        left.set_ylabel("f(z)")
        left.legend(fontsize=6, ncol=2, title="param", title_fontsize=6)
        params = [s["param"] for s in rows]
        for key, style, label in (("residual", "o-", "residual, sqrt(1 - R^2)"),
                                  ("changed", "s--", "fraction changed")):
            # a log axis has no 0: those points are left out, not drawn at a made-up floor
            right.semilogy(params, [s[key] if s[key] > 0 else np.nan for s in rows], style,
                           label=label)
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.set_xlabel("parameter (k, or j for absorption)")
        right.set_ylabel("on N(0,1) (0: not drawn)")
        right.set_title(f"{name}: strength on N(0,1)", fontsize=9)
        right.legend(fontsize=7)
        right.grid(alpha=0.3)
    return save_figure(fig, path)


# --- what the hardware does by default ---------------------------------------------------------

@dataclass(frozen=True)
class Observation:
    backend: str
    setting: str
    op: str
    observed: str  # a regime kind, "identity", or what happened instead
    detail: str = ""


_K = SCALE_EXP  # the 2017 scale: N(0,1) straddles the float32 dead zone |u| < 1/2
_ABSORB = default_param("absorption", "float16")  # c = 2^9 in float16: ulp 1/2
_SAT = 8  # x 2^8 into float8_e4m3fn: clamp at 1.75


def classify(out: Tensor, u: Tensor, candidates: Sequence[Regime]) -> tuple[str, str]:
    """Which candidate regime's activation ``out`` equals value for value (``torch.equal``: a
    zero's sign is not compared) (else "identity" or a count of differences from the closest)."""
    out = out.float()
    for r in candidates:
        if torch.equal(out, r.activation(u)):
            return r.kind, r.label
    if torch.equal(out, u):
        return "identity", "no rounding at all"
    for name, bad in (("NaN", out.isnan()), ("inf", out.isinf())):
        if bad.any():
            return name, f"{int(bad.sum())} of {out.numel()} values are {name} (no saturation)"
    diffs = {r.label: int((out != r.activation(u)).sum()) for r in candidates}
    best = min(diffs, key=diffs.__getitem__)
    return "other", f"{diffs[best]} of {out.numel()} differ from {best}"


def _underflow_rows(backend: str, setting: str, scale: Callable[[Tensor], Tensor],
                    matmul: Callable[[Tensor, Tensor], Tensor] | None) -> list[Observation]:
    """``u 2^-125`` by an elementwise op and by a matmul whose products are subnormal."""
    u = normal_sample(4096)
    cands = [Regime("ftz-deadzone", _K), Regime("subnormal-staircase", _K)]

    def units(x: Tensor) -> Tensor:  # outside any FTZ thread: exact
        return (x.double() * 2.0**_K).float()

    rows = [Observation(backend, setting, "x * 2^-125 (elementwise)",
                        *classify(units(scale(u)), u, cands))]
    if matmul is not None:
        a = (u.double() * 2.0**-62).float().unsqueeze(1)  # normal inputs, subnormal products
        w = torch.tensor([[2.0**-63]])
        rows.append(Observation(backend, setting, "matmul, subnormal products",
                                *classify(units(matmul(a, w)).squeeze(1), u, cands)))
        sub = (u.double() * 2.0**-_K).float().unsqueeze(1)  # subnormal inputs, made exactly
        kept = torch.equal(matmul(sub, torch.tensor([[1.0]])), sub)
        rows.append(Observation(backend, setting, "matmul, subnormal inputs",
                                "kept" if kept else "read as zero (DAZ)"))
    return rows


def _torch_rows(device: str, setting: str, run: Callable[[Callable[[], Any]], Any]
                ) -> list[Observation]:
    backend = f"torch {torch.__version__} {device}"
    u = normal_sample(4096)

    def on(x: Tensor) -> Tensor:
        return x.to(device)

    def scale(x: Tensor) -> Tensor:
        return run(lambda: (on(x) * 2.0**-_K).cpu())

    def matmul(a: Tensor, b: Tensor) -> Tensor:
        return run(lambda: (on(a) @ on(b)).cpu())

    rows = _underflow_rows(backend, setting, scale, matmul)
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        j = default_param("absorption", name)

        def absorb(dtype: torch.dtype = dtype, c: float = 2.0**j) -> Tensor:
            return ((on(u).to(dtype) + c) - c).float().cpu()

        out = run(absorb)
        rows.append(Observation(backend, setting, f"(x + 2^{j}) - 2^{j} in {name}",
                                *classify(out, u, [Regime("absorption", j, name)])))
    out = run(lambda: (on(u) * 2.0**_SAT).to(torch.float8_e4m3fn).float().cpu() * 2.0**-_SAT)
    rows.append(Observation(backend, setting, "x * 2^8 cast to float8_e4m3fn",
                            *classify(out, u, [Regime("saturation", _SAT, "float8_e4m3fn")])))
    big = run(lambda: (on(u) * 2.0**127).cpu())
    rows.append(Observation(backend, setting, "x * 2^127 in float32",
                            *classify((big.double() * 2.0**-127).float(), u,
                                      [Regime("saturation", 127)])))
    return rows


def _numpy_rows() -> list[Observation]:
    backend, setting = f"numpy {np.__version__} CPU", "default"
    rows = _underflow_rows(
        backend, setting,
        lambda x: torch.from_numpy(x.numpy() * np.float32(2.0**-_K)),
        lambda a, b: torch.from_numpy(a.numpy() @ b.numpy()))
    u = normal_sample(4096)
    c = np.float16(2.0**_ABSORB)
    out = torch.from_numpy(((u.numpy().astype(np.float16) + c) - c).astype(np.float32))
    rows.append(Observation(backend, setting, f"(x + 2^{_ABSORB}) - 2^{_ABSORB} in float16",
                            *classify(out, u, [Regime("absorption", _ABSORB, "float16")])))
    try:
        import ml_dtypes
    except ImportError:
        return rows
    with np.errstate(all="ignore"):
        q = (u.numpy() * np.float32(2.0**_SAT)).astype(ml_dtypes.float8_e4m3fn)
    out = torch.from_numpy(q.astype(np.float32) * np.float32(2.0**-_SAT))
    rows.append(Observation(f"ml_dtypes {ml_dtypes.__version__}", setting,
                            "x * 2^8 cast to float8_e4m3fn",
                            *classify(out, u, [Regime("saturation", _SAT, "float8_e4m3fn")])))
    return rows


def _jax_rows() -> list[Observation]:
    """JAX on CPU, if installed (not a dependency): the scale as a runtime argument, and as a
    compile-time constant, which XLA may fold away."""
    import jax
    import jax.numpy as jnp

    backend = f"jax {jax.__version__} {jax.default_backend()}"
    u = normal_sample(4096)
    cands = [Regime("ftz-deadzone", _K), Regime("subnormal-staircase", _K)]
    x = jnp.asarray(u.numpy())
    s_down, s_up = jnp.float32(2.0**-_K), jnp.float32(2.0**_K)
    small = np.array(jax.jit(lambda x, s: x * s)(x, s_down))  # copies: jax arrays are read-only
    out = (torch.from_numpy(small).double() * 2.0**_K).float()
    rows = [Observation(backend, "jit, scale as a runtime argument", "x * 2^-125 (elementwise)",
                        *classify(out, u, cands))]
    both = np.array(jax.jit(lambda x, a, b: (x * a) * b)(x, s_down, s_up))
    rows.append(Observation(backend, "jit, scales as runtime arguments", "(x * 2^-125) * 2^125",
                            *classify(torch.from_numpy(both), u, cands)))
    folded = np.array(jax.jit(lambda x: (x / 2.0**_K) * 2.0**_K)(x))
    rows.append(Observation(backend, "jit, scale a Python constant", "(x / 2^125) * 2^125",
                            *classify(torch.from_numpy(folded), u, cands)))
    return rows


def _plain(fn: Callable[[], Any]) -> Any:
    return fn()


def _cuda_rows(compiled: bool) -> list[Observation]:
    rows = _torch_rows("cuda", "default (eager)", _plain)
    m = torch.backends.cuda.matmul
    a = torch.full((128, 128), 1 + 2.0**-20, device="cuda")
    exact = torch.equal(a @ torch.eye(128, device="cuda"), a)
    rows.append(Observation(
        f"torch {torch.__version__} cuda", "default", "float32 matmul precision",
        "float32 (TF32 off)" if exact else "TF32 (inputs rounded to 10 bits)",
        f"allow_tf32={getattr(m, 'allow_tf32', '?')}, "
        f"cudnn.allow_tf32={torch.backends.cudnn.allow_tf32}, "
        f"float32_matmul_precision={torch.get_float32_matmul_precision()!r}, "
        f"{torch.cuda.get_device_name()}"))
    if compiled:
        u = normal_sample(4096).cuda()
        f = torch.compile(lambda x, s: x * s)  # the scale a runtime tensor: nothing to fold
        out = (f(u, torch.tensor(2.0**-_K, device="cuda")).cpu().double() * 2.0**_K).float()
        cands = [Regime("ftz-deadzone", _K), Regime("subnormal-staircase", _K)]
        rows.append(Observation(f"torch {torch.__version__} cuda", "torch.compile (Inductor)",
                                "x * 2^-125 (elementwise)", *classify(out, u.cpu(), cands)))
    return rows


def hardware_report(cuda: bool | None = None, jax: bool | None = None,
                    compiled: bool = False) -> list[Observation]:
    """Measure which regime each backend on this machine exhibits, by default and with FTZ/DAZ.

    Every row runs the regime's defining operation on the same N(0,1) float32 sample and compares
    the result bit for bit with the regimes' activations. ``cuda``/``jax``: None = when available
    (JAX is optional and never a dependency). ``compiled`` adds torch.compile on CUDA.
    """
    rows = _torch_rows("cpu", "default", _plain)
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        rows += _torch_rows("cpu", "FTZ+DAZ (run_with_hardware_ftz)", ar.run_with_hardware_ftz)
    rows += _numpy_rows()
    if jax is None:
        jax = "jax" in sys.modules or _importable("jax")
    if jax:
        rows += _jax_rows()
    if cuda is None:
        cuda = torch.cuda.is_available()
    if cuda:
        rows += _cuda_rows(compiled)
    return rows


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def format_hardware_report(rows: Sequence[Observation]) -> str:
    w = [max(len(getattr(r, f)) for r in rows) for f in ("backend", "setting", "op", "observed")]
    lines = [f"{'backend':<{w[0]}}  {'setting':<{w[1]}}  {'op':<{w[2]}}  {'observed':<{w[3]}}  "
             "detail"]
    for r in rows:
        lines.append(f"{r.backend:<{w[0]}}  {r.setting:<{w[1]}}  {r.op:<{w[2]}}  "
                     f"{r.observed:<{w[3]}}  {r.detail}")
    return "\n".join(lines)


# --- can training exploit each regime? ---------------------------------------------------------

# each kind where it bites N(0,1) at unit scale; absorption in float16, where it is met
STUDY_REGIMES: tuple[Regime, ...] = tuple(
    Regime(kind, default_param(kind, fmt), fmt)
    for kind, fmt in zip(KINDS, ("float32", "float32", "float16", "float32"), strict=True))

STUDY_METHODS = ("OpenAI-ES", "float-aware backprop")
# ES in the study: sigma/lr from the spirals grid (fan-in-scaled sigma at init gain 2 reached 93%
# in 2000 generations); the init gain is relative to each regime's own threshold
STUDY_ES = {"batch_size": 256, "sigma": 0.03, "lr": 0.03}
STUDY_INIT_GAIN = 2.0


def float_aware_surrogate(regime: Regime) -> str:
    """The backprop surrogate that exploits ``regime``: for the float32 dead zone the smooth
    relaxation (it sees the jump at the threshold; the best on spirals and Fashion-MNIST, see
    :mod:`deeplinear.train.backprop`), for the clamp its exact derivative (1 inside, 0 beyond),
    straight-through across roundings (whose derivative is 0 almost everywhere)."""
    if regime.format == "float32" and regime.kind == "ftz-deadzone":
        return FLOAT_AWARE
    if regime.format == "float32" and regime.kind == "saturation":
        return "exact"
    return "ste"


def study(dataset: str = "spirals", regimes: Sequence[Regime] = STUDY_REGIMES,
          budget: str = "quick", seed: int = 0, sizes: Sequence[int] | None = None,
          data_dir: str | None = None, n_train: int | None = None, n_test: int | None = None,
          progress: bool = False, methods: Sequence[str] = STUDY_METHODS,
          es_overrides: Mapping[str, Any] | None = None,
          partial: Path | None = None) -> dict[str, Any]:
    """Train the same deep linear shape under each regime by OpenAI-ES and by float-aware
    backprop, against softmax regression (the best linear model) and a ReLU MLP.

    Every net starts with pre-activations 2 regime thresholds wide (``init_gain``) and is scored
    in ``exact`` mode, the regime's true float arithmetic; ``collapsed_acc`` is the accuracy of
    the affine map the same weights collapse to, i.e. what is left without the regime.

    ``partial``: a JSON file rewritten (atomically) after each finished model, with the study's
    settings; a study given an existing one skips the models it holds, which it would compute
    bit for bit again (each depends only on the settings), so a killed study loses one model's
    training at most. Refused if it was written with other settings.
    """
    import time

    from deeplinear import evaluate
    from deeplinear.data import load_dataset
    from deeplinear.nets import MLP, DeepLinear, SoftmaxRegression
    from deeplinear.reproduce import BUDGETS, check_budget  # one budget table for every study
    from deeplinear.runs import atomic_write_text
    from deeplinear.train import backprop, es

    check_budget(budget)
    unknown = [m for m in methods if m not in STUDY_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown or '(none)'}; use {', '.join(STUDY_METHODS)}")
    if not regimes:
        raise ValueError("no regimes to study; pass at least one Regime")
    b = BUDGETS[budget]
    budget_es = b.es_for(dataset)  # its generations and pop; the study's own sigma and lr
    es_settings = {**STUDY_ES, "steps": budget_es["steps"], "pop": budget_es["pop"],
                   **(es_overrides or {})}
    threads = torch.get_num_threads()  # backprop's; ES's own count, if any, is in es_settings
    data = load_dataset(dataset, data_dir=data_dir, seed=seed, n_train=n_train, n_test=n_test)
    es_settings["batch_size"] = min(es_settings["batch_size"], len(data.y_train))  # small sets
    sizes = list(sizes) if sizes else default_sizes(data.n_features, data.n_classes)
    xt, yt = data.x_test, data.y_test

    def say(text: str) -> None:
        if progress:
            print(text, file=sys.stderr, flush=True)

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    settings = {"budget": budget, "backprop_steps": b.backprop_steps,
                "es": {**es_settings, "init_gain": STUDY_INIT_GAIN}}
    keys = {"dataset": dataset, "sizes": sizes, "budget": settings, "seed": seed,
            "n_train": len(data.y_train), "n_test": len(yt), "torch": torch.__version__,
            "threads": threads}
    baselines: dict[str, float] = {}
    finished: dict[tuple[str, str], dict[str, Any]] = {}  # (regime, method) -> a resumed row
    if partial is not None and partial.exists():
        baselines, resumed = _resumed_study(partial, keys)
        finished = {(row["regime"], row["method"]): row for row in resumed}
        say(f"{partial}: {len(baselines) + len(finished)} finished models reused")
    rows: list[dict[str, Any]] = []

    def save() -> None:
        if partial is not None:  # the rows redone so far, and those still to be reached
            done = {(row["regime"], row["method"]) for row in rows}
            kept = rows + [row for key, row in finished.items() if key not in done]
            atomic_write_text(json.dumps({**keys, "baselines": baselines, "rows": kept}), partial)

    for name, make in (("softmax regression", lambda: SoftmaxRegression(sizes[0], sizes[-1])),
                       ("ReLU MLP", lambda: MLP(sizes, "relu"))):
        if name in baselines:
            continue
        with seeded(seed):  # nn.Linear's init draws from the global generator
            model = make()
        backprop.train(model, data, backprop.Config(seed=seed, steps=b.backprop_steps),
                       progress=progress)
        baselines[name] = evaluate.accuracy(model, xt, yt)
        save()
        say(f"{name}: {baselines[name]:.4f}")

    for r in regimes:
        for method in methods:
            if (r.label, method) in finished:
                rows.append(finished[r.label, method])
                continue
            net = DeepLinear(sizes, regime=r, generator=gen())
            gain = STUDY_INIT_GAIN * r.threshold / net.threshold
            t0 = time.perf_counter()
            if method == "OpenAI-ES":
                cfg: Any = es.Config(**{**es_settings, "seed": seed, "init_gain": gain,
                                        "eval_every": es_settings["steps"]})
                es.train(net, data, cfg, progress=progress)
                detail = f"pop {cfg.pop}, {cfg.steps} generations, {cfg.perturbation} noise"
            else:
                kind = float_aware_surrogate(r)
                cfg = backprop.Config(seed=seed, steps=b.backprop_steps, surrogate=kind,
                                      init_gain=gain, eval_every=b.backprop_steps)
                backprop.train(net, data, cfg, progress=progress)
                detail = f"surrogate {kind}, {b.backprop_steps} steps"
            wall = time.perf_counter() - t0
            row = {"regime": r.label, "method": method, "detail": detail,
                   "test_acc": evaluate.accuracy(net, xt, yt, mode="exact"),
                   "scaled_acc": evaluate.accuracy(net, xt, yt, mode="scaled"),
                   "collapsed_acc": evaluate.collapsed_accuracy(net, xt, yt),
                   "train_s": wall}
            rows.append(row)
            save()
            say(f"{r.label} {method}: exact {row['test_acc']:.4f}, collapsed "
                f"{row['collapsed_acc']:.4f} ({wall:.0f} s)")
    return {**keys, "baselines": baselines, "rows": rows}


def _resumed_study(partial: Path, keys: Mapping[str, Any]
                   ) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The finished baselines and rows of ``partial``, or a one-line error where it is damaged
    or was written with other settings than ``keys``."""
    try:
        saved = json.loads(partial.read_text())
        baselines, rows = dict(saved["baselines"]), list(saved["rows"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{partial}: not a regimes study's partial results ({e}); delete it to "
                         "start the study again") from None
    from deeplinear.runs import differences

    differ = differences({k: saved.get(k) for k in keys}, json.loads(json.dumps(keys)), {})
    if differ:
        raise ValueError(f"{partial}: written by a study with other settings, {', '.join(differ)}; "
                         "repeat them if a flag sets them, else delete it (or pass another --out) "
                         "to start again")
    return baselines, rows


def _study_grid(result: Mapping[str, Any]
                ) -> tuple[list[str], list[str], dict[tuple[str, str], Mapping[str, Any]]]:
    """A study's methods and regimes in the order trained, and its row for each pair."""
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    regimes = list(dict.fromkeys(r["regime"] for r in result["rows"]))
    return methods, regimes, {(r["regime"], r["method"]): r for r in result["rows"]}


def format_study(result: Mapping[str, Any]) -> str:
    """Markdown: regime x method -> test accuracy in exact arithmetic (scaled | collapsed)."""
    methods, regimes, cell = _study_grid(result)
    lines = [f"{result['dataset']}, deep linear {'-'.join(map(str, result['sizes']))}, "
             f"{result['n_train']} train / {result['n_test']} test, seed {result['seed']}, "
             f"budget {result['budget']['budget']}. Test accuracy in the regime's exact float "
             "arithmetic (in brackets: in the scaled model trained / of the affine map the same "
             "weights collapse to).", "",
             "| regime | " + " | ".join(methods) + " |",
             "|---|" + "---|" * len(methods)]
    for reg in regimes:
        cells = [f"{100 * c['test_acc']:.1f}% ({100 * c['scaled_acc']:.1f}% / "
                 f"{100 * c['collapsed_acc']:.1f}%)" for c in (cell[reg, m] for m in methods)]
        lines.append(f"| {reg} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"- {name}: {100 * acc:.1f}%" for name, acc in result["baselines"].items()]
    return "\n".join(lines)


def draw_study(ax: Any, result: Mapping[str, Any]) -> None:
    """The study's table on ``ax``: per regime a bar for each method's exact-arithmetic test
    accuracy, a black mark at the accuracy of the affine map its weights collapse to (the gap is
    what the regime bought), the baselines as vertical lines. Why a picture: the table's
    question, "which regimes does training exploit, and by how much over linear", is a comparison
    of lengths."""
    methods, regimes, cell = _study_grid(result)
    height = 0.8 / len(methods)
    for j, method in enumerate(methods):
        ys = [i + (j - (len(methods) - 1) / 2) * height for i in range(len(regimes))]
        rows = [cell[reg, method] for reg in regimes]
        ax.barh(ys, [100 * r["test_acc"] for r in rows], height=0.9 * height, color=f"C{j}",
                label=f"{method} (exact)")
        ax.plot([100 * r["collapsed_acc"] for r in rows], ys, "k|", markersize=30 * height,
                markeredgewidth=2, label="its collapsed affine map" if j == 0 else None)
    for k, (name, acc) in enumerate(result["baselines"].items()):
        ax.axvline(100 * acc, color="0.4", ls=("--", ":")[k % 2], lw=1,
                   label=f"{name} {100 * acc:.1f}%")
    ax.set_yticks(range(len(regimes)), regimes, fontsize=8)
    ax.invert_yaxis()  # the table's order, top to bottom
    ax.set_xlim(0, 100)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(f"{result['dataset']}, deep linear {'-'.join(map(str, result['sizes']))}: "
                 f"regimes x training (seed {result['seed']}, budget "
                 f"{result['budget']['budget']})", fontsize=9)
    ax.grid(axis="x", alpha=0.3)


def plot_study(path: str | Path, result: Mapping[str, Any]) -> Path:
    """:func:`draw_study` as a PNG at ``path``, its legend below the axes."""
    from deeplinear.report import plt, save_figure

    n = len(result["rows"])
    fig, ax = plt.subplots(figsize=(7.5, 1.8 + 0.55 * n), layout="constrained")
    draw_study(ax, result)
    fig.legend(fontsize=7, loc="outside lower center", ncol=2, markerscale=0.5)
    return save_figure(fig, Path(path))
