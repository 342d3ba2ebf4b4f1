"""``deeplinear train``: train one model by one method into a resumable run directory.

Methods: ``backprop`` (float-blind for a deep linear net: the 2017 baseline), ``float-aware``
(backprop through the real underflow rule with a surrogate gradient), ``es`` (OpenAI-ES, module
``deeplinear.train.es``) and ``cma-es`` (small nets, ``deeplinear.train.cmaes``). Hyperparameter
flags left out keep the trainer's ``Config`` defaults; a flag the chosen trainer has no field for
is an error, so nothing is silently ignored.

The run directory gets ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` and, at the end,
``final.pt`` with the weights, how to rebuild the model, and its exact-mode accuracies (for a deep
linear net: under its own semantics, every preset and its collapsed affine map).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import nn

from deeplinear.arithmetic import PRESETS, get_semantics
from deeplinear.cli import SEMANTICS, absolute_path, preset, seed, summary
from deeplinear.data import DATASETS, MNIST_LIKE
from deeplinear.es import SIGMA_SCALES
from deeplinear.evaluate import COLLAPSED
from deeplinear.nets import MODELS, SCALE_EXP, build_model
from deeplinear.surrogate import FLOAT_AWARE, KINDS

METHODS = ("backprop", "float-aware", "es", "cma-es")
TRAINERS = {"es": "es", "cma-es": "cmaes"}  # method -> module in deeplinear.train; else backprop
SURROGATES = tuple(k for k in KINDS if k != "blind")  # "blind" is --method backprop
# flags passed through to the trainer's Config field of the same name (argparse dest)
TRAINER_FLAGS = (
    "steps", "batch_size", "lr", "weight_decay", "schedule", "init_gain", "tau", "eval_every",
    "checkpoint_every", "eval_n", "pop", "sigma", "perturbation", "rank", "threads",
    "sigma_scale", "sigma_blocks", "lr_decay", "device",
)


def init_gain(text: str) -> float | str:
    """``--init-gain``: a positive number of thresholds, or ``he`` for plain He init."""
    if text == "he":
        return text
    try:
        gain = float(text)
    except ValueError:
        gain = math.nan
    if not (math.isfinite(gain) and gain > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number or 'he', got {text!r}")
    return gain


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from deeplinear.distributed import BACKENDS
    from deeplinear.train.es import PERTURBATIONS

    p = subparsers.add_parser(
        "train", help="train a deep linear net (or a baseline) into a run directory",
        description=summary(__doc__))
    p.add_argument("--model", choices=MODELS, default=None,
                   help="deeplinear (default), or a baseline: mlp (ReLU, same widths) or softmax "
                        "(regression, no hidden layer)")
    p.add_argument("--method", choices=METHODS, default=None,
                   help="backprop (float-blind for deeplinear), float-aware, es (OpenAI-ES), or "
                   "cma-es (small nets, needs the cma package); default float-aware for "
                   "deeplinear, backprop for mlp and softmax")
    p.add_argument("--surrogate", choices=SURROGATES, default=None,
                   help=f"float-aware gradient of the underflow (default {FLOAT_AWARE})")
    p.add_argument("--dataset", default=None, help=f"{', '.join(DATASETS)} (required, except "
                   "with --resume: --out RUN --resume continues a run with its own settings)")
    p.add_argument("--data-dir", default=None, type=absolute_path,
                   help="directory with the MNIST-format IDX files "
                   f"({', '.join(MNIST_LIKE)}); without it they are downloaded into "
                   "$DEEPLINEAR_CACHE (default ~/.cache/deeplinear) from $DEEPLINEAR_MIRROR "
                   "(comma-separated base URLs) or the built-in mirrors")
    p.add_argument("--data-seed", type=seed, default=None,
                   help="seed of synthetic data and of --n-train/--n-test subsets (default 0)")
    p.add_argument("--n-train", type=int, default=None, help="random subset of the train split")
    p.add_argument("--n-test", type=int, default=None, help="random subset of the test split")
    p.add_argument("--sizes", default=None,
                   help="layer widths, input first, e.g. 784,512,512,10 (default: two hidden "
                        "layers sized for the dataset)")
    p.add_argument("--semantics", default=None, type=preset, choices=list(PRESETS),
                   help=f"float semantics of a deep linear net (default {SEMANTICS})")
    p.add_argument("--scale-exp", type=int, default=None,
                   help=f"deep linear: the scale 2^k (default {SCALE_EXP})")
    p.add_argument("--seed", type=seed, default=None,
                   help="seed of init, batches and noise (default 0)")
    p.add_argument("--out", default=None, help="run directory (default runs/train/<name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out; settings left out come from its config.json, "
                        "settings given must match it")
    p.add_argument("--init-from", type=absolute_path, default=None, metavar="RUN",
                   help="start from the weights of another run of the same model and sizes (its "
                   "final.pt, or its directory: final.pt there, else its latest checkpoint), "
                   "e.g. ES from a float-blind backprop net")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    group = p.add_argument_group("trainer settings (defaults per method: each trainer's Config)")

    class Trainer:  # the group's add_argument, each help ending in the methods' defaults
        @staticmethod
        def add_argument(flag: str, **kw: Any) -> None:
            shown = method_defaults(flag.removeprefix("--").replace("-", "_"))
            kw["help"] = f"{kw['help']} ({shown})" if kw.get("help") and shown else (
                kw.get("help") or shown)
            group.add_argument(flag, **kw)

    t = Trainer()
    t.add_argument("--steps", type=int, help="optimisation steps (es: generations)")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--weight-decay", type=float,
                   help="backprop (AdamW) and es: decoupled decay")
    t.add_argument("--schedule", help="backprop, float-aware: cosine | step | constant")
    t.add_argument("--init-gain", type=init_gain,
                   help="deep linear: pre-activation std at init, in dead-zone half-widths, "
                   "or 'he' (He init, no calibration); with --init-from it rescales the loaded "
                   "net's hidden layers to that std, keeping its collapsed map and logits")
    t.add_argument("--tau", type=float, help="smooth surrogate width, in half-widths")
    t.add_argument("--eval-every", type=int)
    t.add_argument("--checkpoint-every", type=int)
    t.add_argument("--eval-n", type=int, help="samples per split scored at each evaluation")
    t.add_argument("--pop", type=int, help="es, cma-es: population")
    t.add_argument("--sigma", type=float, help="es: noise scale; cma-es: initial step size")
    t.add_argument("--perturbation", choices=PERTURBATIONS, help="es only")
    t.add_argument("--rank", type=int, help="es only: rank of lowrank perturbations")
    t.add_argument("--threads", type=int,
                   help="torch threads, set once at the start (default: torch's own, recorded "
                        "in the run so that --resume elsewhere uses the same count: a wide "
                        "net's sums depend on it; small nets often run faster on 1)")
    t.add_argument("--device", help="backprop, float-aware, es: cpu, cuda or cuda:N "
                   "to train on a GPU (the final exact-mode evaluation runs on the CPU)")
    t.add_argument("--sigma-scale", choices=SIGMA_SCALES,
                   help="es only: divide sigma by sqrt(fan-in) per layer or not")
    t.add_argument("--sigma-blocks", metavar="NAME=FACTOR,...",
                   help="es only: per-block sigma multipliers, 0 freezes the block "
                        "(e.g. weights.0=0: search layers 2-3 and the biases only)")
    t.add_argument("--lr-decay", type=float, help="es only: lr *= this every generation")
    d = p.add_argument_group("where es evaluates its population (deeplinear.distributed)")
    d.add_argument("--backend", default="local", choices=BACKENDS,
                   help="local (default), or ray: Ray workers")
    d.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                   help="ray: join this cluster (default: start Ray on this machine)")
    d.add_argument("--workers", type=int, default=None,
                   help="ray: worker actors (default: the cluster's CPUs // --threads)")
    p.set_defaults(func=run)


def method_defaults(field: str) -> str:
    """``default: backprop, float-aware 3000; es 1000; ...``: a trainer field's default per method
    that has it, read from the trainers' Configs (one source of truth); empty for none."""
    by_module: dict[str, list[str]] = {}
    for method in METHODS:
        by_module.setdefault(TRAINERS.get(method, "backprop"), []).append(method)
    parts = []
    for methods in by_module.values():
        fields = {f.name: f for f in dataclasses.fields(trainer_module(methods[0]).Config)}
        if field in fields and fields[field].default not in (None, "", dataclasses.MISSING):
            parts.append(f"{', '.join(methods)} {fields[field].default!r}")
    return f"default: {'; '.join(parts)}" if parts else ""


