"""Run directories: config, JSONL metrics, atomic checkpoints, final weights, progress with ETA.

Why: long runs must never lose work and must resume to the *same* result. A checkpoint is written
to a temporary file and renamed over the old one (atomic on POSIX), so a kill at any moment leaves
either the previous or the new checkpoint, never a torn one. On resume, metric rows logged after
the checkpoint are dropped, so the resumed run's metrics.jsonl matches an uninterrupted run's
(timing columns aside).

Layout of a run directory::

    config.json        what was asked for (resume refuses a different one)
    metrics.jsonl      one JSON object per evaluation (always has "step")
    checkpoint.pt      latest resumable state (model, optimizer/strategy, RNG, step)
    final.pt           trained weights: {"state_dict", "model", "semantics", ...}
    .lock              the PID of the process writing the run (locked while it runs)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import pickle
import shutil
import sys
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from deeplinear.arithmetic import Semantics, get_semantics
from deeplinear.nets import MLP, SCALE_EXP, DeepLinear, SoftmaxRegression, build_model, nonfinite


def make_dir(d: Path) -> Path:
    """``mkdir -p d``, or a one-line error naming the directory and the fix."""
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create directory {d}: {e.strerror}; pass a writable --out") from None
    return d


LOCK = ".lock"
_LOCKED: dict[Path, TextIO] = {}  # run directories this process holds, with their lock files


def lock_dir(d: Path) -> None:
    """Hold an exclusive ``flock`` on ``d/.lock`` until this process ends (the OS drops it then,
    ``kill -9`` included), or raise a one-line error naming the process that holds it. Why: a
    second ``--resume`` of a run still training would interleave both processes' metrics and
    checkpoints. Reentrant within a process (a run resumed in the same session). A platform or
    file system without flock runs unlocked."""
    key = d.resolve()
    if key in _LOCKED:
        return
    try:
        import fcntl
    except ImportError:  # Windows
        return
    try:
        f = open(d / LOCK, "a+")  # noqa: SIM115 (held open on purpose: it is the lock)
    except OSError as e:  # a read-only directory or file system
        raise OSError(f"cannot write in {d}: {e.strerror or e}; pass a writable --out") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise FileExistsError(f"{d} is in use by another process (PID {holder}); wait for it to "
                              "finish or stop it, or use another --out") from None
    except OSError:  # a file system without locks (some network mounts)
        f.close()
        return
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _LOCKED[key] = f


def unlock_dir(d: Path, remove: bool = False) -> None:
    """Release ``d``'s lock (a finished run: a notebook that trained it must not keep it from a
    terminal), and with ``remove`` delete the file (a run discarded before it started; never
    while others may wait on it: a second process could then lock a new file beside them)."""
    f = _LOCKED.pop(d.resolve(), None)
    if f is not None:
        f.close()
        if remove:  # best effort: it runs while another error is being reported
            with contextlib.suppress(OSError):
                (d / LOCK).unlink(missing_ok=True)


def first_line(e: BaseException) -> str:
    """An error's first line (torch appends frames and advice), or its type if it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` via a temporary file and ``os.replace``; a failed write (a full
    disk: torch reports it as "unexpected pos ...") removes the temporary file and says so in one
    line, the previous ``path`` untouched."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)
        full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            "unexpected pos" in reason)  # how torch's zip writer meets a full disk
        fix = "free some space" if full else "make it writable"
        if path.exists():
            then = f"the previous one is intact; {fix}, then continue with --resume"
        elif (path.parent / "checkpoint.pt").exists():  # e.g. final.pt of a run: resumable
            then = f"{fix}, then continue with --resume (the run's checkpoint is intact)"
        else:
            then = f"{fix}, then run the same command again"
        free = shutil.disk_usage(path.parent).free / 2**20
        raise OSError(f"cannot write {path} ({reason}; {free:.1f} MiB free on its disk): "
                      f"{then}") from None
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_file(path: Path, what: str, fix: str) -> Any:
    """``torch.load`` of a run's file (on the CPU: trainers move it), or a one-line error that
    names the file and ``fix``: a damaged or foreign file must not surface as an unpickling
    traceback. Each entry's CRC-32 (torch's zip format writes them) is checked first: torch.load
    does not, and a flipped byte inside the stored tensors would otherwise load as other weights
    without a word. (A file in torch's legacy, non-zip format has none to check.)"""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
            if damaged is not None:
                raise ValueError(f"{damaged} fails its CRC check")
        return torch.load(path, weights_only=False, map_location="cpu")
    except (FileNotFoundError, PermissionError):
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, OSError,
            NotImplementedError, zlib.error, AttributeError, ValueError) as e:
        # the first sentence: torch appends a paragraph of advice to a damaged zip archive's
        first = first_line(e).split(". ")[0]
        raise ValueError(f"{path}: corrupt or not a deeplinear {what} ({first}); {fix}") from None


