"""Nonlinearity diagnostics: how far a deep linear network, as executed, is from a linear map.

Why this module exists: "the float execution is nonlinear" needs numbers that anyone can
recompute. Everything here measures an executed function against the laws a linear map obeys:

* the blog's two algebra counterexamples (distributivity, associativity), evaluated exactly under
  each semantics, and a randomized search for more (:func:`find_counterexamples`);
* linearity defects of any function ``f`` on data (all norms Frobenius over the batch, float64),
  each of the form ``||actual - linear prediction|| / ||linear prediction||`` after subtracting
  ``f(0)``, so that they are invariant to an output offset and to the output scale::

      additivity   ||f(x+y) - f(x) - f(y) + f(0)|| / ||f(x) + f(y) - 2 f(0)||
      homogeneity  ||f(a x) - f(0) - a (f(x) - f(0))|| / ||a (f(x) - f(0))||

  and the residual of the best affine fit, ``||Y - [X 1] B|| / ||Y - mean(Y)||`` with ``B`` the
  float64 least-squares solution on the same inputs (sqrt of the unexplained variance fraction);
* per-layer dead-zone occupancy and the implicit activation of one unit along a ray.

Pre-underflow values come from :func:`layer_values`, not from ``DeepLinear.trace``'s ``u``: in
exact mode a hidden layer's flush happens inside its bias add, and under scope ``all`` inside its
matmul, so the trace's ``u`` there is already flushed. In scaled units every layer is
``h_prev @ W + b``; evaluating that in float64 on the *executed* ``h_prev`` gives the value the
layer would have produced without underflow, in either mode and under every semantics.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from deeplinear import arithmetic as ar
from deeplinear.arithmetic import PRESETS, Semantics, preset_name
from deeplinear.collapse import collapse_gap
from deeplinear.es import check_memory
from deeplinear.nets import SCALE_EXP, DeepLinear, Mode, parse_sizes
from deeplinear.runs import Progress

Law = Literal["distributivity", "associativity"]
LAWS: tuple[Law, ...] = ("distributivity", "associativity")

BLOG_NORMAL_GAP_RATIO = 2**20  # what the 2017 post claims for float32; the truth is 2**23
HOMOGENEITY_SCALARS = (0.5, 2.0)


def semantics_label(sem: Semantics) -> str:
    """The preset name of ``sem`` if it is one, else ``format/underflow/scope[/saturate]``."""
    return preset_name(sem) or (f"{sem.format}/{sem.underflow}/{sem.scope}"
                                + ("/saturate" if sem.saturates else ""))


def _resolve(semantics: Sequence[str | Semantics] | str | Semantics) -> dict[str, Semantics]:
    if isinstance(semantics, (str, Semantics)):  # one, not a sequence of characters
        semantics = [semantics]
    out: dict[str, Semantics] = {}
    for s in semantics:
        sem = ar.get_semantics(s) if isinstance(s, str) else s
        out[semantics_label(sem)] = sem
    if not out:
        raise ValueError("no semantics given; name at least one of " + ", ".join(PRESETS))
    return out


# --- algebra ------------------------------------------------------------------------------------


def law_sides(law: Law, a: Tensor, b: Tensor, c: Tensor, sem: Semantics) -> tuple[Tensor, Tensor]:
    """Both sides of a law, every op rounded and flushed under ``sem``.

    distributivity: ``(a+b)*c`` vs ``a*c + b*c``; associativity: ``(a+b)+c`` vs ``(b+c)+a``
    (the blog's order; ``+`` itself is commutative under every semantics).
    """
    if law == "distributivity":
        return (ar.mul(ar.add(a, b, sem), c, sem),
                ar.add(ar.mul(a, c, sem), ar.mul(b, c, sem), sem))
    if law == "associativity":
        return ar.add(ar.add(a, b, sem), c, sem), ar.add(ar.add(b, c, sem), a, sem)
    raise ValueError(f"unknown law {law!r}; use {' or '.join(LAWS)}")


@dataclass(frozen=True)
class BlogExample:
    """One of the 2017 post's counterexamples; ``values(min)`` gives a, b, c for a format."""

    law: Law
    values: Callable[[float], tuple[float, float, float]]
    inputs: str
    unit_is_min: bool  # sides shown in units of min (associativity) or of 1 (distributivity)
    needs: str

    def tensors(self, sem: Semantics) -> tuple[Tensor, Tensor, Tensor]:
        """The format's values nearest to the blog's (0.4*min is itself a subnormal)."""
        a, b, c = (torch.tensor(v, dtype=torch.float64).to(sem.fmt.dtype)
                   for v in self.values(sem.fmt.min_normal))
        return a, b, c


BLOG_EXAMPLES: tuple[BlogExample, ...] = (
    BlogExample("distributivity", lambda m: (0.4 * m, 0.5 * m, 1 / m),
                "a=0.4min b=0.5min c=1/min", unit_is_min=False,
                needs="FTZ without DAZ (DAZ reads the subnormal a, b as 0 on both sides)"),
    BlogExample("associativity", lambda m: (2.5 * m, -1.6 * m, m),
                "a=2.5min b=-1.6min c=min", unit_is_min=True,
                needs="any flush (FTZ or FTZ+DAZ); equal under IEEE gradual underflow"),
)


def algebra_table(semantics: Mapping[str, Semantics] | Sequence[str | Semantics] | str | Semantics
                  ) -> list[dict[str, Any]]:
    """The blog's examples under each semantics (named, or a preset name or list as elsewhere):
    one row per (law, semantics), sides in ``unit``."""
    if not isinstance(semantics, Mapping):
        semantics = _resolve(semantics)
    rows = []
    for ex in BLOG_EXAMPLES:
        lhs_expr, rhs_expr = (("(a+b)*c", "a*c+b*c") if ex.law == "distributivity"
                              else ("(a+b)+c", "(b+c)+a"))
        for name, sem in semantics.items():
            lhs, rhs = (v.double() for v in law_sides(ex.law, *ex.tensors(sem), sem))
            unit = sem.fmt.min_normal if ex.unit_is_min else 1.0
            rows.append({
                "law": ex.law, "lhs_expr": lhs_expr, "rhs_expr": rhs_expr,
                "inputs": ex.inputs, "needs": ex.needs, "semantics": name,
                "unit": "min" if ex.unit_is_min else "1",
                "lhs": float(lhs) / unit, "rhs": float(rhs) / unit,
                "differs": bool(lhs != rhs),
            })
    return rows


@dataclass(frozen=True)
class Counterexamples:
    """Triples whose two sides differ under ``semantics`` (values as float64 copies).

    ``flush_caused[i]`` says the law *holds* for triple i under IEEE gradual underflow in the
    same format: the failure is due to flushing, not to ordinary rounding. Under IEEE itself every
    found triple is a rounding counterexample (``flush_caused`` all False by definition).
    """

    law: Law
    semantics: Semantics
    n_tried: int
    a: Tensor
    b: Tensor
    c: Tensor
    lhs: Tensor
    rhs: Tensor
    flush_caused: Tensor

    def __len__(self) -> int:
        return len(self.a)

    def summary(self, k: int = 3) -> dict[str, Any]:
        """Counts and the first ``k`` flush-caused triples with both sides."""
        idx = self.flush_caused.nonzero().flatten()[:k].tolist()
        return {
            "law": self.law, "semantics": semantics_label(self.semantics),
            "n_tried": self.n_tried, "n_found": len(self),
            "n_flush_caused": int(self.flush_caused.sum()),
            "flush_caused_examples": [
                {key: float(getattr(self, key)[i]) for key in ("a", "b", "c", "lhs", "rhs")}
                for i in idx
            ],
        }


def _log_uniform(n: int, lo: float, hi: float, g: torch.Generator) -> Tensor:
    """``±2**U(lo, hi)`` in float64, random signs."""
    e = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return sign * torch.exp2(e)


@torch.no_grad()
def find_counterexamples(law: Law, semantics: Semantics | str, n: int = 100_000,
                         seed: int = 0) -> Counterexamples:
    """Randomized, vectorised search for triples that break ``law`` under ``semantics``.

    a, b (and c for associativity) are ``±min * 2**U(-(p-1), p-1)`` for the format's precision p:
    from the smallest subnormal up to where sums can still cancel into the subnormal range. For
    distributivity c is ``±2**U(-(p-1), hi)`` with ``2**hi`` up to ``2**(p-1) / min`` (capped
    below the format's max), so products land anywhere from far below min to beyond order one,
    covering the blog's c = 1/min. Values are drawn in float64 and rounded to the format.
    """
    if law not in LAWS:
        raise ValueError(f"unknown law {law!r}; use {' or '.join(LAWS)}")
    if ar.integer(n) is None or n < 1:
        raise ValueError(f"n must be a positive number of triples, got {n!r}")
    semantics = ar.as_semantics(semantics)
    fmt = semantics.fmt
    g = torch.Generator().manual_seed(seed)
    span = fmt.precision - 1
    m = fmt.min_normal
    a, b = (m * _log_uniform(n, -span, span, g) for _ in range(2))
    if law == "distributivity":
        hi = min(span - math.log2(m), math.log2(fmt.max) - 1)
        c = _log_uniform(n, -span, hi, g)
    else:
        c = m * _log_uniform(n, -span, span, g)
    a, b, c = (v.to(fmt.dtype).double() for v in (a, b, c))  # rounded to the format, exactly
    lhs, rhs = (v.double() for v in law_sides(law, a, b, c, semantics))
    found = lhs != rhs
    a, b, c, lhs, rhs = (v[found] for v in (a, b, c, lhs, rhs))
    ieee = dataclasses.replace(semantics, underflow="ieee")
    ieee_lhs, ieee_rhs = (v.double() for v in law_sides(law, a, b, c, ieee))
    flush_caused = (ieee_lhs == ieee_rhs) & semantics.flushes
    return Counterexamples(law, semantics, n, a, b, c, lhs, rhs, flush_caused)


# --- linearity defects --------------------------------------------------------------------------

Fn = Callable[[Tensor], Tensor]


def _rows(*xs: Tensor) -> None:
    """A defect over no rows is 0 or NaN, which would read as "linear" or pass unnoticed."""
    if any(len(x) == 0 for x in xs):
        raise ValueError("no inputs: a probe needs at least one row of x")


def _eval(f: Fn, x: Tensor) -> Tensor:
    with torch.no_grad():
        return f(x).detach().double()


def _rel(diff: Tensor, ref: Tensor) -> float:
    return float(diff.norm() / ref.norm().clamp_min(1e-300))


def additivity_defect(f: Fn, x: Tensor, y: Tensor) -> float:
    """``||f(x+y) - f(x) - f(y) + f(0)|| / ||f(x) + f(y) - 2 f(0)||``: superposition's error."""
    _rows(x, y)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have one shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}: superposition adds them row by row")
    f0 = _eval(f, torch.zeros_like(x[:1]))
    fx, fy = _eval(f, x) - f0, _eval(f, y) - f0
    return _rel(_eval(f, x + y) - f0 - fx - fy, fx + fy)