def trainer_module(method: str) -> ModuleType:
    """The trainer module of ``method`` (see :data:`TRAINERS`), imported lazily."""
    name = TRAINERS.get(method, "backprop")
    try:
        return importlib.import_module(f"deeplinear.train.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"deeplinear.train.{name}":
            raise
        raise ValueError(f"--method {method} is not available in this installation "
                         f"(no deeplinear.train.{name})") from None


def default_method(model: str) -> str:
    return "float-aware" if model == "deeplinear" else "backprop"


def default_out(args: argparse.Namespace) -> Path:
    """``runs/train/<dataset>_<model>_<method>_seed<seed>``: where a run goes without --out."""
    model = args.model or "deeplinear"
    return Path("runs", "train", f"{args.dataset}_{model}_{args.method or default_method(model)}"
                                 f"_seed{args.seed or 0}")


def check_model_flags(args: argparse.Namespace) -> None:
    """Fill in the defaults that depend on ``--model``; a deep-linear-only flag on a baseline, or
    ``--rank`` without low-rank noise, is an error rather than silently ignored."""
    if args.model != "deeplinear":
        given = [f for f in ("semantics", "scale_exp", "init_gain") if getattr(args, f) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} applies to --model deeplinear, not "
                             f"{args.model}; drop it")
    if args.rank is not None and args.perturbation != "lowrank":
        raise ValueError("--rank applies to --method es --perturbation lowrank; use those or "
                         "drop --rank")
    args.method = args.method or default_method(args.model)
    args.semantics = args.semantics or SEMANTICS
    args.scale_exp = SCALE_EXP if args.scale_exp is None else args.scale_exp


