"""``deeplinear bench``: throughput of the ES engine against this machine's sgemm peak.

Prints the machine, the settings and one table (see :mod:`deeplinear.bench` for what is measured
and how FLOPs are counted), or the whole report as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any

from deeplinear.bench import MODES, NETS, PEAK_N, QUICK, BenchConfig, format_report, run_bench
from deeplinear.cli import summary


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:  # argparse prints this one with its flag, not "invalid _ints value"
        raise argparse.ArgumentTypeError(f"bad list {text!r}: use integers like 100,500"
                                         ) from None


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="ES engine throughput vs this machine's GEMM peak",
        description=summary(__doc__))
    p.add_argument("--quick", action="store_true",
                   help=f"a fast subset: pop {QUICK['pops'][0]}, batch {QUICK['batches'][0]}, "
                        f"{QUICK['min_time']} s timings, no pop-{BenchConfig.target_pop} target")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the engine and the sgemm peak run (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own choice)")
    p.add_argument("--nets", nargs="+", default=None, metavar="NET",
                   help=f"{' and/or '.join(NETS)} and/or layer widths like 64,256,10 "
                        f"(default: {' '.join(BenchConfig.nets)})")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="full and/or lowrank (default: both)")
    p.add_argument("--pops", type=_ints, default=None,
                   help=f"populations (default: {','.join(map(str, BenchConfig.pops))})")
    p.add_argument("--batches", type=_ints, default=None,
                   help=f"batch sizes (default: {','.join(map(str, BenchConfig.batches))})")
    p.add_argument("--rank", type=int, default=None,
                   help=f"low-rank perturbation rank (default {BenchConfig.rank})")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds each row is repeated for, at least (default "
                        f"{BenchConfig.min_time:g}, quick {QUICK['min_time']})")
    p.add_argument("--peak-n", type=int, default=None,
                   help=f"matrix size of the sgemm peak (default {PEAK_N['cpu']} on CPU, "
                        f"{PEAK_N['cuda']} on CUDA)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    names = {f.name for f in fields(BenchConfig)}
    overrides: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                 for k, v in vars(args).items() if k in names and v is not None}
    return BenchConfig.quick(**overrides) if args.quick else BenchConfig(**overrides)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    report = run_bench(cfg, log=lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
