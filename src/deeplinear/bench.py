"""How fast the ES engine evaluates a population, measured against this machine's own GEMM peak.

Why: "fast" is only meaningful relative to what the hardware can do and to the alternatives, and
timings on a shared 2-core machine are noisy. So every report carries, from the *same* run, the
machine's sgemm peak (``torch.mm`` on large square float32 matrices, same thread count) and the
load average, and expresses the engine's throughput as a fraction of that peak.

How FLOPs are counted: a member's forward pass on a batch is ``2 * batch * sum(in * out)`` (one
multiply and one add per weight per example; bias adds, the underflow rule, the loss, noise and
the ES update are not counted). ``gflops`` charges every mode that nominal, dense-equivalent
count: the work a naive per-member forward would do. ``exec_gflops`` counts what the engine
executes (:func:`executed_flops`): the same for full rank, but in low-rank mode layer 1's
``x @ W1`` runs once per generation (its input is shared by all members) and the rank-r
corrections are added, so only ``exec_gflops`` is compared with the sgemm peak (``frac_of_peak``).

Sections of a report:

- ``rows``: per net, mode, population and batch: generations/s (ask + evaluate + tell),
  member-evaluations/s and GFLOP/s of the evaluation alone, the fraction of the sgemm peak, and
  the peak memory of one generation (RSS high-water mark delta on CPU, reset through
  ``/proc/self/clear_refs``; ``torch.cuda.max_memory_allocated`` delta on CUDA). The shared noise
  table is built before measuring and not counted.
- ``targets``: low-rank vs full-rank generation time on the 2017 net at pop 1000.
- ``ftz_share``: the share of evaluation time spent emulating the flush (the engine's in-place
  rule replaced by identity vs real).
- ``exact``: the net's exact-mode forward (true scale, subnormal arithmetic; 19-23x slower for the
  2017 net and 12-15x for the small one on the 2-core Xeon VM of ``benchmarks/README.md``, runs
  1-7; 11-27x over every CPU measured there) vs scaled mode, one member.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from deeplinear import es
from deeplinear.engine import Engine
from deeplinear.nets import SIZES_2017, DeepLinear, parse_sizes
from deeplinear.surrogate import identity
from deeplinear.train import check_device, check_threads
from deeplinear.train.es import PERTURBATIONS

NETS: dict[str, tuple[int, ...]] = {"2017": SIZES_2017, "small": (64, 256, 256, 10)}
MODES = PERTURBATIONS  # the engine's modes are ES's perturbations


def net_sizes(name: str) -> tuple[int, ...]:
    """A named net (``2017``, ``small``) or explicit layer widths like ``"8,16,4"``."""
    if name in NETS:
        return NETS[name]
    try:
        return tuple(parse_sizes(name))
    except ValueError as e:
        several = " (several nets: separate them with spaces)" if any(
            part in NETS for part in name.split(",")) else ""
        raise ValueError(f"net {name!r}: {e}; use {', '.join(NETS)} or widths like 64,256,10"
                         + several) from None


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``min_time``/``repeats``: each measurement repeats until both are met."""

    nets: tuple[str, ...] = ("2017", "small")
    pops: tuple[int, ...] = (100, 500, 2000)
    batches: tuple[int, ...] = (100, 1000)
    modes: tuple[str, ...] = MODES
    rank: int = 1
    target_pop: int | None = 1000  # low-rank vs full-rank on the 2017 net; None skips it
    ftz_pop: int = 500
    exact_batch: int = 100
    exact_nets: tuple[str, ...] = ()  # () : the same as nets
    device: str = "cpu"
    peak_n: int | None = None  # sgemm size for the peak; None: PEAK_N of the device
    threads: int | None = None  # None: torch's default
    min_time: float = 1.0
    repeats: int = 3
    sigma: float = 0.02
    seed: int = 0

    def __post_init__(self) -> None:
        empty = [k for k in ("nets", "pops", "batches", "modes") if not getattr(self, k)]
        if empty:
            raise ValueError(f"no {empty[0]} to measure: give at least one")
        for name in (*self.nets, *self.exact_nets):
            if len(net_sizes(name)) < 3:
                raise ValueError(f"net {name!r} has no hidden layer: give widths like 64,256,10")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ValueError(f"unknown mode {bad[0]!r}; choose from {', '.join(MODES)}")
        odd = [p for p in (*self.pops, self.ftz_pop, self.target_pop or 2) if p < 2 or p % 2]
        if odd:
            raise ValueError(f"population {odd[0]} must be even and >= 2 (antithetic pairs)")
        if any(b < 1 for b in (*self.batches, self.exact_batch)):
            raise ValueError("batch sizes must be >= 1")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {self.device!r}; use cpu or cuda")
        check_threads(self.threads)
        for name, ok, need in (("rank", self.rank >= 1, ">= 1"),
                               ("repeats", self.repeats >= 1, ">= 1"),
                               ("min_time", self.min_time >= 0, ">= 0"),
                               ("peak_n", self.peak_n is None or self.peak_n >= 1, ">= 1")):
            if not ok:
                raise ValueError(f"{name} must be {need}, got {getattr(self, name)}")

    @classmethod
    def quick(cls, **overrides: Any) -> BenchConfig:
        """A subset that runs in well under a minute on 2 cores."""
        return cls(**(QUICK | overrides))


