"""ES and exact gradients in the per-unit subspace: gains, biases, output layer (7k numbers).

``es_reach.py`` found that exact float-aware gradients beat the linear model only by moving
hundreds of thousands of weights. One reparametrisation moves them all with few numbers: scaling
hidden unit ``j`` by ``g_j`` (its incoming weights and bias times ``g_j``, its outgoing weights
divided by it) leaves the collapsed map unchanged and moves only the unit against the dead zone,
like ``train --init-gain`` but per unit. Searched here: the log-gain of each of the 1,024 hidden
units, the 1,034 biases and layer 3's 5,120 weights (7,178 numbers), from the float-blind net
rescaled to ``--gain`` thresholds; layers 1 and 2 keep their directions.

Both methods move the same numbers in the same normalised coordinates (each block divided by its
rms at the start rounded to a power of two, so that the start is the net bit for bit; log-gains
as they are) with Adam and the same cosine learning rate over the same
number of steps and batch size; ``exact`` trains the smooth surrogate (the float-aware recipe),
``es`` is OpenAI-ES (antithetic pairs, centred ranks, one minibatch per generation). ES scores its
members with a stacked forward in which layer 1's ``x @ W1`` is computed once and layer 2 is one
GEMM for the whole population (the gains act elementwise around the shared ``W2``); that rounds
differently from the materialised weights, so the script prints the largest logit difference it
saw, and every accuracy is the materialised net's, in exact mode.

``es-readout`` splits the work: ES searches the hidden units (gains, hidden biases: 2,048 numbers,
where every flush happens), and the output layer (layer 3's weights and bias) follows its exact
gradient at the centre on the same minibatch, as any linear readout may: it is linear in its own
parameters, and its gradient goes through no hidden flush. What the readout alone reaches from the
same start bounds how much of the result is the readout's (``--methods exact --blocks
weights.2,biases.2``; ``readout_bound.py`` for the optimum).

    OMP_NUM_THREADS=1 deeplinear train --dataset fashion-mnist --method backprop --steps 4690 \\
        --out runs/fm-blind --quiet
    python benchmarks/es_units.py --start runs/fm-blind --threads 1

``--save DIR`` writes each method's trained net as ``DIR/<method>/final.pt`` (the format of
``deeplinear train``), for ``deeplinear eval`` and ``benchmarks/compare_runs.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from deeplinear import es, evaluate
from deeplinear.arithmetic import get_semantics
from deeplinear.bench import cpu_model
from deeplinear.cli.train import load_weights
from deeplinear.data import load_dataset
from deeplinear.engine import inplace_rule, member_losses
from deeplinear.nets import SCALE_EXP, SIZES_2017, DeepLinear, build_model
from deeplinear.runs import Progress, atomic_save, load_final
from deeplinear.surrogate import make_under
from deeplinear.train.backprop import Config, calibrate, lr_at

SIZES = list(SIZES_2017)
BLOCKS = ("gain.0", "gain.1", "biases.0", "biases.1", "biases.2", "weights.2")
READOUT = ("biases.2", "weights.2")  # method es-readout: exact gradients here, ES elsewhere


class Units:
    """The subspace: a flat vector ``z`` (normalised) <-> the net's parameters."""

    def __init__(self, net: DeepLinear) -> None:
        self.base = {k: v.detach().clone() for k, v in net.named_parameters()}
        start = {"gain.0": torch.zeros(SIZES[1]), "gain.1": torch.zeros(SIZES[2])}
        start |= {k: self.base[k].reshape(-1) for k in BLOCKS[2:]}
        self.slices: dict[str, slice] = {}
        scales, o = [], 0
        for k in BLOCKS:
            n = start[k].numel()
            self.slices[k] = slice(o, o + n)
            rms = 1.0 if k.startswith("gain") else float(start[k].pow(2).mean().sqrt())
            # a power of two, so that z0 * scale gives the start back exactly
            scales.append(torch.full((n,), 2.0 ** round(math.log2(rms))))
            o += n
        self.scale = torch.cat(scales)
        self.z0 = torch.cat([start[k] for k in BLOCKS]) / self.scale

    def mask(self, blocks: list[str]) -> Tensor:
        """1 on the coordinates of ``blocks`` (the ones that move), 0 elsewhere."""
        m = torch.zeros(len(self.z0))
        for k in blocks:
            m[self.slices[k]] = 1.0
        return m

    def part(self, z: Tensor, k: str) -> Tensor:
        """Block ``k`` of ``z`` (``(..., n)``, normalised) in net units."""
        return z[..., self.slices[k]] * self.scale[self.slices[k]]

    def params(self, z: Tensor) -> dict[str, Tensor]:
        """The net's parameters at ``z`` (differentiable)."""
        g1, g2 = self.part(z, "gain.0").exp(), self.part(z, "gain.1").exp()
        w3 = self.part(z, "weights.2").view(SIZES[2], SIZES[3])
        return {"weights.0": self.base["weights.0"] * g1, "biases.0": self.part(z, "biases.0") * g1,
                "weights.1": self.base["weights.1"] / g1[:, None] * g2,
                "biases.1": self.part(z, "biases.1") * g2,
                "weights.2": w3 / g2[:, None], "biases.2": self.part(z, "biases.2")}

    def stacked_logits(self, net: DeepLinear, z: Tensor, x: Tensor) -> Tensor:
        """Logits ``(members, batch, classes)`` of the rows of ``z``, in scaled mode; layer 1's
        GEMM shared, layer 2 one GEMM over all members (rounds unlike the materialised net)."""
        rule, p, b = inplace_rule(net), len(z), len(x)
        g1, g2 = self.part(z, "gain.0").exp()[:, None], self.part(z, "gain.1").exp()[:, None]
        u1 = (x @ self.base["weights.0"]).expand(p, b, SIZES[1]) + self.part(z, "biases.0")[:, None]
        h1 = rule(u1.mul_(g1)).div_(g1)
        u2 = (h1.view(p * b, -1) @ self.base["weights.1"]).view(p, b, -1).mul_(g2)
        if net.semantics.matmul_flush:
            rule(u2)
        h2 = rule(u2.add_(rule(self.part(z, "biases.1")[:, None] * g2))).div_(g2)
        u3 = torch.bmm(h2, self.part(z, "weights.2").view(p, SIZES[2], SIZES[3]))
        if net.semantics.matmul_flush:
            rule(u3)
        return rule(u3.add_(rule(self.part(z, "biases.2"))[:, None]))


