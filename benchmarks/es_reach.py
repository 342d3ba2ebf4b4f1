"""How far the parameters ES searches can go: float-aware backprop restricted to them.

ES on Fashion-MNIST starts from the float-blind net (``train --init-from RUN``) and stays within a
few tenths of the best linear model. Is that ES, or the start and the blocks it searches? This
script trains the same start with *exact* gradients of the smooth surrogate (the float-aware
recipe: Adam, cosine lr, batch 128, ``tau`` 0.3), but lets only some parameters move: a set of
blocks, or a rank-``r`` update ``A @ B.T`` of one weight matrix (``A`` random, both trained).
Exact gradients in the same subspace are an optimistic bound for what ES can reach there: ES
estimates the same gradient from ``pop`` losses per step.

    OMP_NUM_THREADS=1 deeplinear train --dataset fashion-mnist --method backprop --steps 4690 \\
        --out runs/fm-blind --quiet
    python benchmarks/es_reach.py --start runs/fm-blind --threads 1

Each row: the start's gain (``--init-gain`` of ``train``: hidden pre-activation std in
thresholds; "as trained" keeps the net), what moves and how many numbers that is, and the test
accuracy in exact mode under TF_GPU and with the same weights under IEEE (= the collapsed map).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from deeplinear import evaluate
from deeplinear.arithmetic import get_semantics
from deeplinear.bench import cpu_model
from deeplinear.cli.train import load_weights
from deeplinear.data import Dataset, load_dataset
from deeplinear.nets import SCALE_EXP, SIZES_2017, build_model
from deeplinear.surrogate import make_under
from deeplinear.train.backprop import Config, calibrate, lr_at

SIZES = list(SIZES_2017)
BIASES = ("biases.0", "biases.1", "biases.2")
ALL = ("weights.0", "weights.1", "weights.2", *BIASES)


@dataclass(frozen=True)
class Setting:
    name: str
    gain: float | None  # None: the start as trained
    blocks: tuple[str, ...]  # trained directly
    lowrank: tuple[int, int] | None = None  # (layer, rank): W_layer + A @ B.T, A and B trained
    lr: float = 1e-3


SETTINGS = [
    Setting("all", None, ALL),
    Setting("all", 1.0, ALL),
    Setting("all", 4.0, ALL),
    Setting("all, lr 1e-4", 4.0, ALL, lr=1e-4),
    Setting("biases", 1.0, BIASES),
    Setting("biases", 4.0, BIASES),
    Setting("W3 + biases", 1.0, ("weights.2", *BIASES)),
    Setting("W1 + biases", 1.0, ("weights.0", *BIASES)),
    Setting("W2 + biases", 1.0, ("weights.1", *BIASES)),
    Setting("W2 + biases", 2.0, ("weights.1", *BIASES)),
    Setting("W2 rank 8 + biases", 1.0, BIASES, lowrank=(1, 8)),
    Setting("W2 rank 64 + biases", 1.0, BIASES, lowrank=(1, 64)),
]


def reach(setting: Setting, start: str, data: Dataset, steps: int, seed: int) -> dict:
    model = build_model("deeplinear", SIZES, SCALE_EXP, get_semantics("TF_GPU"), seed)
    load_weights(model, start, "deeplinear", SIZES)
    if setting.gain is not None:
        calibrate(model, data.x_train, setting.gain, center=False, output=False)
    base = {k: v.detach() for k, v in model.named_parameters()}
    moving = {k: base[k].clone().requires_grad_(True) for k in setting.blocks}
    factors: list[Tensor] = []
    if setting.lowrank is not None:
        layer, r = setting.lowrank
        n_in, n_out = base[f"weights.{layer}"].shape
        a = torch.Generator().manual_seed(seed)
        factors = [(torch.randn(n_in, r, generator=a) / math.sqrt(r)).requires_grad_(True),
                   torch.zeros(n_out, r, requires_grad=True)]

    def params() -> dict[str, Tensor]:
        p = {**base, **moving}
        if factors:
            name = f"weights.{setting.lowrank[0]}"
            p[name] = p[name] + factors[0] @ factors[1].T
        return p

    cfg = Config(steps=steps, lr=setting.lr, surrogate="smooth")
    under = make_under(model, cfg.surrogate, cfg.tau)
    trained = [*moving.values(), *factors]
    opt = torch.optim.Adam(trained, lr=cfg.lr)
    g = torch.Generator().manual_seed(seed)  # the minibatches
    x, y = data.x_train, data.y_train
    t0 = time.perf_counter()
    for s in range(steps):
        idx = torch.randint(len(x), (cfg.batch_size,), generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, s)
        out = functional_call(model, params(), (x[idx],), {"mode": "scaled", "under": under})
        loss = F.cross_entropy(out, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    wall = time.perf_counter() - t0
    with torch.no_grad():
        model.load_state_dict({k: v.detach() for k, v in params().items()})
    acc = evaluate.portability(model, data)["test_acc"]
    return {"dims": sum(t.numel() for t in trained), "TF_GPU": acc["TF_GPU"],
            "IEEE": acc["IEEE"], "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", required=True, help="run directory of the float-blind net")
    p.add_argument("--steps", type=int, default=2000, help="Adam steps per setting")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", data_dir=args.data_dir)
    print(f"# {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"start {args.start}, {args.steps} steps, batch 128, seed {args.seed}")
    print("| moves | start gain | numbers | lr | TF_GPU | IEEE | wall |")
    print("|---|---|---|---|---|---|---|")
    for s in SETTINGS:
        r = reach(s, args.start, data, args.steps, args.seed)
        gain = "as trained" if s.gain is None else f"{s.gain:g}"
        print(f"| {s.name} | {gain} | {r['dims']:,} | {s.lr:g} | {100 * r['TF_GPU']:.2f}% | "
              f"{100 * r['IEEE']:.2f}% | {r['wall_s']:.0f} s |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