def check_method(model: str, method: str, surrogate: str | None) -> str:
    """The surrogate to train with (``blind`` for plain backprop); one-line error if impossible."""
    if method != "backprop" and model != "deeplinear":
        raise ValueError(f"--method {method} needs --model deeplinear ({model} has no underflow "
                         "to exploit); use --method backprop")
    if surrogate is not None and method != "float-aware":
        raise ValueError(f"--surrogate applies to --method float-aware only, not {method}")
    if method == "float-aware":
        return surrogate or FLOAT_AWARE
    return "blind"


def check_tau_flag(tau: float | None, surrogate: str) -> None:
    """``--tau`` is the smooth surrogate's width: an error anywhere else (the backprop trainer has
    the field for every surrogate, so the generic check would let it through)."""
    if tau is not None and surrogate != "smooth":
        what = "plain backprop" if surrogate == "blind" else f"--surrogate {surrogate}"
        raise ValueError(f"--tau applies to --method float-aware with --surrogate smooth, not "
                         f"{what}; drop it")


def make_config(trainer: ModuleType, args: argparse.Namespace, surrogate: str) -> Any:
    """The trainer's Config from the flags given; a flag it has no field for is an error."""
    fields = {f.name for f in dataclasses.fields(trainer.Config)}
    values: dict[str, Any] = {"seed": args.seed}
    for name in TRAINER_FLAGS:
        value = getattr(args, name)
        if value is None:
            continue
        if name not in fields:
            raise ValueError(f"--{name.replace('_', '-')} does not apply to --method "
                             f"{args.method}; drop it")
        values[name] = None if name == "init_gain" and value == "he" else value
    if "surrogate" in fields:
        values["surrogate"] = surrogate
    cfg = trainer.Config(**values)
    cfg.validate()
    return cfg


