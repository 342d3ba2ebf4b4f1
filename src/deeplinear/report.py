"""Render a reproduction's ``results.json`` as ``report.md`` and a self-contained ``report.html``.

Why a separate module: the numbers come from runs (:mod:`deeplinear.reproduce`); this module only
draws and formats them, so a report can be re-rendered from a results file without retraining.
Plots are PNG files beside the report; the HTML embeds them as base64 so it travels as one file.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from deeplinear.evaluate import interval

DPI = 110  # every PNG of a report or probe: small files, readable when embedded in HTML


def save_figure(fig: plt.Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG and free it (pyplot keeps every open figure alive otherwise)."""
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def plot_learning_curves(task: dict[str, Any], path: Path) -> Path:
    """Test accuracy against wall time, one line per method, as the trainers logged it: deep
    linear nets in scaled mode (the same flush decisions at full speed), while the report's
    tables score them in exact mode; the title says so."""
    fig, ax = plt.subplots(figsize=(6, 3.6), layout="tight")
    for name, res in task["methods"].items():
        rows = [r for r in res.get("curve", []) if r.get("test_acc") is not None]
        if rows:
            ax.plot([r["wall_s"] for r in rows], [100 * r["test_acc"] for r in rows],
                    marker=".", label=name)
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{task['dataset']}: learning curves (deep linear nets in scaled mode)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save_figure(fig, path)


def plot_occupancy(task: dict[str, Any], path: Path) -> Path:
    """Fraction of each layer's values the underflow flushed, per deep linear method.

    One group of bars per layer, ticked 1..L at the group's centre (the last is the output)."""
    fig, ax = plt.subplots(figsize=(6, 3.8), layout="tight")
    items = [(n, r["occupancy"]) for n, r in task["methods"].items() if r.get("occupancy")]
    width = 0.8 / max(len(items), 1)
    for i, (name, occ) in enumerate(items):
        xs = [j + (i - (len(items) - 1) / 2) * width for j in range(len(occ))]
        ax.bar(xs, [100 * v for v in occ], width=width, label=name)
    layers = max((len(occ) for _, occ in items), default=0)
    ax.set_xticks(range(layers), [str(j + 1) for j in range(layers)])
    ax.set_xlabel("layer (the last is the output)")
    ax.set_ylabel("flushed (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{task['dataset']}: dead-zone occupancy (exact mode, test set)")
    # below the axes: bars of any height reach the top, where a legend inside would hide them
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    return save_figure(fig, path)


def plot_decision_regions(panels: dict[str, Any], x: Any, y: Any, path: Path,
                          title: str, n_classes: int) -> Path:
    """2-D tasks: each method's predicted class over a grid, with the test points on top.

    ``panels`` maps a method to ``(xx, yy, zz)`` grid coordinates and predicted classes;
    ``title`` says which data and how the nets were run (the panels carry only method names).
    One colour band per class (levels at the half-integers between class indices), the points
    in the same colours, so a region and the points of its class always match.
    """
    n = len(panels)
    cmap = "coolwarm" if n_classes <= 2 else "tab10" if n_classes <= 10 else "turbo"
    levels = np.arange(n_classes + 1) - 0.5
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.0), squeeze=False, layout="tight")
    fig.suptitle(title, fontsize=9)
    for ax, (name, (xx, yy, zz)) in zip(axes[0], panels.items(), strict=True):
        ax.contourf(xx, yy, zz, alpha=0.35, cmap=cmap, levels=levels)
        ax.scatter(x[:, 0], x[:, 1], c=y, s=2, cmap=cmap, vmin=levels[0], vmax=levels[-1])
        ax.set_title(name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, path)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _interval(acc: float | None, n: int | None) -> str:
    if acc is None or n is None:  # results written before the test size was recorded
        return "—"
    lo, hi = interval(acc, n)
    return f"{100 * lo:.1f}-{100 * hi:.1f}"


def results_table(task: dict[str, Any]) -> str:
    rows = []
    for name, r in task["methods"].items():
        rows.append([
            name, _pct(r.get("train_acc")), _pct(r.get("test_acc")),
            _interval(r.get("test_acc"), task.get("n_test")),
            f"{r.get('wall_s', 0):.1f}", r.get("evaluated_in", ""),
            f"`{r['run']}`" if "run" in r else "—",
        ])
    return _table(["method", "train", "test", "test, 95% interval", "wall (s)", "evaluated in",
                   "run directory"], rows)


def paired_table(task: dict[str, Any]) -> str:
    """The exact McNemar test of each pair of methods (``reproduce.paired_tests``)."""
    rows = [[f"{p['a']} / {p['b']}", str(p["a_only"]), str(p["b_only"]),
             f"{p['p_value']:.2g}" if p["p_value"] > 0 else "< 1e-300"]
            for p in task.get("paired", [])]
    return _table(["A / B", "only A right", "only B right", "p (exact McNemar)"], rows) if rows \
        else ""


def portability_table(task: dict[str, Any]) -> str:
    methods = {n: r["portability"]["test_acc"] for n, r in task["methods"].items()
               if r.get("portability")}
    if not methods:
        return ""
    columns = list(next(iter(methods.values())))
    rows = [[n] + [_pct(p.get(c)) for c in columns] for n, p in methods.items()]
    return _table(["trained net \\ evaluated under", *columns], rows)


def render(results: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write report.md and report.html (plots embedded) into ``out``; return their paths."""
    md: list[str] = [f"# deeplinear reproduction\n\n{results['header']}\n"]
    images: list[tuple[str, Path]] = []
    for task in results["tasks"]:
        md.append(f"## {task['dataset']}\n\n{task['description']}\n")
        md.append(results_table(task) + "\n")
        if "n_test" in task:
            md.append(f"Test, 95% interval: Wilson score interval over the {task['n_test']} test "
                      "samples; it covers the draw of the test set, not the seed-to-seed spread "
                      "of training (one seed per method).\n")
        pairs = paired_table(task)
        if pairs:
            md.append("Paired: each pair of methods on the same test samples; p is the chance "
                      "of a split at least this uneven between the samples only one of the two "
                      "gets right, were both equally good (exact McNemar test).\n\n"
                      + pairs + "\n")
        port = portability_table(task)
        if port:
            md.append("Portability: test accuracy of the same weights in true float32 under each "
                      "semantics, and of their collapsed affine map.\n\n" + port + "\n")
        for plot in task.get("plots", []):
            p = out / plot
            md.append(f"![{plot}]({plot})\n")
            images.append((plot, p))
    (out / "report.md").write_text("\n".join(md))
    html_path = out / "report.html"
    html_path.write_text(_to_html("\n".join(md), images))
    return out / "report.md", html_path


def _inline(text: str) -> str:
    """Escaped text with Markdown's inline `code` and **bold** as tags."""
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)


def _to_html(markdown: str, images: list[tuple[str, Path]]) -> str:
    """The Markdown subset :func:`render` writes (headings, paragraphs, tables, images) to HTML
    with inline images."""
    embedded = {name: base64.b64encode(p.read_bytes()).decode() for name, p in images}
    body: list[str] = []
    in_table = False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            row = "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells)
            body.append(f"<tr>{row}</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        if line.startswith("!["):
            name = line[line.index("(") + 1 : line.rindex(")")]
            body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,'
                        f'{embedded[name]}">')
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}"
             "img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>deeplinear report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
