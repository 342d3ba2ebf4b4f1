"""Accuracy of any model, and the portability of a trained deep linear net across semantics.

Why: a deep linear net's function depends on the arithmetic that runs it. Its ground truth is
``exact`` mode (real float32 near 1e-38 under its semantics), and the same weights run under another
preset may compute something else entirely: a net that learned through FTZ falls back towards its
collapsed affine map under IEEE. ``portability`` measures exactly that.

Exact mode is slow on x86 because the hidden products are subnormal (measured slowdown: see
:mod:`deeplinear.nets`), so everything is evaluated in batches under ``no_grad``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from deeplinear.arithmetic import PRESETS, Semantics, integer, preset_name
from deeplinear.collapse import collapse
from deeplinear.data import Dataset, check_labels
from deeplinear.nets import DeepLinear, Mode, check_finite, io_sizes

BATCH = 5000


@torch.no_grad()
def logits(model: nn.Module, x: Tensor, mode: Mode = "scaled", batch_size: int = BATCH) -> Tensor:
    """Model outputs for ``x`` in batches; ``mode`` matters only for a :class:`DeepLinear`.

    Each batch runs on the model's device; the outputs come back on ``x``'s (no rows: no
    outputs, shape ``(0, classes)``)."""
    device, outs = next(model.parameters()).device, []
    if len(x) == 0:
        return torch.empty(0, io_sizes(model)[1], device=x.device)
    deep = isinstance(model, DeepLinear)  # reads any float input in its own format
    dtype = None if deep else next(model.parameters()).dtype  # a baseline's layers need theirs
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device, dtype)
        out = model(xb, mode=mode) if deep else model(xb)
        outs.append(out.to(x.device))
    return torch.cat(outs)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, mode: Mode = "scaled",
             batch_size: int = BATCH) -> float:
    """Fraction of rows whose argmax output is the label (``mode`` as in :func:`logits`).

    Refuses what would score without complaint but mean nothing (see :func:`check_scored`).
    """
    check_scored(model, x, y)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return float((logits(model, x, mode, batch_size).argmax(1) == y).double().mean())


def check_scored(model: nn.Module, x: Tensor, y: Tensor) -> None:
    """One-line errors for a scoring that would return a number without meaning: no rows, labels
    of shape (N, 1) (they broadcast to an N x N comparison), NaN weights or inputs (argmax reads
    a NaN row as class 0), labels that are no class of the model (:func:`check_labels`)."""
    if not isinstance(x, Tensor):
        raise ValueError(f"inputs must be a torch tensor, got {type(x).__name__}; pass "
                         "torch.as_tensor(x, dtype=torch.float32)")
    check_labels(y, io_sizes(model)[1])
    if len(x) == 0:
        raise ValueError("accuracy of an empty set is undefined; pass at least one sample")
    if y.shape != (len(x),):
        raise ValueError(f"got {len(x)} inputs but labels of shape {tuple(y.shape)}; pass one "
                         f"label per row, shape ({len(x)},)")
    check_finite(model, "the run diverged or the weights are damaged: train again or load "
                 "finite weights")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("inputs contain NaN or infinity; drop or impute those rows")


def check_fits(model: nn.Module, data: Dataset) -> None:
    """A one-line error unless ``model`` maps ``data``'s features to its classes: a net with more
    outputs than classes would still score (its argmax lands on a missing class now and then)."""
    n_in, n_out = io_sizes(model)
    if n_in != data.n_features or n_out != data.n_classes:
        raise ValueError(f"model maps {n_in} -> {n_out} but {data.name} has {data.n_features} "
                         f"features and {data.n_classes} classes; fix the sizes")


def interval(acc: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% (``z=1.96``) Wilson score interval of an accuracy measured on ``n`` samples.

    Why: a test set resolves only so much; 450 digits at 96% give about 94-98%, so methods that
    close are not told apart by the table alone (:func:`paired` asks the sharper question on the
    same samples). It covers the draw of the test samples, not the seed-to-seed spread of
    training, which a single run cannot show.
    """
    if (k := integer(n)) is None or k < 1 or not 0 <= acc <= 1:
        raise ValueError(f"need an accuracy in [0, 1] over n >= 1 samples, got {acc!r} over "
                         f"{n!r}")
    centre = (acc + z * z / (2 * k)) / (1 + z * z / k)
    half = z * math.sqrt(acc * (1 - acc) / k + z * z / (4 * k * k)) / (1 + z * z / k)
    # it always holds acc (rounding at acc = 0 or 1 could put an end a hair inside)
    return max(0.0, min(acc, centre - half)), min(1.0, max(acc, centre + half))