QUICK: dict[str, Any] = {"pops": (100,), "batches": (100,), "target_pop": None, "ftz_pop": 100,
                         "min_time": 0.2, "repeats": 2}  # BenchConfig.quick over the defaults
TARGET_BATCH = 100  # the low-rank target: pop 1000 (target_pop) at batch 100
PEAK_N = {"cpu": 2048, "cuda": 8192}  # sgemm size of the peak: big enough to reach it on each


# --- counting and measuring ---------------------------------------------------------------------

def forward_flops(sizes: Sequence[int], batch: int) -> int:
    """FLOPs of one member's forward pass on ``batch`` examples: ``2 * batch * sum(in * out)``."""
    return 2 * batch * sum(i * o for i, o in itertools.pairwise(sizes))


def executed_flops(sizes: Sequence[int], batch: int, pop: int, rank: int) -> int:
    """Matmul FLOPs one generation's evaluation executes in :class:`deeplinear.engine.Engine`.

    Full rank (``rank=0``): ``pop`` forwards. Low rank: ``x @ W1`` once; per antithetic pair at
    layer 1 ``(x @ A) @ B.T`` (both members share it); per member at the other layers ``h @ W`` and
    ``(h @ A) @ B.T``.
    """
    if not rank:
        return pop * forward_flops(sizes, batch)
    (n_in, n_out), *rest = itertools.pairwise(sizes)
    layer1 = 2 * batch * n_in * n_out + pop // 2 * 2 * batch * rank * (n_in + n_out)
    others = pop * 2 * batch * sum(i * o + rank * (i + o) for i, o in rest)
    return layer1 + others


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Seconds per call: every repetition after one untimed warm-up."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def timeit(fn: Callable[[], object], device: str, min_time: float, repeats: int,
           warmup: bool = True) -> Timing:
    """Call ``fn`` until at least ``repeats`` calls and ``min_time`` seconds are timed."""
    if warmup:
        fn()
        synchronize(device)
    t = Timing()
    start = time.perf_counter()
    while len(t.times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        t.times.append(time.perf_counter() - t0)
    return t


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {key} line")


@contextmanager
def peak_memory(device: str) -> Iterator[dict[str, float | None]]:
    """Peak memory above the starting level while the block runs, in bytes (``None``: unknown).

    CPU: the RSS high-water mark (VmHWM), reset by writing 5 to ``/proc/self/clear_refs``
    (Linux); the figure counts pages first touched inside the block, so buffers reused from
    earlier blocks are not counted again. CUDA: ``torch.cuda.max_memory_allocated``.
    """
    box: dict[str, float | None] = {"bytes": None}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield box
        torch.cuda.synchronize()
        box["bytes"] = float(torch.cuda.max_memory_allocated() - base)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kib("VmRSS")
    except OSError:  # not Linux, or /proc not writable: report unknown rather than guess
        yield box
        return
    yield box
    box["bytes"] = float(max(0, _proc_status_kib("VmHWM") - base) * 1024)


def sgemm_peak(device: str, n: int | None = None) -> dict[str, float]:
    """This machine's float32 GEMM rate: ``torch.mm`` of two ``n x n`` matrices, in GFLOP/s."""
    n = n or PEAK_N[device]
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device)
    b = torch.randn(n, n, generator=g).to(device)
    out = torch.empty(n, n, device=device)
    t = timeit(lambda: torch.mm(a, b, out=out), device, 0.5, 3)  # >= 3 calls and 0.5 s
    flops = 2 * n**3
    return {"n": n, "gflops": flops / min(t.times) / 1e9, "gflops_median": flops / t.median / 1e9}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_avg() -> float | None:
    """The 1-minute load average (None where the OS has none): how busy the cores were."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "load_avg_1m": load_avg(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


# --- the engine under test ----------------------------------------------------------------------

@dataclass
class Setup:
    """A net, strategy, state, engine and one minibatch, ready to run generations."""

    net: DeepLinear
    strategy: es.Strategy
    state: es.State
    engine: Engine
    x: Tensor
    y: Tensor

    def generation(self) -> dict[str, float]:
        """One ES generation; seconds spent in ask, evaluation and tell."""
        t0 = time.perf_counter()
        pop = es.ask(self.strategy, self.state)
        t1 = time.perf_counter()
        losses = self.engine.losses(pop, self.x, self.y)
        synchronize(self.x.device.type)
        t2 = time.perf_counter()
        es.tell(self.strategy, self.state, pop, losses)
        synchronize(self.x.device.type)
        t3 = time.perf_counter()
        return {"ask": t1 - t0, "eval": t2 - t1, "tell": t3 - t2, "total": t3 - t0}


def make_setup(sizes: Sequence[int], pop: int, batch: int, rank: int, cfg: BenchConfig) -> Setup:
    g = torch.Generator().manual_seed(cfg.seed)
    net = DeepLinear(sizes, generator=g)
    layout = es.Layout.of(sizes)
    strategy = es.Strategy(layout, pop=pop, sigma=cfg.sigma, rank=rank, seed=cfg.seed,
                           device=cfg.device)
    state = es.init(strategy, layout.flatten(net))
    x = torch.rand(batch, sizes[0], generator=g)  # pixel-like inputs in [0, 1)
    y = torch.randint(sizes[-1], (batch,), generator=g)
    strategy.table  # noqa: B018  (build the shared noise table before anything is measured)
    return Setup(net.to(cfg.device), strategy, state, Engine(net, strategy), x.to(cfg.device),
                 y.to(cfg.device))


def bench_row(net_name: str, mode: str, pop: int, batch: int, cfg: BenchConfig,
              peak_gflops: float) -> dict[str, Any]:
    sizes = net_sizes(net_name)
    s = make_setup(sizes, pop, batch, cfg.rank if mode == "lowrank" else 0, cfg)
    with peak_memory(cfg.device) as mem:
        s.generation()  # warm-up: allocates the engine's buffers
    parts: list[dict[str, float]] = []
    start = time.perf_counter()
    while len(parts) < cfg.repeats or time.perf_counter() - start < cfg.min_time:
        parts.append(s.generation())
    med = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    flops = pop * forward_flops(sizes, batch)
    exec_gflops = executed_flops(sizes, batch, pop, s.strategy.rank) / med["eval"] / 1e9
    return {
        "net": net_name, "sizes": list(sizes), "mode": mode, "rank": s.strategy.rank, "pop": pop,
        "batch": batch, "generations": len(parts), "s_per_gen": med["total"],
        "s_ask": med["ask"], "s_eval": med["eval"], "s_tell": med["tell"],
        "gens_per_s": 1 / med["total"], "member_evals_per_s": pop / med["eval"],
        "gflop_per_gen": flops / 1e9, "gflops": flops / med["eval"] / 1e9,
        "exec_gflops": exec_gflops, "frac_of_peak": exec_gflops / peak_gflops,
        "peak_mem_bytes": mem["bytes"],
    }


def ftz_share(net_name: str, mode: str, pop: int, batch: int, cfg: BenchConfig) -> dict[str, Any]:
    """Evaluation time with the engine's flush vs with identity in its place (float-blind)."""
    s = make_setup(net_sizes(net_name), pop, batch, cfg.rank if mode == "lowrank" else 0, cfg)
    population = es.ask(s.strategy, s.state)

    def evaluate() -> None:
        s.engine.losses(population, s.x, s.y)

    real = s.engine.rule
    # interleave so that load changes on a shared machine hit both alike
    t_real, t_id = Timing(), Timing()
    evaluate()
    for _ in range(max(cfg.repeats, 3)):
        s.engine.rule = real
        t_real.times += timeit(evaluate, cfg.device, cfg.min_time / 2, 1, warmup=False).times
        s.engine.rule = identity
        t_id.times += timeit(evaluate, cfg.device, cfg.min_time / 2, 1, warmup=False).times
    s.engine.rule = real
    return {"net": net_name, "mode": mode, "pop": pop, "batch": batch,
            "s_eval_ftz": t_real.median, "s_eval_identity": t_id.median,
            "ftz_share": 1 - t_id.median / t_real.median}


