"""A/B: ``deeplinear bench`` rows of a git revision against the working tree, side by side.

Why: the sgemm peak of a shared 2-core VM moves by ~20% between runs, so an engine change is only
measured fairly against its base on the same machine, at the same time, interleaved. This script
extracts ``src/`` of ``--base`` into a temporary folder, then runs ``python -m deeplinear bench
--json ARGS`` alternately from the base and from the working tree (the order flips every round, so
a drift in the machine's speed hits both sides alike) and prints, per row, the median
generations/s and fraction of each run's own sgemm peak of both sides and their ratio.

    python benchmarks/ab.py --base HEAD~1 --rounds 3 -- --nets 2017 --modes full --pops 500 \\
        --batches 100 --min-time 1 --threads 2

On a machine without the project's git history (a lent GPU machine gets the working tree only),
``--base`` takes a ``src/`` folder made beforehand: ``git archive REV src | tar -x -C DIR`` and
``--base DIR/src``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def extract_src(rev: str, dest: Path) -> Path:
    """``src/`` of ``rev`` under ``dest``; a clear error if git does not know the revision."""
    run = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True)
    if run.returncode:
        raise SystemExit(f"ab: git cannot archive {rev!r}: "
                         f"{run.stderr.decode().strip().splitlines()[-1]}")
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
    with tarfile.open(fileobj=io.BytesIO(run.stdout)) as tar:
        tar.extractall(dest, **safe)
    return dest / "src"


def base_src(base: str, dest: Path) -> Path:
    """The base side's ``src/``: a folder holding ``deeplinear/`` as given, else a git revision."""
    folder = Path(base)
    if folder.is_dir():
        if not (folder / "deeplinear" / "__init__.py").is_file():
            raise SystemExit(f"ab: {base} holds no deeplinear/ package; pass a src/ folder "
                             "(git archive REV src | tar -x -C DIR) or a git revision")
        return folder
    return extract_src(base, dest)


def bench(src: Path, args: list[str]) -> dict:
    """One ``deeplinear bench --json`` run with ``src`` first on the path."""
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run([sys.executable, "-m", "deeplinear", "bench", "--json", *args],
                         env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"ab: bench from {src} failed:\n{out.stderr.strip()}")
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:  # e.g. --help among the bench arguments
        raise SystemExit(f"ab: bench from {src} printed no report:\n{out.stdout.strip()}"
                         ) from None


def key(row: dict) -> tuple:
    return row["net"], row["mode"], row["pop"], row["batch"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True,
                   help="git revision to compare against (e.g. HEAD~1), or a src/ folder")
    p.add_argument("--rounds", type=int, default=3, help="bench runs per side (default 3)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER,
                   help="after --: arguments for deeplinear bench")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    args = a.bench_args[1:] if a.bench_args[:1] == ["--"] else a.bench_args
    with tempfile.TemporaryDirectory() as tmp:
        sides = {"base": base_src(a.base, Path(tmp)), "head": ROOT / "src"}
        runs: dict[str, list[dict]] = {"base": [], "head": []}
        for r in range(a.rounds):
            for side in (("base", "head") if r % 2 == 0 else ("head", "base")):
                print(f"ab: round {r + 1}/{a.rounds}, {side}", file=sys.stderr, flush=True)
                runs[side].append(bench(sides[side], args))
    machine = runs["head"][0]["machine"]
    print(f"base {a.base} vs working tree; {a.rounds} runs each, interleaved; "
          f"{machine.get('cpu')}, {machine.get('threads')} threads; bench {' '.join(args)}")
    peaks = {s: [run["peak"]["gflops"] for run in runs[s]] for s in runs}
    print("sgemm peak GFLOP/s  base " + " ".join(f"{x:.0f}" for x in peaks["base"])
          + "  head " + " ".join(f"{x:.0f}" for x in peaks["head"]))
    print("| net | mode | pop | batch | base gen/s | head gen/s | head/base | base %peak "
          "| head %peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in runs["head"][0]["rows"]:
        k = key(row)
        med = {s: {f: statistics.median(r[f] for run in runs[s] for r in run["rows"] if key(r) == k)
                   for f in ("gens_per_s", "frac_of_peak")} for s in runs}
        b, h = med["base"], med["head"]
        print(f"| {' | '.join(map(str, k))} | {b['gens_per_s']:.3g} | {h['gens_per_s']:.3g} | "
              f"{h['gens_per_s'] / b['gens_per_s']:.2f}x | {b['frac_of_peak']:.0%} | "
              f"{h['frac_of_peak']:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
