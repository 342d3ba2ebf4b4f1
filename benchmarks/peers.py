"""deeplinear's ES vs EvoTorch and evosax on the same work: seconds per generation, side by side.

Why this script: "fast" only means something next to what people would otherwise use. Every
runner does one OpenAI-ES generation (antithetic sampling, centered ranks, fixed sigma, Adam) on
the same net, initial weights, population, minibatches and float32, and evaluates the same fitness:
the cross-entropy of the 2017-layout deep linear net (scale 2**k, TF-GPU semantics: elementwise
results flushed, matmul keeping subnormals) on a minibatch. Where a peer cannot compute that
function at full speed, each way it can run is timed and labelled with what it really computes;
the ``check`` columns compare its logits at the initial weights with deeplinear's exact-mode
reference (``DeepLinear.forward(x, "exact")``).

Runners (each in its own subprocess, so peak RSS and the CPU's FTZ/DAZ state are its own):

- ``deeplinear``: :mod:`deeplinear.engine` full-rank batched forward + :mod:`deeplinear.es` step.
- ``deeplinear-lowrank``: the same with EGGROLL low-rank perturbations (a different search
  distribution: same fitness, cheaper generation; not the like-for-like row).
- ``evotorch-true``: EvoTorch PGPE (symmetric, centered ranks, stdev_learning_rate 0, Adam) over a
  vectorised ``Problem`` whose fitness runs the net at true scale in torch, flushing elementwise
  results explicitly; matmuls keep subnormals, the real TF-GPU semantics, and run ~200x slower.
- ``evotorch-hwftz``: the same code in a thread with hardware FTZ+DAZ: fast, but the matmul then
  flushes inside its accumulation, a different function (CPU_FTZ_DAZ-like).
- ``evotorch-scaled``: the same searcher with the fitness written in units of 2**-k (dead zone,
  every value normal): the TF-GPU function at full speed, i.e. EvoTorch given deeplinear's trick.
- ``evosax-true``: evosax ``Open_ES`` (jitted, JAX CPU) with the true-scale fitness, the scale a
  runtime argument so that XLA cannot fold ``(x/s)*s``. XLA on CPU flushes (FTZ and DAZ) always.
- ``evosax-scaled``: the same with the fitness in units of 2**-k: the TF-GPU function.

Run inside the peers venv (``bash benchmarks/setup_peers.sh`` creates it)::

    benchmarks/.venv-peers/bin/python benchmarks/peers.py                 # 2017 net, pop 500
    benchmarks/.venv-peers/bin/python benchmarks/peers.py --net small --pop 200 --batch 256

``--device cuda`` runs every runner on a GPU (JAX on its CUDA platform, matmul precision
'highest'; torch with TF32 off, its default), with the check still against the CPU reference.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

# deeplinear.bench.NETS as text: this process imports no torch (each runner's subprocess sets its
# threads before torch or jax load); tests/test_benchmark_reports.py checks they agree
NETS = {"2017": "784,512,512,10", "small": "64,256,256,10"}
DATASETS = {"2017": "fashion-mnist", "small": "digits"}
RUNNERS = ("deeplinear", "deeplinear-lowrank", "evotorch-true", "evotorch-hwftz",
           "evotorch-scaled", "evosax-true", "evosax-scaled")


@dataclass(frozen=True)
class Config:
    net: str = "2017"
    pop: int = 500
    batch: int = 100
    gens: int = 2  # timed generations, after one untimed warm-up (allocation, jit)
    sigma: float = 0.02
    lr: float = 0.01
    rank: int = 1  # low-rank runner only
    scale_exp: int = 125
    threads: int = 2
    seed: int = 0
    n_data: int = 10_000
    data_dir: str | None = None  # MNIST-format files; None: deeplinear's usual search
    device: str = "cpu"  # cpu | cuda: where every runner computes


# --- shared set-up: every runner sees the same weights and minibatches --------------------------

def setup(cfg: Config) -> dict[str, Any]:
    import torch

    from deeplinear.data import load_dataset
    from deeplinear.nets import DeepLinear

    torch.set_num_threads(cfg.threads)
    sizes = [int(s) for s in NETS[cfg.net].split(",")]
    data = load_dataset(DATASETS[cfg.net], data_dir=cfg.data_dir, seed=cfg.seed)
    x_all, y_all = data.x_train[: cfg.n_data], data.y_train[: cfg.n_data]
    g = torch.Generator().manual_seed(cfg.seed)
    net = DeepLinear(sizes, scale_exp=cfg.scale_exp, generator=g)
    idx = [torch.randint(len(x_all), (cfg.batch,), generator=g) for _ in range(cfg.gens + 1)]
    batches = [(x_all[i].contiguous(), y_all[i].contiguous()) for i in idx]
    with torch.no_grad():
        ref = net.forward(batches[0][0], mode="exact")
    return {"sizes": sizes, "net": net, "batches": batches, "ref": ref}


def check(logits: Any, env: dict[str, Any]) -> dict[str, Any]:
    """What a runner computes: its logits at the initial weights vs deeplinear's exact reference."""
    import torch

    logits = torch.as_tensor(logits, dtype=torch.float32).reshape(env["ref"].shape)
    ref = env["ref"]
    y = env["batches"][0][1]
    loss = float(torch.nn.functional.cross_entropy(logits, y))
    return {
        "loss_at_init": loss,
        "loss_is_ln10": abs(loss - math.log(10)) < 1e-6,
        "constant_output": bool((logits == logits[:1]).all()),
        "argmax_agree": float((logits.argmax(1) == ref.argmax(1)).double().mean()),
        "max_abs_logit_diff": float((logits - ref).abs().max()),
    }


