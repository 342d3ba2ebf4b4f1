"""Deep linear networks, run in two modes meant to compute the same function, and reference models.

The 2017 layout, generalised to any depth L >= 2 with scale s = 2**scale_exp::

    h1 = (x @ W1 + b1) / s;   h_i = h_{i-1} @ W_i + b_i / s;   out = (h_{L-1} @ W_L + b_L / s) * s

Mathematically this is one affine map (see :mod:`deeplinear.collapse`). In float32 the hidden
values live near 1e-38, where the semantics' underflow rule acts as a hidden activation.

``exact`` mode executes exactly that, every op through :mod:`deeplinear.arithmetic`: the ground
truth, but on x86 subnormal products make it slow (19-23x for the 2017 net on the 2-core VM of
``benchmarks/README.md``, 11-27x over the CPUs measured there). ``scaled`` mode runs the same
network in units of 2**-scale_exp, where every value is normal and each underflow becomes an
explicit elementwise function of the float32 value (``dead_zone`` for FTZ, ``staircase`` for IEEE
gradual underflow). Layer 1's output and every bias are identical by construction: multiplying a
float32 by a power of two commutes with rounding to 24 bits with unbounded exponent, which is
exactly when x86 decides "tiny" (where the semantics flush a product, layer 1's product, at true
scale in both modes, loses its subnormal values in both: :meth:`DeepLinear.pre_activation`). The
modes can differ only inside hidden matmuls, whose exact-mode partial sums are rounded on the
subnormal grid (absolute spacing 2**-149) instead of to 24 relative bits. (Under DAZ, a subnormal
*input*, weight or layer-1 bias is read as zero by exact mode only; data and trained weights are not
that small. Where the semantics flush a product, a layer-1 sum that rounds up to exactly the
smallest normal on the subnormal grid is flushed by exact mode, which decides tininess after
rounding as x86 does (:func:`deeplinear.arithmetic.matmul`), and kept by scaled mode; that needs
inputs near 1e-38. And scaled values are 2**k times the exact ones, so a hidden value above
float32's max in scaled units, 2**(128 - k) at true scale, overflows in scaled mode only; trained
nets are nowhere near.)
That difference is negligible while the hidden values are many grid steps wide, as for the dead
zone at 2**125; it is not where the grid step is the point (the float32 subnormal staircase at
2**149: there a hidden product's partial sums are themselves on the coarse grid, and the two modes
compute different functions, measured argmax agreement 16%).

Both modes multiply with torch's float32 matmul, whose last bits may change with the thread count
(MKL splits some products' sums across threads): results are bit-reproducible for a fixed thread
count (the trainers' ``threads``, ``--threads``).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from deeplinear import arithmetic as ar
from deeplinear.arithmetic import IEEE, TF_GPU, Semantics, as_semantics

if TYPE_CHECKING:
    from deeplinear.regimes import Regime

Mode = Literal["exact", "scaled"]
Under = Callable[[Tensor], Tensor]


def dead_zone(u: Tensor, threshold: float) -> Tensor:
    """FTZ in scaled units: ``|u| < threshold -> signed 0``; autograd gives its exact derivative."""
    return torch.where(u.abs() < threshold, u * 0, u)


def staircase(u: Tensor, threshold: float, step: float) -> Tensor:
    """IEEE gradual underflow in scaled units: below the threshold, round to multiples of step."""
    return torch.where(u.abs() < threshold, torch.round(u / step) * step, u)


def parse_sizes(text: str | Sequence[int]) -> list[int]:
    """``"784,512,512,10"`` -> ``[784, 512, 512, 10]`` with a one-line error for bad input."""
    try:
        sizes = [int(s) for s in text.split(",")] if isinstance(text, str) else \
            [ar.integer(s) for s in text]
    except (ValueError, TypeError):
        raise ValueError(f"bad sizes {text!r}: use integers like 784,512,10") from None
    if any(s is None for s in sizes):
        raise ValueError(f"bad sizes {text!r}: use integers like 784,512,10")
    if len(sizes) < 2:
        raise ValueError(f"bad sizes {text!r}: need at least two layer widths (in, out)")
    if any(s < 1 for s in sizes):  # type: ignore[operator]
        raise ValueError(f"bad sizes {text!r}: every layer width must be >= 1")
    return sizes  # type: ignore[return-value]


def _exponent(value: object) -> int:
    k = ar.integer(value)
    if k is None:
        raise ValueError(f"scale exponent must be an integer like 125, got {value!r}")
    return k


SCALE_EXP = 125  # the 2017 net's scale 2^125: N(0, 1)-sized values straddle the dead zone |u| < 1/2
SIZES_2017 = (784, 512, 512, 10)


def default_sizes(n_features: int, n_classes: int) -> list[int]:
    """Two hidden layers sized for the input: the 2017 net's 512 for image-sized inputs (>= 784
    features), 256 for digits-sized ones (>= 64), 64 for low-dimensional tasks such as spirals."""
    hidden = 512 if n_features >= 784 else (256 if n_features >= 64 else 64)
    return [n_features, hidden, hidden, n_classes]


class DeepLinear(nn.Module):
    """Affine layers with no activation; weights are ``(in, out)``, so a layer is ``h @ W + b``.

    ``regime`` (a :class:`deeplinear.regimes.Regime`) replaces ``scale_exp`` and ``semantics``.
    The float32 underflow regimes *are* this layout (``scale_exp = k``, FTZ or IEEE semantics) and
    leave ``self.regime`` None; any other regime is kept as ``self.regime`` and becomes the hidden
    rule (``under()``, ``threshold``) between float32 IEEE linear layers, whose exact mode runs
    the regime's own float operations (:meth:`~deeplinear.regimes.Regime.exact`).
    """

    def __init__(self, sizes: Sequence[int], scale_exp: int | None = None,
                 semantics: Semantics | str | None = None,
                 generator: torch.Generator | None = None,
                 regime: Regime | str | None = None) -> None:
        """``scale_exp`` defaults to :data:`SCALE_EXP` and ``semantics`` to TF_GPU (a preset's
        name or a :class:`Semantics`); ``regime``, a :class:`~deeplinear.regimes.Regime` or its
        text (``"absorption:9"``), sets both."""
        super().__init__()
        self.sizes = parse_sizes(sizes)
        if len(self.sizes) < 3:
            raise ValueError("DeepLinear needs at least one hidden layer (sizes like 784,512,10)")
        if regime is not None:
            if scale_exp is not None or semantics is not None:
                raise ValueError("pass a regime or scale_exp/semantics, not both: "
                                 "the regime sets them")
            if isinstance(regime, str):
                from deeplinear.regimes import Regime
                regime = Regime.parse(regime)
            k, semantics = regime.scale_exp, regime.semantics if regime.native else IEEE
        else:
            k = SCALE_EXP if scale_exp is None else _exponent(scale_exp)
            semantics = TF_GPU if semantics is None else as_semantics(semantics)
        self.regime = None if regime is None or regime.native else regime
        self._check(k, semantics, regime)
        self._scale_exp, self._semantics = k, semantics
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:], strict=True):
            # He-normal, float32 whatever torch's default dtype (the net runs float32 weights)
            w = torch.randn(n_in, n_out, generator=generator, dtype=torch.float32)
            self.weights.append(nn.Parameter(w * math.sqrt(2.0 / n_in)))
            self.biases.append(nn.Parameter(torch.zeros(n_out, dtype=torch.float32)))

    def _check(self, k: int, semantics: Semantics, regime: Regime | None = None) -> None:
        """Refuse a scale and semantics scaled mode cannot run (the constructor's arguments, or
        a later ``net.semantics = ...`` / ``net.scale_exp = ...``, checked alike)."""
        if self.regime is not None:
            return
        # Scaled mode is float32 arithmetic whose only rule is underflow: the format must be
        # float32 and the scale must push hidden values down (k >= 0; k < 0 scales them up,
        # where exact mode overflows and scaled mode cannot follow), 2^-k a nonzero float32.
        if semantics.format != "float32":
            raise ValueError(f"DeepLinear runs float32 (its scaled mode is float32 "
                             f"arithmetic), not {semantics.format}; other formats run as a "
                             "regime: DeepLinear(sizes, regime=deeplinear.regimes.Regime(...))")
        high = round(-math.log2(semantics.fmt.min_subnormal))
        if not 0 <= k <= high:
            what = f"regime {regime.label}" if regime is not None else \
                f"scale exponent {k} (scale_exp, --scale-exp)"
            raise ValueError(f"{what} is out of range for a net: 0 <= k <= {high} (2^-k must "
                             "be a nonzero float32 that moves hidden values toward "
                             f"underflow); the 2017 net uses {SCALE_EXP}")

    def _refuse_under_regime(self, what: str) -> None:
        """A regime's own float operations run this net, whatever ``semantics`` and ``scale_exp``
        say: setting either would be ignored, so it is refused."""
        if self.regime is not None:
            raise ValueError(f"this net runs regime {self.regime.label}, which fixes its {what}; "
                             "to run its weights otherwise, load its state_dict into a "
                             f"DeepLinear({','.join(map(str, self.sizes))}, semantics=..., "
                             "scale_exp=...)")

    @property
    def semantics(self) -> Semantics:
        return self._semantics

    @semantics.setter
    def semantics(self, value: Semantics | str) -> None:
        """Another arithmetic for the same weights (a preset's name or a :class:`Semantics`)."""
        self._refuse_under_regime("semantics")
        sem = as_semantics(value)
        self._check(self._scale_exp, sem)
        self._semantics = sem

    @property
    def scale_exp(self) -> int:
        return self._scale_exp

    @scale_exp.setter
    def scale_exp(self, value: int) -> None:
        self._refuse_under_regime("scale_exp")
        k = _exponent(value)
        self._check(k, self._semantics)
        self._scale_exp = k

    # -- the underflow rule in scaled units -------------------------------------------------------
    @property
    def threshold(self) -> float:
        """Smallest normal in units of 2**-scale_exp: the dead-zone half-width (0.5 at k=125);
        under a regime, the width at which it acts (:attr:`Regime.threshold`)."""
        if self.regime is not None:
            return self.regime.threshold
        return math.ldexp(self.semantics.fmt.min_normal, self.scale_exp)

    def under(self) -> Under:
        """The elementwise function the semantics or regime applies to a result, in scaled units."""
        if self.regime is not None:
            return self.regime.activation
        grid = self.staircase_grid()
        if grid is None:  # a flushing semantics
            t = self.threshold
            return lambda u: dead_zone(u, t)
        t, step = grid
        return lambda u: staircase(u, t, step)

    def staircase_grid(self) -> tuple[float, float] | None:
        """``(threshold, step)`` of :func:`staircase` where the net's rule is float32's subnormal
        staircase (IEEE gradual underflow, or that regime), in scaled units; None otherwise."""
        if self.regime is not None:
            r = self.regime
            return ((r.extent, r.threshold) if r.kind == "subnormal-staircase"
                    and r.format == "float32" else None)
        if self.semantics.flushes:
            return None
        return self.threshold, math.ldexp(self.semantics.fmt.min_subnormal, self.scale_exp)

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, mode: Mode = "scaled", under: Under | None = None) -> Tensor:
        """The net's outputs on ``x`` (batch, sizes[0]). ``mode="scaled"`` (the default, fast):
        every hidden value in units of 2^-scale_exp with the semantics' flush as an explicit dead
        zone; ``mode="exact"``: real float32 at true scale, the ground truth (slow on a CPU where
        subnormals meet the matmul). ``under`` replaces the scaled mode's rule (training
        surrogates). See :meth:`trace` for the layers' values."""
        return self.trace(x, mode, under)[-1][1]

    def trace(self, x: Tensor, mode: Mode = "scaled",
              under: Under | None = None) -> list[tuple[Tensor, Tensor]]:
        """Per layer, ``(u, h)``: the value before and after the underflow, in scaled units.

        ``under`` replaces the semantics' rule in scaled mode (identity = float-blind; a custom
        autograd function = float-aware training). Exact-mode values are converted to scaled units
        exactly (a power-of-two scale). In exact mode a layer's flush happens inside its bias add
        (layer 1's too), so there ``u`` is the add's flushed result (its ``h`` is the same in both
        modes); :func:`deeplinear.probes.layer_values` recomputes the pre-flush values when they
        are needed. Exact mode reads the weights detached: no gradient reaches them through it
        (its ops are not differentiable), so training runs in scaled mode.
        """
        self.check_float32()
        if mode == "exact":
            if self.regime is None:
                return self._trace_exact(self.check_input(x))
            with torch.no_grad():  # float32 linear layers, the regime's own float ops between
                return self.trace(x, "scaled", self.regime.exact)
        if mode != "scaled":
            raise ValueError(f"unknown mode {mode!r}; use exact or scaled")
        x = self.check_input(x)
        f = under or self.under()
        out = []
        h = x
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            u = self.pre_activation(i, h @ w, b, f)
            h = f(u)
            out.append((u, h))
        return out

    def pre_activation(self, i: int, m: Tensor, b: Tensor, f: Under) -> Tensor:
        """Layer ``i``'s value before the rule ``f``, in scaled units, from its product ``m = h @
        W``. Where the semantics flush a product (or read it through DAZ) it loses its small
        values first: layer 1's product is at true scale, so below the format's smallest normal
        (not ``f``'s threshold); a hidden bias is ``b / s``, which underflows like a value."""
        flush_matmul = self.semantics.matmul_flush
        if i == 0:
            return (dead_zone(m, self.semantics.fmt.min_normal) if flush_matmul else m) + b
        return (f(m) if flush_matmul else m) + f(b)

    def with_semantics(self, semantics: Semantics | str) -> DeepLinear:
        """A copy with the same weights (no gradients) under ``semantics``: what these weights
        compute on other hardware (portability, the probe's nets)."""
        other = copy.deepcopy(self).requires_grad_(False)
        other.semantics = semantics
        return other

    def check_float32(self) -> None:
        """A one-line error for a net cast to another dtype (``net.double()``), which no float32
        semantics describes."""
        wrong = {p.dtype for p in self.parameters()} - {torch.float32}
        if wrong:
            raise ValueError(f"the net's parameters are {', '.join(map(str, wrong))}; DeepLinear "
                             "computes in float32 (its semantics are float32 arithmetic): call "
                             "net.float()")

    def check_input(self, x: Tensor) -> Tensor:
        """``x`` as float32 ``(..., sizes[0])``, or a one-line error naming what is wrong."""
        n = self.sizes[0]
        if not isinstance(x, Tensor):
            raise ValueError(f"inputs must be a torch tensor of shape (batch, {n}), got "
                             f"{type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != n:
            raise ValueError(f"inputs of shape {tuple(x.shape)} do not fit the net: it takes {n} "
                             f"features, shape (batch, {n})")
        if x.is_complex():
            raise ValueError(f"inputs must be real, got {x.dtype}")
        device = self.weights[0].device
        if x.device != device:
            raise ValueError(f"inputs are on {x.device}, the net on {device}; move one of them "
                             f"(x.to({str(device)!r}))")
        return x if x.dtype == torch.float32 else x.to(torch.float32)

    def _trace_exact(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        sem, k = self.semantics, self.scale_exp
        last = len(self.weights) - 1

        def units(t: Tensor) -> Tensor:  # exact: a power-of-two scale of a float32 value
            return (t.double() * 2.0**k).to(t.dtype)

        out = []
        h = x.to(sem.fmt.dtype)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            w, b = w.detach(), b.detach()
            m = ar.matmul(h, w, sem)
            if i == 0:
                u = ar.bias_add(m, b, sem)  # layer 1 runs at normal magnitudes
                h = ar.scale(u, -k, sem)
                out.append((u, units(h)))
            elif i < last:
                u = ar.bias_add(m, ar.scale(b, -k, sem), sem)
                h = u
                out.append((units(u), units(h)))
            else:
                u = ar.bias_add(m, ar.scale(b, -k, sem), sem)
                h = ar.scale(u, k, sem)
                out.append((units(u), h))
        return out


def io_sizes(model: nn.Module) -> tuple[int, int]:
    """(input features, outputs) of a DeepLinear, MLP or SoftmaxRegression."""
    if isinstance(model, DeepLinear):
        return model.sizes[0], model.sizes[-1]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} is not a model deeplinear knows: no linear "
                         "layers found; pass a DeepLinear, MLP or SoftmaxRegression")
    return linears[0].in_features, linears[-1].out_features


