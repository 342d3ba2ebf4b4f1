"""benchmarks/seed_spread.py: the same reproduction on several seeds, summarised per method."""

import json
import shutil
import statistics

import pytest
from helpers import load_benchmark

from deeplinear.reproduce import Budget, reproduce

TINY = Budget(backprop_steps=30, es={"steps": 4, "pop": 8})


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    for seed in (0, 1):
        reproduce("checkerboard", TINY, root / f"seed{seed}", seed=seed)
    return root


def test_spread_gives_each_seeds_accuracy_and_their_statistics(seeds, tmp_path, capsys):
    spread = load_benchmark("seed_spread")
    dirs = [seeds / "seed0", seeds / "seed1"]
    s = spread.spread(dirs)
    assert s["seeds"] == [0, 1] and "--seed" not in s["command"]
    runs = [json.loads((d / "results.json").read_text())["tasks"][0]["methods"] for d in dirs]
    methods = s["tasks"]["checkerboard"]
    assert list(methods) == list(runs[0])
    for name, m in methods.items():
        accs = [r[name]["test_acc"] for r in runs]
        assert m["test_acc"] == accs and m["mean"] == statistics.fmean(accs)
        assert m["sd"] == statistics.stdev(accs) and (m["min"], m["max"]) == (min(accs), max(accs))
    assert any(len(set(m["test_acc"])) > 1 for m in methods.values())  # seeds differ somewhere
    text = spread.markdown(s)
    assert "| method | seed 0 | seed 1 | mean | sd | range |" in text
    row = next(line for line in text.splitlines() if line.startswith("| ReLU MLP |"))
    relu = methods["ReLU MLP"]
    assert row.split(" | ")[1:3] == [f"{100 * a:.1f}" for a in relu["test_acc"]]


def test_spread_refuses_runs_that_differ_in_more_than_the_seed(seeds, tmp_path):
    spread = load_benchmark("seed_spread")
    other = tmp_path / "other"
    shutil.copytree(seeds / "seed1", other)
    results = json.loads((other / "results.json").read_text())
    results["header"] = results["header"].replace("--semantics TF_GPU", "--semantics IEEE")
    (other / "results.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match="differ in more than --seed"):
        spread.spread([seeds / "seed0", other])
    with pytest.raises(SystemExit, match="the same seed"):
        spread.spread([seeds / "seed0", seeds / "seed0"])


def test_spread_refuses_what_is_not_a_set_of_reproductions(seeds, tmp_path):
    spread = load_benchmark("seed_spread")
    with pytest.raises(SystemExit, match="at least two reproductions"):
        spread.spread([seeds / "seed0"])
    with pytest.raises(SystemExit, match=r"no readable results\.json"):
        spread.spread([seeds / "seed0", tmp_path])
    (tmp_path / "results.json").write_text(json.dumps({"header": "no command here", "tasks": []}))
    with pytest.raises(SystemExit, match="not a reproduction's header"):
        spread.spread([seeds / "seed0", tmp_path])