@dataclass
class Run:
    """A run directory opened for writing (fresh) or for resuming."""

    dir: Path
    config: dict[str, Any]
    resumed_state: dict[str, Any] | None = None
    rows: int = 0  # metrics rows in the file, recorded in each checkpoint

    @classmethod
    def open(cls, directory: str | Path, config: dict[str, Any], resume: bool = False,
             defaults: dict[str, Any] | None = None) -> Run:
        """``defaults`` (nested like ``config``) holds the values of settings added since a run
        was written: a saved config that lacks one still resumes when the new run asks for its
        default, which by that contract reproduces what the older code did.

        The directory is locked while the run is open (:func:`lock_dir`); a refused open gives
        the lock back (and removes a lock file it made), :meth:`close` and :meth:`save_final`
        give it back."""
        d = Path(directory)
        made, held = not (d / LOCK).exists(), d.resolve() in _LOCKED
        try:
            return cls._open(d, config, resume, defaults)
        except BaseException:
            if not held:  # this open took the lock (an open run of this process keeps it)
                unlock_dir(d, remove=made)
            raise

    def close(self) -> None:
        """Give the directory's lock back (a run stopped or failed; the process goes on)."""
        unlock_dir(self.dir)

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        """``with Run.open(...) as run:`` gives the lock back however the block ends, so a run
        driven from Python does not keep its directory from a later ``--resume`` elsewhere."""
        self.close()

    @classmethod
    def _open(cls, d: Path, config: dict[str, Any], resume: bool,
              defaults: dict[str, Any] | None) -> Run:
        cfg_path, ckpt = d / "config.json", d / "checkpoint.pt"
        if d.is_dir():
            lock_dir(d)
        if resume:
            if not ckpt.exists():
                if (d / "final.pt").exists():
                    raise FileNotFoundError(_finished(d))
                raise FileNotFoundError(f"cannot resume: no checkpoint in {d}; drop --resume")
            state = load_file(ckpt, "checkpoint", "start the run again in another --out")
            if not isinstance(state, dict) or "step" not in state:
                raise ValueError(f"{ckpt}: not a deeplinear checkpoint (no step); start the run "
                                 "again in another --out")
            # the checkpoint's copy of the config, as JSON would give it back (tuples as lists)
            recorded = json.loads(json.dumps(state["run_config"])) if "run_config" in state \
                else None
            try:
                saved = json.loads(cfg_path.read_text())
            except FileNotFoundError:
                if recorded is None:  # a checkpoint from before run_config was saved in it
                    raise ValueError(f"{cfg_path}: missing; restore it or start the run again "
                                     "in another --out") from None
                saved = recorded  # written back below, once the settings are known to match
            except (OSError, ValueError) as e:
                raise ValueError(f"{cfg_path}: not valid JSON ({e}); restore it or start the "
                                 "run again in another --out") from None
            if not isinstance(saved, dict):
                raise ValueError(f"{cfg_path}: not a run's config (a JSON object); restore it or "
                                 "start the run again in another --out")
            diff = _changes(saved, config, defaults or {})
            if diff:
                raise ValueError(f"cannot resume {d}: config differs in {', '.join(diff)}; "
                                 "resume with the run's own settings or start another --out")
            # (saved is recorded where config.json was missing: judged just above)
            if recorded is not None and recorded is not saved and _changes(
                    recorded, config, defaults or {}):
                raise ValueError(f"{ckpt}: written by another run than {cfg_path} describes; "
                                 "restore this run's checkpoint or start again in another --out")
            if not cfg_path.exists():
                atomic_write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", cfg_path)
            run = cls(d, config, state)
            run.rows = run._truncate_metrics(state["step"])
            expected = state.get("metrics_rows")  # checkpoints before it was recorded: None
            if expected is not None and run.rows != expected:
                raise ValueError(f"{d / 'metrics.jsonl'}: {run.rows} rows up to step "
                                 f"{state['step']}, but the checkpoint was written after "
                                 f"{expected}, so the run's history was "
                                 f"{'cut' if run.rows < expected else 'added to'}; restore it "
                                 "or start the run again in another --out")
            return run
        if (d / "checkpoint.pt").exists() or (d / "final.pt").exists():
            raise FileExistsError(_taken(d, config, defaults or {}))
        fresh = json.dumps(config, indent=2, sort_keys=True) + "\n"
        # only the same run, stopped before its first checkpoint, may be written over
        written = cfg_path.exists() or (d / "metrics.jsonl").exists()
        if written and not (cfg_path.is_file() and cfg_path.read_text() == fresh):
            raise FileExistsError(f"{d} holds a config.json or metrics.jsonl of other settings "
                                  "(or not a run's) that this run would overwrite; use another "
                                  "--out")
        make_dir(d)
        lock_dir(d)
        atomic_write_text(fresh, cfg_path)
        (d / "metrics.jsonl").write_text("")
        return cls(d, config)

    def discard_if_unstarted(self) -> None:
        """Remove a fresh run's ``config.json`` and empty metrics (and the directory, if that
        leaves it empty) when it failed before its first checkpoint: a setup error should not
        leave a directory that looks like a run."""
        if (self.dir / "checkpoint.pt").exists() or (self.dir / "final.pt").exists():
            return
        unlock_dir(self.dir, remove=True)
        with contextlib.suppress(OSError):  # best effort, as above: the first error is the news
            for name in ("config.json", "metrics.jsonl"):
                (self.dir / name).unlink(missing_ok=True)
            self.dir.rmdir()

    def _truncate_metrics(self, step: int) -> int:
        """Keep the rows up to the checkpoint's ``step`` and return how many. A last line cut
        short (the process died while appending it) is dropped; damage anywhere else is an error
        naming the line."""
        path = self.dir / "metrics.jsonl"
        fix = "restore it or start the run again in another --out"
        try:
            lines = [r for r in path.read_text().splitlines() if r]
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing, so the run's history is lost; {fix}"
                                    ) from None
        rows: list[str] = []
        last = 0
        for i, line in enumerate(lines):
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                if i == len(lines) - 1:
                    break
                raise ValueError(f"{path}: line {i + 1} is not a metrics row; {fix}")
            if i > 0 and row["step"] <= last:  # every trainer logs at growing steps
                raise ValueError(f"{path}: line {i + 1} (step {row['step']}) does not follow "
                                 f"step {last}; {fix}")
            last = row["step"]
            if row["step"] <= step:
                rows.append(line)
        atomic_write_text("".join(r + "\n" for r in rows), path)
        return len(rows)

    def log(self, row: dict[str, Any]) -> None:
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        self.rows += 1

    def metrics(self) -> list[dict[str, Any]]:
        text = (self.dir / "metrics.jsonl").read_text()
        return [json.loads(r) for r in text.splitlines() if r]

    def checkpoint(self, state: dict[str, Any]) -> None:
        """Save resumable state; must contain ``step``. The run's config is saved with it, so a
        checkpoint copied in from another run is refused on resume instead of half-loaded; so is
        the count of metrics rows, so a resume notices history lost from ``metrics.jsonl``."""
        atomic_save({**state, "run_config": self.config, "metrics_rows": self.rows},
                    self.dir / "checkpoint.pt")

    def resumed(self, *keys: str) -> dict[str, Any] | None:
        """The checkpoint's state when resuming (else None), checked to hold ``keys``: a
        trainer names what it reads, so a hand-edited checkpoint fails here in one line."""
        state = self.resumed_state
        missing = [k for k in keys if state is not None and k not in state]
        if missing:
            raise ValueError(f"{self.dir / 'checkpoint.pt'}: no {', '.join(missing)} in it, so "
                             "not this trainer's checkpoint; start the run again in another --out")
        return state

    def save_final(self, payload: dict[str, Any]) -> Path:
        path = self.dir / "final.pt"
        atomic_save(payload, path)
        unlock_dir(self.dir)  # done: free for eval, a --resume that finds nothing to do, ...
        return path


