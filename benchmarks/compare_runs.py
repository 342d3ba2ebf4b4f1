"""Two trained models on the same test set, sample by sample: is the first really better?

Each run is scored in exact mode under the semantics given (default: its own), then
:func:`deeplinear.evaluate.paired` counts the test samples only one of them gets right and gives
the exact McNemar p-value. The question this answers in the README: is the ES net (TF_GPU) above
the best linear model (the float-blind net's weights under IEEE, i.e. its collapse) by more than
the test set's noise?

    python benchmarks/compare_runs.py RUN_A RUN_B [--semantics-a own] [--semantics-b IEEE]
"""

from __future__ import annotations

import argparse
import json

import torch

from deeplinear.arithmetic import get_semantics
from deeplinear.cli.eval import load_final, rebuild
from deeplinear.data import load_dataset
from deeplinear.evaluate import logits, paired
from deeplinear.nets import DeepLinear


def correct(run: str, semantics: str, data) -> torch.Tensor:
    model = rebuild(load_final(run))
    if semantics != "own":
        if not isinstance(model, DeepLinear):
            raise SystemExit(f"{run}: not a deep linear net, it has no float semantics to choose")
        model.semantics = get_semantics(semantics)
    return logits(model, data.x_test, "exact").argmax(1) == data.y_test


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a")
    p.add_argument("run_b")
    p.add_argument("--semantics-a", default="own")
    p.add_argument("--semantics-b", default="own")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_final(args.run_a)["data"]
    if load_final(args.run_b)["data"] != spec:
        raise SystemExit("the runs trained on different data; compare two runs of one dataset")
    data = load_dataset(spec["name"], data_dir=spec.get("data_dir"), seed=spec.get("seed", 0),
                        n_train=spec.get("n_train"), n_test=spec.get("n_test"))
    a = correct(args.run_a, args.semantics_a, data)
    b = correct(args.run_b, args.semantics_b, data)
    acc = {"a": (args.run_a, args.semantics_a, a), "b": (args.run_b, args.semantics_b, b)}
    res = {"dataset": spec["name"], "n_test": len(a), **paired(a, b)}
    for key, (run, semantics, ok) in acc.items():
        res[key] = {"run": run, "semantics": semantics, "test_acc": ok.double().mean().item()}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
