"""CMA-ES (Hansen's ``cma`` package) for small deep linear nets, through their real underflow rule.

Why a second evolution strategy: OpenAI-ES searches with isotropic noise, so every direction
costs the same; CMA-ES learns the covariance of its search distribution, and with it the
correlated moves the dead zone asks for (a unit's bias together with the weights that feed it).
Its price is an ``n x n`` covariance and an eigendecomposition, so it is for nets of at most
:data:`MAX_PARAMS` parameters (2-16-16-2 has 354; the 2017 net's 670k are OpenAI-ES territory).

Per generation: one common minibatch (a ``torch.Generator`` seeded with ``cfg.seed``), each
candidate's loss on it in scaled mode (the semantics' rule exactly, float32 weights; the
candidates stacked, one bmm per layer as in the ES engine), one ``tell``. A non-finite loss
ranks worst and does not derail the run. The model ends at the distribution's mean, CMA-ES's
estimate of the optimum under a noisy fitness.

Defaults measured on spirals 2-16-16-2 (TF_GPU, exact-mode test accuracy; linear <= 58%; runs
kept in ``benchmarks/results/cmaes_spirals/``, wall times in README.md): cma's own population
(21), sigma 0.1, batch 256: 68.2% after 3000 generations, the step size down to 5e-5 by
generation 1000 (a local search stalls on the dead zone's plateaus); pop 200, sigma 0.3, batch
1000: 84.2% after 1000 generations; 2-32-32-2 with the same settings 89.2% (most of its time in
``cma``'s own update). OpenAI-ES reaches 95% on the wider
2-64-64-2 (4,482 parameters: a full covariance there costs far more per generation).

Reproducible and resumable bit for bit: the candidates come from a ``numpy.random.RandomState``
of our own (``cma``'s ``randn`` option), pickled with the strategy into the checkpoint beside
the batch generator; ``cma``'s linear algebra runs on one BLAS thread, since numpy's BLAS rounds
by its thread count (the 1000-generation spirals run above: 84.2% on one thread, 83.2% on two;
the pin reaches OpenBLAS and MKL, the BLAS of numpy's Linux and Windows wheels, not Accelerate).
``cma`` is an optional dependency: ``pip install 'deeplinear[cma]'``.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from deeplinear import es
from deeplinear.data import NUMPY_SEEDS, Dataset
from deeplinear.engine import (
    CHUNK_CACHE_BYTES,
    member_accuracy,
    member_bytes,
    member_errors,
    member_losses,
    stacked_logits,
)
from deeplinear.nets import DeepLinear
from deeplinear.runs import Progress, Run, rng_state, set_rng_state
from deeplinear.train import (
    check_arguments,
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

MAX_PARAMS = 5000  # full covariance: 200 MB of float64 and an O(n^3) eigendecomposition
# Host memory per candidate and parameter in a generation: cma keeps several float64 copies of
# each candidate (measured with `deeplinear train --method cma-es --dataset spirals --sizes
# 2,16,16,2 --steps 2`, 354 parameters: peak resident 673 MB at pop 4000, 1443 MB at 16000, so
# ~180 bytes a candidate and parameter)
CANDIDATE_PARAM_BYTES = 200


@dataclass
class Config:
    seed: int = 0  # minibatches and candidates; the net's init is the caller's (generator=)
    steps: int = 1000  # generations
    pop: int | None = 200  # candidates per generation; None: cma's 4 + 3 ln(n)
    batch_size: int = 1000  # the common minibatch every candidate is scored on
    sigma: float = 0.3  # initial step size, in the units of the weights
    fitness: str = "loss"  # loss (mean cross-entropy) | error (1 - accuracy) on the minibatch
    init_gain: float | None = 2.0  # pre-activation std at init, in thresholds (None: He init)
    center: bool = True  # centre layer 1's pre-activations at init
    threads: int | None = None  # torch threads, set once at the start
    eval_every: int = 100
    checkpoint_every: int = 500
    eval_n: int = 10000  # samples of each split scored at every evaluation

    def validate(self) -> None:
        check_evolution_config(self)
        if self.pop is not None and self.pop < 2:
            raise ValueError(f"pop must be >= 2, got {self.pop}")
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ValueError(f"sigma must be a positive number, got {self.sigma}")
        if not 0 <= self.seed < NUMPY_SEEDS:
            raise ValueError(f"seed must be in [0, 2**32) for CMA-ES, got {self.seed}")


def _cma() -> Any:
    try:
        import cma
    except ModuleNotFoundError:
        raise ValueError("CMA-ES needs the cma package: pip install 'deeplinear[cma]'") from None
    return cma


def strategy(theta: np.ndarray, cfg: Config) -> Any:
    """A ``cma.CMAEvolutionStrategy`` around ``theta`` drawing from its own seeded RandomState.

    ``cma`` seeds numpy's global generator from its ``seed`` option only when it samples with
    ``np.random.randn``; with our ``randn`` it would merely warn that the seed is unused, so the
    option is NaN ("no seeding") and the global generator is never touched. Its stopping rules
    are off: the run lasts ``cfg.steps`` generations.
    """
    opts = {"seed": math.nan, "randn": np.random.RandomState(cfg.seed).randn,
            "verbose": -9, "verb_log": 0, "verb_disp": 0, "maxiter": math.inf,
            "tolfun": 0, "tolfunhist": 0, "tolx": 0, "tolstagnation": math.inf,
            "tolflatfitness": math.inf, "tolconditioncov": False}
    if cfg.pop is not None:
        opts["popsize"] = cfg.pop
    return _cma().CMAEvolutionStrategy(theta, cfg.sigma, opts)


@torch.no_grad()
def fitness(model: DeepLinear, layout: es.Layout, candidates: list[np.ndarray], x: torch.Tensor,
            y: torch.Tensor, kind: str, generation: int) -> tuple[list[float], float]:
    """Each candidate's loss (or error) on ``(x, y)`` with non-finite values ranked worst, and the
    mean of the finite ones.

    The candidates run stacked, a chunk at a time (:func:`deeplinear.engine.stacked_logits`: one
    bmm per layer, bit-identical to loading each into ``model`` with one thread, a candidate alone
    in its chunk included: :func:`deeplinear.engine.member_products` runs a lone one twice).
    """
    members = torch.from_numpy(np.asarray(candidates, dtype=np.float32))
    per_chunk = max(2, int(CHUNK_CACHE_BYTES // member_bytes(layout, len(x))))
    values: list[float] = []
    for chunk in members.split(per_chunk):
        logits = stacked_logits(model, layout, chunk, x)
        loss = member_losses(logits, y)
        values += (loss if kind == "loss" else member_errors(loss, member_accuracy(logits, y))
                   ).tolist()
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        raise es.DivergedError(f"all {len(values)} candidates of generation {generation} have "
                               "a non-finite loss; lower sigma and start again")
    worst = max(finite) + 1.0
    return [v if math.isfinite(v) else worst for v in values], sum(finite) / len(finite)


@restores_caller_state
@stops_cleanly
@threadpool_limits.wrap(limits=1, user_api="blas")  # numpy's, for cma: see the module docstring
def train(model: DeepLinear, data: Dataset, cfg: Config, run: Run | None = None,
          progress: bool = True) -> list[dict[str, Any]]:
    """Train ``model`` in place by CMA-ES; return the metric rows logged (one per eval).

    Runs on the CPU, where ``cma`` keeps its state (nets small enough for an n x n covariance
    gain nothing from a GPU); a model on another device goes back there however the run ends.
    """
    model.cpu()
    check_arguments(data, cfg, Config)
    check_evolvable(model, data, cfg, "CMA-ES")
    layout = es.Layout.of(model.sizes)
    if layout.n > MAX_PARAMS:
        raise ValueError(f"CMA-ES keeps an n x n covariance and {model.sizes} has {layout.n} "
                         f"parameters (at most {MAX_PARAMS}); use ES for this net (--method es)")
    es.check_memory((cfg.pop or 0) * layout.n * CANDIDATE_PARAM_BYTES,
                    f"a CMA-ES population of {cfg.pop} over {layout.n} parameters needs about",
                    "lower pop (--pop)")
    x, y = data.x_train, data.y_train

    g = torch.Generator().manual_seed(cfg.seed)
    rows: list[dict[str, Any]] = []
    needs = ("cma", "rng", "wall_s", "loss_sum", "loss_n")
    if run is not None and (saved := run.resumed(*needs)) is not None:
        opt = pickle.loads(saved["cma"])
        set_rng_state(saved["rng"], g)
        start, wall0, loss_sum, loss_n = saved["step"], saved["wall_s"], saved["loss_sum"], \
            saved["loss_n"]
        rows = run.metrics()
    else:
        calibrate_fresh(model, x, cfg)
        opt = strategy(layout.flatten(model).double().numpy(), cfg)
        start, wall0, loss_sum, loss_n = 0, 0.0, 0.0, 0
    mark_trained(model)
    n_eval = min(cfg.eval_n, len(x), len(data.x_test))

    def centre() -> None:
        layout.load(torch.from_numpy(np.asarray(opt.mean, dtype=np.float32)), model)

    bar = Progress(total=cfg.steps, desc="cma-es") if progress else None
    t0 = time.perf_counter()
    for gen in range(start, cfg.steps):
        idx = torch.randint(0, len(x), (cfg.batch_size,), generator=g)
        candidates = opt.ask()
        values, mean = fitness(model, layout, candidates, x[idx], y[idx], cfg.fitness, gen)
        opt.tell(candidates, values)
        loss_sum, loss_n = loss_sum + mean, loss_n + 1
        done = gen + 1
        is_eval, is_ckpt, stop = due(done, cfg)
        if is_eval or is_ckpt:  # a stop is a checkpoint step
            centre()
        if is_eval:
            record({"step": done, "wall_s": wall0 + time.perf_counter() - t0,
                    "loss": loss_sum / loss_n, "sigma": float(opt.sigma),
                    **scores(model, data, n_eval)}, rows, run)
            loss_sum, loss_n = 0.0, 0
        if is_ckpt and run is not None:
            run.checkpoint({"step": done, "cma": pickle.dumps(opt), "rng": rng_state(g),
                            "model": model.state_dict(), "wall_s": wall0 + time.perf_counter() - t0,
                            "loss_sum": loss_sum, "loss_n": loss_n})
        show(bar, done, cfg, mean, rows)
        if stop:
            raise interrupted(done, run, rows)
    centre()
    return rows
