"""Backprop (Adam, cross-entropy, minibatches) for softmax regression, MLPs and deep linear nets.

A :class:`~deeplinear.nets.DeepLinear` trains in scaled mode (every value normal, full speed) with
``under = make_under(net, cfg.surrogate)``: ``blind`` is the 2017 baseline whose graph has no flush
(it can only learn the collapsed affine map); ``exact``, ``ste`` and ``smooth`` run the real
underflow rule forward and differ in the gradient they pass back (:mod:`deeplinear.surrogate`).
Evaluation during training uses scaled mode with the real rule; the ground truth (exact mode) is
left to the caller because it is slow on x86.

The float-aware recipe (``surrogate="smooth"``, :data:`deeplinear.surrogate.FLOAT_AWARE`, with the
other ``Config`` defaults; the default
surrogate is ``blind``, plain backprop), chosen by sweeps of surrogate x init gain x lr x width on
spirals/rings/checkerboard and Fashion-MNIST 784-512-512-10 (10 epochs, batch 128):

- ``smooth`` surrogate, ``tau = 0.3`` thresholds. The exact derivative is blind to the jump of
  height ``t`` at the threshold, so no unit learns to move a sample across it; the relaxation's
  slope peaks at ``1/2 + 1/(4 tau)`` there and leaks ``sigmoid(-1/tau)`` (3%) inside, so dead
  units keep learning. STE ignores the nonlinearity it should exploit. Fashion-MNIST test
  (scaled mode): smooth 88.1% (3 seeds 87.7-88.1), exact 87.8%, STE 84.9%, blind 84.7%;
  spirals 2-256-256-2, 4000 steps: smooth 96-98% (tau 0.1 to 0.3), exact 93-95%, STE 86-89%.
- ``init_gain = 1``: each layer is rescaled at the start (LSUV-style: data-dependent, no
  randomness) so that its pre-activation std is one threshold, which flushes about half of the
  hidden values. He init leaves the 784-512-512-10 net's pre-activations at several thresholds
  (nearly linear). Fashion-MNIST by gain: 0.5: 88.3%, 0.7: 88.5%, 1: 88.1%, 2: 85.6%, 3: 84.9%.
  ``center`` also sets ``b1 = -mean(x @ W1)`` (no measurable effect on Fashion-MNIST: 88.1 vs
  88.4% without; it keeps uncentred inputs from putting a whole layer on one side).
- AdamW lr 1e-3 with a cosine schedule (2e-3: 87.5%, 3e-4: 87.7%, step schedule: 87.7%),
  batch 128 (64: 87.4%); 20 epochs add ~0.3 points and then it overfits.

Device: ``cfg.device`` (``cuda`` on a GPU) holds the data, model and optimiser while training; the
minibatch order is drawn on the CPU whatever the device, and the model goes back to its own device
however the run ends.

Resumable bit for bit: the minibatch order comes from one ``torch.Generator`` seeded from
``cfg.seed``; the checkpoint holds the model, Adam state, generator state, the current epoch's
permutation and the loss accumulators, and the learning rate is a pure function of the step.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deeplinear.arithmetic import ftz_is_on, hardware_ftz
from deeplinear.data import Dataset
from deeplinear.nets import DeepLinear, nonfinite
from deeplinear.probes import occupancy
from deeplinear.runs import Progress, Run, rng_state, set_rng_state
from deeplinear.surrogate import DEFAULT_TAU, KINDS, make_under
from deeplinear.train import (
    FLOAT32_MAX,
    TRAINED,
    check_arguments,
    check_config,
    check_device,
    check_trainable,
    due,
    interrupted,
    mark_trained,
    record,
    restores_caller_state,
    scores,
    show,
    stops_cleanly,
)

SCHEDULES = ("cosine", "step", "constant")
# Adam moments of parameters whose gradient stops decay geometrically into subnormals, where
# every elementwise op on them runs far slower on x86 (an AdamW step of the 2017 net's 670k
# parameters, 2 threads: 2.1 ms, with 20% of the moments subnormal 10.3 ms). The step therefore
# runs with hardware FTZ+DAZ (arithmetic.hardware_ftz: this thread, one thread, restored after):
# no moment ever goes subnormal and the step takes 3.9 ms either way, where zeroing the tiny
# entries after each step costs 2.6 ms on top of the 2-thread step (benchmarks/source_figures.py).
# It only changes values below 2**-126, which cannot move a weight.


MAX_LR = FLOAT32_MAX * (1 - 0.9)  # AdamW's first step is lr / (1 - beta1), beta1 = 0.9


@dataclass
class Config:
    seed: int = 0  # minibatch order; the model's init is the caller's (DeepLinear(generator=))
    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0  # decoupled (AdamW)
    schedule: str = "cosine"  # cosine | step (x0.1 at 50% and 75%) | constant
    warmup: int = 0  # linear warm-up steps
    surrogate: str = "blind"  # deep linear only: blind | exact | ste | smooth
    tau: float = DEFAULT_TAU  # smooth surrogate width, in thresholds
    init_gain: float | None = 1.0  # deep linear: pre-activation std at init, in thresholds
    center: bool = True  # deep linear: centre layer 1's pre-activations at init
    eval_every: int = 500
    checkpoint_every: int = 1000
    eval_n: int = 10000  # samples of each split scored at every evaluation
    device: str = "cpu"  # cpu | cuda | cuda:N
    threads: int | None = None  # torch threads, set once at the start (None: leave torch's)

    def validate(self) -> None:
        check_device(self.device)
        check_config(self)
        for name, value, ok, need in (("lr", self.lr, 0 < self.lr <= MAX_LR,
                                       f"> 0 and at most {MAX_LR:.3g} (AdamW's first step, lr / "
                                       f"(1 - beta1), must be a float32)"),
                                      ("weight_decay", self.weight_decay, self.weight_decay >= 0,
                                       ">= 0"),
                                      ("warmup", self.warmup, self.warmup >= 0, ">= 0")):
            if not ok:
                raise ValueError(f"{name} must be {need}, got {value}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; use {', '.join(SCHEDULES)}")
        if self.surrogate not in KINDS:
            raise ValueError(f"unknown surrogate {self.surrogate!r}; use {', '.join(KINDS)}")


def saved(step: int) -> str:
    """What a diverged run left to resume from: its last checkpoint, or none yet."""
    return f"last good checkpoint: step {step}" if step else "no checkpoint was written yet"


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate for optimisation step ``step`` (0-based): a pure function, for resuming."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    frac = step / cfg.steps
    if cfg.schedule == "cosine":
        factor = 0.5 * (1 + math.cos(math.pi * frac))
    elif cfg.schedule == "step":
        factor = 0.1 ** ((frac >= 0.5) + (frac >= 0.75))
    else:
        factor = 1.0
    return cfg.lr * warm * factor


CALIBRATION_ROWS = 2000  # the rows of x calibrate reads: a std to ~2%, at a bounded cost


@torch.no_grad()
def calibrate(net: DeepLinear, x: Tensor, gain: float, center: bool = True,
              output: bool = True) -> None:
    """Rescale each layer so that its pre-activation std on ``x`` (its first
    :data:`CALIBRATION_ROWS` rows) is ``gain`` thresholds.

    Layer by layer (LSUV, Mishkin & Matas 2016), through the real rule, so each layer sees the
    flushed output of the one before. ``center`` first sets ``b1 = -mean(x @ W1)``.

    Each bias follows its layer's input scale, and ``output=False`` gives the last layer the
    factor that undoes the hidden ones, so with ``center=False`` a *trained* net keeps its
    collapsed (IEEE) map, logits included, and only moves against the dead zone
    (``train --init-from RUN --init-gain G``).

    Where the semantics also flush a product (``CPU_FTZ_DAZ``), the flushed pre-activation's std
    is not proportional to the scale (a smaller scale flushes more), so that factor is found by
    bisection; one proportional step left those layers at 0.6-0.9 of the target.
    """
    target, f = gain * net.threshold, net.under()
    flush_matmul = net.semantics.matmul_flush

    def spread(u: Tensor) -> float:
        std = float(u.std())
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"cannot calibrate layer {i + 1}: its pre-activations on the data "
                             f"have std {std}; check the inputs or use init_gain=None "
                             "(--init-gain he)")
        return std

    def flushed_spread(m: Tensor, b: Tensor, a: float) -> float:
        return spread(f(a * m) + f(a * b))

    h, scale = x[:CALIBRATION_ROWS], 1.0  # scale: the factor applied so far to this layer's input
    last = len(net.weights) - 1
    for i, (w, b) in enumerate(zip(net.weights, net.biases, strict=True)):
        m = h @ w
        if i == 0 and center:
            b.copy_(-m.mean(0))
        b.mul_(scale)
        if i == last and not output:
            factor = 1 / scale
        else:
            # proportional: exact unless the product is flushed too, and then a scale at which
            # the flushed spread is at most the target, where the search starts
            factor = target / spread(m + (b if i == 0 else f(b)))
            if i > 0 and flush_matmul:
                factor = _bisect_scale(functools.partial(flushed_spread, m, b), target, factor)
        w.mul_(factor)
        b.mul_(factor)
        scale *= factor
        h = f(net.pre_activation(i, h @ w, b, f))


def calibrate_fresh(net: DeepLinear, x: Tensor, cfg: Any) -> None:
    """A new run's start: ``cfg.init_gain``'s :func:`calibrate` (``None``: keep the weights as
    they are), refused on a net a trainer here has already trained. Why: calibration rescales
    every layer and resets the first bias, which undoes much of what a net learned; weights
    loaded from a file carry no such mark, so pass ``init_gain=None`` to train those further."""
    if cfg.init_gain is None:
        return
    if getattr(net, TRAINED, False):
        raise ValueError(f"this net was trained already, and init_gain={cfg.init_gain} would "
                         "calibrate it again (rescale every layer, reset the first bias); pass "
                         "init_gain=None to continue from its weights, or train a new net")
    calibrate(net, x, cfg.init_gain, cfg.center)


def _bisect_scale(spread: Callable[[float], float], target: float, start: float) -> float:
    """The scale ``a`` with ``spread(a) = target`` (to 0.1%), for a ``spread`` that grows with
    ``a`` at least proportionally: from ``start`` (where ``spread(start) <= target``) up."""
    lo, hi = start, start
    while spread(hi) < target:
        lo, hi = hi, hi * 2
        if hi > start * 2**20:
            raise ValueError("cannot calibrate: the flushed pre-activations do not reach the "
                             "target spread; use init_gain=None (--init-gain he)")
    for _ in range(40):
        if hi / lo < 1.001:
            break
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if spread(mid) < target else (lo, mid)
    return hi


def _step(opt: torch.optim.Optimizer, ftz: bool) -> None:
    if not ftz:
        opt.step()
        return
    with hardware_ftz():
        opt.step()


def _flushed_fraction(net: DeepLinear, x: Tensor) -> float:
    """Fraction of hidden pre-activations the real rule sends to zero (0: linear, 1: dead).

    The mean over hidden layers of :func:`deeplinear.probes.occupancy`, whose pre-underflow values
    also see a flush inside the matmul (scope ``all``), where ``trace``'s ``u`` is already flushed.
    """
    hidden = occupancy(net, x, "scaled")[:-1]
    return sum(hidden) / len(hidden)


@restores_caller_state
@stops_cleanly
def train(model: nn.Module, data: Dataset, cfg: Config, run: Run | None = None,
          progress: bool = True) -> list[dict[str, Any]]:
    """Train ``model`` in place; return the metric rows logged (one per evaluation).

    Training runs with this thread's FTZ off (on where the Adam step sets it); the caller's FTZ
    state and the model's device come back however the run ends, a divergence included.
    """
    ftz_before = ftz_is_on()
    try:
        with torch.enable_grad():  # a caller's ``torch.no_grad()`` block would stop backward
            return _train(model, data, cfg, run, progress)
    finally:
        torch.set_flush_denormal(ftz_before)


def _train(model: nn.Module, data: Dataset, cfg: Config, run: Run | None,
           progress: bool) -> list[dict[str, Any]]:
    check_arguments(data, cfg, Config)
    check_trainable(model, data, cfg)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("no parameter of the model requires grad (probes.make_nets returns "
                         "frozen nets); call model.requires_grad_(True) first")
    net = model if isinstance(model, DeepLinear) else None  # the deep linear net, if it is one
    if net is None and cfg.surrogate != "blind":
        raise ValueError(f"surrogate {cfg.surrogate!r} needs a deep linear model; "
                         f"{type(model).__name__} has no underflow to see")
    n = len(data.x_train)
    device = torch.device(cfg.device)  # checked by cfg.validate()
    model.to(device)
    x, y = data.x_train.to(device), data.y_train.to(device)
    per_epoch = n // cfg.batch_size

    if net is not None:
        under = make_under(net, cfg.surrogate, cfg.tau)

        def forward(xb: Tensor) -> Tensor:
            return model(xb, mode="scaled", under=under)
    else:
        forward = model

    ftz = torch.set_flush_denormal(False)  # FTZ off; True where the CPU can flush (x86, SSE3)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rows: list[dict[str, Any]] = []
    needs = ("model", "optimizer", "rng", "perm", "wall_s", "loss_sum", "loss_n")
    if run is not None and (state := run.resumed(*needs)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], g)
        start, perm, wall0 = state["step"], state["perm"], state["wall_s"]
        loss_sum, loss_n = state["loss_sum"], state["loss_n"]
        rows = run.metrics()
    else:
        if net is not None:
            calibrate_fresh(net, x, cfg)
        start, perm, wall0, loss_sum, loss_n = 0, torch.empty(0, dtype=torch.long), 0.0, 0.0, 0
    mark_trained(model)
    n_eval = min(cfg.eval_n, n, len(data.x_test))
    desc = "backprop" if cfg.surrogate == "blind" else "float-aware"  # the CLI's method names
    bar = Progress(total=cfg.steps, desc=desc) if progress else None
    t0 = time.perf_counter()
    last_ckpt = start
    for s in range(start, cfg.steps):
        i = s % per_epoch
        if i == 0:
            perm = torch.randperm(n, generator=g)
        idx = perm[i * cfg.batch_size:(i + 1) * cfg.batch_size].to(device)
        lr = lr_at(cfg, s)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = F.cross_entropy(forward(x[idx]), y[idx])
        value = float(loss.detach())
        if not math.isfinite(value):
            raise ValueError(f"training diverged at step {s + 1}: loss is {value}; lower lr (--lr) "
                             f"({saved(last_ckpt)})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        _step(opt, ftz)
        loss_sum, loss_n = loss_sum + value, loss_n + 1
        done = s + 1
        is_eval, is_ckpt, stop = due(done, cfg)
        if (is_eval or is_ckpt) and nonfinite(model.named_parameters()):
            raise ValueError(f"training diverged at step {done}: non-finite weights; lower lr "
                             f"(--lr) ({saved(last_ckpt)})")
        if is_eval:
            row = {"step": done, "epoch": done / per_epoch, "lr": lr,
                   "wall_s": wall0 + time.perf_counter() - t0, "loss": loss_sum / loss_n,
                   **scores(model, data, n_eval)}
            if net is not None:
                row["flushed"] = _flushed_fraction(net, data.x_test[:1000].to(device))
            record(row, rows, run)
            loss_sum, loss_n = 0.0, 0
        if is_ckpt and run is not None:
            run.checkpoint({"step": done, "model": model.state_dict(),
                            "optimizer": opt.state_dict(), "rng": rng_state(g), "perm": perm,
                            "wall_s": wall0 + time.perf_counter() - t0, "loss_sum": loss_sum,
                            "loss_n": loss_n})
            last_ckpt = done
        show(bar, done, cfg, value, rows)
        if stop:
            raise interrupted(done, run, rows)
    return rows
