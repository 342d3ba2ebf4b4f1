"""Re-measure the timing figures that comments in the source give as the reason for a design.

Why: "a fresh large tensor costs ~10 ms here" or "an Adam step with subnormal moments took 203 ms"
is a claim like any other, and a reader should be able to rerun it. Each function below measures
one such claim side by side in one process (the two variants interleaved, medians) and the
comment quotes the kept output, ``benchmarks/results/source_figures_cpu2.txt``:

    python benchmarks/source_figures.py | tee benchmarks/results/source_figures_cpu2.txt

About 2 minutes on 2 cores; ``--quick`` shrinks every size (a smoke run, figures meaningless).
Kept runs: ``source_figures_cpu2.txt`` (session 17), ``source_figures_cpu2_s21.txt`` (with the
staircase rule's figure) and ``source_figures_cpu2_s22.txt`` (chunks counting their activations).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from deeplinear import engine as engine_mod
from deeplinear import es
from deeplinear.arithmetic import hardware_ftz
from deeplinear.bench import NETS, BenchConfig, forward_flops, machine_info, make_setup, sgemm_peak
from deeplinear.data import DataError, load_mnist_like
from deeplinear.engine import Engine
from deeplinear.nets import SIZES_2017, DeepLinear

NET_2017 = SIZES_2017


def side_by_side(variants: dict[str, Callable[[], object]], rounds: int,
                 before: Callable[[], object] = lambda: None) -> dict[str, float]:
    """Median seconds of each variant, the variants interleaved round by round (so drift in the
    machine's speed hits all alike); ``before`` runs untimed ahead of every call."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm-up
        before()
        fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            before()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def fresh_tensor(mib: int, rounds: int) -> dict[str, float]:
    """engine.py: writing a new large tensor pays its page faults; a reused buffer does not."""
    n = mib << 18
    buf = torch.empty(n)
    buf.fill_(0)
    return side_by_side({"fresh": lambda: torch.empty(n).fill_(1.0),
                         "reused": lambda: buf.fill_(1.0)}, rounds)


def chunk_sizes(sizes: tuple[int, ...], pop: int, batch: int, rank: int, chunks: tuple[int, int],
                threads: int, rounds: int) -> dict[str, float]:
    """engine.py CHUNK_CACHE_BYTES: one evaluation of the population with two chunk sizes (and,
    under ``"member MiB"``, a member's share of the working set that constant bounds)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s = make_setup(sizes, pop, batch, rank, BenchConfig(nets=("2017",)))
        engines = {c: Engine(s.net, s.strategy, chunk=c) for c in chunks}
        pop_ = es.ask(s.strategy, s.state)
        t = side_by_side({f"chunk {c}": (lambda e=e: e.losses(pop_, s.x, s.y))
                          for c, e in engines.items()}, rounds)
        return t | {"member MiB": engine_mod.member_bytes(s.strategy.layout, batch, rank) / 2**20}
    finally:
        torch.set_num_threads(previous)


def misaligned_bmm(sizes: tuple[int, ...], members: int, batch: int,
                   rounds: int) -> dict[str, float]:
    """engine.py ALIGN: batched GEMMs of layers 1-2 on member rows of the layout's length (all but
    the first start off a 64-byte line) vs rows padded to 16 floats; GFLOP/s per layer."""
    layout = es.Layout.of(sizes)
    g = torch.Generator().manual_seed(0)
    out: dict[str, float] = {}
    for label, stride in (("packed", layout.n), ("aligned", engine_mod.aligned(layout.n))):
        flat = torch.randn(members * stride, generator=g)
        rows = flat.as_strided((members, layout.n), (stride, 1))
        for i in (0, 1):
            w, _ = layout.layer(rows, i)
            x = torch.rand(members, batch, w.shape[1], generator=g)
            y = torch.empty(members, batch, w.shape[2])
            t = side_by_side({"bmm": lambda w=w, x=x, y=y: torch.bmm(x, w, out=y)}, rounds)
            out[f"layer {i + 1} {label}"] = 2 * members * batch * w[0].numel() / t["bmm"] / 1e9
    return out


def normals(n: int, rounds: int) -> dict[str, float]:
    """es.py noise table: drawing N(0, 1) float32 with torch's CPU generator, normals/s."""
    g = torch.Generator().manual_seed(0)
    buf = torch.empty(n)
    t = side_by_side({"randn": lambda: torch.randn(n, generator=g, out=buf)}, rounds)
    return {"M normals/s": n / t["randn"] / 1e6}


