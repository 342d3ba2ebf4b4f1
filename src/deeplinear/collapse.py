"""Collapse: a deep linear network is one affine map, mathematically.

``collapse(net)`` multiplies the layers out in float64 (the scale 2**k cancels: the network divides
by it once after layer 1 and multiplies by it once at the end, while hidden biases are scaled on
the way). ``collapse_gap`` then says how far the float execution is from that map: ~1e-7 relative
under IEEE (plain rounding), order one under FTZ, where underflow is doing real work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deeplinear.nets import DeepLinear, Mode, check_finite


def collapse(net: DeepLinear) -> tuple[Tensor, Tensor]:
    """The single affine map ``x @ W + b`` (float64) the network equals without underflow."""
    if not isinstance(net, DeepLinear):
        raise ValueError(f"collapse multiplies out a DeepLinear's layers; a "
                         f"{type(net).__name__} is not one")
    check_finite(net, "a diverged or damaged net has no collapse to compare; load finite weights")
    w = torch.eye(net.sizes[0], dtype=torch.float64)
    b = torch.zeros(net.sizes[0], dtype=torch.float64)
    for wi, bi in zip(net.weights, net.biases, strict=True):
        wi, bi = wi.detach().double(), bi.detach().double()
        w, b = w @ wi, b @ wi + bi
    return w, b


@dataclass(frozen=True)
class CollapseGap:
    relative: float  # ||f(x) - (xW+b)|| / ||xW+b||, Frobenius over the batch
    max_abs: float
    argmax_agreement: float  # fraction of rows where the net and its collapse predict the same

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


@torch.no_grad()
def collapse_outputs(net: DeepLinear, x: Tensor, mode: Mode = "exact") -> tuple[Tensor, Tensor]:
    """The float net's outputs on ``x`` (shape ``(batch, sizes[0])``, or one row) and its
    collapse's, both float64.

    Both sides see the same float32 inputs (the net rounds ``x`` to float32 before layer 1).
    """
    w, b = collapse(net)
    x = net.check_input(x)
    if x.numel() == 0:
        raise ValueError("no inputs: the collapse gap needs at least one row of x")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("inputs contain NaN or infinity: the collapse gap needs finite inputs "
                         "(drop or impute those rows)")
    return net(x, mode=mode).double(), x.double() @ w + b


def _gap(out: Tensor, lin: Tensor) -> CollapseGap:
    diff = out - lin
    return CollapseGap(
        relative=float(diff.norm() / lin.norm().clamp_min(1e-300)),
        max_abs=float(diff.abs().max()),
        argmax_agreement=float((out.argmax(-1) == lin.argmax(-1)).double().mean()),
    )


def collapse_gap(net: DeepLinear, x: Tensor, mode: Mode = "exact") -> CollapseGap:
    """How far the float net on ``x`` is from its collapse (:func:`collapse_outputs`)."""
    return _gap(*collapse_outputs(net, x, mode))


@torch.no_grad()
def draw_collapse(ax: Any, nets: Mapping[str, DeepLinear], x: Tensor, mode: Mode = "exact",
                  limit: int = 2000) -> None:
    """On a matplotlib ``ax``: each net's executed outputs on ``x`` (up to ``limit`` rows) against
    its collapsed map's, every output coordinate one point, one colour per net.

    Why a picture: on the diagonal the net *is* its affine map (IEEE: plain rounding); every
    point off it is underflow at work (FTZ: whole rows pulled to the flushed values)."""
    x = x[:limit]
    lo, hi = float("inf"), float("-inf")
    markers = ("o", "x", "+", "^")  # nets that compute the same (TF_GPU, CPU_FTZ_DAZ) stay seen
    for i, (name, net) in enumerate(nets.items()):
        out, lin = collapse_outputs(net, x, mode)  # one exact forward per net, for gap and points
        gap = _gap(out, lin)
        out, lin = out.reshape(-1), lin.reshape(-1)
        agree = 100 * gap.argmax_agreement
        ax.scatter(lin.numpy(), out.numpy(), s=12 if i else 3, alpha=0.5,
                   marker=markers[i % len(markers)], linewidths=0.6,
                   label=f"{name}: gap {gap.relative:.2g}, argmax {agree:.0f}%")
        lo, hi = min(lo, float(lin.min()), float(out.min())), max(hi, float(lin.max()),
                                                                  float(out.max()))
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls=":", label="executed = collapsed")
    ax.set(title=f"collapse: executed vs affine map ({mode} mode)",
           xlabel="collapsed map x @ W + b (float64)", ylabel="executed net output")
    ax.legend(fontsize=7, markerscale=3)


def plot_collapse(path: str | Path, nets: Mapping[str, DeepLinear], x: Tensor,
                  mode: Mode = "exact", title: str | None = None) -> Path:
    """PNG of :func:`draw_collapse`: e.g. one net under each semantics (``probes.make_nets``)."""
    from deeplinear.report import plt, save_figure

    fig, ax = plt.subplots(figsize=(5.6, 4.8), constrained_layout=True)
    if title:
        fig.suptitle(title, fontsize=10)
    draw_collapse(ax, nets, x, mode)
    return save_figure(fig, Path(path))