def homogeneity_defect(f: Fn, x: Tensor, a: float) -> float:
    """``||f(a x) - f(0) - a (f(x) - f(0))|| / ||a (f(x) - f(0))||``."""
    _rows(x)
    f0 = _eval(f, torch.zeros_like(x[:1]))
    pred = a * (_eval(f, x) - f0)
    return _rel(_eval(f, a * x) - f0 - pred, pred)


def check_fit_size(n: int, d: int) -> None:
    """An affine fit needs well over d + 1 rows, else its residual is ~0 whatever f is."""
    if n <= 2 * (d + 1):
        raise ValueError(f"affine fit on {n} inputs of dimension {d} is meaningless: use more "
                         f"than {2 * (d + 1)} inputs (n_fit)")


def affine_fit_residual(f: Fn, x: Tensor) -> float:
    """Residual of the best affine map on ``x``: ``||Y - [X 1] B|| / ||Y - mean(Y)||``.

    In-sample least squares in float64. It needs many more rows than ``x`` has columns (+1);
    with n rows and d+1 parameters a pure-noise residual is underestimated by ~sqrt(1-(d+1)/n).
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a tensor of shape (inputs, features), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}; "
                         "pass x.reshape(len(x), -1)")
    n, d = x.shape
    check_fit_size(n, d)
    y = _eval(f, x)
    xa = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], dim=1)
    coef = torch.linalg.lstsq(xa, y, driver="gelsd").solution
    return _rel(y - xa @ coef, y - y.mean(0))


# --- what each layer does -----------------------------------------------------------------------


@torch.no_grad()
def layer_values(net: DeepLinear, x: Tensor, mode: Mode = "exact") -> list[tuple[Tensor, Tensor]]:
    """Per layer ``(u, h)`` in scaled units (float64): ``u = h_prev @ W + b`` without underflow,
    computed from the *executed* previous activation, and ``h`` the executed value.
    """
    hs = [h.double() for _, h in net.trace(x, mode)]
    prev = [x.double(), *hs[:-1]]
    return [(hp @ w.detach().double() + b.detach().double(), h)
            for hp, h, w, b in zip(prev, hs, net.weights, net.biases, strict=True)]


def occupancy(net: DeepLinear, x: Tensor, mode: Mode = "exact") -> list[float]:
    """Per layer, the fraction of values underflow zeroed: ``u != 0`` and ``h == 0``."""
    _rows(x)
    return [float(((u != 0) & (h == 0)).double().mean()) for u, h in layer_values(net, x, mode)]


@dataclass(frozen=True)
class ImplicitActivation:
    """One unit along the ray ``x(t) = x0 + t d``: pre-underflow ``u`` and executed ``h``."""

    t: Tensor
    u: Tensor
    h: Tensor


def unit_ray(net: DeepLinear, unit: int = 0) -> tuple[Tensor, Tensor]:
    """``(x0, d)`` with x0 = 0 and d along W1[:, unit], scaled so that unit's u is ``t + b``."""
    _check_unit(net, 0, unit)
    w = net.weights[0].detach()[:, unit]
    norm2 = w.double().dot(w.double())
    if not (torch.isfinite(norm2) and norm2 > 0):
        raise ValueError(f"layer-1 unit {unit} has zero or non-finite weights, so no ray "
                         "through the inputs moves it; pick another unit")
    return torch.zeros_like(w), (w.double() / norm2).to(w.dtype)


