"""The same reproduction on several seeds: how much of a table's figure is the seed?

One reproduction's report gives each test accuracy with the test set's 95% interval, which says
nothing of how another seed would train (other initial weights, noise, minibatches, and for the
generated sets and digits another split). This reads the ``results.json`` of reproductions that
differ only in ``--seed`` and prints, per dataset and method, the test accuracy of each seed and
their mean, standard deviation and range; with ``--out`` also as Markdown and JSON.

    for s in 0 1 2 3 4; do deeplinear reproduce --seed $s --out runs/seed$s; done
    python benchmarks/seed_spread.py runs/seed0 runs/seed1 runs/seed2 runs/seed3 runs/seed4 \
        --out benchmarks/results/seed_spread
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def settings(header: str) -> tuple[str, int]:
    """A reproduction's command with its ``--seed`` taken out (what the runs must share), and
    the seed."""
    parts = header.split("`")
    words = parts[1].split() if len(parts) > 2 else []
    if "--seed" not in words[:-1]:
        raise SystemExit(f"not a reproduction's header (no `deeplinear reproduce ... --seed N`): "
                         f"{header[:80]!r}")
    i = words.index("--seed")
    return " ".join(words[:i] + words[i + 2:]), int(words[i + 1])


def spread(dirs: list[Path]) -> dict[str, Any]:
    """Per dataset and method: each seed's test accuracy and their summary statistics."""
    if len(dirs) < 2:
        raise SystemExit("a spread needs at least two reproductions (one --out per seed)")
    runs = []
    for d in dirs:
        try:
            runs.append(json.loads((d / "results.json").read_text()))
        except (OSError, ValueError) as e:
            raise SystemExit(f"{d}: no readable results.json ({e}); pass the --out of a "
                             "finished reproduction") from None
    commands, seeds = zip(*(settings(r["header"]) for r in runs), strict=True)
    shared = set(commands)
    if len(shared) != 1:
        raise SystemExit(f"the reproductions differ in more than --seed: {sorted(shared)}")
    seeds = list(seeds)
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"two reproductions have the same seed: {seeds}")
    out: dict[str, Any] = {"command": shared.pop(), "seeds": seeds,
                           "runs": [str(d) for d in dirs], "tasks": {}}
    for name in [t["dataset"] for t in runs[0]["tasks"]]:
        per_method: dict[str, Any] = {}
        for r in runs:
            task = next(t for t in r["tasks"] if t["dataset"] == name)
            for method, m in task["methods"].items():
                per_method.setdefault(method, []).append(m["test_acc"])
        out["tasks"][name] = {
            method: {"test_acc": accs, "mean": statistics.fmean(accs),
                     "sd": statistics.stdev(accs),
                     "min": min(accs), "max": max(accs)}
            for method, accs in per_method.items()}
    return out


def markdown(s: dict[str, Any]) -> str:
    seeds = s["seeds"]
    lines = [f"Command (each with `--seed N`, N = {', '.join(map(str, seeds))}): "
             f"`{s['command']}`; runs: {', '.join(f'`{r}`' for r in s['runs'])}.", ""]
    for name, methods in s["tasks"].items():
        lines += [f"**{name}**, test accuracy (exact float32 for deep linear nets):", "",
                  "| method | " + " | ".join(f"seed {k}" for k in seeds)
                  + " | mean | sd | range |",
                  "|---|" + "---|" * (len(seeds) + 3)]
        for method, m in methods.items():
            lines.append(f"| {method} | " + " | ".join(f"{100 * a:.1f}" for a in m["test_acc"])
                         + f" | {100 * m['mean']:.1f} | {100 * m['sd']:.1f} | "
                         f"{100 * m['min']:.1f}-{100 * m['max']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="reproduction directories (--out of each)")
    p.add_argument("--out", type=Path, help="also write OUT.md and OUT.json")
    args = p.parse_args()
    s = spread(args.runs)
    text = markdown(s)
    print(text)
    if args.out:
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(s, indent=2) + "\n")


if __name__ == "__main__":
    main()
