"""Differentiable stand-ins for the underflow rule, for float-aware backprop in scaled units.

Why: the rule (a dead zone ``|u| < t -> 0`` under FTZ, a staircase under IEEE) is the network's only
nonlinearity, and backprop that ignores it (``blind``: the 2017 baseline) can only fit the
collapsed affine map. Every non-blind kind here runs the *real* rule forward, bit for bit (the
network trained is the network deployed); they differ only in the gradient they pass back:

``exact``
    autograd through the rule itself: derivative 1 outside the dead zone, 0 inside (the exact
    derivative almost everywhere; it cannot see the jump of height ``t`` at the threshold, so a
    unit never learns to move a sample across it except through other units).
``ste``
    straight-through (Bengio, Léonard, Courville 2013): derivative 1 everywhere.
``smooth``
    the derivative of the relaxation ``g(u) = u * sigmoid((|u| - t) / tau)`` of the dead zone,
    which spikes near ``|u| = t`` and so *does* see the jump. A staircase (IEEE gradual
    underflow, or a regime that rounds) deviates from the identity by at most half a step, so its
    relaxation is the identity and ``smooth`` equals ``ste`` there; saturation has none.
``blind``
    identity forward and backward: no flush in the graph at all.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deeplinear.nets import DeepLinear, Under

KINDS: tuple[str, ...] = ("blind", "exact", "ste", "smooth")
FLOAT_AWARE = "smooth"  # the float-aware recipe's surrogate (measured best, see backprop)
DEFAULT_TAU = 0.3  # smooth relaxation width, in thresholds (measured best, see backprop)


def identity(u: Tensor) -> Tensor:
    return u


class _RuleWithGrad(torch.autograd.Function):
    """Forward: ``rule(u)`` exactly; backward: ``grad * dfdu(u)`` (``dfdu=None`` means 1)."""

    @staticmethod
    def forward(ctx, u: Tensor, rule: Under, dfdu: Under | None) -> Tensor:  # type: ignore[override]
        ctx.dfdu = dfdu
        if dfdu is not None:
            ctx.save_for_backward(u)
        return rule(u)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        if ctx.dfdu is None:
            return grad, None, None
        (u,) = ctx.saved_tensors
        return grad * ctx.dfdu(u), None, None


def smooth_dead_zone_grad(t: float, tau: float) -> Under:
    """``d/du [u * sigmoid((|u| - t) / tau)]`` = ``s + |u| s (1 - s) / tau`` with that sigmoid s."""

    def dfdu(u: Tensor) -> Tensor:
        a = u.abs()
        s = torch.sigmoid((a - t) / tau)
        return s + a * s * (1 - s) / tau

    return dfdu


def check_tau(tau: float, threshold: float) -> None:
    """A one-line error unless ``tau`` (in thresholds) gives a usable relaxation width.

    It must be finite (``tau = inf`` relaxes the dead zone to ``u / 2``, not to the rule) and
    ``tau * threshold`` a normal float32: a width that is zero or subnormal in float32 makes the
    derivative ``0 / 0`` (NaN) everywhere.
    """
    tiny = torch.finfo(torch.float32).tiny
    if not (math.isfinite(tau) and tau * threshold >= tiny):
        low = f"; at a threshold of {threshold:.3g} that needs tau >= {tiny / threshold:.3g} " \
              "or a larger scale (scale_exp, --scale-exp)" \
            if tau * threshold < tiny and tau > 0 else ""
        raise ValueError(f"smooth surrogate needs a finite tau > 0 (in thresholds, e.g. "
                         f"{DEFAULT_TAU}) whose width tau * threshold is a normal float32, "
                         f"got tau={tau}{low}")


def make_under(net: DeepLinear, kind: str, tau: float = DEFAULT_TAU) -> Under:
    """The ``under=`` function for ``net.forward(x, 'scaled', under=...)`` for one surrogate kind.

    ``tau`` (``smooth`` only) is the relaxation width relative to ``net.threshold``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown surrogate {kind!r}; use {', '.join(KINDS)}")
    if kind == "blind":
        return identity
    rule = net.under()
    if kind == "exact":
        return rule
    regime = net.regime.kind if net.regime is not None else None
    if kind == "smooth" and regime == "saturation":
        raise ValueError("the smooth surrogate relaxes a dead zone or a staircase, not "
                         "saturation; use exact or ste")
    if kind == "smooth":
        check_tau(tau, net.threshold)
    dead = regime == "ftz-deadzone" if regime is not None else net.semantics.flushes
    if kind == "ste" or not dead:  # a staircase's relaxation is the identity
        return lambda u: _RuleWithGrad.apply(u, rule, None)
    dfdu = smooth_dead_zone_grad(net.threshold, tau * net.threshold)
    return lambda u: _RuleWithGrad.apply(u, rule, dfdu)

