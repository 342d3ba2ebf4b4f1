"""ES population evaluation on Ray actors: the same run as a local one, over many cores or machines.

Why this split of work (as in Salimans et al. 2017): an ES member is fully described by the centre
``theta`` and a table offset (:mod:`deeplinear.es`), so a generation needs to ship the parameters
once and get back one loss per member. Workers are long-lived Ray actors that hold the training
set, the shared noise table and an :class:`~deeplinear.engine.Engine`; per generation the driver
``ray.put``-s ``theta`` once (2.7 MB for the 2017 net), sends each worker its pairs' table offsets
and the minibatch's row indices, and gets back ``2 x members`` float32 scalars (loss, accuracy).
The strategy update (``es.tell``) stays on the driver, so checkpoints and resume are the local
trainer's own (:mod:`deeplinear.train.es`).

Bit-identical to ``backend=local``: a member's loss must be a pure function of (theta, its
offset, sigma, minibatch), not of which other members share its chunk or worker. The full-rank
engine is: each member is its own single-threaded product inside a ``bmm``, whatever the thread
count or chunk (measured on the 2017 shapes). The low-rank engine is not in general: its shared
``h @ W`` products are multi-threaded ``mm`` calls over all members of a chunk, whose reduction
split depends on the thread count and may depend on the row count. So for low-rank noise the pairs
are cut only at the local engine's own chunk boundaries (every worker then runs exactly the local
chunks), and the run equals a local run with the same torch thread count as each worker.

Faults: a worker that dies (killed, OOM, node lost) or gives no answer within ``timeout_s`` is
killed, replaced by a fresh actor, and its members evaluated again: the result does not change,
since nothing a worker holds depends on history. A worker that *raises* is a bug or bad input:
its message is raised on the driver in one line, without retry. Ray is an optional dependency.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import platform
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

import deeplinear
from deeplinear import es
from deeplinear.data import Dataset
from deeplinear.engine import Engine
from deeplinear.nets import DeepLinear

if TYPE_CHECKING:  # the trainer is imported only where used, so the CLI can import this cheaply
    from deeplinear.train.es import Config

RAY_MISSING = "Ray is not installed: pip install 'deeplinear[ray]'"
BACKENDS = ("local", "ray")
CONNECT_TIMEOUT_S = 5.0
START_TIMEOUT_S = 120.0  # a worker's start: a fresh process, imports, data, noise table


class DistributedError(RuntimeError):
    """The Ray backend cannot go on (missing Ray, version mismatch, a worker that raised)."""


class WorkerError(DistributedError):
    """A worker raised, or crashed more often than ``max_retries``."""


def require_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise DistributedError(RAY_MISSING) from None
    return ray


def one_line(text: object, limit: int = 300) -> str:
    """``text`` without ANSI colours, its lines joined: Ray's messages span many lines."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    joined = " ".join(line.strip() for line in plain.splitlines() if line.strip())
    return joined if len(joined) <= limit else joined[:limit - 3] + "..."


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` -> ``(host, port)``; an IPv6 host may be bracketed."""
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise ValueError(f"bad Ray address {address!r}: use auto or HOST:PORT (e.g. 10.0.0.1:6379)")
    return host.strip("[]"), int(port)


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Make sure this process is connected to Ray; return True if this call started a runtime.

    ``address=None`` starts a private runtime on this machine with ``num_cpus`` CPUs; ``"auto"``
    joins the cluster ``ray start`` left on this machine (or ``RAY_ADDRESS``); ``HOST:PORT`` joins
    that cluster's head. An already connected process is left as it is. An explicit address is
    probed with a plain TCP connect first: Ray itself retries an unreachable head for minutes.
    """
    ray = require_ray()
    if address not in (None, "auto"):
        host, port = parse_address(address)
        try:
            socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise ConnectionError(f"cannot reach a Ray cluster at {address}: "
                                  f"{e.strerror or e}; start one with `ray start --head` "
                                  "or use --backend local") from None
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"configure_logging": False}
    if address is None:  # "local": a new runtime even if `ray start` left one running here
        kwargs.update(address="local", num_cpus=num_cpus, include_dashboard=False)
    else:
        kwargs.update(address=address)
    try:
        ray.init(**kwargs)
    except ConnectionError as e:  # Ray 2.60 sends its token to HOST:PORT only if told to
        hint = "" if os.environ.get("RAY_AUTH_MODE") else (
            " (a cluster with token authentication needs RAY_AUTH_MODE=token here)")
        raise ConnectionError(f"cannot join Ray at {address}: {one_line(e)}{hint}") from None
    except RuntimeError as e:  # Ray/Python version mismatch with the cluster, among others
        raise DistributedError(f"cannot join Ray at {address or 'a new local runtime'}: "
                               f"{one_line(e)}") from None
    return address is None


def partition(pairs: int, parts: int, align: int = 1) -> list[range]:
    """``range(pairs)`` cut into at most ``parts`` contiguous, near-equal ranges whose boundaries
    are multiples of ``align`` (the engine's chunk, in pairs, when chunking matters).
    """
    if pairs < 1 or parts < 1 or align < 1:
        raise ValueError(f"need pairs, parts and align >= 1, got {pairs}, {parts}, {align}")
    blocks = math.ceil(pairs / align)
    parts = min(parts, blocks)
    bounds = [min(pairs, (i * blocks // parts) * align) for i in range(parts + 1)]
    return [range(a, b) for a, b in itertools.pairwise(bounds)]


def versions() -> dict[str, str]:
    """What must match between driver and workers for the two to compute the same bits."""
    ray = require_ray()
    return {"python": platform.python_version(), "torch": torch.__version__,
            "deeplinear": deeplinear.__version__, "ray": ray.__version__}


class Worker:
    """A Ray actor's body: the data, the noise table and an engine, kept for the whole run."""

    def __init__(self, model: DeepLinear, strategy: es.Strategy, max_bytes: int,
                 data: tuple[Tensor, Tensor], threads: int) -> None:
        torch.set_num_threads(threads)  # before any parallel op, never changed (see train.es)
        self.x, self.y = data
        self.engine = Engine(model, strategy, max_bytes=max_bytes)
        self.table = strategy.table  # drawn now rather than inside the first generation

    def info(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": platform.node(), "threads": torch.get_num_threads(),
                "versions": versions()}

    def losses(self, theta: Tensor, sigma: float, generation: int, offsets: tuple[int, ...],
               idx: Tensor) -> tuple[Tensor, float]:
        """``(2, members)`` losses and accuracies of the pairs at ``offsets``, and the seconds."""
        t0 = time.perf_counter()
        pop = es.Population(self.engine.strategy, theta, sigma, generation, offsets)
        loss, acc = self.engine.losses(pop, self.x[idx], self.y[idx], with_accuracy=True)
        return torch.stack([loss, acc]), time.perf_counter() - t0


@dataclass
class Stats:
    """Where a run's evaluation time went, summed over generations."""

    generations: int = 0
    worker_s: float = 0.0  # the slowest worker's engine time, per generation
    restarts: int = 0  # workers replaced after a crash or a timeout


class RayEvaluator:
    """``evaluate(pop, idx) -> (loss, acc)`` for :func:`deeplinear.train.es.train`, on Ray actors.

    ``workers`` defaults to the cluster's CPUs // ``threads``; ``threads`` (torch threads and Ray
    CPUs per worker) defaults to ``cfg.threads`` or 1. Use as a context manager: closing kills the
    actors, and shuts Ray down if this evaluator started it.
    """

    def __init__(self, model: DeepLinear, data: Dataset, cfg: Config, *,
                 workers: int | None = None, address: str | None = None,
                 threads: int | None = None, timeout_s: float = 300.0,
                 max_retries: int = 2) -> None:
        ray = self._ray = require_ray()
        threads = threads if threads is not None else cfg.threads or 1  # 0 is an error
        checks = (("--workers", workers, workers is None or workers >= 1, ">= 1"),
                  ("--threads", threads, threads >= 1, ">= 1"),
                  ("timeout_s", timeout_s, timeout_s > 0, "> 0"),
                  ("max_retries", max_retries, max_retries >= 0, ">= 0"))
        for name, value, ok, need in checks:
            if not ok:
                raise ValueError(f"{name} must be {need}, got {value}")
        if not isinstance(model, DeepLinear):
            raise ValueError(f"the Ray backend evaluates deep linear nets, not "
                             f"{type(model).__name__}")
        cfg.validate()
        if cfg.device != "cpu":
            raise ValueError(f"the Ray backend evaluates on the workers' CPUs, not on "
                             f"{cfg.device}; drop --device")
        self.strategy = cfg.strategy(es.Layout.of(model.sizes))
        self.threads, self.timeout_s, self.max_retries = threads, timeout_s, max_retries
        max_bytes = cfg.max_mb << 20
        chunk = Engine(model, self.strategy, max_bytes=max_bytes).members_per_chunk(cfg.batch_size)
        self.align = chunk // 2 if self.strategy.rank else 1
        self.started = connect(address, workers * threads if workers else None)
        self.actors: list[Any] = []
        try:
            cpus = ray.cluster_resources().get("CPU", 0)
            if workers is None:
                workers = max(1, int(cpus // threads))
            if workers * threads > cpus:
                raise ValueError(f"{workers} workers x {threads} threads need {workers * threads}"
                                 f" CPUs but the Ray cluster has {cpus:g}; use --workers "
                                 f"{max(1, int(cpus // threads))}")
            self._remote = ray.remote(Worker).options(
                num_cpus=threads, max_restarts=0, max_task_retries=0,
                scheduling_strategy="SPREAD")
            # a fresh strategy: the driver's may carry its cached 128 MB noise table
            self._args = (model, replace(self.strategy), max_bytes,
                          ray.put((data.x_train, data.y_train)), threads)
            self.actors = [self._remote.remote(*self._args) for _ in range(workers)]
            self._check_workers()
        except BaseException:
            self.close()
            raise
        self.stats = Stats()

    # -- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> RayEvaluator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for a in self.actors:
            self._kill(a)
        self.actors = []
        if self.started and self._ray.is_initialized():
            self._ray.shutdown()
            self.started = False

    def _kill(self, actor: Any) -> None:
        with contextlib.suppress(Exception):  # already gone or Ray shutting down: nothing to free
            self._ray.kill(actor, no_restart=True)

    def info(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Each worker's pid, node, threads and versions (waits for workers still starting)."""
        return self._ray.get([a.info.remote() for a in self.actors],
                             timeout=timeout_s or self.timeout_s)

    def _check_workers(self) -> None:
        """Wait for every worker to start; check it runs the driver's versions."""
        ray, mine = self._ray, versions()
        try:
            wait = max(self.timeout_s, START_TIMEOUT_S)
            info = self.info(wait)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"Ray workers did not start within {wait:g} s; check "
                               "the cluster (`ray status`)") from None
        except ray.exceptions.RayError as e:
            raise WorkerError(f"a Ray worker failed to start: {self._reason(e)}") from None
        for i, w in enumerate(info):
            bad = {k: v for k, v in w["versions"].items() if v != mine[k]}
            if bad:
                k, v = next(iter(bad.items()))
                raise DistributedError(f"worker {i} on {w['node']} runs {k} {v} but the driver "
                                       f"runs {mine[k]}: install the same versions everywhere")

    # -- one generation --------------------------------------------------------------------------
    def __call__(self, pop: es.Population, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Loss and accuracy of every member of ``pop`` on training rows ``idx``."""
        if pop.strategy != self.strategy:
            raise ValueError("population comes from another strategy than this evaluator's; "
                             "build both from the same model and config")
        ray = self._ray
        theta = ray.put(pop.theta)
        ranges = partition(pop.size // 2, len(self.actors), self.align)
        out = torch.empty(2, pop.size)
        tries = [0] * len(ranges)
        pending = {self._submit(i, pop, theta, r, idx): i for i, r in enumerate(ranges)}
        deadline = time.perf_counter() + self.timeout_s
        slowest = 0.0
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1,
                                timeout=max(0.0, deadline - time.perf_counter()))
            if not ready:  # every unanswered worker is presumed hung
                for ref, i in list(pending.items()):
                    del pending[ref]
                    why = f"no answer within {self.timeout_s:g} s"
                    pending[self._retry(i, tries, why, pop, theta, ranges[i], idx)] = i
                deadline = time.perf_counter() + self.timeout_s
                continue
            i = pending.pop(ready[0])
            try:
                part, seconds = ray.get(ready[0])
            except ray.exceptions.RayTaskError as e:
                raise WorkerError(f"worker {i} failed on generation {pop.generation}: "
                                  f"{self._reason(e)}") from None
            except ray.exceptions.RayError as e:  # the process or node died: replace, redo
                pending[self._retry(i, tries, self._reason(e), pop, theta, ranges[i], idx)] = i
                continue
            r = ranges[i]
            out[:, 2 * r.start:2 * r.stop] = part
            slowest = max(slowest, seconds)
        self.stats.generations += 1
        self.stats.worker_s += slowest
        return out[0], out[1]

    def _submit(self, i: int, pop: es.Population, theta: Any, pairs: range, idx: Tensor) -> Any:
        offsets = pop.offsets[pairs.start:pairs.stop]
        return self.actors[i].losses.remote(theta, pop.sigma, pop.generation, offsets, idx)

    def _retry(self, i: int, tries: list[int], why: str, pop: es.Population, theta: Any,
               pairs: range, idx: Tensor) -> Any:
        """Replace worker ``i`` by a fresh actor and give it the same members again."""
        tries[i] += 1
        if tries[i] > self.max_retries:
            error = TimeoutError if why.startswith("no answer") else WorkerError
            raise error(f"worker {i} gave up on generation {pop.generation} after "
                        f"{tries[i]} tries: {why}; check the cluster (`ray status`)")
        self._kill(self.actors[i])
        self.actors[i] = self._remote.remote(*self._args)
        self.stats.restarts += 1
        return self._submit(i, pop, theta, pairs, idx)

    @staticmethod
    def _reason(e: Exception) -> str:
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            first = str(cause).strip().splitlines()
            return f"{type(cause).__name__}: {first[0] if first else ''}".rstrip(": ")
        return one_line(e)


@contextlib.contextmanager
def backend(name: str, model: Any, data: Dataset, cfg: Any, *, method: str = "es",
            workers: int | None = None, address: str | None = None) -> Iterator[dict[str, Any]]:
    """The extra keyword arguments a trainer needs for backend ``name`` (for the CLI).

    ``local`` -> ``{}``; ``ray`` -> ``{"evaluate": RayEvaluator(...)}``, closed on exit.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; use {', '.join(BACKENDS)}")
    if name == "local":
        if workers is not None or address is not None:
            raise ValueError("--workers and --ray-address need --backend ray")
        yield {}
        return
    if method != "es":
        raise ValueError(f"--backend ray runs --method es only, not {method}")
    with RayEvaluator(model, data, cfg, workers=workers, address=address) as evaluate:
        yield {"evaluate": evaluate}
