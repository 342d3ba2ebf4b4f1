"""Trainers. Each module (``backprop``, ``es``, ``cmaes``) has the same interface, so callers swap
them freely:

- ``Config``: a dataclass of hyperparameters, JSON-serialisable via ``dataclasses.asdict``, with at
  least ``seed``, ``steps`` (optimisation steps or generations), ``batch_size``, ``eval_every``,
  ``checkpoint_every``, ``eval_n``, ``init_gain`` and ``threads``, checked when ``train`` starts
  (``cfg.validate()``); backprop's and ES's also ``device`` (CMA-ES computes on the CPU);
- ``train(model, data, cfg, run=None, progress=True) -> list[dict]``: trains ``model`` in place and
  returns the metric rows it logged (``step``, ``wall_s``, ``loss``, ``train_acc``, ``test_acc``,
  ...). With ``run.resumed_state`` it continues from that checkpoint and ends bit-identical to an
  uninterrupted run with the same seed. ``progress`` prints a line with rate and ETA to stderr;
  ES's ``train`` also takes ``evaluate`` (the population's scores from elsewhere, e.g. Ray).

The modules are imported on first use (``deeplinear.train.es`` after ``import deeplinear.train``),
not here, so one can be used while another is absent or broken; what they share lives here.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import signal
import sys
import threading
import typing
from collections.abc import Callable
from numbers import Real
from typing import Any, TypeVar

import torch
from torch import nn

from deeplinear.arithmetic import integer
from deeplinear.data import Dataset
from deeplinear.evaluate import accuracy, check_fits
from deeplinear.nets import DeepLinear, check_finite
from deeplinear.signals import catchable

TRAINER_MODULES = ("backprop", "es", "cmaes")


def __getattr__(name: str) -> Any:
    if name in TRAINER_MODULES:
        return importlib.import_module(f"deeplinear.train.{name}")
    raise AttributeError(f"module 'deeplinear.train' has no attribute {name!r}")


FITNESS = ("loss", "error")  # what an evolution strategy minimises on its minibatch


DEVICES = ("cpu", "cuda")


def check_device(name: str) -> torch.device:
    """``name`` as a device this machine can train on, or a one-line error saying what to use."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICES:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name}: torch sees no CUDA device here; use device cpu "
                             "(--device cpu)")
        if (device.index or 0) >= (count := torch.cuda.device_count()):
            raise ValueError(f"device {name}: torch sees {count} CUDA device(s) here; use cuda "
                             f"or cuda:N with N below {count}")
    check_float32_matmul()
    return device


def check_float32_matmul() -> None:
    """Refuse reduced-precision float32 matmuls (TF32 on a GPU; bfloat16 passes in oneDNN on a
    CPU): with them a product's inputs are rounded to fewer bits, and no float32 semantics holds.
    ``torch.backends.cuda.matmul.allow_tf32 = True`` sets this precision to 'high' too; torch's
    per-backend API (``torch.backends.<backend>.matmul.fp32_precision``) is read where used."""
    try:
        precision = torch.get_float32_matmul_precision()
    except RuntimeError:  # torch refuses to answer once the per-backend API asked for less
        precision = None
    if precision == "highest":
        return
    if precision is not None:
        raise ValueError(f"float32 matmul precision is {precision!r} (TF32 or bfloat16 products),"
                         " so float32 semantics do not hold; call "
                         "torch.set_float32_matmul_precision('highest') first")
    for name in ("cuda", "mkldnn"):
        matmul = getattr(getattr(torch.backends, name, None), "matmul", None)
        setting = getattr(matmul, "fp32_precision", "none")
        if setting not in ("ieee", "none"):
            raise ValueError(f"torch.backends.{name}.matmul.fp32_precision is {setting!r}, so "
                             "float32 semantics do not hold; set it to 'ieee' first")
    raise ValueError("torch reports a reduced float32 matmul precision; set "
                     "torch.backends.fp32_precision = 'ieee' first")