def _check_unit(net: DeepLinear, layer: int, unit: int) -> None:
    n = net.sizes[layer + 1]
    if ar.integer(unit) is None:
        raise ValueError(f"unit must be an integer index, got {unit!r}")
    if not 0 <= unit < n:
        raise ValueError(f"unit {unit} out of range: layer {layer + 1} has {n} units (0..{n - 1})")


def _float_blind(net: DeepLinear, x: Tensor, layers: int) -> Tensor:
    """The first ``layers`` layers in float64 with no underflow (scaled units)."""
    h = x.double()
    for w, b in list(zip(net.weights, net.biases, strict=True))[:layers]:
        h = h @ w.detach().double() + b.detach().double()
    return h


def implicit_activation(net: DeepLinear, x0: Tensor, d: Tensor, t: Tensor | Sequence[float],
                        layer: int = 0, unit: int = 0, mode: Mode = "exact") -> ImplicitActivation:
    """The activation that underflow implements, seen by one unit along a ray ``x0 + t d``
    through inputs (``t`` a 1-D tensor or a list of positions)."""
    if not 0 <= layer < len(net.weights):
        raise ValueError(f"layer {layer} out of range: the net has {len(net.weights)} layers")
    _check_unit(net, layer, unit)
    t = torch.as_tensor(t, dtype=x0.dtype, device=x0.device)
    if t.dim() != 1:
        raise ValueError(f"t must be 1-D positions along the ray, got shape {tuple(t.shape)}")
    x = x0 + t[:, None] * d
    u, h = layer_values(net, x, mode)[layer]
    return ImplicitActivation(t, u[:, unit], h[:, unit])