def train(method: str, units: Units, net: DeepLinear, data, args) -> tuple[Tensor, float]:
    """Adam on ``z`` for ``args.steps`` steps; returns the final ``z`` and the largest |logit|
    difference between ES's stacked forward and the materialised net (0 for exact)."""
    cfg = Config(steps=args.steps, lr=args.lr, batch_size=args.batch, surrogate="smooth")
    under = make_under(net, cfg.surrogate, cfg.tau)
    z = units.z0.clone().requires_grad_(method == "exact")
    mask = units.mask(args.blocks)
    readout = units.mask([k for k in args.blocks if method == "es-readout" and k in READOUT])
    moving = (mask - readout).nonzero().squeeze(1)
    opt = torch.optim.Adam([z], lr=cfg.lr)
    g = torch.Generator().manual_seed(args.seed)  # minibatches, then ES noise
    x, y = data.x_train, data.y_train
    worst, progress = 0.0, Progress(args.steps, method, every_s=30)
    for s in range(args.steps):
        idx = torch.randint(len(x), (cfg.batch_size,), generator=g)
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, s)
        if method == "exact":
            out = functional_call(net, units.params(z), (x[idx],), {"mode": "scaled",
                                                                     "under": under})
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(out, y[idx]).backward()
            z.grad.mul_(mask)  # Adam leaves a coordinate with zero gradients where it is
        else:
            eps = torch.zeros(args.pop // 2, len(z))
            eps[:, moving] = torch.randn(args.pop // 2, len(moving), generator=g)
            eps = torch.cat([eps, -eps])
            with torch.no_grad():
                members = z + args.sigma * eps
                logits = units.stacked_logits(net, members, x[idx])
                if s % 500 == 0:  # the stacked forward against the real one, member 0
                    real = functional_call(net, units.params(members[0]), (x[idx],))
                    worst = max(worst, float((logits[0] - real).abs().max()))
                r = es.shaped_fitness(member_losses(logits, y[idx]), s)
            z.grad = (r @ eps) / (args.pop * args.sigma)
            if method == "es-readout":  # the output layer is linear in its own parameters
                zz = z.detach().requires_grad_(True)
                out = functional_call(net, units.params(zz), (x[idx],))  # the net's own rule
                F.cross_entropy(out, y[idx]).backward()
                z.grad += zz.grad * readout
        opt.step()
        progress.update(s + 1)
    return z.detach(), worst


def cosines(units: Units, net: DeepLinear, data, args) -> str:
    """How well ES's estimate points at the start: cosines between a pop-``args.pop`` estimate, a
    100x larger one (raw losses, no ranks: the smoothed loss's gradient on this minibatch, up to
    its own noise), the surrogate's gradient and the exact a.e. gradient, on one minibatch; and
    for scale, the minibatch noise exact-gradient training copes with."""
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randint(len(data.x_train), (args.batch,), generator=g)
    x, y, z = data.x_train[idx], data.y_train[idx], units.z0

    def backprop(under, x: Tensor = x, y: Tensor = y) -> Tensor:
        zz = z.clone().requires_grad_(True)
        out = functional_call(net, units.params(zz), (x,), {"mode": "scaled", "under": under})
        F.cross_entropy(out, y).backward()
        return zz.grad

    def estimate(pop: int, shaped: bool) -> Tensor:
        eps = torch.randn(pop // 2, len(z), generator=g)
        eps = torch.cat([eps, -eps])
        with torch.no_grad():
            losses = member_losses(units.stacked_logits(net, z + args.sigma * eps, x), y)
        r = es.shaped_fitness(losses) if shaped else losses - losses.mean()
        return (r @ eps) / (pop * args.sigma)

    def cos(a: Tensor, b: Tensor) -> float:
        return float(a @ b / (a.norm() * b.norm()))

    surrogate = make_under(net, "smooth")
    smooth, exact = backprop(surrogate), backprop(None)
    full = backprop(surrogate, data.x_train, data.y_train)
    big = sum(estimate(args.pop * 10, shaped=False) for _ in range(10))
    small = ", ".join(f"{cos(estimate(args.pop, shaped=True), big):.3f}" for _ in range(3))
    return (f"cosines at the start (sigma {args.sigma:g}, one minibatch): three pop-{args.pop} ES "
            f"estimates vs a pop-{100 * args.pop} one: {small}; pop-{100 * args.pop} vs the "
            f"surrogate's gradient {cos(big, smooth):.3f}, vs the exact a.e. gradient "
            f"{cos(big, exact):.3f}; surrogate vs exact a.e. {cos(smooth, exact):.3f}; the "
            f"surrogate's gradient on this minibatch vs on all {len(data.x_train):,} training "
            f"images {cos(smooth, full):.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", required=True, help="run directory of the float-blind net")
    p.add_argument("--gain", type=float, default=1.0, help="start: hidden std in thresholds")
    p.add_argument("--methods", default="exact,es")
    p.add_argument("--steps", type=int, default=4000, help="Adam steps (ES: generations)")
    p.add_argument("--blocks", default=",".join(BLOCKS),
                   help=f"comma-separated blocks that move (default: all of {', '.join(BLOCKS)})")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--pop", type=int, default=300)
    p.add_argument("--sigma", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cosines", action="store_true", help="first print how ES's estimate "
                   "points at the start")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--save", default=None, metavar="DIR",
                   help="write each method's net to DIR/<method>/final.pt")
    args = p.parse_args(argv)
    methods = args.methods.split(",")
    if not set(methods) <= {"exact", "es", "es-readout"}:
        p.error(f"unknown method in {args.methods!r}; choose from exact, es, es-readout")
    args.blocks = args.blocks.split(",")
    if not set(args.blocks) <= set(BLOCKS):
        p.error(f"unknown block in {','.join(args.blocks)!r}; choose from {', '.join(BLOCKS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset("fashion-mnist", data_dir=args.data_dir)
    net = build_model("deeplinear", SIZES, SCALE_EXP, get_semantics("TF_GPU"), args.seed)
    load_weights(net, args.start, "deeplinear", SIZES)
    source = load_final(args.start) if args.save else None  # its model and data spec
    calibrate(net, data.x_train, args.gain, center=False, output=False)
    units = Units(net)
    start = evaluate.portability(net, data)["test_acc"]
    print(f"# {cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; start "
          f"{args.start} at gain {args.gain:g} (TF_GPU {100 * start['TF_GPU']:.2f}%, IEEE "
          f"{100 * start['IEEE']:.2f}%); {int(units.mask(args.blocks).sum()):,} numbers move "
          f"({','.join(args.blocks)}), {args.steps} steps, batch "
          f"{args.batch}, lr {args.lr:g} cosine, seed {args.seed}; ES pop {args.pop}, sigma "
          f"{args.sigma:g}")
    if args.cosines:
        print(cosines(units, net, data, args), flush=True)
    print("| method | TF_GPU | IEEE | wall | ES forward vs real, max abs logit diff |")
    print("|---|---|---|---|---|")
    for method in methods:
        t0 = time.perf_counter()
        z, worst = train(method, units, net, data, args)
        wall = time.perf_counter() - t0
        trained = build_model("deeplinear", SIZES, SCALE_EXP, get_semantics("TF_GPU"), args.seed)
        trained.load_state_dict(units.params(z))
        acc = evaluate.portability(trained, data)["test_acc"]
        diff = f"{worst:.1e}" if method != "exact" else "-"
        if args.save:
            out = Path(args.save, method)
            out.mkdir(parents=True, exist_ok=True)
            atomic_save({"state_dict": trained.state_dict(), "model": source["model"],
                         "semantics": dataclasses.asdict(trained.semantics),
                         "method": f"es_units {method}", "data": source["data"],
                         "results": {"test_acc": acc}, "wall_s": wall,
                         "settings": vars(args)}, out / "final.pt")
        print(f"| {method} | {100 * acc['TF_GPU']:.2f}% | {100 * acc['IEEE']:.2f}% | "
              f"{wall:.0f} s | {diff} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