def weights_file(path: str | Path) -> Path:
    """The file :func:`load_final` reads for ``path``: itself, or a run directory's
    ``final.pt``, else its ``checkpoint.pt``; a one-line error where there is none."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("final.pt", "checkpoint.pt") if (path / n).exists()]
        if not found:
            methods = sorted(path.glob("*/*/final.pt"))  # a reproduction: one run per method
            fix = (f"pass one method's run directory, e.g. {methods[0].parent}" if methods
                   else "pass a run directory that deeplinear train or reproduce wrote")
            raise FileNotFoundError(f"{path}: no final.pt or checkpoint.pt here; {fix}")
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file; pass a run's final.pt (train it first)")
    return path


def load_final(path: str | Path, fix: str | None = None) -> dict[str, Any]:
    """A ``final.pt`` payload, checked: readable, complete, finite weights.

    A run's ``checkpoint.pt`` works too (with the run's ``config.json`` beside it), so an
    unfinished or killed run can be measured at its last checkpoint; a run directory without a
    ``final.pt`` falls back to its checkpoint. ``fix`` replaces the advice for a damaged or
    foreign file (a caller that knows a better way past it: ``reproduce`` retrains).
    """
    path = weights_file(path)
    payload = load_file(path, "final.pt", fix or "retrain or pass the right file")
    if isinstance(payload, dict) and "state_dict" not in payload and "step" in payload:
        payload = from_checkpoint(payload, path)
    missing = [k for k in ("state_dict", "model")
               if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"{path}: not a deeplinear final.pt (missing {', '.join(missing)}); "
                         f"{fix or 'pass the final.pt that deeplinear train or reproduce wrote'}")
    spec = payload["model"]
    malformed = [k for k, ok in (
        ("state_dict", isinstance(payload["state_dict"], dict)),
        ("model", isinstance(spec, dict) and {"kind", "sizes"} <= spec.keys()),
        ("semantics", isinstance(payload.get("semantics") or {}, dict)),
        ("data", isinstance(payload.get("data", {}), dict))) if not ok]
    if malformed:
        raise ValueError(f"{path}: malformed {', '.join(malformed)} entry; "
                         f"{fix or 'pass the final.pt that deeplinear train or reproduce wrote'}")
    bad = nonfinite(payload["state_dict"].items())
    if bad:
        raise ValueError(f"{path}: non-finite weights in {', '.join(bad)}; the run diverged, "
                         "retrain with a lower lr (--lr)")
    return payload


def rebuild(payload: dict[str, Any]) -> torch.nn.Module:
    """The trained model a :func:`load_final` payload describes: its kind, sizes, scale and
    semantics, with its weights."""
    spec = payload["model"]
    try:
        sem = Semantics(**payload["semantics"]) if payload.get("semantics") else None
    except (TypeError, ValueError) as e:
        raise ValueError(f"the weights' semantics entry is not valid ({e}); pass the final.pt "
                         "that deeplinear train or reproduce wrote") from None
    model = build_model(spec["kind"], spec["sizes"], spec.get("scale_exp", SCALE_EXP), sem)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:  # "Error(s) in loading state_dict for X:" then one line per problem
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise ValueError(f"weights do not fit a {spec['kind']} {spec['sizes']}: {detail}; "
                         "pass the final.pt of a run of this model") from None
    return model


def load_model(path: str | Path) -> torch.nn.Module:
    """A trained model from a run: ``path`` a ``final.pt``, a checkpoint or the run directory
    (as :func:`load_final`), rebuilt with the arithmetic it trained under."""
    return rebuild(load_final(path))


def model_spec(model: torch.nn.Module) -> dict[str, Any]:
    """How ``deeplinear eval`` rebuilds ``model`` (the ``model`` entry of a final.pt)."""
    if isinstance(model, DeepLinear):
        return {"kind": "deeplinear", "sizes": model.sizes, "scale_exp": model.scale_exp}
    if isinstance(model, SoftmaxRegression):
        return {"kind": "softmax", "sizes": [model.linear.in_features, model.linear.out_features]}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return {"kind": "mlp", "sizes": [linears[0].in_features] + [m.out_features for m in linears]}


def save_model(model: torch.nn.Module, path: str | Path, **extra: Any) -> Path:
    """Write ``model`` to ``path`` as a ``final.pt`` that :func:`load_model` and ``deeplinear
    eval`` read back as the same function: weights, kind, sizes, scale and semantics.

    Why not ``torch.save(net.state_dict())``: a state_dict holds the weights only, and the same
    weights under another semantics or scale are another function. ``extra`` entries are kept
    (e.g. ``data={"name": "spirals", "seed": 0}``, which lets ``deeplinear eval`` find the test
    set without ``--dataset``). Written atomically; non-finite weights are refused (no loader
    would take them)."""
    if isinstance(model, DeepLinear) and model.regime is not None:
        raise ValueError(f"this net runs regime {model.regime.label}, which a final.pt does not "
                         "record; save its state_dict and rebuild it with the same regime")
    if not isinstance(model, DeepLinear | MLP | SoftmaxRegression):
        raise ValueError(f"save_model keeps deeplinear's models (DeepLinear, MLP, "
                         f"SoftmaxRegression), not {type(model).__name__}")
    bad = nonfinite(model.state_dict().items())
    if bad:
        raise ValueError(f"non-finite weights in {', '.join(bad)}: no loader would take them")
    semantics = dataclasses.asdict(model.semantics) if isinstance(model, DeepLinear) else None
    path = Path(path)
    make_dir(path.parent)
    atomic_save({**extra, "state_dict": model.state_dict(), "model": model_spec(model),
                 "semantics": semantics}, path)
    return path


def from_checkpoint(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """The parts of a final.pt that a checkpoint and its run's ``config.json`` hold.

    ``deeplinear train`` records a preset's name; ``reproduce`` records the semantics itself
    (none for its baselines)."""
    try:
        config = json.loads((path.parent / "config.json").read_text())
        semantics = config.get("semantics")
        if isinstance(semantics, str):
            semantics = dataclasses.asdict(get_semantics(semantics))
        return {"state_dict": ckpt["model"], "model": config["model"], "data": config["data"],
                "semantics": semantics, "method": config["method"], "step": ckpt["step"]}
    except KeyError as e:
        raise ValueError(f"{path.parent / 'config.json'} has no {e} entry: the run was not "
                         "written by deeplinear train or reproduce, and only those record how "
                         "to rebuild its model; a run driven from Python saves its model with "
                         "deeplinear.runs.save_model(model, RUN / 'final.pt')") from None
    except (OSError, TypeError, AttributeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: a checkpoint needs its run's config.json beside it "
                         f"({type(e).__name__}: {e}); pass the run directory") from None


def differences(saved: dict[str, Any], config: dict[str, Any], defaults: dict[str, Any],
                prefix: str = "") -> list[str]:
    """The settings in which ``config`` differs from ``saved``, each as ``name (run: old, now:
    new)`` with a dotted name, so the error that lists them says what to pass; a setting absent
    from ``saved`` counts as its value in ``defaults`` when it has one there."""
    diff = []
    for k in sorted(set(saved) | set(config)):
        old, new, default = saved.get(k), config.get(k), defaults.get(k)
        if isinstance(old, dict) and isinstance(new, dict):
            diff += differences(old, new, default if isinstance(default, dict) else {},
                                f"{prefix}{k}.")
        elif k not in saved and k in defaults and new == default:
            continue
        elif old != new:
            was = default if k not in saved and k in defaults else old
            had = k in saved or k in defaults
            diff.append(f"{prefix}{k} (run: {_short(was) if had else 'not set'}, "
                        f"now: {_short(new) if k in config else 'not set'})")
    return diff


def _taken(d: Path, config: dict[str, Any], defaults: dict[str, Any]) -> str:
    """Why a fresh run may not start in ``d``, which holds one: with the same settings it can only
    be continued; with others (a sweep over, say, ``--lr`` into one default directory) the
    message names them, so the user sees that only another ``--out`` helps."""
    if not (d / "checkpoint.pt").exists():
        return _finished(d)
    try:
        saved = json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        return f"{d} already holds a run; use --resume or another --out"
    diff = _changes(saved, config, defaults)
    if not diff:
        return (f"{d} already holds this run; continue it with --resume, or start again in "
                "another --out")
    return (f"{d} already holds a run with other settings ({', '.join(diff)}); pass another "
            "--out for this one")


def _finished(d: Path) -> str:
    """A run whose final.pt is there but whose checkpoint is gone (deleted to save space): done,
    and neither a resume nor a fresh start in ``d`` is possible; its weights are usable."""
    return (f"{d} holds a finished run (final.pt) without its checkpoint, so it cannot be "
            f"continued: evaluate it with deeplinear eval {d}, or use another --out")


def _changes(saved: dict[str, Any], config: dict[str, Any],
             defaults: dict[str, Any]) -> list[str]:
    """:func:`differences` of a saved config and a new one, the new one first put in the form a
    config takes in JSON (tuples become lists)."""
    asked, known = json.loads(json.dumps([config, defaults]))
    return differences(saved, asked, known)


def _short(value: Any, width: int = 40) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def rng_state(*generators: torch.Generator) -> dict[str, Any]:
    """Everything random a run depends on, so a resumed run draws the same numbers."""
    return {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}


def set_rng_state(state: dict[str, Any], *generators: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    for g, s in zip(generators, state["generators"], strict=True):
        g.set_state(s)


def duration(seconds: float) -> str:
    """``42s``, ``12m05s``, ``3h07m``, ``14d06h``: an ETA a reader takes in at a glance."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


@dataclass
class Progress:
    """A periodic status line with rate and ETA; cheap enough to call every step.

    The rate counts from the first update, not from construction: the first step carries the
    run's warm-up (building the noise table, the first allocations), and counting it made the
    first ETA of a 28 s run read 1205 s. Until a second update there is no rate to show.
    """

    total: int
    desc: str = ""
    every_s: float = 2.0
    stream: TextIO = field(default_factory=lambda: sys.stderr)
    clock: Callable[[], float] = time.perf_counter
    _first: tuple[int, float] | None = None
    _last: float = -math.inf

    def update(self, step: int, force: bool = False, **metrics: float) -> None:
        now = self.clock()
        if self._first is None:
            self._first = (step, now)
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        first_step, t0 = self._first
        rate = (step - first_step) / (now - t0) if now > t0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else math.inf
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if not math.isnan(v))
        rate_s = f"{rate:6.2f}/s" if rate > 0 else "     ?/s"
        eta_s = duration(eta).rjust(6) if math.isfinite(eta) else "    ?"
        print(f"{self.desc} {step}/{self.total} {rate_s} eta {eta_s} {shown}",
              file=self.stream, flush=True)