# --- the report ---------------------------------------------------------------------------------


def make_nets(sizes: Sequence[int] | str,
              semantics: Sequence[str | Semantics] | str | Semantics, seed: int = 0,
              scale_exp: int = SCALE_EXP) -> dict[str, DeepLinear]:
    """One net per semantics, all with the same seeded He-normal weights (zero biases)."""
    sizes = parse_sizes(sizes)
    sems = _resolve(semantics)
    first = next(iter(sems.values()))
    base = DeepLinear(sizes, scale_exp, first, generator=torch.Generator().manual_seed(seed))
    return {name: base.with_semantics(sem) for name, sem in sems.items()}


def default_n_fit(n_in: int) -> int:
    """4x the parameters of an affine fit per output: residual biased low by ~sqrt(3/4)."""
    return 4 * (n_in + 1)


def input_bytes(sizes: Sequence[int]) -> int:
    """Peak host memory :func:`probe_report` takes per input: 16 bytes per input value (x, y and
    float64 copies) and 28 per unit of the widest hidden layer (its values, kept per layer).
    Measured (peak resident, ``--semantics IEEE``, two n each): 784-8-8-10 13.1 kB an input
    (this gives 12.8), 2-20000-2 560 kB (this gives 560)."""
    return 16 * sizes[0] + 28 * max(sizes[1:-1], default=0)


