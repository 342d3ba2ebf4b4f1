"""``deeplinear probe``: how nonlinear is a deep linear net at init, under each float semantics.

Prints the blog's algebra counterexamples, the collapse gap, the linearity defects and the
dead-zone occupancy per semantics (see :mod:`deeplinear.probes` for the definitions), as a table
or as JSON, and optionally draws the implicit activation to a PNG.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import time
from pathlib import Path
from typing import Any

from deeplinear.arithmetic import FORMATS, PRESETS
from deeplinear.cli import seed, semantics_names, summary
from deeplinear.nets import SCALE_EXP, SIZES_2017, parse_sizes
from deeplinear.probes import make_nets, plot_implicit_activation, probe_inputs, probe_report
from deeplinear.regimes import KINDS, format_probe_report, plot_sweeps
from deeplinear.regimes import probe_report as regime_probe

# The net probe's flags: None in the parser, so that giving one in regime mode is an error
# rather than silently ignored; these are the defaults their help documents.
NET_DEFAULTS: dict[str, Any] = {"sizes": ",".join(map(str, SIZES_2017)), "semantics": "all",
                                "n": inspect.signature(probe_report).parameters["n"].default,
                                "n_fit": None, "scale_exp": SCALE_EXP}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "probe", help="nonlinearity diagnostics of a deep linear net at init",
        description=summary(__doc__))  # plain text, not RST
    p.add_argument("--sizes", default=None,
                   help="layer widths, input first (default: the 2017 net "
                        f"{NET_DEFAULTS['sizes']})")
    p.add_argument("--semantics", default=None,
                   help=f"{' | '.join(PRESETS)} | all, or a comma-separated list "
                        f"(default: {NET_DEFAULTS['semantics']})")
    p.add_argument("--seed", type=seed, default=0, help="seed of weights and inputs (default: 0)")
    p.add_argument("--n", type=int, default=None,
                   help="random inputs for the defects and occupancy "
                        f"(default: {NET_DEFAULTS['n']})")
    p.add_argument("--n-fit", type=int, default=None,
                   help="inputs for the affine fit (default: 4 x (input width + 1))")
    p.add_argument("--scale-exp", type=int, default=None,
                   help=f"the scale 2^k (default: {NET_DEFAULTS['scale_exp']})")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--plot", metavar="FILE.png", default=None,
                   help="also draw the implicit activation and occupancy to this PNG")
    p.add_argument("--regime", default=None,
                   help="instead of probing a net, sweep a regime's implicit activation on "
                        f"N(0,1): {' | '.join(KINDS)} | all, or KIND:PARAM for one parameter; "
                        "the net flags (--sizes, --semantics, --n, --n-fit, --scale-exp) are "
                        "then an error")
    p.add_argument("--format", default=None, choices=list(FORMATS),
                   help="format of the regime sweep (default: float32); given without "
                        "--regime, it sweeps all regimes, as --regime all does")
    p.set_defaults(func=run)


def _check_plot_path(text: str) -> Path:
    """Fail before the (slow) computation if the PNG cannot be written."""
    path = Path(text)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--plot {text}: the file name must end in .png")
    if path.is_dir():
        raise IsADirectoryError(f"--plot {text}: is a directory; give a file name ending in .png")
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"--plot {text}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"--plot {text}: not writable; choose another path")
    return path


def _num(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"


def _sides(row: dict[str, Any]) -> str:
    return f"{_num(row['lhs'])} | {_num(row['rhs'])}" + (" *" if row["differs"] else "  ")


def format_report(r: dict[str, Any]) -> str:
    """The report as aligned text: the algebra table, then one column per semantics."""
    names = list(r["semantics"])
    lines = [
        f"net {'-'.join(map(str, r['sizes']))}, scale 2^{r['scale_exp']}, seed {r['seed']}, "
        f"{r['n']} inputs {r['inputs']} ({r['n_fit']} for the affine fit), {r['mode']} mode",
    ]
    for fmt, ratio in r["normal_gap_ratio"].items():
        note = (f" (the blog says 2^{round(math.log2(r['blog_normal_gap_ratio_float32']))})"
                if fmt == "float32" else "")
        lines.append(f"{fmt}: gap 0 -> min is 2^{round(math.log2(ratio))} = {ratio} times "
                     f"the gap min -> next{note}")
    lines += ["", "Blog algebra examples (lhs | rhs; * = the law fails)"]
    width = max(14, *(len(n) + 2 for n in names))
    laws = dict.fromkeys(row["law"] for row in r["algebra"])
    lines.append(f"  {'':<48}" + "".join(f"{n:>{width}}" for n in names))
    for law in laws:
        rows = {row["semantics"]: row for row in r["algebra"] if row["law"] == law}
        first = next(iter(rows.values()))
        unit = " [units of min]" if first["unit"] == "min" else ""
        head = f"{law} {first['lhs_expr']} | {first['rhs_expr']}{unit}"
        cells = "".join(f"{_sides(rows[n]):>{width}}" for n in names)
        lines.append(f"  {head:<48}" + cells)
        lines.append(f"    {first['inputs']}; needs {first['needs']}")
    lines += ["", f"  {'':<48}" + "".join(f"{n:>{width}}" for n in names)]

    def row(label: str, get: Any) -> None:
        lines.append(f"  {label:<48}" + "".join(f"{_num(get(r['semantics'][n])):>{width}}"
                                                 for n in names))

    row("collapse gap (relative to the collapsed map)", lambda s: s["collapse_gap"]["relative"])
    row("argmax agreement with the collapsed map", lambda s: s["collapse_gap"]["argmax_agreement"])
    row("additivity defect", lambda s: s["additivity"])
    for a in next(iter(r["semantics"].values()))["homogeneity"]:
        row(f"homogeneity defect, a = {a}", lambda s, a=a: s["homogeneity"][a])
    row("affine-fit residual (relative, centred)", lambda s: s["affine_fit_residual"])
    n_layers = len(r["sizes"]) - 1
    for i in range(n_layers):
        label = "output layer" if i == n_layers - 1 else f"layer {i + 1}"
        row(f"dead-zone occupancy, {label}", lambda s, i=i: s["occupancy"][i])
    row("seconds", lambda s: s["seconds"])
    return "\n".join(lines)


def _net_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The net flags as given, the documented defaults where not."""
    return {name: default if getattr(args, name) is None else getattr(args, name)
            for name, default in NET_DEFAULTS.items()}


