"""Generations per second of ES with the local engine vs Ray workers, and where the time goes.

For each backend the same run (same seed and config, so the same bits) is timed per generation:
``period`` is the time between the starts of two consecutive evaluations (one generation), ``eval``
the time inside the evaluator, ``outside = period - eval`` the driver's own work (minibatch, ask,
tell, logging), and for Ray ``compute`` the slowest worker's engine time, so ``eval - compute`` is
what distribution costs (put, dispatch, gather, imbalance). Medians over the generations after the
first (buffers and noise tables are set up there). The final parameters of every backend are
compared with the local run's (``same`` column).

    python benchmarks/ray_scaling.py --task 2017 --gens 20 --workers 1,2
    python benchmarks/ray_scaling.py --task digits --gens 50 --perturbation lowrank --threads 1
    python benchmarks/ray_scaling.py --invariance      # may members be split freely? (no Ray)
    python benchmarks/ray_scaling.py --tell            # the driver's update alone, 1 thread

``--invariance`` checks the premise of the Ray backend on the 2017 shapes: does a member's loss
depend on the engine's chunk or on the torch thread count? ``--tell`` times ``es.tell`` (the
driver's serial share) for the task's population.

Timings depend on what else runs on the machine: the header prints the CPU count and load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

import torch

from deeplinear import distributed as dist
from deeplinear import es
from deeplinear.data import load_dataset
from deeplinear.engine import Engine
from deeplinear.nets import SIZES_2017, DeepLinear
from deeplinear.train import es as es_train

TASKS = {  # dataset, sizes, config
    "digits": ("digits", [64, 256, 256, 10], {"pop": 200, "batch_size": 256, "sigma": 0.03,
                                                "lr": 0.03, "table_size": 1 << 22}),
    "2017": ("fashion-mnist", list(SIZES_2017), {"pop": 200, "batch_size": 100,
                                                     "sigma": 0.03, "lr": 0.01}),
}


class Timed:
    """Wraps an evaluator and records when each generation's evaluation starts and ends."""

    def __init__(self, evaluate: Any) -> None:
        self.evaluate, self.starts, self.evals = evaluate, [], []

    def __call__(self, pop: es.Population, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t0 = time.perf_counter()
        self.starts.append(t0)
        out = self.evaluate(pop, idx)
        self.evals.append(time.perf_counter() - t0)
        return out


def summarise(timed: Timed, compute: list[float] | None) -> dict[str, float]:
    periods = [b - a for a, b in zip(timed.starts, timed.starts[1:], strict=False)]
    period, ev = statistics.median(periods), statistics.median(timed.evals[1:])
    row = {"gen_per_s": 1 / period, "period_ms": 1e3 * period, "eval_ms": 1e3 * ev,
           "outside_ms": 1e3 * (period - ev)}
    if compute:
        row["compute_ms"] = 1e3 * statistics.median(compute[1:])
        row["dist_ms"] = row["eval_ms"] - row["compute_ms"]
    return row


class ComputeLog(dist.RayEvaluator):
    """Also keeps the slowest worker's engine time of every generation."""

    def __call__(self, pop, idx):
        before = self.stats.worker_s
        out = super().__call__(pop, idx)
        self.compute.append(self.stats.worker_s - before)
        return out


def run(backend: str, workers: int, data, sizes, cfg) -> tuple[dict[str, float], torch.Tensor]:
    model = DeepLinear(sizes, generator=torch.Generator().manual_seed(0))
    if backend == "local":
        layout = es.Layout.of(sizes)
        engine = Engine(model, cfg.strategy(layout), max_bytes=cfg.max_mb << 20)
        timed = Timed(lambda pop, idx: engine.losses(pop, data.x_train[idx], data.y_train[idx],
                                                     with_accuracy=True))
        es_train.train(model, data, cfg, progress=False, evaluate=timed)
        return summarise(timed, None), layout.flatten(model)
    ev = ComputeLog(model, data, cfg, workers=workers, threads=cfg.threads or 1)
    ev.compute = []
    with ev:
        timed = Timed(ev)
        es_train.train(model, data, cfg, progress=False, evaluate=timed)
    return summarise(timed, ev.compute), es.Layout.of(sizes).flatten(model)


def invariance() -> None:
    """How many of 40 members change with the engine's chunk (2 members) or the thread count."""
    sizes = list(SIZES_2017)
    net = DeepLinear(sizes, generator=torch.Generator().manual_seed(0))
    layout = es.Layout.of(sizes)
    x = torch.rand(100, 784, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (100,), generator=torch.Generator().manual_seed(2))
    threads = torch.get_num_threads()
    for rank in (0, 1):
        s = es.Strategy(layout, pop=40, sigma=0.1, rank=rank, table_size=1 << 21)
        pop = es.ask(s, es.init(s, layout.flatten(net) * 4))  # x4: the dead zone acts
        torch.set_num_threads(2)
        whole = Engine(net, s).losses(pop, x, y)
        chunked = Engine(net, s, chunk=2).losses(pop, x, y)
        torch.set_num_threads(1)
        single = Engine(net, s).losses(pop, x, y)
        torch.set_num_threads(threads)
        print(f"rank {rank}: chunk=2 vs default (2 threads): {int((chunked != whole).sum())}/40 "
              f"members differ; 1 vs 2 threads: {int((single != whole).sum())}/40 differ, "
              f"max |loss diff| {float((single - whole).abs().max()):.2g}")


def tell_time(sizes: list[int], cfg: es_train.Config, repeats: int = 6) -> None:
    torch.set_num_threads(1)
    layout = es.Layout.of(sizes)
    s = cfg.strategy(layout)
    state = es.init(s, layout.flatten(DeepLinear(sizes)))
    times = []
    for _ in range(repeats):
        pop = es.ask(s, state)
        t0 = time.perf_counter()
        es.tell(s, state, pop, torch.randn(pop.size))
        times.append(time.perf_counter() - t0)
    med = statistics.median(times[1:])
    print(f"tell, pop {cfg.pop} {cfg.perturbation}, 1 thread: median {1e3 * med:.1f} ms, "
          f"{1e3 * med / s.pairs:.3f} ms per pair (load average {os.getloadavg()[0]:.1f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, default="2017")
    p.add_argument("--gens", type=int, default=20)
    p.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    p.add_argument("--perturbation", choices=es_train.PERTURBATIONS, default="full")
    p.add_argument("--pop", type=int, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the local run and of each worker (default: torch's "
                        "own for local, 1 per worker)")
    p.add_argument("--invariance", action="store_true", help="only the chunk/thread check")
    p.add_argument("--tell", action="store_true", help="only time the driver's update")
    args = p.parse_args()
    if args.invariance:
        return invariance()
    name, sizes, base = TASKS[args.task]
    cfg = es_train.Config(**{**base, "steps": args.gens, "eval_every": args.gens,
                             "eval_n": 1000, "perturbation": args.perturbation, "rank": 1,
                             "threads": args.threads,
                             **({"pop": args.pop} if args.pop else {})})
    if args.tell:
        return tell_time(sizes, cfg)
    data = load_dataset(name)
    print(f"# {args.task}: {name} {','.join(map(str, sizes))} pop {cfg.pop} batch "
          f"{cfg.batch_size} {cfg.perturbation}; {args.gens} generations; {os.cpu_count()} "
          f"CPUs, load average {os.getloadavg()[0]:.1f}; torch threads "
          f"{args.threads or torch.get_num_threads()} local")
    counts = [int(w) for w in args.workers.split(",")]
    dist.connect(None, num_cpus=max(os.cpu_count() or 1, max(counts) * (args.threads or 1)))
    ref = None
    for backend, workers in [("local", 0)] + [("ray", w) for w in counts]:
        row, theta = run(backend, workers, data, sizes, cfg)
        ref = theta if ref is None else ref
        row = {"backend": backend if backend == "local" else f"ray x{workers}", **row,
               "same": bool(torch.equal(theta, ref))}
        print(" | ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in row.items()), flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
