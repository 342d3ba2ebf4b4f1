"""``benchmarks/ab.py``: a revision's bench against the working tree's, interleaved."""

import shutil
import subprocess

import pytest
from helpers import BENCHMARKS, load_benchmark

ROOT = BENCHMARKS.parent
in_git = shutil.which("git") is not None and subprocess.run(
    ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True).returncode == 0
pytestmark = pytest.mark.skipif(not in_git, reason="needs the project's git history")
TINY = ["--quick", "--nets", "8,16,4", "--modes", "full", "--pops", "2", "--batches", "1",
        "--min-time", "0", "--peak-n", "64"]


@pytest.fixture(scope="module")
def ab():
    return load_benchmark("ab")


def report(gens_per_s, peak=100.0):
    row = {"net": "2017", "mode": "full", "pop": 500, "batch": 100, "gens_per_s": gens_per_s,
           "frac_of_peak": gens_per_s / 10}
    return {"machine": {"cpu": "test cpu", "threads": 2}, "peak": {"gflops": peak}, "rows": [row]}


def test_the_base_side_is_the_revisions_source(ab, tmp_path):
    src = ab.extract_src("HEAD", tmp_path)
    shown = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:src/deeplinear/engine.py"],
                           capture_output=True, text=True, check=True).stdout
    assert (src / "deeplinear" / "engine.py").read_text() == shown


def test_bench_runs_the_given_source_before_the_installed_package(ab, tmp_path):
    fake = tmp_path / "deeplinear"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text("import json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    assert ab.bench(tmp_path, ["--quick"]) == ["bench", "--json", "--quick"]


def test_each_row_shows_both_sides_medians_and_their_ratio(ab, monkeypatch, capsys):
    calls = []

    def fake_bench(src, args):
        side = "head" if src == ROOT / "src" else "base"
        calls.append(side)
        return report({"base": 2.0, "head": 3.0}[side] + 0.1 * calls.count(side))

    monkeypatch.setattr(ab, "bench", fake_bench)
    assert ab.main(["--base", "HEAD", "--rounds", "3", "--", "--quick"]) == 0
    assert calls == ["base", "head", "head", "base", "base", "head"]  # order flips each round
    out = capsys.readouterr().out
    assert "| 2017 | full | 500 | 100 | 2.2 | 3.2 | 1.45x | 22% | 32% |" in out


def test_a_real_bench_on_both_sides(ab, capsys):
    assert ab.main(["--base", "HEAD", "--rounds", "1", "--", *TINY]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("| 8,16,4 "))
    assert line.count("|") == 10 and line.split("|")[7].strip().endswith("x")


def test_an_unknown_revision_is_a_one_line_error(ab, tmp_path):
    with pytest.raises(SystemExit, match="git cannot archive 'no-such-rev'"):
        ab.extract_src("no-such-rev", tmp_path)


def test_a_failing_bench_names_its_source_and_error(ab):
    with pytest.raises(SystemExit, match="unrecognized arguments"):
        ab.bench(ROOT / "src", ["--no-such-flag"])


def test_bench_arguments_that_print_no_report_are_a_clear_error(ab):
    with pytest.raises(SystemExit, match="printed no report"):
        ab.bench(ROOT / "src", ["--help"])


def test_the_base_may_be_a_src_folder_from_elsewhere(ab, tmp_path):
    """A lent GPU machine has the working tree but no git history: the base comes as a folder."""
    src = ab.extract_src("HEAD", tmp_path)
    assert ab.base_src(str(src), tmp_path / "unused") == src
    assert not (tmp_path / "unused").exists()
    with pytest.raises(SystemExit, match="holds no deeplinear/ package"):
        ab.base_src(str(tmp_path), tmp_path / "unused")
    seen = []
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ab, "bench", lambda src, args: seen.append(src) or report(1.0))
        assert ab.main(["--base", str(src), "--rounds", "1", "--", "--quick"]) == 0
    assert seen == [src, ROOT / "src"]