def model_device(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live."""
    return next(model.parameters()).device


Train = TypeVar("Train", bound=Callable[..., Any])


def restores_caller_state(train: Train) -> Train:
    """``train(model, ...)`` that gives the model back on its own device, and torch its thread
    count, however the run ends.

    Why: a trainer moves the model where it computes (``cfg.device``; CMA-ES the CPU) and sets
    ``cfg.threads``; a notebook that trains, diverges or is refused midway must not find its
    model elsewhere or its own work on another number of threads.
    """
    @functools.wraps(train)
    def wrapper(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        home, threads = model_device(model), torch.get_num_threads()
        try:
            return train(model, *args, **kwargs)
        finally:
            model.to(home)
            torch.set_num_threads(threads)
    return wrapper  # type: ignore[return-value]


TRAINED = "deeplinear_trained"  # set on a model a trainer here has started: its weights are no init


def mark_trained(model: nn.Module) -> None:
    """Note on ``model`` that a run has begun changing its weights (see
    :func:`deeplinear.train.backprop.calibrate_fresh`)."""
    setattr(model, TRAINED, True)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a run after finished step ``step``; the message says where its
    checkpoint is (a CLI that knows a better command to go on builds its own from ``step``).
    The model holds the weights of that step; ``rows`` are the metric rows logged until then
    (what ``train`` would have returned)."""

    def __init__(self, step: int, where: str = "",
                 rows: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"stopped after step {step}{where}")
        self.step, self.rows = step, rows if rows is not None else []


def stopped_prefix(e: BaseException) -> str:
    """``stopped after step N; `` for an :class:`Interrupted`, empty for a Ctrl-C that knows no
    step (a second one, or one outside a trainer): how a CLI starts the message it builds."""
    return f"stopped after step {e.step}; " if isinstance(e, Interrupted) else ""


_stop = threading.Event()


def stops_cleanly(train: Train) -> Train:
    """``train(...)`` on which a first Ctrl-C or SIGTERM finishes the current step, saves a
    checkpoint and raises :class:`Interrupted` (see :func:`stop_asked`); a second stops at once.

    Why: a signal lands anywhere, e.g. halfway through an optimiser update, so it cannot be saved
    from; and with checkpoints every 500 steps, stopping at once threw away up to 499 steps (all
    of them before the first). SIGTERM too: it is how ``kill``, a job scheduler or a background
    job's owner stops a run (a background job ignores Ctrl-C). Only in the main thread, where
    Python delivers signals, and never for a signal that is ignored (it stays ignored).
    """
    @functools.wraps(train)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        caught = catchable()
        if threading.current_thread() is not threading.main_thread() or not caught:
            return train(*args, **kwargs)

        given = inspect.signature(train).bind(*args, **kwargs).arguments
        then = (", with a checkpoint" if given.get("run") is not None
                else "; no run directory, so no checkpoint: the model keeps that step's weights")

        def ask_to_stop(signum: int, frame: Any) -> None:
            if _stop.is_set():
                raise KeyboardInterrupt
            _stop.set()
            again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\nstopping after this step{then} ({again} again: stop now)",
                  file=sys.stderr, flush=True)

        previous = {s: signal.signal(s, ask_to_stop) for s in caught}
        _stop.clear()
        try:
            rows = train(*args, **kwargs)
            if _stop.is_set():  # asked during the last step, after the trainer's own check
                raise interrupted(given["cfg"].steps, given.get("run"), rows)
            return rows
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)
            _stop.clear()
    return wrapper  # type: ignore[return-value]


def stop_asked() -> bool:
    """Whether Ctrl-C or SIGTERM asked the running trainer to stop. A trainer reads it once per
    step, before deciding to checkpoint, then checkpoints that step and raises
    :func:`interrupted`."""
    return _stop.is_set()


def due(done: int, cfg: Any) -> tuple[bool, bool, bool]:
    """What every trainer does after step ``done``: ``(evaluate, checkpoint, stop)``. It evaluates
    every ``eval_every`` steps and at the last; checkpoints (where it has a run) every
    ``checkpoint_every``, at the last and when a signal asked it to stop (:func:`stop_asked`, read
    once here), so that a stopped run resumes from the step it stopped at."""
    stop, last = stop_asked(), done == cfg.steps
    return (done % cfg.eval_every == 0 or last, done % cfg.checkpoint_every == 0 or last or stop,
            stop)


def record(row: dict[str, Any], rows: list[dict[str, Any]], run: Any) -> None:
    """Keep a metric row, and log it to the run's ``metrics.jsonl`` where there is a run."""
    rows.append(row)
    if run is not None:
        run.log(row)


def show(bar: Any, done: int, cfg: Any, loss: float, rows: list[dict[str, Any]]) -> None:
    """The progress line after step ``done`` (if shown): that step's loss and the test accuracy
    of the latest evaluation."""
    if bar is not None:
        bar.update(done, force=done == cfg.steps, loss=loss,
                   test_acc=rows[-1]["test_acc"] if rows else math.nan)


def interrupted(step: int, run: Any, rows: list[dict[str, Any]]) -> Interrupted:
    """The exception that ends a run stopped by a signal after ``step`` (its checkpoint saved)."""
    return Interrupted(step, f"; checkpoint in {run.dir}: continue with --resume"
                       if run is not None else "; the model holds that step's weights", rows)


