"""The one-command reproduction: every method on the same data, evaluated in true float arithmetic.

For each dataset it trains softmax regression, a deep linear net by float-blind backprop (the 2017
baseline: can only learn its collapse), by OpenAI-ES and by float-aware backprop (both exploit the
underflow), and a ReLU MLP of the same shape. Every deep linear accuracy is measured in ``exact``
mode under the net's own semantics, and again under every other preset ("portability"). Each
method trains in its own run directory, so ``--resume`` continues a killed reproduction: finished
methods are loaded from ``final.pt``, unfinished ones resume from their checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deeplinear import evaluate, probes
from deeplinear.arithmetic import PRESETS, TF_GPU, Semantics, preset_name
from deeplinear.bench import cpu_model
from deeplinear.collapse import collapse_gap
from deeplinear.data import Dataset, check_datasets, data_dir_for, load_dataset
from deeplinear.nets import MLP, DeepLinear, Mode, SoftmaxRegression, default_sizes, seeded
from deeplinear.report import (
    plot_decision_regions,
    plot_learning_curves,
    plot_occupancy,
    render,
)
from deeplinear.runs import (
    Run,
    atomic_write_text,
    differences,
    load_final,
    make_dir,
    model_spec,
)
from deeplinear.surrogate import FLOAT_AWARE
from deeplinear.train import backprop, es

DEFAULT_DATASETS = ("spirals", "digits")
TRAIN_EVAL_N = 10000  # train accuracy of a deep linear net: the first this many train samples


@dataclass(frozen=True)
class Budget:
    """Steps per method, and the ES settings that fit them.

    ``quick`` keeps the default reproduction (spirals + digits) under 10 minutes on 2 cores. Its
    ES settings: He init, unscaled sigma 0.02, Adam lr 0.003, pop 100, batch 256, 4000
    generations, and 8000 on spirals (``es_per_dataset``), where 4000 left ES still learning on
    some seeds (seeds 0-4: 92.0-97.4% test, seed 1 at 93.5% train; with 8000 95.8-98.0%, ~25 s
    more; ``benchmarks/results/seed_spread/``); digits' 4000 take ~4 minutes already. ``full``
    is the setting measured on Fashion-MNIST 784-512-512-10 (low-rank noise, pop 300: ~6
    generations/s on one core).
    """

    backprop_steps: int
    es: dict[str, Any]
    es_per_dataset: dict[str, dict[str, Any]] = field(default_factory=dict)  # over ``es``

    def es_for(self, dataset: str) -> dict[str, Any]:
        """The ES settings on ``dataset``: ``es`` with that dataset's own entries on top."""
        return {**self.es, **self.es_per_dataset.get(dataset, {})}


_ES_SMALL = {"batch_size": 256, "sigma": 0.02, "sigma_scale": "none", "init_gain": None,
             "lr": 0.003}
BUDGETS = {
    "smoke": Budget(20, {**_ES_SMALL, "steps": 4, "pop": 8}),  # plumbing checks, not results
    "quick": Budget(10000, {**_ES_SMALL, "steps": 4000, "pop": 100}, {"spirals": {"steps": 8000}}),
    "full": Budget(20000, {"steps": 20000, "pop": 300, "perturbation": "lowrank", "rank": 1,
                           "sigma": 0.03, "lr": 0.01}),
}


def check_budget(name: str) -> None:
    """One line for a budget that is none of :data:`BUDGETS`."""
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; use {', '.join(BUDGETS)}")


@dataclass(frozen=True)
class Method:
    name: str
    make: Callable[[list[int], torch.Generator], nn.Module]
    trainer: Any  # a module with Config and train()
    overrides: dict[str, Any]


def methods(budget: Budget, semantics: Semantics, dataset: str = "") -> list[Method]:
    def deep(sizes: list[int], g: torch.Generator) -> nn.Module:
        return DeepLinear(sizes, semantics=semantics, generator=g)

    bp = {"steps": budget.backprop_steps}
    return [
        Method("softmax regression", lambda s, g: SoftmaxRegression(s[0], s[-1]), backprop, bp),
        Method("deep linear, float-blind backprop", deep, backprop, {**bp, "surrogate": "blind"}),
        Method("deep linear, OpenAI-ES", deep, es, budget.es_for(dataset)),
        Method("deep linear, float-aware backprop", deep, backprop,
               {**bp, "surrogate": FLOAT_AWARE}),
        Method("ReLU MLP", lambda s, g: MLP(s, "relu"), backprop, bp),
    ]


