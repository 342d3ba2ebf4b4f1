"""OpenAI-ES training of a DeepLinear through its real underflow rule (the 2017 experiment).

Per generation: one common minibatch (from a ``torch.Generator`` seeded with ``cfg.seed``), every
member's loss on it from :class:`deeplinear.engine.Engine` (scaled mode, the semantics' rule
exactly), one :func:`deeplinear.es.tell`. The centre is copied into the model at every evaluation
and at the end. Evaluation uses scaled mode (fast); exact mode, the ground truth, is left to the
caller (:func:`deeplinear.evaluate.portability`).

Device: ``cfg.device`` (``cuda`` on a GPU) holds the data, the model and the strategy's state while
training; the minibatch generator, the noise table's values and the fitness ranks are computed on
the CPU whatever the device, and the model goes back to its own device however the run
ends.

Threads: ``cfg.threads`` (if set) is applied once, before the first parallel op of the run, and
never changed: OpenMP pools and hardware FTZ state are per thread (see
:mod:`deeplinear.arithmetic`), and a multi-threaded ``mm`` may split its reduction differently
for another thread count. Resuming is bit-identical with the same thread count: all randomness
is the batch generator (checkpointed) and noise that is a pure function of (seed, generation).
Both start from ``cfg.seed``: the table is one ``randn`` from a generator seeded with it, the
batches are ``randint`` draws from a second generator seeded alike, so the table's first values
and the first batch come from the same random bits. Pairs read the table at hashed offsets, so
no pair's noise is tied to its batch in a way the update could exploit; the shared start is kept
because deriving a second seed would change every recorded ES result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from deeplinear import es
from deeplinear.data import Dataset
from deeplinear.engine import DEFAULT_MAX_BYTES, Engine, member_errors
from deeplinear.nets import DeepLinear
from deeplinear.runs import Progress, Run, rng_state, set_rng_state
from deeplinear.train import (
    check_arguments,
    check_device,
    check_evolution_config,
    check_evolvable,
    due,
    interrupted,
    mark_trained,
    record,
    restores_caller_state,
    scores,
    show,
    stops_cleanly,
)
from deeplinear.train.backprop import calibrate_fresh

PERTURBATIONS = ("full", "lowrank")
Evaluate = Callable[[es.Population, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Config:
    seed: int = 0  # minibatches and noise; the net's init is the caller's (generator=)
    steps: int = 1000  # generations
    pop: int = 200  # members per generation (even: antithetic pairs)
    batch_size: int = 100  # the common minibatch every member is scored on
    # the strategy's own defaults (es.Strategy), in normalised units (see deeplinear.es):
    # sigma_g = max(sigma_min, sigma * sigma_decay**g) and likewise lr_g for Adam; sigma_scale
    # fan_in | none; sigma_blocks per-block multipliers, 0 freezes ("weights.0=0"); weight decay
    # decoupled: theta *= 1 - lr * weight_decay per generation
    sigma: float = es.Strategy.sigma
    sigma_decay: float = es.Strategy.sigma_decay
    sigma_min: float = es.Strategy.sigma_min
    sigma_scale: str = es.Strategy.sigma_scale
    sigma_blocks: str = es.Strategy.sigma_blocks
    lr: float = es.Strategy.lr
    lr_decay: float = es.Strategy.lr_decay
    lr_min: float = es.Strategy.lr_min
    weight_decay: float = es.Strategy.weight_decay
    perturbation: str = "full"  # full | lowrank (EGGROLL)
    rank: int = 1  # lowrank only
    fitness: str = "loss"  # loss (mean cross-entropy) | error (1 - accuracy; NaN on NaN/inf loss)
    init_gain: float | None = 2.0  # pre-activation std at init, in thresholds (None: He init)
    center: bool = True  # centre layer 1's pre-activations at init
    table_size: int = es.Strategy.table_size  # shared noise table (float32 values)
    max_mb: int = DEFAULT_MAX_BYTES >> 20  # engine buffers
    threads: int | None = None  # torch threads, set once at the start
    device: str = "cpu"  # cpu | cuda | cuda:N
    eval_every: int = 100
    checkpoint_every: int = 500
    eval_n: int = 10000  # samples of each split scored at every evaluation

    def validate(self) -> None:
        check_evolution_config(self)
        check_device(self.device)
        if self.max_mb < 1:
            raise ValueError(f"max_mb must be >= 1, got {self.max_mb}")
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"unknown perturbation {self.perturbation!r}; "
                             f"use {', '.join(PERTURBATIONS)}")
        if self.perturbation == "lowrank" and self.rank < 1:
            raise ValueError(f"lowrank perturbation needs rank >= 1, got {self.rank}")
        es.parse_sigma_blocks(self.sigma_blocks)  # its names are checked against the net's
        replace(self, sigma_blocks="").strategy(es.Layout.of([1, 1, 1]))

    def strategy(self, layout: es.Layout) -> es.Strategy:
        return es.Strategy(
            layout, pop=self.pop, sigma=self.sigma, sigma_decay=self.sigma_decay,
            sigma_min=self.sigma_min, sigma_scale=self.sigma_scale,
            sigma_blocks=self.sigma_blocks, lr=self.lr,
            lr_decay=self.lr_decay, lr_min=self.lr_min, weight_decay=self.weight_decay,
            rank=self.rank if self.perturbation == "lowrank" else 0,
            seed=self.seed, table_size=self.table_size, device=self.device)


@restores_caller_state
@stops_cleanly
def train(model: DeepLinear, data: Dataset, cfg: Config, run: Run | None = None,
          progress: bool = True, evaluate: Evaluate | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place by OpenAI-ES; return the metric rows logged (one per eval).

    ``evaluate(pop, idx) -> (loss, acc)`` scores the members on training rows ``idx`` instead of
    the local engine, bit for bit as it would (e.g. :class:`deeplinear.distributed.RayEvaluator`).
    """
    check_arguments(data, cfg, Config)
    check_evolvable(model, data, cfg, "ES")
    device = torch.device(cfg.device)  # checked by cfg.validate()
    model.to(device)
    x, y = data.x_train.to(device), data.y_train.to(device)

    layout = es.Layout.of(model.sizes)
    strategy = cfg.strategy(layout)
    engine = Engine(model, strategy, max_bytes=cfg.max_mb << 20)
    g = torch.Generator().manual_seed(cfg.seed)
    rows: list[dict[str, Any]] = []
    needs = ("es", "rng", "wall_s", "loss_sum", "loss_n")
    if run is not None and (saved := run.resumed(*needs)) is not None:
        state = es.State.from_state_dict(saved["es"], cfg.device)
        set_rng_state(saved["rng"], g)
        wall0, loss_sum, loss_n = saved["wall_s"], saved["loss_sum"], saved["loss_n"]
        rows = run.metrics()
    else:
        calibrate_fresh(model, x, cfg)
        state = es.init(strategy, layout.flatten(model))
        wall0, loss_sum, loss_n = 0.0, 0.0, 0
    mark_trained(model)
    start = state.generation
    n_eval = min(cfg.eval_n, len(x), len(data.x_test))
    bar = Progress(total=cfg.steps, desc="es") if progress else None
    t0 = time.perf_counter()
    for gen in range(start, cfg.steps):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g).to(device)
        xb, yb = x[idx], y[idx]
        pop = es.ask(strategy, state)
        if evaluate is None:
            loss, acc = engine.losses(pop, xb, yb, with_accuracy=True)
        else:
            loss, acc = evaluate(pop, idx)
        es.tell(strategy, state, pop, loss if cfg.fitness == "loss" else member_errors(loss, acc))
        finite = loss[torch.isfinite(loss)]
        loss_sum, loss_n = loss_sum + float(finite.mean()), loss_n + 1
        done = gen + 1
        is_eval, is_ckpt, stop = due(done, cfg)
        if is_eval or is_ckpt:  # a stop is a checkpoint step
            layout.load(state.theta, model)
        if is_eval:
            record({"step": done, "wall_s": wall0 + time.perf_counter() - t0,
                    "loss": loss_sum / loss_n, "sigma": pop.sigma,
                    **scores(model, data, n_eval)}, rows, run)
            loss_sum, loss_n = 0.0, 0
        if is_ckpt and run is not None:
            run.checkpoint({"step": done, "es": state.state_dict(), "rng": rng_state(g),
                            "model": model.state_dict(), "wall_s": wall0 + time.perf_counter() - t0,
                            "loss_sum": loss_sum, "loss_n": loss_n})
        show(bar, done, cfg, float(finite.mean()), rows)
        if stop:
            raise interrupted(done, run, rows)
    layout.load(state.theta, model)
    return rows
