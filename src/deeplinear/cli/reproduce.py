"""``deeplinear reproduce``: the 2017 result and beyond, on built-in data by default."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deeplinear.arithmetic import PRESETS, get_semantics
from deeplinear.cli import SEMANTICS, absolute_path, preset, seed, summary
from deeplinear.data import DATASETS, check_data_dir, check_datasets, data_dir_for
from deeplinear.reproduce import BUDGETS, DEFAULT_DATASETS, command, default_out, reproduce
from deeplinear.train import check_threads, stopped_prefix


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="train every method, evaluate in true float32, report",
                       description=summary(__doc__))
    p.add_argument("--dataset", default=",".join(DEFAULT_DATASETS),
                   help=f"comma-separated, from {', '.join(DATASETS)} (default: %(default)s)")
    p.add_argument("--budget", default="quick", choices=sorted(BUDGETS),
                   help="smoke: seconds, a check that everything runs; quick (default): the "
                        "README's figures, minutes; full: longer training")
    p.add_argument("--out", default=None,
                   help="output directory (default: runs/reproduce, or runs/reproduce-BUDGET "
                        "for another --budget, so a smoke run does not take the real run's place)")
    p.add_argument("--seed", type=seed, default=0,
                   help="seed of data, init, batches and noise (default 0)")
    p.add_argument("--data-dir", default=None, type=absolute_path,
                   help="directory holding the IDX files")
    p.add_argument("--semantics", default=None, type=preset, choices=list(PRESETS),
                   help=f"the deep linear nets' semantics (default: {SEMANTICS})")
    p.add_argument("--study", default="methods", choices=["methods", "regimes"],
                   help="methods: the 2017 table (default); regimes: every float nonlinearity "
                        "(FTZ dead zone, subnormal staircase, absorption, saturation) x ES and "
                        "float-aware backprop")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: 1 for nets up to 256 wide, else torch's own)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed reproduction: reuse finished methods, resume the rest "
                        "(--study regimes: reuse its finished models)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # each once: a repeated name would train its dataset twice (the second time refused)
    datasets = tuple(dict.fromkeys(d.strip() for d in args.dataset.split(",") if d.strip()))
    check_datasets(datasets)
    check_data_dir(datasets, args.data_dir)
    if args.out is None:
        args.out = str(default_out(args.budget))
    check_threads(args.threads, "--threads")
    if args.study == "regimes":
        if args.semantics is not None:
            raise ValueError("--semantics applies to --study methods only (the regimes study sets "
                             "its own semantics per regime); drop it")
        return run_regimes_study(datasets, args)
    if args.resume and not any(Path(args.out).glob("*/*/*.pt")):
        print(f"nothing to resume in {args.out}: starting a new reproduction", file=sys.stderr)
    semantics = get_semantics(args.semantics or SEMANTICS)
    try:
        reproduce(datasets, args.budget, args.out, args.seed, args.data_dir, args.resume,
                  semantics, args.threads)
    except KeyboardInterrupt as e:
        # a trainer's own message names its run's --resume, which is not how a reproduction goes on
        stopped = stopped_prefix(e)
        again = command(datasets, args.budget, args.seed, semantics, args.data_dir, args.threads,
                        resume=True)
        raise KeyboardInterrupt(f"{stopped}finished methods and checkpoints are kept in "
                                f"{args.out}: continue with {again} --out {args.out}") from None
    print(f"wrote {args.out}/results.json, report.md, report.html")
    return 0


def study_threads(partial: Path, asked: int | None, default: int) -> int:
    """The torch threads a regimes study trains with: those its partial results were written
    with (a resume), else ``--threads``, else the methods study's default.

    Why: the study records its thread count and a resume must match it (a wide net's sums depend
    on it); before this default the study took torch's own count, on which small nets train
    slower (:func:`deeplinear.reproduce.default_threads`)."""
    import json

    from deeplinear.reproduce import kept_threads

    try:
        recorded = json.loads(partial.read_text()).get("threads")
    except (OSError, ValueError, AttributeError):
        recorded = None  # none yet; a damaged file is named by the study itself
    return kept_threads(partial, asked, default, recorded if isinstance(recorded, int) else None)


def run_regimes_study(datasets: tuple[str, ...], args: argparse.Namespace) -> int:
    """Write ``regimes_<dataset>.json`` and ``.png`` and ``regimes.md`` (the regime x method
    tables, each with its figure)."""
    import json

    import torch

    from deeplinear.data import load_dataset
    from deeplinear.nets import default_sizes
    from deeplinear.regimes import format_study, plot_study, study
    from deeplinear.reproduce import default_threads
    from deeplinear.runs import atomic_write_text, make_dir

    out = make_dir(Path(args.out))
    partials = {name: out / f"regimes_{name}.partial.json" for name in datasets}
    finals = [out / f"regimes_{name}.json" for name in datasets]
    taken = [p for p in [*partials.values(), *finals] if p.exists()]
    if taken and not args.resume:
        raise FileExistsError(f"{out} already holds a regimes study ({taken[0].name}); add "
                              "--resume to reuse its finished models, or pass another --out")
    tables: list[str] = []
    plots: list[str] = []
    for name, final in zip(datasets, finals, strict=True):
        partial = partials[name]
        if args.resume and final.exists() and not partial.exists():
            partial = final  # checked against the settings like any partial (and named)
        data = load_dataset(name, data_dir=data_dir_for(name, args.data_dir), seed=args.seed)
        torch.set_num_threads(study_threads(  # for the whole command, as --threads promises
            partial, args.threads, default_threads([default_sizes(data.n_features,
                                                                  data.n_classes)])))
        try:
            result = study(name, budget=args.budget, seed=args.seed,
                           data_dir=data_dir_for(name, args.data_dir), progress=True,
                           partial=partial)
        except KeyboardInterrupt as e:
            kept = (f"finished models are kept in {partial}: continue with the same command and "
                    "--resume" if partial.exists() else "no model had finished, nothing is kept")
            raise KeyboardInterrupt(f"{stopped_prefix(e)}{kept}") from None
        atomic_write_text(json.dumps(result, indent=1), final)
        if partial != final:
            partial.unlink(missing_ok=True)
        tables.append(format_study(result))
        plots.append(plot_study(out / f"regimes_{name}.png", result).name)
    sections = [f"{table}\n\n![{plot}]({plot})" for table, plot in zip(tables, plots, strict=True)]
    (out / "regimes.md").write_text("# Regimes study\n\n" + "\n\n".join(sections) + "\n")
    print("\n\n".join(tables))
    print(f"wrote {out}/regimes.md")
    return 0