def resolve_sizes(args: argparse.Namespace, n_features: int, n_classes: int,
                  dataset: str) -> list[int]:
    from deeplinear.nets import default_sizes, parse_sizes

    if args.sizes is None:
        if args.model == "softmax":
            return [n_features, n_classes]
        return default_sizes(n_features, n_classes)
    sizes = parse_sizes(args.sizes)
    if sizes[0] != n_features or sizes[-1] != n_classes:
        raise ValueError(f"--sizes {args.sizes} must start with {n_features} (the features of "
                         f"{dataset}) and end with {n_classes} (its classes)")
    if args.model == "softmax" and len(sizes) != 2:
        raise ValueError(f"softmax regression has no hidden layer: use --sizes "
                         f"{n_features},{n_classes}")
    if args.model != "softmax" and len(sizes) < 3:
        what = "a deep linear net" if args.model == "deeplinear" else "an MLP"
        raise ValueError(f"{what} needs at least one hidden layer, e.g. --sizes "
                         f"{n_features},64,{n_classes} (or --model softmax)")
    return sizes


def note_lowrank(cfg: Any, sizes: list[int]) -> None:
    """Say so when ``--rank`` makes low rank draw as much noise as full rank: allowed (a study of
    the rank may want it), but slower than full rank and rarely what was meant."""
    from deeplinear import es

    layout = es.Layout.of(sizes)
    low = cfg.strategy(layout).noise_dim
    if low >= layout.n:
        print(f"note: --rank {cfg.rank} draws {low:,} noise values per pair, not fewer than the "
              f"net's {layout.n:,} parameters: low rank saves nothing here; lower --rank or use "
              "--perturbation full", file=sys.stderr)


def load_weights(model: nn.Module, source: str, kind: str, sizes: list[int],
                 scale_exp: int | None = None) -> None:
    """Copy a finished run's weights into ``model`` (``--init-from``); same model, sizes and (for
    a deep linear net) scale: the same weights at another scale are another function."""
    from deeplinear.runs import load_final

    payload = load_final(source)
    spec = payload["model"]
    if spec["kind"] != kind or list(spec["sizes"]) != sizes:
        raise ValueError(f"{source} holds a {spec['kind']} {spec['sizes']}, not a {kind} {sizes}; "
                         "pass a run of the same model and --sizes")
    saved = spec.get("scale_exp")
    if scale_exp is not None and saved is not None and saved != scale_exp:
        raise ValueError(f"{source} was trained at --scale-exp {saved}, not {scale_exp}; pass "
                         f"--scale-exp {saved} (--init-gain moves a net against the dead zone)")
    model.load_state_dict(payload["state_dict"])


def final_results(model: nn.Module, data: Any, progress: bool = False) -> dict[str, Any]:
    """Exact-mode accuracies of the trained model (portability table for a deep linear net)."""
    from deeplinear import evaluate
    from deeplinear.nets import DeepLinear
    from deeplinear.probes import occupancy

    if isinstance(model, DeepLinear):
        if progress:
            print(evaluate.exact_notice(model, len(data.y_test)), file=sys.stderr, flush=True)
        return {**evaluate.portability(model, data),
                "occupancy": occupancy(model, data.x_test, "exact")}
    return {"test_acc": {"float32": evaluate.accuracy(model, data.x_test, data.y_test)}}


LINEAR_FLUSHED = 0.01  # at most this fraction of any hidden layer flushed, for linear_note


