"""``deeplinear eval``: exact-mode test accuracy of trained weights (a ``final.pt``).

For a deep linear net, the weights run in real float32 under the named semantics (``all``: its own,
every preset and the collapsed affine map). Baselines (softmax, MLP) run in plain float32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deeplinear.arithmetic import PRESETS, get_semantics
from deeplinear.cli import semantics_names, summary
from deeplinear.cli.train import format_results
from deeplinear.evaluate import COLLAPSED
from deeplinear.runs import load_final, rebuild, weights_file

if TYPE_CHECKING:
    from deeplinear.data import Dataset


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval", help="exact-mode accuracy of trained weights under each float semantics",
        description=summary(__doc__))
    p.add_argument("weights", metavar="WEIGHTS", help="a final.pt, or the run directory holding it")
    p.add_argument("--semantics", default="all",
                   help=f"comma-separated, from {', '.join((*PRESETS, COLLAPSED))}; or all "
                        "(default: own, every preset, collapsed)")
    p.add_argument("--dataset", default=None, help="default: the dataset the run trained on")
    p.add_argument("--data-dir", default=None, help="directory with the MNIST-format IDX files")
    p.add_argument("--n-test", type=int, default=None,
                   help="random subset of the test split (default: as trained, else all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def load_data(payload: dict[str, Any], dataset: str | None = None, data_dir: str | None = None,
              n_test: int | None = None) -> Dataset:
    """The dataset the weights were trained on, split as in training (or ``dataset`` instead)."""
    from deeplinear.data import data_dir_for, load_dataset

    spec = payload.get("data", {})
    name = dataset or spec.get("name")
    if name is None:
        raise ValueError("the weights do not say which dataset they trained on; pass --dataset")
    if name != spec.get("name"):
        spec = {}  # another dataset: none of the run's data settings apply
    recorded = data_dir_for(name, spec.get("data_dir"))  # older runs kept one for built-ins
    if data_dir is None and recorded is not None and not Path(recorded).is_dir():
        raise FileNotFoundError(f"{recorded}: the run's data directory is gone; if its files "
                                "moved, pass --data-dir")
    return load_dataset(name, data_dir=data_dir or recorded, seed=spec.get("seed", 0),
                        n_train=spec.get("n_train"),
                        n_test=n_test if n_test is not None else spec.get("n_test"))


def evaluate_payload(payload: dict[str, Any], semantics: str, dataset: str | None = None,
                     data_dir: str | None = None, n_test: int | None = None,
                     progress: bool = False) -> dict[str, Any]:
    from deeplinear import evaluate
    from deeplinear.nets import DeepLinear, io_sizes

    data = load_data(payload, dataset, data_dir, n_test)
    model = rebuild(payload)
    n_in = io_sizes(model)[0]
    if n_in != data.n_features:
        raise ValueError(f"the weights take {n_in} features but {data.name} has {data.n_features}; "
                         "pass the dataset they were trained on")
    names = semantics_names(semantics, (COLLAPSED,))
    if not isinstance(model, DeepLinear):
        if names is not None:
            raise ValueError(f"a {payload['model']['kind']} model runs in plain float32 and has "
                             f"no float semantics to choose; drop --semantics {semantics}")
        return {"test_acc": {"float32": evaluate.accuracy(model, data.x_test, data.y_test)},
                "dataset": data.name, "n_test": len(data.y_test)}
    if progress:
        print(evaluate.exact_notice(model, len(data.y_test), names), file=sys.stderr, flush=True)
    if names is None:
        res = evaluate.portability(model, data)
    else:
        acc = {}
        for name in names:
            if name == COLLAPSED:
                acc[name] = evaluate.collapsed_accuracy(model, data.x_test, data.y_test)
            else:
                model.semantics = get_semantics(name)
                acc[name] = evaluate.accuracy(model, data.x_test, data.y_test, "exact")
        res = {"test_acc": acc, "n_test": len(data.y_test)}
    res["dataset"] = data.name
    return res


def run(args: argparse.Namespace) -> int:
    semantics_names(args.semantics, (COLLAPSED,))  # a typo fails before weights and data load
    payload = load_final(args.weights)
    res = evaluate_payload(payload, args.semantics, args.dataset, args.data_dir, args.n_test,
                           progress=True)
    if args.json:  # what was scored, as the text header says it
        scored = {"weights": str(weights_file(args.weights).resolve()), "model": payload["model"],
                  "method": payload.get("method")}
        if "step" in payload:
            scored["checkpoint_step"] = payload["step"]
        print(json.dumps({**scored, **res}, indent=1))
    else:
        spec = payload["model"]
        method = payload.get("method")
        print(f"{spec['kind']} {'-'.join(map(str, spec['sizes']))} "
              + (f"trained by {method}" if method else "(no training method recorded)")
              + (f" (checkpoint at step {payload['step']})" if "step" in payload else "")
              + f"; {res['dataset']} test set ({res['n_test']})"
              + (", exact mode" if spec["kind"] == "deeplinear" else ""))
        print(format_results(res))
    return 0
