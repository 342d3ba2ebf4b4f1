"""Which float regimes can training exploit? OpenAI-ES and float-aware backprop on one deep linear
shape under each regime, scored in the regime's exact arithmetic, against softmax regression and
a ReLU MLP (:func:`deeplinear.regimes.study`).

    python benchmarks/regimes_study.py                          # spirals, quick budget (minutes)
    python benchmarks/regimes_study.py --dataset fashion-mnist --sizes 784,512,512,10 \\
        --methods float-aware                                    # ES there: hours per regime

Writes the JSON result to ``--out`` and its figure beside it (``.png``), and prints the table as
Markdown.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from deeplinear.nets import parse_sizes
from deeplinear.regimes import STUDY_METHODS, STUDY_REGIMES, Regime, format_study, plot_study, study
from deeplinear.reproduce import BUDGETS


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="spirals")
    p.add_argument("--budget", default="quick", choices=list(BUDGETS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", default=None, help="layer widths (default: two hidden layers sized "
                                                 "for the dataset, deeplinear.nets.default_sizes)")
    p.add_argument("--regimes", default=None,
                   help="comma-separated KIND:PARAM[@FORMAT] (default: "
                        + ", ".join(f"{r.kind}:{r.param}@{r.format}" for r in STUDY_REGIMES) + ")")
    p.add_argument("--methods", default="es,float-aware",
                   help="es and/or float-aware (comma-separated)")
    p.add_argument("--es", default=None, metavar="JSON",
                   help='ES settings over the study\'s, e.g. \'{"steps": 1000, "pop": 300, '
                        '"perturbation": "lowrank"}\'')
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="runs/regimes_study.json")
    args = p.parse_args()
    regimes = STUDY_REGIMES
    if args.regimes:
        regimes = tuple(Regime.parse(*spec.split("@")) for spec in args.regimes.split(","))
    names = dict(zip(("es", "float-aware"), STUDY_METHODS, strict=True))
    if any(m not in names for m in args.methods.split(",")):
        raise SystemExit(f"--methods: choose from {', '.join(names)}")
    t0 = time.perf_counter()
    result = study(args.dataset, regimes, args.budget, args.seed,
                   parse_sizes(args.sizes) if args.sizes else None, args.data_dir,
                   args.n_train, args.n_test, progress=True,
                   methods=[names[m] for m in args.methods.split(",")],
                   es_overrides=json.loads(args.es) if args.es else None)
    result["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    plot = plot_study(out.with_suffix(".png"), result)
    print(format_study(result))
    print(f"\n{result['wall_s']:.0f} s; JSON in {out}, figure in {plot}")


if __name__ == "__main__":
    main()