def time_generations(step: Callable[[int], None], gens: int) -> list[float]:
    """Seconds for each of ``gens`` generations after one untimed warm-up generation."""
    step(0)
    times = []
    for g in range(1, gens + 1):
        t0 = time.perf_counter()
        step(g)
        times.append(time.perf_counter() - t0)
    return times


# --- torch fitness functions (EvoTorch) ---------------------------------------------------------

def unflatten(values: Any, sizes: list[int]) -> list[tuple[Any, Any]]:
    """Rows of flat parameters -> per layer ``(W (pop,in,out), b (pop,out))`` views."""
    out, at = [], 0
    for n_in, n_out in itertools.pairwise(sizes):
        w = values[:, at: at + n_in * n_out].view(-1, n_in, n_out)
        at += n_in * n_out
        b = values[:, at: at + n_out]
        at += n_out
        out.append((w, b))
    return out


def flatten(net: Any) -> Any:
    import torch

    parts = []
    for w, b in zip(net.weights, net.biases, strict=True):
        parts += [w.detach().reshape(-1), b.detach()]
    return torch.cat(parts)


def torch_true_logits(layers: list[tuple[Any, Any]], x: Any, k: int) -> Any:
    """The 2017 net at true scale with TF-GPU semantics: elementwise results flushed, matmul not."""
    import torch

    from deeplinear.arithmetic import FORMATS

    tiny = FORMATS["float32"].min_normal

    def flush(t: Any) -> Any:
        return torch.where(t.abs() < tiny, t * 0, t)

    last = len(layers) - 1
    h = x
    for i, (w, b) in enumerate(layers):
        m = torch.matmul(h, w)
        if i == 0:
            h = flush(flush(m + b[:, None]) * 2.0**-k)
        else:
            h = flush(m + flush(b[:, None] * 2.0**-k))
        if i == last:
            h = flush(h * 2.0**k)
    return h


def torch_scaled_logits(layers: list[tuple[Any, Any]], x: Any, under: Callable[[Any], Any]) -> Any:
    """The same function in units of 2**-k: ``under`` is the net's dead zone, every value normal."""
    import torch

    h = x
    for i, (w, b) in enumerate(layers):
        m = torch.matmul(h, w)
        h = under(m + (b[:, None] if i == 0 else under(b[:, None])))
    return h


