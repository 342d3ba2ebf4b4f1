"""What the last layer alone can reach on the float-blind net's flushed features.

With layers 1 and 2 fixed, ES (or anything) searching only ``W3, b3`` fits a softmax readout of
the executed hidden values ``h2``; a convex problem, solved here to convergence by L-BFGS on all
training images (features divided by their std; the output layer's own flush left out). Its test
accuracy bounds what a cheap-member subspace around layer 3 can hold, at each start gain
(``train --init-from RUN --init-gain G``; "as trained" is the blind net itself).

    python benchmarks/readout_bound.py --start runs/fm-blind --gains trained,0.5,1,2
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from deeplinear.cli.train import load_weights
from deeplinear.data import load_dataset
from deeplinear.nets import SCALE_EXP, SIZES_2017, DeepLinear, build_model
from deeplinear.train.backprop import calibrate

SIZES = list(SIZES_2017)


def readout(h_train: torch.Tensor, y_train: torch.Tensor, h_test: torch.Tensor,
            y_test: torch.Tensor, l2: float = 1e-5) -> tuple[float, float]:
    """Train and test accuracy of the L2-regularised softmax readout fitted by L-BFGS."""
    s = h_train.std()
    a, b = h_train / s, h_test / s
    w = torch.zeros(a.shape[1], int(y_train.max()) + 1, requires_grad=True)
    c = torch.zeros(w.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, c], lr=1, max_iter=500, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + c, y_train) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train, test = (float(((z @ w + c).argmax(1) == y).float().mean())
                       for z, y in ((a, y_train), (b, y_test)))
    return train, test


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--start", required=True, help="run directory of the float-blind net")
    p.add_argument("--gains", default="trained,0.5,1,2", help="start gains; 'trained': as is")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset)
    print(f"readout of h2, {args.dataset}, start {args.start}, {torch.get_num_threads()} threads")
    print("| start gain | net as is (TF_GPU, scaled) | flushed h1 / h2 | readout train | "
          "readout test | s |\n|---|---|---|---|---|---|")
    for gain in args.gains.split(","):
        net = build_model("deeplinear", SIZES, SCALE_EXP, None, 0)
        assert isinstance(net, DeepLinear)
        load_weights(net, args.start, "deeplinear", SIZES, SCALE_EXP)
        t0 = time.perf_counter()
        with torch.no_grad():
            if gain != "trained":
                calibrate(net, data.x_train, float(gain), center=False, output=False)
            h_train, h_test = (net.trace(x, "scaled")[1][1] for x in (data.x_train, data.x_test))
            acc = float((net(data.x_test).argmax(1) == data.y_test).float().mean())
            dead = [float((h == 0).float().mean()) for _, h in net.trace(data.x_test[:2000])[:2]]
        train, test = readout(h_train, data.y_train, h_test, data.y_test)
        print(f"| {gain} | {100 * acc:.2f}% | {100 * dead[0]:.0f}% / {100 * dead[1]:.0f}% | "
              f"{100 * train:.2f}% | {100 * test:.2f}% | {time.perf_counter() - t0:.0f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