def adam_state(sizes: tuple[int, ...], frac: float) -> tuple[torch.optim.Optimizer,
                                                            dict[str, dict[str, torch.Tensor]],
                                                            torch.Tensor]:
    """An AdamW over the net's parameters (one flat tensor) after one step, where ``frac`` of
    them have a zero gradient; the moments to start each timed step from, normal and with those
    entries subnormal (as a stopped gradient's moments become); and the weights to restore."""
    n = es.Layout.of(sizes).n
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n, generator=g) * 0.05)
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(n, generator=g) * 1e-3
    p.grad[torch.rand(n, generator=g) < frac] = 0.0
    opt.step()  # creates the state
    normal = {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
    tiny = {k: v.clone() for k, v in normal.items()}
    tiny["exp_avg"][p.grad == 0], tiny["exp_avg_sq"][p.grad == 0] = 1e-39, 1e-40
    return opt, {"normal moments": normal, "subnormal moments": tiny}, p.detach().clone()


def adam_subnormal(sizes: tuple[int, ...], frac: float, rounds: int) -> dict[str, float]:
    """backprop.py _step: one AdamW step, plain vs under hardware FTZ+DAZ, from normal and from
    subnormal moments; and zeroing the moments' tiny entries (the alternative to FTZ)."""
    opt, starts, weights = adam_state(sizes, frac)
    p = opt.param_groups[0]["params"][0]
    state = opt.state[p]

    def reset(moments: dict[str, torch.Tensor]) -> Callable[[], None]:
        def go() -> None:
            with torch.no_grad():
                p.copy_(weights)
            for k, v in moments.items():
                state[k].copy_(v)
        return go

    def step_ftz() -> None:
        with hardware_ftz():
            opt.step()

    floor = torch.finfo(torch.float32).tiny
    out = {}
    for label, moments in starts.items():
        t = side_by_side({"plain": opt.step, "FTZ+DAZ": step_ftz}, rounds, reset(moments))
        out |= {f"{label}, {k}": v for k, v in t.items()}
    t = side_by_side({"zero tiny moments": lambda: [
        state[k].masked_fill_(state[k].abs() < floor, 0.0) for k in ("exp_avg", "exp_avg_sq")]},
        rounds, reset(starts["subnormal moments"]))
    return out | t


def dataset_copy(rounds: int) -> dict[str, float] | None:
    """data.py Dataset.subset: what a full-size copy of Fashion-MNIST would cost (None: the set
    is not on this machine; nothing is downloaded)."""
    try:
        ds = load_mnist_like("fashion-mnist", download=False)
    except DataError:
        return None
    n_train, n_test = len(ds.y_train), len(ds.y_test)
    return side_by_side({"copy": lambda: ds.subset(n_train, n_test)}, rounds)


def staircase_rule(generations: int, rounds: int, ieee: bool = False
                   ) -> tuple[dict[str, float], bool]:
    """engine.py inplace_staircase: ES on the subnormal-staircase regime (2-64-64-2, spirals, the
    regimes study's ES settings, pop 100, one thread; ``ieee``: an IEEE net at the 2017 scale,
    step 2^-24, instead) with the masked rule the engine used before against the in-place one;
    and whether both end on the same weights."""
    from deeplinear.data import load_dataset
    from deeplinear.regimes import STUDY_ES, Regime
    from deeplinear.train import es as es_train

    data = load_dataset("spirals")
    arithmetic: dict = ({"semantics": "IEEE"} if ieee
                        else {"regime": Regime("subnormal-staircase", 149)})
    inplace = engine_mod.inplace_rule

    def masked(net: DeepLinear) -> Callable[[torch.Tensor], torch.Tensor]:
        rule = net.under()
        return lambda u: u.copy_(rule(u))

    def run(rule: Callable[[DeepLinear], Callable[[torch.Tensor], torch.Tensor]]) -> list:
        engine_mod.inplace_rule = rule  # what Engine calls for the net's rule
        try:
            net = DeepLinear([2, 64, 64, 2], **arithmetic,
                             generator=torch.Generator().manual_seed(0))
            cfg = es_train.Config(**STUDY_ES, steps=generations, pop=100, seed=0, init_gain=2.0,
                                  eval_every=generations, threads=1)
            es_train.train(net, data, cfg, progress=False)
            return [p.detach().clone() for p in net.parameters()]
        finally:
            engine_mod.inplace_rule = inplace

    weights: dict[str, list] = {}  # each variant's last run
    t = side_by_side({name: lambda name=name, rule=rule: weights.__setitem__(name, run(rule))
                      for name, rule in (("masked", masked), ("in place", inplace))}, rounds)
    same = all(torch.equal(a, b) for a, b in zip(*weights.values(), strict=True))
    return t, same


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    q = a.quick
    net = (16, 32, 32, 10) if q else NET_2017
    info = machine_info("cpu")
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
          f"{a.threads} threads, load {info['load_avg_1m']}; medians of {a.rounds} interleaved "
          "rounds after a warm-up")
    peak = sgemm_peak("cpu", n=256 if q else None)["gflops"]
    print(f"sgemm peak: {peak:.0f} GFLOP/s")

    t = fresh_tensor(1 if q else 32, a.rounds)
    print(f"\n[engine.py] writing a {1 if q else 32} MiB tensor: fresh {t['fresh'] * 1e3:.2f} ms, "
          f"reused buffer {t['reused'] * 1e3:.2f} ms")

    print("\n[engine.py CHUNK_CACHE_BYTES] one evaluation (the first chunk size is the engine's):")
    small = NETS["small"]
    for sizes, rank, pop, batch, chunks, threads in (
            (net, 0, 500, 100, (10, 60), 2), (net, 0, 500, 1000, (4, 12), 2),
            (small, 0, 500, 1000, (12, 98), 2), (small, 0, 500, 1000, (12, 98), 1),
            (net, 1, 300, 100, (54, 300), 1), (net, 1, 300, 1000, (4, 32), 1)):
        if q:
            pop, batch, chunks = 8, 10, (2, 8)
        else:  # the engine's own choice first, then the one it made before
            own = Engine(DeepLinear(sizes), es.Strategy(es.Layout.of(sizes), pop=pop, rank=rank)
                         ).members_per_chunk(batch)
            if own != chunks[0]:
                raise SystemExit(f"source_figures: the engine now cuts {sizes} (rank {rank}, "
                                 f"batch {batch}) into chunks of {own}, not {chunks[0]}; update "
                                 "the row")
        t = chunk_sizes(sizes, pop, batch, rank, chunks, threads, a.rounds)
        (c1, t1), (c2, t2) = ((k, v) for k, v in t.items() if k.startswith("chunk"))
        mib = [c * t["member MiB"] for c in chunks]
        print(f"  {'-'.join(map(str, sizes))}, {'low' if rank else 'full'} rank, pop {pop}, batch "
              f"{batch}, {threads} thread(s): {c1} ({mib[0]:.0f} MiB) {t1 * 1e3:.1f} ms, {c2} "
              f"({mib[1]:.0f} MiB) {t2 * 1e3:.1f} ms: {t2 / t1:.2f}x")

    members, batch = (4, 10) if q else (12, 100)
    t = misaligned_bmm(net, members, batch, a.rounds)
    print(f"\n[engine.py ALIGN] batched sgemm, {members} members, batch {batch}, GFLOP/s: "
          + ", ".join(f"{k} {v:.0f}" for k, v in t.items()))

    n = 1 << 16 if q else 250 * es.Layout.of(NET_2017).n
    r = normals(n, a.rounds)["M normals/s"]
    gemm = 500 * forward_flops(NET_2017, 100) / (peak * 1e9)
    print(f"\n[es.py noise table] torch CPU generator: {r:.0f} M normals/s; one generation of the "
          f"2017 net at pop 500 needs {250 * es.Layout.of(NET_2017).n / 1e6:.0f} M normals "
          f"({250 * es.Layout.of(NET_2017).n / r / 1e6:.2f} s) against {gemm:.2f} s of GEMMs at "
          "the peak")

    t = adam_subnormal(net, 0.2, a.rounds)
    print("\n[backprop.py _step] one AdamW step of the net's parameters, 20% with zero gradient:")
    for k, v in t.items():
        print(f"  {k}: {v * 1e3:.1f} ms")

    t = None if q else dataset_copy(a.rounds)
    print("\n[data.py Dataset.subset] "
          + ("Fashion-MNIST not found, skipped" if t is None else
             f"a full-size copy of Fashion-MNIST: {t['copy'] * 1e3:.0f} ms"))

    gens = 5 if q else 300
    print(f"\n[engine.py inplace_staircase] ES, 2-64-64-2, pop 100, {gens} generations, one "
          "thread, masked rule vs in place:")
    for ieee, what in ((False, "staircase regime, k=149"), (True, "IEEE, k=125")):
        t, same = staircase_rule(gens, min(a.rounds, 3), ieee)
        print(f"  {what}: masked {t['masked']:.2f} s, in place {t['in place']:.2f} s: "
              f"{t['masked'] / t['in place']:.2f}x; same weights: {same}")
    torch.set_num_threads(a.threads)  # the run above set one thread for itself


if __name__ == "__main__":
    main()