def exact_vs_scaled(net_name: str, batch: int, cfg: BenchConfig) -> dict[str, Any]:
    """One member's forward pass in exact mode (true scale) vs scaled mode, on the device."""
    g = torch.Generator().manual_seed(cfg.seed)
    net = DeepLinear(net_sizes(net_name), generator=g).to(cfg.device)
    x = torch.rand(batch, net.sizes[0], generator=g).to(cfg.device)
    with torch.no_grad():
        t_exact = timeit(lambda: net(x, mode="exact"), cfg.device, cfg.min_time, cfg.repeats)
        t_scaled = timeit(lambda: net(x, mode="scaled"), cfg.device, cfg.min_time, cfg.repeats)
        agree = float((net(x, mode="exact").argmax(1) == net(x, mode="scaled").argmax(1))
                      .double().mean())
    flops = forward_flops(net.sizes, batch)
    return {"net": net_name, "batch": batch, "s_exact": t_exact.median,
            "s_scaled": t_scaled.median, "slowdown": t_exact.median / t_scaled.median,
            "gflops_exact": flops / t_exact.median / 1e9,
            "gflops_scaled": flops / t_scaled.median / 1e9, "argmax_agree": agree}


def engine_error(cfg: BenchConfig) -> str | None:
    """Why the engine cannot run on ``cfg.device`` (one tiny generation), or None if it can."""
    try:
        make_setup((2, 3, 2), 2, 1, 0, replace(cfg, seed=0)).generation()
    except (RuntimeError, TypeError) as e:
        return str(e).strip().splitlines()[0]
    return None