def linear_note(model: nn.Module, results: dict[str, Any]) -> str | None:
    """A note for a trained net whose semantics flush but which flushes less than 1% of each
    hidden layer's values and scores exactly what its collapsed affine map scores on the test set:
    what the dead zone did, and where it is.

    Why: nothing else says so. At a small ``--scale-exp`` the dead zone is tiny in the net's
    units and training moves the hidden values out of it (spirals at k=100: 56.2% under every
    semantics and collapsed, ``flushed: 0`` throughout; found by a teacher's audit)."""
    from deeplinear.nets import DeepLinear

    acc, hidden = results["test_acc"], results.get("occupancy", [])[:-1]
    if not (isinstance(model, DeepLinear) and model.semantics.flushes and hidden
            and max(hidden) < LINEAR_FLUSHED and acc.get(results.get("own")) == acc.get(COLLAPSED)):
        return None  # (a net flushing more that ties with its map on a few samples: no claim)
    where = (f"its dead zone is |u| < {model.threshold:g} in the net's units at --scale-exp "
             f"{model.scale_exp} (the 2017 setting is {SCALE_EXP})")
    if not any(hidden):
        return ("note: no hidden value is flushed on the test set, so this net computes its "
                f"collapsed affine map, a linear model; {where}")
    flushed = " / ".join(f"{100 * h:.1f}%" for h in hidden)
    return (f"note: this net scores what its collapsed affine map, a linear model, scores "
            f"({100 * acc[COLLAPSED]:.2f}%), with {flushed} of its hidden values flushed (per "
            f"layer); {where}")

def format_results(results: dict[str, Any]) -> str:
    own = results.get("own")
    lines = [f"{'evaluated under':<16} {'test acc':>8}"]
    for name, acc in results["test_acc"].items():
        mark = "  (own semantics)" if name == own else ""
        lines.append(f"{name:<16} {100 * acc:7.2f}%{mark}")
    return "\n".join(lines)


