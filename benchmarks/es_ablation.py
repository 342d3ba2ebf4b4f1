"""What makes OpenAI-ES learn a deep linear net through float underflow: a small ablation.

Each setting is the task's base config with a few fields changed; every run trains a fresh net
for a fixed number of generations and reports test accuracy (scaled mode; for the 2-D tasks also
exact mode under TF_GPU and, with the same weights, under IEEE) with the wall time it took.
Runs go to worker processes (``--jobs``), each with ``--threads`` torch threads.

    python benchmarks/es_ablation.py ablation --task digits --gens 1500 --jobs 2
    python benchmarks/es_ablation.py ablation --task spirals --only recipe,plain
    python benchmarks/es_ablation.py throughput --threads 2      # engine speed, 2017 net

Timings depend on the machine and on what else runs on it: the header prints the CPU, threads and
load average, and ``throughput`` measures torch's sgemm peak in the same process.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import itertools
import multiprocessing as mp
import os
import time
from dataclasses import asdict, replace

import torch

from deeplinear.bench import cpu_model

TASKS = {  # dataset, sizes, base config (the recipe)
    "spirals": ("spirals", "2,64,64,2", {"pop": 100, "batch_size": 256, "sigma": 0.03,
                                          "lr": 0.03, "lr_decay_to": 0.05,
                                          "table_size": 1 << 20}),
    "digits": ("digits", "64,256,256,10", {"pop": 200, "batch_size": 256, "sigma": 0.03,
                                           "lr": 0.03, "lr_decay_to": 0.05,
                                           "table_size": 1 << 22}),
    "fashion": ("fashion-mnist", "784,512,512,10", {"pop": 500, "batch_size": 100,
                                                    "sigma": 0.03, "lr": 0.01,
                                                    "perturbation": "lowrank", "rank": 1}),
}

SETTINGS = {  # name -> changes to the task's base config (*_factor, lr_decay_to: see build_config)
    "recipe": {},
    "plain": {"sigma_scale": "none", "init_gain": None, "sigma": 0.02, "lr": 0.003,
              "lr_decay_to": 1.0},
    "no-fan-in": {"sigma_scale": "none", "sigma": 0.02},
    "he-init": {"init_gain": None},
    "sigma/3": {"sigma": 0.01},
    "sigma*3": {"sigma": 0.1},
    "lr/3": {"lr": 0.01},
    "const-lr": {"lr_decay_to": 1.0},
    "fitness=error": {"fitness": "error"},
    "pop/2": {"pop_factor": 0.5},
    "pop*2": {"pop_factor": 2.0},
    "batch/4": {"batch_factor": 0.25},
    "lowrank-1": {"perturbation": "lowrank", "rank": 1},
    "lowrank-4": {"perturbation": "lowrank", "rank": 4},
    "full-rank": {"perturbation": "full"},
}


def machine() -> str:
    load = "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    return (f"{cpu_model()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
            f"load average {load}")


def build_config(task: str, setting: str, gens: int, seed: int):
    from deeplinear.train.es import Config

    changes = {**TASKS[task][2], **SETTINGS[setting]}
    base = Config(steps=gens, seed=seed, eval_every=gens, checkpoint_every=gens)
    pop_factor = changes.pop("pop_factor", 1.0)
    batch_factor = changes.pop("batch_factor", 1.0)
    decay_to = changes.pop("lr_decay_to", 1.0)  # lr falls geometrically to this fraction
    cfg = replace(base, lr_decay=decay_to ** (1 / gens), **changes)
    return replace(cfg, pop=max(2, round(cfg.pop * pop_factor / 2) * 2),
                   batch_size=max(1, round(cfg.batch_size * batch_factor)))


def run_one(task: str, setting: str, gens: int, seed: int, threads: int,
            n_train: int | None, data_dir: str | None) -> dict:
    torch.set_num_threads(threads)
    from deeplinear.arithmetic import IEEE
    from deeplinear.data import load_dataset
    from deeplinear.evaluate import accuracy
    from deeplinear.nets import DeepLinear
    from deeplinear.train.es import train

    name, sizes, _ = TASKS[task]
    data = load_dataset(name, seed=seed, n_train=n_train, data_dir=data_dir)
    cfg = build_config(task, setting, gens, seed)
    net = DeepLinear([int(s) for s in sizes.split(",")],
                     generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    row = train(net, data, cfg, progress=False)[-1]
    out = {"task": task, "setting": setting, "seed": seed, "gens": gens,
           "wall_s": time.perf_counter() - t0, "loss": row["loss"],
           "train_acc": row["train_acc"], "test_acc": row["test_acc"], "config": asdict(cfg)}
    if data.n_features == 2:  # ground truth, and the same weights under IEEE
        out["exact_tf_gpu"] = accuracy(net, data.x_test, data.y_test, "exact")
        ieee = copy.deepcopy(net)
        ieee.semantics = IEEE
        out["exact_ieee"] = accuracy(ieee, data.x_test, data.y_test, "exact")
    return out


def ablation(args: argparse.Namespace) -> None:
    settings = args.only.split(",") if args.only else list(SETTINGS)
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    print(f"# ES ablation: task {args.task} ({TASKS[args.task][1]}), {args.gens} generations, "
          f"seeds {args.seeds}, {args.jobs} jobs x {args.threads} threads")
    print(f"# machine: {machine()}")
    print(f"# recipe: {TASKS[args.task][2]}")
    jobs = [(args.task, s, args.gens, seed, args.threads, args.n_train, args.data_dir)
            for s in settings for seed in range(args.seeds)]
    ctx = mp.get_context("spawn")
    extra = TASKS[args.task][0] in ("spirals", "rings", "checkerboard")
    print("| setting | seed | test acc | train acc | loss | wall s |"
          + (" exact TF_GPU | exact IEEE |" if extra else ""))
    print("|---|---|---|---|---|---|" + ("---|---|" if extra else ""), flush=True)
    with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        for done in cf.as_completed([pool.submit(run_one, *job) for job in jobs]):
            r = done.result()
            line = (f"| {r['setting']} | {r['seed']} | {r['test_acc']:.4f} | "
                    f"{r['train_acc']:.4f} | {r['loss']:.4f} | {r['wall_s']:.0f} |")
            if extra:
                line += f" {r['exact_tf_gpu']:.4f} | {r['exact_ieee']:.4f} |"
            print(line, flush=True)


def throughput(args: argparse.Namespace) -> None:
    """Generations/s of the engine (and of a whole ask/evaluate/tell step) on the 2017 net."""
    from deeplinear import es
    from deeplinear.engine import Engine
    from deeplinear.nets import SIZES_2017, DeepLinear

    torch.set_num_threads(args.threads)
    sizes = list(SIZES_2017)
    net = DeepLinear(sizes, generator=torch.Generator().manual_seed(0))
    layout = es.Layout.of(sizes)
    x = torch.rand(args.batch, sizes[0])
    y = torch.randint(0, sizes[-1], (args.batch,))
    dense = 2 * args.batch * sum(a * b for a, b in itertools.pairwise(sizes))
    dense_gflop = dense * args.pop / 1e9
    print(f"# engine throughput: {'-'.join(map(str, sizes))}, pop {args.pop}, batch {args.batch}, "
          f"{args.threads} threads; {dense_gflop:.1f} GFLOP per generation (dense-equivalent)")
    print(f"# machine: {machine()}")
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)

    def peak() -> float:
        a @ b
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        return 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e9

    print("| mode | chunk | evaluate s/gen | GFLOP/s (dense-equiv.) | tell s/gen | gens/s "
          "| sgemm peak GFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for rank in (0, 1, 4):
        s = es.Strategy(layout, pop=args.pop, rank=rank, sigma=0.03)
        state = es.init(s, layout.flatten(net))
        for chunk in ([None, 8, 32] if rank == 0 else [None]):
            engine = Engine(net, s, chunk=chunk)
            pop = es.ask(s, state)
            engine.losses(pop, x, y)  # warm the buffers
            ev, tl = [], []
            for _ in range(args.gens):
                pop = es.ask(s, state)
                t0 = time.perf_counter()
                loss = engine.losses(pop, x, y)
                t1 = time.perf_counter()
                es.tell(s, state, pop, loss)
                ev.append(t1 - t0)
                tl.append(time.perf_counter() - t1)
            e, t = min(ev), min(tl)
            mode = "full" if rank == 0 else f"lowrank r={rank}"
            print(f"| {mode} | {engine.members_per_chunk(args.batch)} | {e:.3f} | "
                  f"{dense_gflop / e:.1f} | {t:.3f} | {1 / (e + t):.2f} | {peak():.0f} |",
                  flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("ablation")
    a.add_argument("--task", choices=TASKS, default="digits")
    a.add_argument("--gens", type=int, default=1500)
    a.add_argument("--seeds", type=int, default=1)
    a.add_argument("--only", default="", help="comma-separated setting names")
    a.add_argument("--jobs", type=int, default=1)
    a.add_argument("--threads", type=int, default=1)
    a.add_argument("--n-train", type=int, default=None)
    a.add_argument("--data-dir", default=None, help="MNIST-format files (fashion)")
    t = sub.add_parser("throughput")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--pop", type=int, default=500)
    t.add_argument("--batch", type=int, default=100)
    t.add_argument("--gens", type=int, default=3)
    args = p.parse_args()
    ablation(args) if args.what == "ablation" else throughput(args)


if __name__ == "__main__":
    main()