def _target_pop(cfg: BenchConfig) -> int | None:
    """The population of the low-rank vs full-rank target (2017 net, both modes), if measured."""
    wanted = "2017" in cfg.nets and set(MODES) <= set(cfg.modes)
    return cfg.target_pop if wanted and cfg.target_pop else None


def _steps(cfg: BenchConfig) -> int:
    """How many measurements :func:`run_bench` logs after the peak (rows, target, shares, exact)."""
    grid = len(cfg.nets) * len(cfg.modes)
    return (grid * (len(cfg.pops) * len(cfg.batches) + 1) + (_target_pop(cfg) is not None)
            + len(cfg.exact_nets or cfg.nets))


def _with_eta(log: Callable[[str], None], total: int) -> Callable[[str], None]:
    """``log`` with ``[step/total, elapsed, ~ETA]`` in front: the full run takes minutes.

    The ETA assumes the steps left take as long as the average so far (rows differ up to ~100x,
    so it is rough early on and right by the end).
    """
    t0, done = time.perf_counter(), 0

    def logged(msg: str) -> None:
        nonlocal done
        elapsed = time.perf_counter() - t0
        eta = f", ~{elapsed / done * (total - done):.0f} s left" if done else ""
        done += 1
        log(f"[{done}/{total}, {elapsed:.0f} s{eta}] {msg}")
    return logged


