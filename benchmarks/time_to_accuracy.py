"""Wall time for OpenAI-ES to reach given test accuracies, full-rank vs low-rank (EGGROLL) noise.

Why: generations/s says how fast the engine runs, not how fast it learns; low-rank noise makes a
generation cheaper but each one may teach less. This script trains the same net from the same
init with both perturbations and reports, per target accuracy, the wall time (training plus the
periodic evaluations that detect it) and the generation at which the test accuracy first reached
it. Long: minutes per task on 2 cores; run it in the background with a log.

    python benchmarks/time_to_accuracy.py                       # spirals and fashion-mnist
    python benchmarks/time_to_accuracy.py --tasks spirals --json out.json
    python benchmarks/time_to_accuracy.py --device cuda             # on a GPU (TF32 off)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from typing import Any

import torch

from deeplinear.bench import load_avg, machine_info
from deeplinear.data import load_dataset
from deeplinear.nets import DeepLinear
from deeplinear.train.es import Config, train


@dataclass(frozen=True)
class Task:
    dataset: str
    hidden: tuple[int, ...]
    targets: tuple[float, ...]
    steps: int
    pop: int
    batch: int
    eval_every: int


TASKS = {
    "spirals": Task("spirals", (256, 256), (0.80, 0.90, 0.95), 1500, 200, 256, 25),
    "fashion-mnist": Task("fashion-mnist", (512, 512), (0.70, 0.75, 0.80), 600, 500, 100, 25),
}


def reach(rows: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation row whose test accuracy is at least ``target``."""
    return next((r for r in rows if r["test_acc"] >= target), None)


def run_task(name: str, perturbation: str, threads: int, seed: int,
             device: str = "cpu") -> dict[str, Any]:
    task = TASKS[name]
    data = load_dataset(task.dataset, seed=seed)
    sizes = [data.n_features, *task.hidden, data.n_classes]
    model = DeepLinear(sizes, generator=torch.Generator().manual_seed(seed))
    cfg = Config(seed=seed, steps=task.steps, pop=task.pop, batch_size=task.batch,
                 perturbation=perturbation, threads=threads, eval_every=task.eval_every,
                 eval_n=2000, device=device)
    rows = train(model, data, cfg, progress=False)
    hits = {f"{t:.2f}": reach(rows, t) for t in task.targets}
    return {"task": name, "perturbation": perturbation, "sizes": sizes, "config": asdict(cfg),
            "best_test_acc": max(r["test_acc"] for r in rows), "total_s": rows[-1]["wall_s"],
            "reached": {t: (None if r is None else {"wall_s": r["wall_s"], "generation": r["step"]})
                        for t, r in hits.items()}}


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'task':14s} {'noise':8s} {'target':>6s} {'wall s':>8s} {'gen':>6s}"]
    for res in results:
        for t, hit in res["reached"].items():
            wall, gen = ("-", "-") if hit is None else (f"{hit['wall_s']:.1f}", hit["generation"])
            lines.append(f"{res['task']:14s} {res['perturbation']:8s} {t:>6s} {wall:>8s} {gen:>6}")
        m = res["machine"]
        lines.append(f"{res['task']:14s} {res['perturbation']:8s} best {res['best_test_acc']:.3f} "
                     f"in {res['total_s']:.0f} s (load average {_load(m['load_avg_1m'])} -> "
                     f"{_load(m['load_avg_1m_end'])})")
    return "\n".join(lines)


def _load(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=sorted(TASKS, key=len))
    p.add_argument("--perturbations", nargs="+", choices=("full", "lowrank"),
                   default=["full", "lowrank"])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where ES computes (default cpu)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    results = []
    for name in args.tasks:
        for pert in args.perturbations:
            print(f"time_to_accuracy: {name} {pert}", file=sys.stderr, flush=True)
            machine = machine_info(args.device)  # the load average at its start and end, recorded
            results.append(run_task(name, pert, args.threads, args.seed, args.device))
            machine["load_avg_1m_end"] = load_avg()
            results[-1]["machine"] = machine
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