def check_config(cfg: Any) -> None:
    """The checks every trainer's ``Config.validate`` shares: step counts >= 1 (the error names
    the ones that are not), every number field of the type it declares (``lr="1e-3"`` would fail
    inside a comparison), init gain and threads."""
    counts = ("steps", "batch_size", "eval_every", "checkpoint_every", "eval_n")
    bad = [f"{name} = {getattr(cfg, name)!r}" for name in counts
           if (n := integer(getattr(cfg, name))) is None or n < 1]
    if bad:
        raise ValueError(f"{', '.join(bad)}: must be an integer >= 1 (flags --steps, "
                         "--batch-size, --eval-every, --checkpoint-every, --eval-n)")
    seed = integer(cfg.seed)
    if seed is None or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {cfg.seed!r}")
    mistyped = []  # fields declared float or int (or None) holding something else, e.g. "1e-3"
    for name, hint in typing.get_type_hints(type(cfg)).items():
        kinds, v = set(typing.get_args(hint)) or {hint}, getattr(cfg, name)
        if v is None:
            continue
        if float in kinds and (isinstance(v, bool) or not isinstance(v, Real)):
            mistyped.append(f"{name} = {v!r} must be a number")
        elif float in kinds and math.isfinite(v) and abs(v) > FLOAT32_MAX:  # e.g. lr=1e308
            mistyped.append(f"{name} = {v!r} is beyond float32's range, in which the trainers "
                            "compute; pass a value below 3.4e38")
        elif int in kinds and float not in kinds and integer(v) is None:
            mistyped.append(f"{name} = {v!r} must be an integer")
    if mistyped:
        raise ValueError("; ".join(mistyped))
    if cfg.init_gain is not None and not cfg.init_gain > 0:
        raise ValueError(f"init_gain must be > 0 or None, got {cfg.init_gain}")
    check_threads(cfg.threads)


FLOAT32_MAX = float(torch.finfo(torch.float32).max)
MAX_THREADS = 1024


def check_threads(threads: int | None, name: str = "threads") -> None:
    """A thread count from 1 to :data:`MAX_THREADS`, or a one-line error: torch's OpenMP pool
    crashed (a segfault, no message) when asked for 100,000 (1,024 ran). Not tied to this
    machine's CPUs: a run trained with 16 threads must resume on a 2-core machine (slower)."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"{name} must be between 1 and {MAX_THREADS}, got {threads}")


def use_threads(cfg: Any) -> None:
    """``cfg.threads`` for torch, once, before the run's first parallel op (see
    :mod:`deeplinear.train.es`); None leaves torch's own."""
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)


def check_evolution_config(cfg: Any) -> None:
    """The checks the evolution strategies' ``Config.validate`` share."""
    check_config(cfg)
    if cfg.fitness not in FITNESS:
        raise ValueError(f"unknown fitness {cfg.fitness!r}; use {', '.join(FITNESS)}")


def check_arguments(data: Any, cfg: Any, config: type[Any]) -> None:
    """``train``'s first check: a :class:`Dataset` and its own trainer's ``Config``, named, not
    an AttributeError from deep inside."""
    if not isinstance(data, Dataset):
        raise ValueError(f"data must be a deeplinear.data.Dataset (load_dataset(name)), got "
                         f"{type(data).__name__}")
    if not isinstance(cfg, config):
        raise ValueError(f"cfg must be a {config.__module__}.Config, got "
                         f"{type(cfg).__module__}.{type(cfg).__name__}")
    cfg.validate()


def check_trainable(model: nn.Module, data: Dataset, cfg: Any) -> None:
    """One-line errors for a model and data no trainer can use together (another width, a batch
    larger than the set, non-finite starting weights, which would be reported as the run's own
    divergence), then :func:`use_threads`."""
    check_fits(model, data)
    if isinstance(model, DeepLinear):
        model.check_float32()
    if cfg.batch_size > len(data.x_train):
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {len(data.x_train)} training "
                         "samples; lower batch_size (--batch-size)")
    check_finite(model, "initialise the model again or load finite weights")
    use_threads(cfg)


def check_evolvable(model: nn.Module, data: Dataset, cfg: Any, method: str) -> None:
    """:func:`check_trainable` for an evolution strategy, which trains deep linear nets only."""
    if not isinstance(model, DeepLinear):
        raise ValueError(f"{method} trains deep linear nets only, not {type(model).__name__}; "
                         "use the backprop trainer")
    check_trainable(model, data, cfg)


def scores(model: nn.Module, data: Dataset, n: int) -> dict[str, float]:
    """Scaled-mode accuracy on the first ``n`` train and test samples, for a metric row."""
    return {"train_acc": accuracy(model, data.x_train[:n], data.y_train[:n]),
            "test_acc": accuracy(model, data.x_test[:n], data.y_test[:n])}