def member_losses(logits: Any, y: Any) -> Any:
    import torch

    logp = torch.log_softmax(logits, dim=-1)
    return -logp.gather(2, y.expand(logits.shape[0], -1)[..., None]).squeeze(2).mean(1)


def run_evotorch(cfg: Config, variant: str) -> dict[str, Any]:
    import torch
    from evotorch import Problem
    from evotorch.algorithms import PGPE

    from deeplinear.arithmetic import run_with_hardware_ftz
    from deeplinear.bench import synchronize

    env = setup(cfg)
    sizes, net = env["sizes"], env["net"]
    batches = [(x.to(cfg.device), y.to(cfg.device)) for x, y in env["batches"]]
    under = net.under()
    current = {"g": 0}

    def logits_of(values: Any, x: Any) -> Any:
        layers = unflatten(values, sizes)
        if variant == "scaled":
            return torch_scaled_logits(layers, x, under)
        return torch_true_logits(layers, x, cfg.scale_exp)

    class NetProblem(Problem):
        def __init__(self) -> None:
            super().__init__(objective_sense="min", solution_length=sum(
                i * o + o for i, o in itertools.pairwise(sizes)),
                initial_bounds=(-1.0, 1.0), dtype=torch.float32, device=cfg.device)

        def _evaluate_batch(self, solutions: Any) -> None:
            x, y = batches[current["g"]]
            with torch.no_grad():
                solutions.set_evals(member_losses(logits_of(solutions.values, x), y))

    def body() -> dict[str, Any]:
        torch.set_num_threads(cfg.threads)
        problem = NetProblem()
        searcher = PGPE(problem, popsize=cfg.pop, center_learning_rate=cfg.lr,
                        stdev_learning_rate=0.0, stdev_init=cfg.sigma, optimizer="adam",
                        ranking_method="centered", center_init=flatten(net).to(cfg.device),
                        symmetric=True)
        with torch.no_grad():
            init_logits = logits_of(flatten(net).to(cfg.device)[None], batches[0][0])[0].cpu()

        def step(g: int) -> None:
            current["g"] = g
            searcher.step()
            synchronize(cfg.device)

        return {"times": time_generations(step, cfg.gens), "check": check(init_logits, env)}

    if variant == "hwftz":
        return run_with_hardware_ftz(body)  # type: ignore[return-value]
    return body()


# --- JAX fitness functions (evosax) -------------------------------------------------------------

def run_evosax(cfg: Config, variant: str) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from evosax.algorithms import Open_ES

    if cfg.device != "cpu":  # XLA may run float32 GPU matmuls in TF32 unless told otherwise
        jax.config.update("jax_default_matmul_precision", "highest")
    env = setup(cfg)
    net, batches = env["net"], env["batches"]
    threshold = net.threshold
    params0 = [(jnp.asarray(w.detach().numpy()), jnp.asarray(b.detach().numpy()))
               for w, b in zip(net.weights, net.biases, strict=True)]

    def logits_true(params: Any, x: Any, s: Any) -> Any:
        # s = 2**k arrives as a runtime float32, so XLA cannot fold (x / s) * s into x
        last = len(params) - 1
        h = x
        for i, (w, b) in enumerate(params):
            m = h @ w
            h = (m + b) / s if i == 0 else m + b / s
            if i == last:
                h = h * s
        return h

    def logits_scaled(params: Any, x: Any, t: Any) -> Any:
        def dead(u: Any) -> Any:
            return jnp.where(jnp.abs(u) < t, 0.0 * u, u)

        h = x
        for i, (w, b) in enumerate(params):
            h = dead(h @ w + (b if i == 0 else dead(b)))
        return h

    logits_fn = logits_scaled if variant == "scaled" else logits_true
    const = jnp.float32(threshold if variant == "scaled" else 2.0**cfg.scale_exp)

    def loss(params: Any, x: Any, y: Any, c: Any) -> Any:
        logp = jax.nn.log_softmax(logits_fn(params, x, c), axis=-1)
        return -jnp.take_along_axis(logp, y[:, None], axis=1).mean()

    es = Open_ES(population_size=cfg.pop, solution=params0, optimizer=optax.adam(cfg.lr),
                 std_schedule=optax.constant_schedule(cfg.sigma))
    es_params = es.default_params
    state = es.init(jax.random.key(cfg.seed), params0, es_params)

    @jax.jit
    def generation(key: Any, state: Any, x: Any, y: Any, c: Any) -> Any:
        k_ask, k_tell = jax.random.split(key)
        population, state = es.ask(k_ask, state, es_params)
        fitness = jax.vmap(loss, in_axes=(0, None, None, None))(population, x, y, c)
        state, _ = es.tell(k_tell, population, fitness, state, es_params)
        return state, fitness

    data = [(jnp.asarray(x.numpy()), jnp.asarray(y.numpy())) for x, y in batches]
    box = {"state": state, "key": jax.random.key(cfg.seed + 1)}

    def step(g: int) -> None:
        box["key"], key = jax.random.split(box["key"])
        box["state"], fitness = generation(key, box["state"], *data[g], const)
        fitness.block_until_ready()

    init_logits = jax.jit(logits_fn)(params0, data[0][0], const)
    return {"times": time_generations(step, cfg.gens),
            "check": check(np.array(init_logits), env)}