def _run_regimes(args: argparse.Namespace, plot: Path | None) -> int:
    """``--regime`` / ``--format``: strength sweeps of the regimes, no net involved."""
    mode = "--regime" if args.regime is not None else "--format"
    for name in NET_DEFAULTS:
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} applies to the net probe, not to the regime sweep that "
                             f"{mode} asks for; drop {flag} or {mode}")
    if args.regime is not None and not args.regime.strip():
        raise ValueError("--regime is empty; use " + " | ".join(KINDS) + " | all, or KIND:PARAM")
    regimes = regime_probe("all" if args.regime is None else args.regime,
                           args.format or "float32", seed=args.seed)
    if plot is not None:
        regimes["plot"] = str(plot_sweeps(plot, regimes["sweeps"]))
    if args.json:
        print(json.dumps(regimes, indent=2))
    else:
        print(format_probe_report(regimes))
        if plot is not None:
            print(f"plot written to {plot}")
    return 0


def run(args: argparse.Namespace) -> int:
    plot = _check_plot_path(args.plot) if args.plot else None
    if args.regime is not None or args.format is not None:
        return _run_regimes(args, plot)
    net = _net_settings(args)
    sizes = parse_sizes(net["sizes"])
    names = semantics_names(net["semantics"]) or list(PRESETS)
    if net["n"] < 1:
        raise ValueError(f"--n must be a positive number of inputs, got {net['n']}")
    start = time.perf_counter()
    report = probe_report(sizes, names, seed=args.seed, n=net["n"], n_fit=net["n_fit"],
                          scale_exp=net["scale_exp"])
    report["total_seconds"] = time.perf_counter() - start
    if plot is not None:
        nets = make_nets(sizes, names, args.seed, net["scale_exp"])
        plot_implicit_activation(plot, nets, {k: v["occupancy"]
                                              for k, v in report["semantics"].items()},
                                 title=f"a He-initialised {'-'.join(map(str, sizes))} net "
                                       f"(seed {args.seed}) under each semantics",
                                 inputs=probe_inputs(sizes[0], net["n"], args.seed))
        report["plot"] = str(plot)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        print(f"total {report['total_seconds']:.1f} s" + (f"; plot written to {plot}"
                                                           if plot else ""))
    return 0