def paired(correct_a: Tensor, correct_b: Tensor) -> dict[str, float]:
    """Two models scored on the *same* test samples: is one really better? (exact McNemar test)

    Why: 0.2 points apart on 10,000 images is 20 images, inside the test set's sampling noise
    (about 0.36 points at 85%); what decides is the samples exactly one of the two gets right.
    If both models were equally good, each such sample would be a fair coin between them.
    ``correct_a``/``correct_b``: one bool per sample. Returns the two discordant counts and the
    exact two-sided binomial p-value.
    """
    if correct_a.shape != correct_b.shape or correct_a.dim() != 1:
        raise ValueError(f"need two 1-D results of the same length, got {tuple(correct_a.shape)} "
                         f"and {tuple(correct_b.shape)}; score both models on the same samples")
    a, b = correct_a.bool(), correct_b.bool()
    a_only, b_only = int((a & ~b).sum()), int((~a & b).sum())
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1))
    return {"a_only": a_only, "b_only": b_only, "p_value": min(1.0, 2 * tail / 2**n)}


def semantics_name(net: DeepLinear) -> str:
    """The preset name of the net's float32 semantics, or ``custom``."""
    return preset_name(net.semantics) or "custom"


COLLAPSED = "collapsed"  # portability's name for the collapsed affine map, beside the presets


def portability(net: DeepLinear, data: Dataset) -> dict[str, Any]:
    """Exact-mode test accuracy of ``net`` under its own semantics and every preset.

    Returns ``{"own": NAME, "test_acc": {NAME: acc, ..., "collapsed": acc}, "seconds": {...},
    "n_test": N}``;
    ``collapsed`` is the affine map the layers multiply out to (what a float-blind view sees).
    """
    if not isinstance(net, DeepLinear):
        raise ValueError(f"portability runs a DeepLinear under each float semantics; a "
                         f"{type(net).__name__} has none: score it with evaluate.accuracy")
    check_fits(net, data)
    own, variants = _variants(net)
    acc: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for name, variant in variants.items():
        t0 = time.perf_counter()
        other = variant if isinstance(variant, DeepLinear) else _with_semantics(net, variant)
        acc[name] = accuracy(other, data.x_test, data.y_test, "exact")
        seconds[name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    acc[COLLAPSED] = collapsed_accuracy(net, data.x_test, data.y_test)
    seconds[COLLAPSED] = time.perf_counter() - t0
    return {"own": own, "test_acc": acc, "seconds": seconds, "n_test": len(data.y_test)}


def _variants(net: DeepLinear) -> tuple[str, dict[str, DeepLinear | Semantics]]:
    """The net's own arithmetic's name, and what :func:`portability` runs its weights under."""
    own = semantics_name(net)
    if net.regime is not None:  # a regime is its own arithmetic: no float32 preset replaces it
        return net.regime.label, {net.regime.label: net}
    if own == "custom":
        return own, {own: net, **PRESETS}
    return own, dict(PRESETS)


def portability_names(net: DeepLinear) -> list[str]:
    """The columns :func:`portability` measures for ``net``, in order (for progress messages)."""
    return [*_variants(net)[1], COLLAPSED]


def exact_notice(net: DeepLinear, n: int, names: Sequence[str] | None = None,
                 n_train: int = 0) -> str:
    """The line a command prints before scoring ``net`` on ``n`` test samples in exact mode under
    ``names`` (default: :func:`portability_names`), and on ``n_train`` training samples under its
    own semantics. Why: subnormal arithmetic on a CPU takes ~30 s for :func:`portability` on
    Fashion-MNIST's 10k test samples (2 cores): not in silence."""
    train = f" ({n_train} train samples under {_variants(net)[0]})" if n_train else ""
    return (f"evaluating {n} test samples in exact mode under "
            f"{', '.join(names or portability_names(net))}{train}")


def collapsed_accuracy(net: DeepLinear, x: Tensor, y: Tensor) -> float:
    """Accuracy of the affine map the layers multiply out to (in float64): what the net would
    score if depth added nothing, the float-blind view of it."""
    x = net.check_input(x)
    check_scored(net, x, y)
    w, b = collapse(net)
    return float(((x.double() @ w + b).argmax(1) == y).double().mean())


def _with_semantics(net: DeepLinear, sem: Semantics) -> DeepLinear:
    return net if sem == net.semantics else net.with_semantics(sem)