# --- deeplinear ---------------------------------------------------------------------------------

def run_deeplinear(cfg: Config, low_rank: bool) -> dict[str, Any]:
    import torch

    from deeplinear import es
    from deeplinear.bench import synchronize
    from deeplinear.engine import Engine

    env = setup(cfg)
    net = copy.deepcopy(env["net"]).to(cfg.device)
    batches = [(x.to(cfg.device), y.to(cfg.device)) for x, y in env["batches"]]
    layout = es.Layout.of(net.sizes)
    # sigma_scale "none": the same isotropic search distribution as the peers' runners
    strategy = es.Strategy(layout, pop=cfg.pop, sigma=cfg.sigma, sigma_scale="none", lr=cfg.lr,
                           rank=cfg.rank if low_rank else 0, seed=cfg.seed, device=cfg.device)
    state = es.init(strategy, layout.flatten(net))
    engine = Engine(net, strategy)
    strategy.table  # noqa: B018  (the shared noise table is drawn once per run, before timing)

    def step(g: int) -> None:
        pop = es.ask(strategy, state)
        es.tell(strategy, state, pop, engine.losses(pop, *batches[g]))
        synchronize(cfg.device)  # tell's Adam step runs on after it returns

    # the engine must compute the net's scaled mode: compare a pair against materialised members
    x, y = batches[0]
    pop = es.ask(strategy, state)
    got = engine.losses(pop, x, y)[:2]
    member_net = copy.deepcopy(net)
    want = []
    for j in range(2):
        layout.load(pop.member(j), member_net)
        with torch.no_grad():
            want.append(torch.nn.functional.cross_entropy(member_net(x), y))
    with torch.no_grad():
        result = check(net(x, mode="scaled").cpu(), env)
    result["engine_vs_net_loss_diff"] = float((got - torch.stack(want)).abs().max())
    return {"times": time_generations(step, cfg.gens), "check": result}


def run_child(name: str, cfg: Config) -> dict[str, Any]:
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "deeplinear": lambda: run_deeplinear(cfg, low_rank=False),
        "deeplinear-lowrank": lambda: run_deeplinear(cfg, low_rank=True),
        "evotorch-true": lambda: run_evotorch(cfg, "true"),
        "evotorch-hwftz": lambda: run_evotorch(cfg, "hwftz"),
        "evotorch-scaled": lambda: run_evotorch(cfg, "scaled"),
        "evosax-true": lambda: run_evosax(cfg, "true"),
        "evosax-scaled": lambda: run_evosax(cfg, "scaled"),
    }
    return runners[name]()


# --- the parent: one subprocess per runner, then the table -------------------------------------