def probe_inputs(width: int, n: int, seed: int = 0) -> Tensor:
    """The ``n`` pixel-like inputs (uniform [0, 1]) :func:`probe_report` measures as ``x`` with
    ``seed`` (its generator's first draw): ``deeplinear probe --plot`` shows the collapse on
    them."""
    return torch.rand(n, width, generator=_input_generator(seed))


def _input_generator(seed: int) -> torch.Generator:
    """The generator of :func:`probe_report`'s inputs, ``x`` its first draw (the nets' weights
    take ``seed`` itself)."""
    return torch.Generator().manual_seed(seed + 1)


def probe_report(sizes: Sequence[int] | str,
                 semantics: Sequence[str | Semantics] = tuple(PRESETS), seed: int = 0,
                 n: int = 256, n_fit: int | None = None, scale_exp: int = SCALE_EXP,
                 mode: Mode = "exact", progress: bool = True) -> dict[str, Any]:
    """Every diagnostic for a net at init on random pixel-like inputs (uniform [0, 1]).

    Weights come from ``Generator(seed)``; the inputs ``x``, ``y`` (n each) and the affine-fit set
    (``n_fit``, default :func:`default_n_fit`) from ``Generator(seed + 1)``, identical for every
    semantics. ``mode='exact'`` (the default) is the ground truth, slow where subnormals meet
    the CPU's matmul: ~2 minutes for the 2017 net at n=4096 on 2 cores, hence the progress line
    (on stderr) after each of the five diagnostics of each semantics.
    """
    if (whole := ar.integer(n)) is None or whole < 1:
        raise ValueError(f"n must be a positive whole number of inputs, got {n!r}")
    n = whole
    nets = make_nets(sizes, semantics, seed, scale_exp)
    sizes = parse_sizes(sizes)
    check_memory(n * input_bytes(sizes),
                 f"n={n} inputs of a {'-'.join(map(str, sizes))} net need about", "lower n (--n)")
    n_fit = default_n_fit(sizes[0]) if n_fit is None else n_fit
    check_fit_size(n_fit, sizes[0])
    g = _input_generator(seed)
    x, y = torch.rand(n, sizes[0], generator=g), torch.rand(n, sizes[0], generator=g)
    x_fit = torch.rand(n_fit, sizes[0], generator=g)
    bar = Progress(total=5 * len(nets), desc="probe") if progress else None
    done = 0

    def step(value: Any) -> Any:
        """``value``, counted as one finished diagnostic on the progress line."""
        nonlocal done
        done += 1
        if bar is not None:
            bar.update(done, force=done == bar.total)
        return value

    per: dict[str, Any] = {}
    for name, net in nets.items():
        start = time.perf_counter()

        def f(z: Tensor, net: DeepLinear = net) -> Tensor:
            return net(z, mode=mode)

        per[name] = {  # evaluated in order, so each step() follows its diagnostic
            "semantics": dataclasses.asdict(net.semantics),
            "collapse_gap": step(collapse_gap(net, x, mode).as_dict()),
            "additivity": step(additivity_defect(f, x, y)),
            "homogeneity": step({str(a): homogeneity_defect(f, x, a)
                                 for a in HOMOGENEITY_SCALARS}),
            "affine_fit_residual": step(affine_fit_residual(f, x_fit)),
            "occupancy": step(occupancy(net, x, mode)),
            "seconds": time.perf_counter() - start,
        }
    formats = sorted({net.semantics.format for net in nets.values()})
    return {
        "sizes": sizes, "seed": seed, "n": n, "n_fit": n_fit, "scale_exp": scale_exp,
        "mode": mode, "inputs": "uniform [0, 1]",
        "normal_gap_ratio": {f: ar.FORMATS[f].normal_gap_ratio for f in formats},
        "blog_normal_gap_ratio_float32": BLOG_NORMAL_GAP_RATIO,
        "algebra": algebra_table({k: net.semantics for k, net in nets.items()}),
        "semantics": per,
    }