def run_bench(cfg: BenchConfig, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Measure everything ``cfg`` asks for; a JSON-able report."""
    check_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    report: dict[str, Any] = {"machine": machine_info(cfg.device), "settings": asdict(cfg)}
    log("sgemm peak")
    report["peak"] = sgemm_peak(cfg.device, n=cfg.peak_n)
    peak = report["peak"]["gflops"]
    report["engine_error"] = engine_error(cfg)
    if report["engine_error"]:
        log(f"engine unusable on {cfg.device}: {report['engine_error']}")
        cfg = replace(cfg, nets=(), target_pop=None, exact_nets=cfg.nets)
    plain, log = log, _with_eta(log, _steps(cfg))
    rows = []
    for net_name in cfg.nets:
        for mode in cfg.modes:
            for pop in cfg.pops:
                for batch in cfg.batches:
                    log(f"{net_name} {mode} pop {pop} batch {batch}")
                    rows.append(bench_row(net_name, mode, pop, batch, cfg, peak))
    report["rows"] = rows
    if (target := _target_pop(cfg)) is not None:
        log(f"target: low-rank vs full-rank, 2017 net, pop {target}")
        full, low = (bench_row("2017", m, target, TARGET_BATCH, cfg, peak) for m in MODES)
        report["targets"] = {"lowrank_over_full": full["s_per_gen"] / low["s_per_gen"],
                             "full": full, "lowrank": low}
    report["ftz_share"] = []
    for net_name in cfg.nets:
        for mode in cfg.modes:
            log(f"ftz share {net_name} {mode}")
            report["ftz_share"].append(ftz_share(net_name, mode, cfg.ftz_pop, 100, cfg))
    report["exact"] = []
    for net_name in cfg.exact_nets or cfg.nets:
        log(f"exact vs scaled {net_name}")
        report["exact"].append(exact_vs_scaled(net_name, cfg.exact_batch, cfg))
    report["peak_after"] = sgemm_peak(cfg.device, n=cfg.peak_n)
    report["machine"]["load_avg_1m_end"] = load_avg()
    report["warnings"] = report_warnings(report)  # in the JSON too, and on the log as they arise
    for w in report["warnings"]:
        plain(f"warning: {w}")
    return report


# --- printing -----------------------------------------------------------------------------------

def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


BUSY_LOAD = 1.0
# A 1-min load average above this before the run starts means other processes hold cores: on the
# 2-core VM a load of 2.35 made one quick run's FTZ share 69% (quiet: 0-7%) and put a row above
# the sgemm peak measured in the same run.


def _all_rows(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The grid's rows, then the target's two (full, low rank) if measured."""
    return r["rows"] + ([r["targets"]["full"], r["targets"]["lowrank"]] if "targets" in r else [])


def report_warnings(r: dict[str, Any]) -> list[str]:
    """What makes a report's figures unreliable, read off the report itself."""
    out = []
    load = r["machine"].get("load_avg_1m")
    if load is not None and load > BUSY_LOAD:
        out.append(f"load average {load:.2f} at the start: other processes share the cores, so "
                   "these figures (the %peak and the FTZ share above all) are unreliable; rerun "
                   "on a quiet machine")
    over = [f"{row['net']} {row['mode']} pop {row['pop']} batch {row['batch']}"
            for row in _all_rows(r) if row["frac_of_peak"] > 1]
    if over:
        out.append(f"{', '.join(over)} ran above the sgemm peak measured in this run: the peak "
                   "was measured while the machine was busier, so every %peak is too high")
    return out


def format_report(r: dict[str, Any]) -> str:
    m, cfg, peak = r["machine"], r["settings"], r["peak"]
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['threads']} threads"
        + (f", GPU {m['gpu']} (TF32 matmul {'on' if m['tf32_matmul'] else 'off'})"
           if "gpu" in m else ""),
        f"load average (1 min): {m['load_avg_1m']:.2f} at start, "
        f"{m.get('load_avg_1m_end', math.nan):.2f} at end",
        f"sgemm peak ({cfg['device']}, {peak['n']}x{peak['n']}): {peak['gflops']:.0f} GFLOP/s "
        f"at start, {r['peak_after']['gflops']:.0f} at end",
        f"settings: sigma {cfg['sigma']}"
        + (f", low-rank rank {cfg['rank']}" if "lowrank" in cfg["modes"] else "")
        + f", >= {cfg['repeats']} "
        f"generations and {cfg['min_time']} s per row (median), seed {cfg['seed']}",
        "GFLOP/s: 2*batch*sum(in*out) per member forward over evaluation time (dense-equivalent);"
        " exec: FLOPs the engine executes (low-rank: x@W1 once per generation); %peak: exec/sgemm",
        "mem: resident memory one generation adds beyond pages earlier rows already touched "
        "(0: none new), so it depends on which rows ran before",
        "",
        f"{'net':7s} {'mode':7s} {'pop':>5s} {'batch':>5s} {'gen/s':>7s} {'s/gen':>7s} "
        f"{'eval s':>7s} {'member/s':>9s} {'GFLOP/s':>8s} {'exec':>7s} {'%peak':>6s} "
        f"{'mem MiB':>7s}",
    ]
    for row in _all_rows(r):
        lines.append(
            f"{row['net']:7s} {row['mode']:7s} {row['pop']:5d} {row['batch']:5d} "
            f"{row['gens_per_s']:7.2f} {row['s_per_gen']:7.3f} {row['s_eval']:7.3f} "
            f"{row['member_evals_per_s']:9.0f} {row['gflops']:8.1f} {row['exec_gflops']:7.1f} "
            f"{100 * row['frac_of_peak']:5.1f}% {_mib(row['peak_mem_bytes']):>7s}")
    if r["engine_error"]:
        lines.append(f"(engine not measured on {cfg['device']}: {r['engine_error']})")
    lines += [f"warning: {w}" for w in report_warnings(r)]
    if "targets" in r:
        t = r["targets"]
        lines += ["", f"low-rank vs full-rank, 2017 net, pop {t['full']['pop']}, batch "
                      f"{t['full']['batch']}: "
                      f"{t['lowrank_over_full']:.2f}x faster per generation (target >= 2x)"]
    lines += ["", "FTZ emulation share of evaluation time (flush vs identity; target <= 10%):"]
    for f in r["ftz_share"]:
        lines.append(f"  {f['net']:5s} {f['mode']:7s} pop {f['pop']} batch {f['batch']}: "
                     f"{100 * f['ftz_share']:5.1f}%  ({f['s_eval_ftz']:.3f} s vs "
                     f"{f['s_eval_identity']:.3f} s)")
    lines += ["", "exact mode (true scale, subnormal arithmetic) vs scaled mode, one member:"]
    for e in r["exact"]:
        lines.append(f"  {e['net']:5s} batch {e['batch']}: exact {e['s_exact'] * 1e3:.1f} ms "
                     f"({e['gflops_exact']:.2f} GFLOP/s), scaled {e['s_scaled'] * 1e3:.2f} ms "
                     f"({e['gflops_scaled']:.1f} GFLOP/s): {e['slowdown']:.0f}x; "
                     f"argmax agree {100 * e['argmax_agree']:.0f}%")
    return "\n".join(lines)