def spawn(name: str, cfg: Config) -> dict[str, Any]:
    """Run one runner in a fresh interpreter; add its peak RSS from ``wait4``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--config",
           json.dumps(asdict(cfg))]
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.threads),
               JAX_PLATFORMS="cpu" if cfg.device == "cpu" else "cuda")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"name": name, "error": f"exit {proc.returncode}"}
    result = json.loads(out.strip().splitlines()[-1])
    result.update(name=name, peak_rss_gib=usage.ru_maxrss / 2**20)
    result["s_per_gen"] = statistics.median(result["times"])
    return result


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "evotorch", "evosax", "jax", "jaxlib", "deeplinear"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    return out


def table(results: list[dict[str, Any]], cfg: Config) -> str:
    base = next((r["s_per_gen"] for r in results if r["name"] == "deeplinear" and "error" not in r),
                math.nan)
    lines = [f"{'runner':20s} {'s/gen':>8s} {'/deeplinear':>12s} {'peak GiB':>8s} "
             f"{'loss@init':>9s} {'const':>5s} {'argmax=':>7s} {'max|dlogit|':>11s}"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:20s} {r['error']}")
            continue
        c = r["check"]
        lines.append(
            f"{r['name']:20s} {r['s_per_gen']:8.3f} {r['s_per_gen'] / base:12.1f} "
            f"{r['peak_rss_gib']:8.2f} {c['loss_at_init']:9.4f} "
            f"{'yes' if c['constant_output'] else 'no':>5s} "
            f"{c['argmax_agree']:7.1%} {c['max_abs_logit_diff']:11.3g}")
    head = (f"net {NETS[cfg.net]} (scale 2^{cfg.scale_exp}, TF_GPU), pop {cfg.pop}, batch "
            f"{cfg.batch}, float32, {cfg.threads} threads, on {cfg.device}, median of {cfg.gens} "
            "generations")
    foot = ("/deeplinear: s/gen over deeplinear's (full-rank) s/gen, i.e. how many times slower. "
            "check columns: loss and logits at\nthe initial weights vs deeplinear's exact mode "
            "(true scale, TF_GPU): const = every example gets the same logits.")
    return head + "\n" + "\n".join(lines) + "\n" + foot


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--net", choices=sorted(NETS), default="2017")
    p.add_argument("--pop", type=int, default=Config.pop)
    p.add_argument("--batch", type=int, default=Config.batch)
    p.add_argument("--gens", type=int, default=Config.gens)
    p.add_argument("--threads", type=int, default=Config.threads)
    p.add_argument("--runners", default=",".join(RUNNERS),
                   help=f"comma-separated subset of {','.join(RUNNERS)}")
    p.add_argument("--data-dir", help="directory of the Fashion-MNIST .gz files (2017 net)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where every runner computes (default cpu)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args.child, Config(**json.loads(args.config)))))
        return 0
    names = [n for n in args.runners.split(",") if n]
    unknown = sorted(set(names) - set(RUNNERS))
    if unknown:
        p.error(f"unknown runner(s) {', '.join(unknown)}; choose from {', '.join(RUNNERS)}")
    cfg = Config(net=args.net, pop=args.pop, batch=args.batch, gens=args.gens,
                 threads=args.threads, data_dir=args.data_dir, device=args.device)
    from deeplinear.bench import load_avg, machine_info

    machine = machine_info(args.device)  # the load average: "quiet" is a measurement, not a word
    del machine["threads"]  # this process's; each runner uses cfg.threads
    results = []
    for name in names:
        r = spawn(name, cfg)
        results.append(r)
        print(f"  {name}: {r.get('s_per_gen', r.get('error'))}", file=sys.stderr, flush=True)
    machine["load_avg_1m_end"] = load_avg()
    print(table(results, cfg))
    loads = " / ".join("-" if v is None else f"{v:.2f}"
                       for v in (machine["load_avg_1m"], machine["load_avg_1m_end"]))
    gpu = f", GPU {machine['gpu']}" if "gpu" in machine else ""
    print(f"machine: {machine['cpu']}, {machine['cores']} cores{gpu}; load average (1 min) at "
          f"start / end: {loads}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "machine": machine, "versions": versions(),
                       "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
