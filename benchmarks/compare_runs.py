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
from typing import Any

import torch

from deeplinear.arithmetic import get_semantics
from deeplinear.cli.eval import load_data
from deeplinear.data import Dataset
from deeplinear.evaluate import logits, paired
from deeplinear.nets import DeepLinear
from deeplinear.runs import load_final, rebuild


def correct(payload: dict[str, Any], semantics: str, data: Dataset) -> torch.Tensor:
    """Which test samples the run's model gets right, in exact mode under ``semantics``."""
    model = rebuild(payload)
    if semantics != "own":
        if not isinstance(model, DeepLinear):
            raise SystemExit("a baseline has no float semantics to choose; use --semantics-* own")
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
    runs = {"a": (args.run_a, args.semantics_a), "b": (args.run_b, args.semantics_b)}
    try:
        payloads = {key: load_final(run) for key, (run, _) in runs.items()}
    except (OSError, ValueError) as e:  # load_final's one-line messages name the file and fix
        raise SystemExit(f"compare_runs: {e}") from None
    if payloads["a"]["data"] != payloads["b"]["data"]:
        raise SystemExit("the runs trained on different data; compare two runs of one dataset")
    data = load_data(payloads["a"])
    ok = {key: correct(payloads[key], semantics, data) for key, (_, semantics) in runs.items()}
    res = {"dataset": data.name, "n_test": len(data.y_test), **paired(ok["a"], ok["b"])}
    for key, (run, semantics) in runs.items():
        res[key] = {"run": run, "semantics": semantics, "test_acc": ok[key].double().mean().item()}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
