"""How often a process's first vector-math call (torch's CPU sqrt, exp, log) rounds differently
from its second, with and without deeplinear's import-time kernel pick.

Why: oneMKL 2024.2 (bundled with torch 2.13's wheel) picks a VML kernel on a function's first
call, and a first call on two threads at once can leave one thread's half of the tensor less
accurately rounded (pytorch/pytorch#188792). ``deeplinear.arithmetic`` calls each function once,
serially, when imported (see ``VECTOR_MATH`` there). Only a process's first call can show the
race, so every try is a fresh interpreter, one at a time (side by side they did not race here).

    python benchmarks/vml_first_call.py --tries 40 | tee benchmarks/results/vml_first_call.txt

About 1.3 s per try on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys

TRY = """
import sys, torch
if sys.argv[2] == "deeplinear":
    import deeplinear.arithmetic
v = torch.rand(3466, generator=torch.Generator().manual_seed(0)) * 1e-3 + 1e-4
f = getattr(torch, sys.argv[1])
print(int(torch.equal(f(v), f(v))), torch.__version__)
"""


def first_call_differs(op: str, mode: str) -> tuple[bool, str]:
    """One fresh interpreter: whether its first ``op`` differs from its second; torch's version."""
    out = subprocess.run([sys.executable, "-c", TRY, op, mode], capture_output=True, text=True,
                         check=True, env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout.split()
    return out[0] == "0", out[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tries", type=int, default=40, help="fresh processes per op and mode")
    ap.add_argument("--ops", default="sqrt,exp,log")
    a = ap.parse_args(argv)
    version = first_call_differs("sqrt", "bare")[1]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{version}, OMP_NUM_THREADS=2; {a.tries} fresh processes per row, one at a time")
    for mode in ("bare", "deeplinear"):
        for op in a.ops.split(","):
            bad = sum(first_call_differs(op, mode)[0] for _ in range(a.tries))
            what = "torch alone" if mode == "bare" else "after import deeplinear.arithmetic"
            print(f"{op:5s} {what:35s}: first call differs in {bad} of {a.tries}", flush=True)


if __name__ == "__main__":
    main()