def plot_implicit_activation(path: str | Path, nets: Mapping[str, DeepLinear],
                             occupancy_by_name: Mapping[str, Sequence[float]] | None = None,
                             unit: int = 0, seed: int = 0, points: int = 1201,
                             mode: Mode = "exact", title: str | None = None,
                             inputs: Tensor | None = None) -> Path:
    """PNG of what underflow does, one line per semantics; ``title`` says whose weights.

    Left: layer-1 ``unit`` along :func:`unit_ray`, ``u -> h`` (the implicit activation itself:
    the ray is built so that ``u`` sweeps the dead zone, so this panel shows the semantics, the
    same for any weights). Middle: the layer-2 unit with the largest float-blind value along
    ``x = s * x0``, ``s`` from 0 to 2, ``x0`` the first row of ``inputs`` or else a random
    pixel-like one (``Generator(seed)``): underflow composed through a layer, against the
    float-blind line. Then, if given, dead-zone occupancy per layer; and with ``inputs``, the
    collapse (:func:`deeplinear.collapse.draw_collapse`: executed outputs against the affine map).
    """
    from deeplinear.collapse import draw_collapse
    from deeplinear.report import plt, save_figure

    path = Path(path)
    first = next(iter(nets.values()))
    thr = first.threshold
    t = torch.linspace(-3 * thr, 3 * thr, points, dtype=torch.float64)
    x0, d = unit_ray(first, unit)
    s = torch.linspace(0, 2, points, dtype=torch.float64)
    pixels = (torch.rand(first.sizes[0], generator=torch.Generator().manual_seed(seed))
              if inputs is None else first.check_input(inputs)[0])
    along = "x0 uniform [0, 1]" if inputs is None else "x0 the first input"
    lin = _float_blind(first, s[:, None] * pixels.double(), layers=2)
    deep_unit = int(lin[-1].abs().argmax())
    panels = 2 + bool(occupancy_by_name) + (inputs is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.4), constrained_layout=True)
    if title:
        fig.suptitle(title, fontsize=10)
    styles: list[dict[str, Any]] = [dict(lw=3.5, alpha=0.45), dict(lw=1.6),
                                    dict(lw=1.2, ls="--"), dict(lw=1, ls=":")]
    for i, (name, net) in enumerate(nets.items()):
        style = styles[i % len(styles)]
        act = implicit_activation(net, x0, d, t, 0, unit, mode)
        axes[0].plot(act.u, act.h, label=name, **style)
        deep = implicit_activation(net, torch.zeros_like(pixels), pixels, s, 1, deep_unit, mode)
        axes[1].plot(s, deep.h, label=name, **style)
    axes[1].plot(s, lin[:, deep_unit], color="k", lw=0.8, ls=":", label="no underflow")
    axes[0].axvspan(-thr, thr, color="0.9", zorder=0)
    for ax in axes[:2]:
        ax.axhline(0, color="0.6", lw=0.5)
        ax.legend(fontsize=8)
    axes[0].set(title=f"implicit activation, layer 1 unit {unit}\n(shaded: |u| below min = "
                      f"{thr:g} in units of 2^-{first.scale_exp})",
                xlabel="u (pre-underflow, scaled units)", ylabel="h (executed)")
    layer2 = "output" if len(first.weights) == 2 else "layer 2"
    axes[1].set(title=f"{layer2} unit {deep_unit} along x = s * x0 ({along})",
                xlabel="s", ylabel="h (executed, scaled units)")
    if occupancy_by_name:
        ax = axes[2]
        names = list(occupancy_by_name)
        layers = len(next(iter(occupancy_by_name.values())))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs = [layer + i * width for layer in range(layers)]
            bars = ax.bar(xs, occupancy_by_name[name], width, label=name)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks([layer + 0.4 - width / 2 for layer in range(layers)],
                      [f"layer {i + 1}" for i in range(layers - 1)] + ["output"])
        ax.set(title="dead-zone occupancy (fraction of values zeroed)", ylim=(0, 1))
        ax.legend(fontsize=8)
    if inputs is not None:
        draw_collapse(axes[-1], nets, inputs, mode)
    return save_figure(fig, path)