def make_config(trainer: Any, seed: int, overrides: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(trainer.Config)}
    return trainer.Config(**{k: v for k, v in {"seed": seed, **overrides}.items() if k in fields})


def run_method(method: Method, data: Dataset, sizes: list[int], seed: int, out: Path,
               resume: bool, data_spec: dict[str, Any] | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Train (or load a finished run of) one method and measure it.

    The run directory's ``final.pt`` has the entries ``deeplinear eval`` and ``train --init-from``
    read. ``resume`` reuses a finished run only if it was made with the same settings."""
    with seeded(seed):  # the baselines' nn.Linear init draws from the global generator
        model = method.make(sizes, torch.Generator().manual_seed(seed))
    cfg = make_config(method.trainer, seed, method.overrides)
    if cfg.batch_size > len(data.y_train):  # a small set (parity: 192) trains on all of it
        cfg = dataclasses.replace(cfg, batch_size=len(data.y_train))
    data_spec = data_spec or {"name": data.name, "seed": seed}
    # "model" and "data" let ``deeplinear eval`` measure an unfinished run's checkpoint.pt
    derived = {"model": model_spec(model), "data": data_spec}
    config = {"method": method.name, "dataset": data.name, "sizes": sizes,
              "trainer": dataclasses.asdict(cfg), **derived}
    semantics = dataclasses.asdict(model.semantics) if isinstance(model, DeepLinear) else None
    if semantics is not None:
        config["semantics"] = semantics
    defaults = {"trainer": dataclasses.asdict(method.trainer.Config()),
                "semantics": dataclasses.asdict(TF_GPU),  # runs older than that entry
                **derived}  # older runs lack these; they follow from the settings above
    final = out / "final.pt"
    if resume and final.exists():
        again = ("its checkpoint is reused" if (out / "checkpoint.pt").exists()
                 else "that method is trained again")  # how this command gets past a torn file
        payload = load_final(final, f"delete it and run the same command again ({again})")
        saved, asked = json.loads(json.dumps([payload.get("config", {}), config]))
        diff = differences(saved, asked, json.loads(json.dumps(defaults)))
        if diff:
            raise ValueError(f"cannot resume {out}: its finished run differs in "
                             f"{', '.join(diff)}; rerun with the same settings or another --out")
        model.load_state_dict(payload["state_dict"])
        curve, wall = payload["curve"], payload["wall_s"]
    else:
        run = Run.open(out, config, resume=resume and (out / "checkpoint.pt").exists(),
                       defaults=defaults)
        try:
            curve = method.trainer.train(model, data, cfg, run=run)
        except BaseException:
            run.close()  # stopped or failed: free for the --resume that follows (save_final
            raise  # gives it back when the run is done)
        wall = (curve[-1]["wall_s"] if curve else 0.0)
        run.save_final({"state_dict": model.state_dict(), "curve": curve, "wall_s": wall,
                        "config": config, "semantics": semantics, "method": method.name,
                        **derived})
    t0 = time.perf_counter()
    res: dict[str, Any] = {"curve": curve, "wall_s": wall}
    if isinstance(model, DeepLinear):
        n = TRAIN_EVAL_N  # exact mode runs subnormal arithmetic: a subset of a large train set
        n_train = min(n, len(data.y_train))
        print(f"  {evaluate.exact_notice(model, len(data.y_test), n_train=n_train)}", flush=True)
        res["train_acc"] = evaluate.accuracy(model, data.x_train[:n], data.y_train[:n], "exact")
        res["portability"] = port = evaluate.portability(model, data)
        res["test_acc"] = port["test_acc"][port["own"]]  # exact mode, its own semantics
        res["evaluated_in"] = f"exact float32, {port['own']}"
        res["occupancy"] = probes.occupancy(model, data.x_test, mode="exact")
        res["collapse_gap"] = collapse_gap(model, data.x_test).as_dict()
    else:
        res["train_acc"] = evaluate.accuracy(model, data.x_train, data.y_train)
        res["test_acc"] = evaluate.accuracy(model, data.x_test, data.y_test)
        res["evaluated_in"] = "float32"
    res["eval_s"] = time.perf_counter() - t0
    return model, res


def same_weights_under_presets(net: DeepLinear) -> dict[str, DeepLinear]:
    """One copy of a trained net per preset semantics: what the same weights compute elsewhere."""
    return {name: net.with_semantics(sem) for name, sem in PRESETS.items()}


@torch.no_grad()
def decision_grid(model: nn.Module, data: Dataset, n: int = 200) -> tuple[Any, Any, Any]:
    """Predicted class over a grid spanning the data (deep linear nets in exact mode)."""
    lo, hi = data.x_test.min(0).values - 0.1, data.x_test.max(0).values + 0.1
    xs, ys = (torch.linspace(float(lo[i]), float(hi[i]), n) for i in (0, 1))
    xx, yy = torch.meshgrid(xs, ys, indexing="xy")
    grid = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    mode: Mode = "exact" if isinstance(model, DeepLinear) else "scaled"
    zz = evaluate.logits(model, grid, mode).argmax(1).reshape(n, n)
    return xx.numpy(), yy.numpy(), zz.numpy()


def paired_tests(models: dict[str, nn.Module], data: Dataset) -> list[dict[str, Any]]:
    """Every pair of methods scored on the same test samples (:func:`evaluate.paired`, exact
    McNemar): which of the table's differences this test set can tell from chance. Deep linear
    nets run in exact mode, as for their test accuracy."""
    correct = {}
    for name, model in models.items():
        mode: Mode = "exact" if isinstance(model, DeepLinear) else "scaled"
        correct[name] = evaluate.logits(model, data.x_test, mode).argmax(1) == data.y_test
    return [{"a": a, "b": b, **evaluate.paired(correct[a], correct[b])}
            for a, b in itertools.combinations(correct, 2)]


def run_task(name: str, data: Dataset, steps: Budget, semantics: Semantics, seed: int, out: Path,
             resume: bool, data_dir: str | None = None,
             count: tuple[int, int] | None = None) -> dict[str, Any]:
    """Every method on one dataset, then the task's plots. ``count`` (methods done before this
    task, methods in the whole reproduction) numbers the progress lines."""
    sizes = default_sizes(data.n_features, data.n_classes)
    models, measured = {}, {}
    task_methods = methods(steps, semantics, name)
    done, total = count or (0, len(task_methods))
    for i, m in enumerate(task_methods, done + 1):
        print(f"[{i}/{total}] {name}: {m.name}", flush=True)
        models[m.name], measured[m.name] = run_method(
            m, data, sizes, seed, out / name / _slug(m.name), resume,
            {"name": name, "data_dir": data_dir, "seed": seed})
        measured[m.name]["run"] = f"{name}/{_slug(m.name)}"  # every figure names its run
    aware = models["deep linear, float-aware backprop"]
    assert isinstance(aware, DeepLinear)  # methods() builds it
    task: dict[str, Any] = {
        "dataset": name, "sizes": sizes, "n_test": len(data.y_test),
        "paired": paired_tests(models, data),
        "description": (f"{data.n_features} features, {data.n_classes} classes, "
                        f"{len(data.y_train)} train / {len(data.y_test)} test; deep linear "
                        f"sizes {'-'.join(map(str, sizes))}, scale 2^{aware.scale_exp}."
                        + (f" Deep linear train accuracy on the first {TRAIN_EVAL_N} train "
                           "samples (exact mode is slow)." if len(data.y_train) > TRAIN_EVAL_N
                           else "")),
        "methods": measured,
    }
    task["plots"] = [
        plot_learning_curves(task, out / f"{name}_curves.png").name,
        plot_occupancy(task, out / f"{name}_occupancy.png").name,
    ]
    task["plots"].append(probes.plot_implicit_activation(
        out / f"{name}_activation.png", same_weights_under_presets(aware),
        title=f"{name}: the float-aware backprop net's weights under each semantics",
        inputs=data.x_test).name)
    if data.n_features == 2:
        panels = {n: decision_grid(m, data) for n, m in models.items()}
        task["plots"].append(plot_decision_regions(
            panels, data.x_test.numpy(), data.y_test.numpy(), out / f"{name}_regions.png",
            f"{name}: predicted class (deep linear nets in exact mode), test points on top",
            data.n_classes).name)
    return task


def default_threads(sizes: list[list[int]]) -> int:
    """One torch thread for nets up to 256 wide, torch's default for wider ones.

    Why: the small nets' GEMMs gain nothing from a second thread, and each op's OpenMP barrier
    stalls whenever another process holds a core. Measured here with one other job running:
    float-aware backprop on 2-64-64-2 ran 54 steps/s with 2 threads and 520 with 1.
    """
    return 1 if max(max(s[1:-1]) for s in sizes) <= 256 else torch.get_num_threads()


def command(datasets: tuple[str, ...], budget: str | Budget, seed: int, semantics: Semantics,
            data_dir: str | None, threads: int | None, resume: bool) -> str:
    """The ``deeplinear reproduce`` line that repeats a run, for its report's header.

    Why every setting that changes the numbers: a header that drops one (say ``--semantics
    IEEE``) names a command that computes a different table. A custom :class:`Budget` or
    :class:`Semantics` (Python API only) shows as its repr.
    """
    sem = _label(semantics)
    flags = [f"--budget {_label(budget)}", f"--seed {seed}", f"--dataset {','.join(datasets)}",
             f"--semantics {sem}"]
    flags += [f"--data-dir {data_dir}"] if data_dir is not None else []
    flags += [f"--threads {threads}"] if threads is not None else []
    flags += ["--resume"] if resume else []
    return " ".join(["deeplinear reproduce", *flags])


SETTINGS_FILE = "reproduction.json"


def claim(out: Path, datasets: tuple[str, ...], settings: dict[str, Any],
          resume: bool) -> int | None:
    """Refuse, before any training, an ``out`` holding runs of a reproduction made with other
    settings (or, without ``resume``, runs of one of ``datasets``), then record ``settings``.
    Returns the thread count the runs there were trained with (None: no runs, or not recorded),
    which :func:`settle_threads` then binds.

    Why up front: each method's run refuses on its own, but only when its turn comes (after
    earlier methods printed and trained), and it names trainer fields (``trainer.steps``) where
    the user changed ``--budget``. The record binds only while runs exist: a reproduction that
    failed before its first run (a download, say) leaves no claim. A directory of an older
    version (runs, no record) gets none either: its per-run checks stay the judge.
    """
    path, saved = out / SETTINGS_FILE, None
    runs = {d.parent.parent.name for d in [*out.glob("*/*/checkpoint.pt"),
                                           *out.glob("*/*/final.pt")]}
    if runs and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a reproduction's settings ({e}); delete it or pass "
                             "another --out") from None
    recorded = saved.pop("threads", None) if isinstance(saved, dict) else None
    if isinstance(saved, dict) and (diff := differences(saved, settings, {})):
        raise ValueError(f"{out} holds a reproduction that differs in {', '.join(diff)}; pass "
                         "another --out, or repeat its own settings to resume it")
    reported = reported_datasets(out)
    dropped = [d for d in reported if d not in datasets]
    if dropped:
        every = ",".join(dict.fromkeys([*reported, *datasets]))
        raise FileExistsError(f"{out}/results.json reports on {', '.join(dropped)} too, which a "
                              f"report of {', '.join(datasets)} alone would replace; pass "
                              f"--dataset {every} --resume to report on all, or another --out")
    done = [d for d in datasets if d in runs]
    if not resume and done:
        raise FileExistsError(f"{out} already holds a reproduction on {', '.join(done)}; add "
                              "--resume to reuse its finished methods and continue the rest, or "
                              "pass another --out")
    if not runs or saved is not None:
        kept = {"threads": recorded} if recorded is not None else {}
        atomic_write_text(json.dumps({**settings, **kept}, indent=1) + "\n", path)
    return recorded


def kept_threads(where: Path, asked: int | None, default: int, recorded: int | None) -> int:
    """The threads a resumed study keeps: those ``where`` was written with, else ``asked``
    (``--threads``), else ``default``; ``--threads`` asking for another than the recorded count is
    refused in one line (why: :func:`settle_threads`)."""
    if recorded is not None and asked is not None and asked != recorded:
        raise ValueError(f"{where} was written with --threads {recorded}, not {asked}: a wide "
                         "net's sums depend on the count; resume without --threads (or with "
                         f"{recorded}), or pass another --out")
    return recorded if recorded is not None else asked or default


def settle_threads(out: Path, asked: int | None, default: int, recorded: int | None) -> int:
    """The torch threads of this invocation, recorded beside the settings.

    Why: a wide net's matmuls split their sums by thread count, so methods trained on 1 thread
    and continued on 2 end on other weights (measured on Fashion-MNIST's 784-512-512-10). A
    resume therefore keeps the count its runs were trained with: by default, and refused where
    ``--threads`` asks for another."""
    used = kept_threads(out, asked, default, recorded)
    path = out / SETTINGS_FILE
    if path.is_file():  # where claim recorded the settings
        settings = json.loads(path.read_text())
        atomic_write_text(json.dumps({**settings, "threads": used}, indent=1) + "\n", path)
    return used


def reported_datasets(out: Path) -> list[str]:
    """The datasets ``out/results.json`` reports on (none if it is missing or unreadable: a
    damaged report protects nothing)."""
    try:
        tasks = json.loads((out / "results.json").read_text())["tasks"]
        return [t["dataset"] for t in tasks]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def default_out(budget: str | Budget) -> Path:
    """``runs/reproduce`` for the README's budget (quick), ``runs/reproduce-BUDGET`` for another,
    so a smoke run does not take the main job's directory."""
    if budget == "quick":
        return Path("runs/reproduce")
    return Path(f"runs/reproduce-{budget if isinstance(budget, str) else 'custom'}")


def reproduce(datasets: str | Sequence[str] = DEFAULT_DATASETS, budget: str | Budget = "quick",
              out: str | Path | None = None, seed: int = 0, data_dir: str | None = None,
              resume: bool = False, semantics: Semantics = TF_GPU,
              threads: int | None = None) -> dict[str, Any]:
    """Train and measure every method on each dataset (one name, or several); write
    results.json, report.md and report.html (from those same results) into ``out`` (default:
    :func:`default_out`), and return the results."""
    datasets = (datasets,) if isinstance(datasets, str) else tuple(datasets)
    check_datasets(datasets)  # before ``out`` is made or claimed
    if isinstance(budget, str):
        check_budget(budget)
    steps = BUDGETS[budget] if isinstance(budget, str) else budget
    out = Path(out) if out is not None else default_out(budget)
    make_dir(out)
    recorded = claim(out, datasets, {"budget": _label(budget), "seed": seed,
                                     "semantics": _label(semantics)}, resume)
    t0 = time.perf_counter()
    loaded = [load_dataset(name, data_dir=data_dir_for(name, data_dir), seed=seed)
              for name in datasets]
    shapes = [default_sizes(d.n_features, d.n_classes) for d in loaded]
    used = settle_threads(out, threads, default_threads(shapes), recorded)
    before = torch.get_num_threads()
    torch.set_num_threads(used)  # once, before any parallel op (see deeplinear.train.es)
    try:
        per_task = len(methods(steps, semantics))
        tasks = [run_task(name, data, steps, semantics, seed, out, resume,
                          data_dir_for(name, data_dir), (k * per_task, len(loaded) * per_task))
                 for k, (name, data) in enumerate(zip(datasets, loaded, strict=True))]
    finally:
        torch.set_num_threads(before)
    cmd = command(datasets, budget, seed, semantics, data_dir, threads, resume)
    smoke = ("**A smoke budget: a check that the pipeline runs, too short for its figures to "
             "mean anything.** " if budget == "smoke" else "")
    results = {
        "header": (f"{smoke}Command: `{cmd}`. Machine: {cpu_model()}, "
                   f"{used} torch thread(s), torch {torch.__version__}. "
                   f"Total wall time {time.perf_counter() - t0:.0f} s"
                   + (" (this invocation; --resume reuses finished methods)" if resume else "")
                   + "."),
        "tasks": tasks,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    render(results, out)
    return results


def _label(setting: str | Budget | Semantics) -> str:
    """A budget's or semantics' name as ``deeplinear reproduce`` takes it; a custom one (Python
    API only) as its repr."""
    if isinstance(setting, Semantics):
        return preset_name(setting) or repr(setting)
    return setting if isinstance(setting, str) else repr(setting)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")