def resumed_data(out: Path, data_dir: str | None, fingerprint: str) -> tuple[str | None, str]:
    """The data directory and fingerprint a resumed run's config is compared with.

    The run's own directory where the data now comes from another place but is the very same
    (its recorded fingerprint matches; older runs have none), so a run continues after its data
    moved or on another machine. The fingerprint itself is compared only then: a synthetic set
    generated through sin/cos differs in its last bits between CPU instruction sets (measured:
    rings under ATEN_CPU_CAPABILITY=default vs avx2), and such a run must still resume. Else
    ``data_dir`` and ``fingerprint``, whose differences ``Run.open`` names."""
    try:
        saved = json.loads((out / "config.json").read_text())["data"]
        moved, recorded = saved.get("data_dir") != data_dir, saved.get("fingerprint")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return data_dir, fingerprint  # Run.open names what is wrong with the file
    if not moved:
        return data_dir, recorded or fingerprint
    if recorded == fingerprint:
        print(f"reading the run's data from {data_dir or 'its default place'} (trained from "
              f"{saved.get('data_dir') or 'the default place'}: the same data, by fingerprint)",
              file=sys.stderr)
        return saved.get("data_dir"), fingerprint
    return data_dir, fingerprint


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The run config a checkpoint beside a missing ``config.json`` (``path``) holds a copy of
    (``Run.open`` writes it back), or the error that there is no run there to resume."""
    from deeplinear.runs import load_file

    ckpt = path.parent / "checkpoint.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{path}: no run to resume there; pass the run's directory as "
                                "--out, or drop --resume to start a run")
    state = load_file(ckpt, "checkpoint", "start the run again in another --out")
    if not isinstance(state, dict) or not isinstance(state.get("run_config"), dict):
        raise ValueError(f"{path}: missing, and {ckpt} (from an earlier version) keeps no copy; "
                         "restore it or start the run again in another --out")
    return state["run_config"]


def fill_from_run(args: argparse.Namespace) -> None:
    """``--out RUN --resume``: every setting not given on the command line is the run's own, from
    its ``config.json`` (the inverse of the ``config`` that :func:`run` writes).

    Why: a resume had to repeat every flag of the original command, and one left out was a
    changed setting. A flag that is given still has to match the run (``Run.open`` compares the
    whole config), so a wrong inverse here is a one-line refusal, never another run.
    """
    if args.out is None:
        if args.dataset is None:
            raise ValueError("--resume without --dataset continues the run in --out: pass "
                             "--out RUN")
        args.out = str(default_out(args))
    path = Path(args.out) / "config.json"
    saved = None if path.is_file() else checkpoint_config(path)  # its own one-line errors
    try:
        if saved is None:
            saved = json.loads(path.read_text())
        model, data, trainer = saved["model"], saved["data"], saved["trainer"]
        found = {"dataset": data["name"], "data_dir": data.get("data_dir"),
                 "data_seed": data.get("seed"), "n_train": data.get("n_train"),
                 "n_test": data.get("n_test"), "model": model["kind"],
                 "sizes": ",".join(map(str, model["sizes"])), "method": saved["method"],
                 "init_from": saved.get("init_from"), "seed": trainer.get("seed")}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a deeplinear train config ({type(e).__name__}: {e}); pass "
                         "the directory deeplinear train wrote") from None
    if found["method"] not in METHODS or found["model"] not in MODELS:  # reproduce's names
        raise ValueError(f"{args.out} is a run of a reproduction ({found['method']}), not of "
                         "deeplinear train: continue it with deeplinear reproduce --resume --out "
                         f"{Path(args.out).parent.parent}")
    trained = {"dataset": found["dataset"], "model": found["model"], "method": found["method"],
               "surrogate": trainer.get("surrogate") if found["method"] == "float-aware" else None,
               "perturbation": trainer.get("perturbation")}
    for name, value in trained.items():  # these decide which other flags apply: compare first
        given = getattr(args, name)
        if given is not None and value is not None and given != value:
            raise ValueError(f"{args.out} was trained with --{name} {value}, not {given}; resume "
                             "it with its own settings, or start another --out")
    if model["kind"] == "deeplinear":
        gain = saved.get("rescale_gain") if saved.get("init_from") else trainer.get("init_gain")
        found |= {"semantics": saved.get("semantics"), "scale_exp": model.get("scale_exp"),
                  "init_gain": "he" if gain is None else gain}
    found["surrogate"] = trained["surrogate"]
    applies = {"init_gain": False, "tau": trainer.get("surrogate") == "smooth",
               "rank": trainer.get("perturbation") == "lowrank"}
    found |= {name: trainer[name] for name in TRAINER_FLAGS
              if name in trainer and applies.get(name, True)}
    for name, value in found.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def run(args: argparse.Namespace) -> int:
    import torch

    from deeplinear.data import load_dataset
    from deeplinear.runs import Run
    from deeplinear.train import stopped_prefix

    if args.resume:
        fill_from_run(args)
    elif args.dataset is None:
        raise ValueError("--dataset is required (or --out RUN --resume to continue a run)")
    args.model = args.model or "deeplinear"
    args.seed = args.seed or 0
    args.data_seed = args.data_seed or 0
    check_model_flags(args)
    surrogate = check_method(args.model, args.method, args.surrogate)
    check_tau_flag(args.tau, surrogate)
    trainer = trainer_module(args.method)
    rescale = None  # --init-gain with --init-from: the loaded net's rescaling, not the trainer's
    if args.init_from is not None:  # the trainer starts from the loaded weights, not its init
        rescale = None if args.init_gain == "he" else args.init_gain
        args.init_gain = "he"
    if args.threads is None and not args.resume and args.backend != "ray":
        args.threads = torch.get_num_threads()  # recorded: a resume keeps it (see --help)
    cfg = make_config(trainer, args, surrogate)
    if args.threads is not None:  # checked by make_config, before torch is asked for them
        torch.set_num_threads(args.threads)  # the whole command's, from before data loading:
        # the final evaluation too (a trainer gives back the count it found)
    semantics = get_semantics(args.semantics)
    if args.resume and args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise FileNotFoundError(f"{args.data_dir}: the run's data directory is gone; if its "
                                "files moved, pass --data-dir with their new place")
    data = load_dataset(args.dataset, data_dir=args.data_dir, seed=args.data_seed,
                        n_train=args.n_train, n_test=args.n_test)
    fingerprint = data.fingerprint()
    sizes = resolve_sizes(args, data.n_features, data.n_classes, args.dataset)
    if getattr(cfg, "perturbation", None) == "lowrank":
        note_lowrank(cfg, sizes)
    model = build_model(args.model, sizes, args.scale_exp, semantics, args.seed)
    if args.init_from is not None and not args.resume:  # on resume the checkpoint holds them
        load_weights(model, args.init_from, args.model, sizes, args.scale_exp)
        if rescale is not None:
            from deeplinear.nets import DeepLinear
            from deeplinear.train.backprop import calibrate

            assert isinstance(model, DeepLinear)  # check_model_flags: --init-gain is deep only
            calibrate(model, data.x_train, rescale, center=False, output=False)
    data_spec = {"name": args.dataset, "data_dir": args.data_dir, "seed": args.data_seed,
                 "n_train": args.n_train, "n_test": args.n_test, "fingerprint": fingerprint}
    out = Path(args.out) if args.out else default_out(args)
    if args.resume:
        data_spec["data_dir"], data_spec["fingerprint"] = resumed_data(out, args.data_dir,
                                                                       fingerprint)
    config = {"model": {"kind": args.model, "sizes": sizes, "scale_exp": args.scale_exp},
              "semantics": args.semantics, "method": args.method, "data": data_spec,
              "trainer": dataclasses.asdict(cfg), "init_from": args.init_from,
              "rescale_gain": rescale}
    run_dir = Run.open(out, config, resume=args.resume,
                       defaults={"trainer": dataclasses.asdict(trainer.Config()),
                                 "rescale_gain": None,  # runs written before these entries:
                                 "data": {"fingerprint": fingerprint}})
    if run_dir.resumed_state is not None:
        print(f"resuming {out} from step {run_dir.resumed_state['step']}", file=sys.stderr)
    from deeplinear.distributed import backend

    try:
        with backend(args.backend, model, data, cfg, method=args.method, workers=args.workers,
                     address=args.ray_address) as extra:
            rows = trainer.train(model, data, cfg, run=run_dir, progress=not args.quiet, **extra)
        results = final_results(model, data, progress=not args.quiet)
    except KeyboardInterrupt as e:
        # the trainer's Interrupted knows its step; a second Ctrl-C, or one during the final
        # evaluation, knows none: either way, name the command that goes on
        run_dir.close()
        stopped = stopped_prefix(e)
        raise KeyboardInterrupt(
            f"{stopped}latest checkpoint in {out}: continue with deeplinear train --out {out} "
            "--resume" if (out / "checkpoint.pt").exists() else
            f"{stopped}before the first checkpoint in {out}: run the same command again to "
            "start over") from None
    except Exception:
        if not args.resume:
            run_dir.discard_if_unstarted()
        run_dir.close()
        raise
    run_dir.save_final({
        "state_dict": model.state_dict(), "model": config["model"],
        "semantics": dataclasses.asdict(semantics), "method": args.method,
        "surrogate": surrogate, "results": results,
        "data": {**data_spec, "data_dir": args.data_dir},  # where eval finds it (data moved)
        "wall_s": rows[-1]["wall_s"] if rows else 0.0,
    })
    print(f"{args.method} {args.model} {'-'.join(map(str, sizes))} on {args.dataset}: "
          f"{cfg.steps} steps, {rows[-1]['wall_s'] if rows else 0:.1f} s; run in {out}")
    print(format_results(results))
    if (note := linear_note(model, results)) is not None:
        print(note, file=sys.stderr)
    return 0