def nonfinite(named: Iterable[tuple[str, Tensor]]) -> list[str]:
    """The names of the floating-point tensors in ``named`` (``model.named_parameters()``, a
    state dict's items) that hold NaN or infinity."""
    return [k for k, v in named
            if torch.is_floating_point(v) and not bool(torch.isfinite(v).all())]


def check_finite(model: nn.Module, fix: str) -> None:
    """A one-line error naming ``model``'s non-finite parameters, then ``fix``: NaN weights
    would otherwise score as whatever class argmax picks for NaN rows (class 0)."""
    bad = nonfinite(model.named_parameters())
    if bad:
        raise ValueError(f"the model has non-finite weights in {', '.join(bad)}; {fix}")


class SoftmaxRegression(nn.Module):
    """The best a linear model can do: one affine map trained with cross-entropy."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "identity": nn.Identity,
}


class MLP(nn.Module):
    """A conventional network of the same shape: what a real activation buys."""

    def __init__(self, sizes: Sequence[int], activation: str = "relu") -> None:
        super().__init__()
        sizes = parse_sizes(sizes)
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; use {', '.join(ACTIVATIONS)}")
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[activation]())
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


MODELS = ("deeplinear", "mlp", "softmax")  # the kinds a run records (``model.kind``)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's global generator inside, and give the caller's stream back after.

    Why: ``nn.Linear`` initialises from the global generator, so a baseline's weights depend on a
    seed only if it is set right before; but a library call that reseeds it for good would make
    every later draw of the caller the same stream, whatever the caller had seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_model(kind: str, sizes: Sequence[int], scale_exp: int = SCALE_EXP,
                semantics: Semantics | str | None = None, seed: int = 0) -> nn.Module:
    """A fresh model of ``kind`` whose initial weights depend only on ``seed``."""
    if kind == "deeplinear":
        return DeepLinear(sizes, scale_exp, semantics or TF_GPU,
                          generator=torch.Generator().manual_seed(seed))
    with seeded(seed):
        if kind == "mlp":
            return MLP(sizes)
        if kind == "softmax":
            return SoftmaxRegression(sizes[0], sizes[-1])
    raise ValueError(f"unknown model {kind!r}; use {', '.join(MODELS)}")
