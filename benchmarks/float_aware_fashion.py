"""Fashion-MNIST, 784-512-512-10: does float-aware backprop make a deep linear net nonlinear?

Trains, with the same Adam/cosine/minibatch settings and the same number of epochs:

- softmax regression and a ReLU MLP (the linear floor and the nonlinear reference),
- the deep linear net by float-blind backprop (2017 baseline: learns only its collapse),
- the deep linear net by float-aware backprop with the exact a.e. derivative and He init (the
  plain dead-zone run), and with this project's recipe (smooth surrogate, calibrated init),

then measures every deep linear net in exact mode (real float32 at 1e-38) under its own TF_GPU
semantics, under IEEE, and as its collapsed affine map. Each method trains in its own run
directory, so a killed benchmark continues where it stopped when started again with the same
arguments (finished methods are read back from ``final.pt``).

    python benchmarks/float_aware_fashion.py [--epochs 10] [--methods all] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from deeplinear import evaluate
from deeplinear.bench import cpu_model
from deeplinear.data import load_dataset
from deeplinear.nets import MLP, SCALE_EXP, SIZES_2017, DeepLinear, SoftmaxRegression
from deeplinear.runs import Run
from deeplinear.train import backprop

SIZES = list(SIZES_2017)
# name -> (model kind, Config overrides)
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "softmax": ("softmax", {}),
    "mlp": ("mlp", {}),
    "blind": ("deeplinear", {"surrogate": "blind"}),
    "exact-he": ("deeplinear", {"surrogate": "exact", "init_gain": None, "center": False}),
    "float-aware": ("deeplinear", {"surrogate": "smooth"}),
}
LABELS = {
    "softmax": "softmax regression",
    "mlp": "ReLU MLP",
    "blind": "deep linear, float-blind backprop",
    "exact-he": "deep linear, float-aware: exact derivative, He init",
    "float-aware": "deep linear, float-aware: smooth surrogate, calibrated init",
}


def build(kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "deeplinear":
        return DeepLinear(SIZES, generator=torch.Generator().manual_seed(seed))
    return MLP(SIZES) if kind == "mlp" else SoftmaxRegression(SIZES[0], SIZES[-1])


def run_method(name: str, data: Any, cfg: backprop.Config, out: Path,
               data_dir: str | None = None) -> dict[str, Any]:
    kind, _ = METHODS[name]
    model = build(kind, cfg.seed)
    config = {"method": name, "sizes": SIZES, "trainer": dataclasses.asdict(cfg)}
    if (out / "final.pt").exists():
        payload = torch.load(out / "final.pt", weights_only=False)
        if payload["config"] != config:
            raise ValueError(f"{out} holds a different run; pass another --out")
        return payload["result"]
    run = Run.open(out, config, resume=(out / "checkpoint.pt").exists())
    rows = backprop.train(model, data, cfg, run=run)
    t0 = time.perf_counter()
    if isinstance(model, DeepLinear):
        port = evaluate.portability(model, data)
        acc = port["test_acc"]
        result = {"test_acc": acc["TF_GPU"], "ieee_acc": acc["IEEE"],
                  "cpu_ftz_daz_acc": acc["CPU_FTZ_DAZ"], "collapsed_acc": acc["collapsed"],
                  "exact_eval_s": port["seconds"]}
    else:
        result = {"test_acc": evaluate.accuracy(model, data.x_test, data.y_test)}
    result.update(train_s=rows[-1]["wall_s"], eval_s=time.perf_counter() - t0,
                  last_row=rows[-1])
    deep = isinstance(model, DeepLinear)
    run.save_final({  # also readable by `deeplinear eval`
        "state_dict": model.state_dict(), "config": config, "result": result,
        "model": {"kind": kind, "sizes": SIZES if kind != "softmax" else [SIZES[0], SIZES[-1]],
                  "scale_exp": model.scale_exp if deep else SCALE_EXP},
        "semantics": dataclasses.asdict(model.semantics) if deep else None,
        "method": name, "data": {"name": data.name, "data_dir": data_dir, "seed": 0},
    })
    return result


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--methods", default="all", help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default="runs/bench/float_aware_fashion")
    args = p.parse_args(argv)
    names = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", data_dir=args.data_dir)
    steps = round(args.epochs * (len(data.y_train) // args.batch_size))
    out = Path(args.out)
    results, t0 = {}, time.perf_counter()
    for name in names:
        cfg = backprop.Config(seed=args.seed, steps=steps, batch_size=args.batch_size,
                              lr=args.lr, eval_every=max(1, steps // 10),
                              checkpoint_every=max(1, steps // 10), **METHODS[name][1])
        print(f"== {LABELS[name]}", file=sys.stderr, flush=True)
        result = run_method(name, data, cfg, out / name, args.data_dir)
        results[name] = {"config": dataclasses.asdict(cfg), **result}
    total = time.perf_counter() - t0
    cmd = shlex.join([Path(sys.executable).name, *sys.argv])
    machine = (f"{cpu_model()}, {os.cpu_count()} CPUs, "
               f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")
    lines = [
        f"command: {cmd}",
        f"machine: {machine}",
        f"settings: Fashion-MNIST 60k/10k, {'-'.join(map(str, SIZES))}, {args.epochs:g} epochs "
        f"({steps} steps), batch {args.batch_size}, AdamW lr {args.lr} cosine, seed {args.seed}; "
        f"deep linear: scale 2^{SCALE_EXP}, TF_GPU semantics; accuracies in exact mode "
        "(real float32)",
        f"total wall time: {total:.0f} s (finished methods read back from {out})",
        "",
        f"| {'method':<60} | {'train s':>7} | {'eval s':>6} | {'test (own)':>10} | "
        f"{'IEEE':>7} | {'collapsed':>9} |",
        f"|{'-' * 62}|{'-' * 9}|{'-' * 8}|{'-' * 12}|{'-' * 9}|{'-' * 11}|",
    ]
    for name, r in results.items():
        lines.append(f"| {LABELS[name]:<60} | {r['train_s']:7.0f} | {r['eval_s']:6.1f} | "
                     f"{pct(r['test_acc']):>10} | {pct(r.get('ieee_acc')):>7} | "
                     f"{pct(r.get('collapsed_acc')):>9} |")
    report = "\n".join(lines)
    print(report)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"report": report, "results": results},
                                                 indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
