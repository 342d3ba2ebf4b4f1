import json

import matplotlib.image
import pytest

from deeplinear.cli import main

SMALL = ["probe", "--sizes", "64,32,10", "--n", "32"]


def test_json_output(capsys):
    assert main(["probe", "--sizes", "64,32,10", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"sizes", "seed", "n", "n_fit", "algebra", "semantics", "normal_gap_ratio"} <= set(r)
    assert r["sizes"] == [64, 32, 10]
    assert list(r["semantics"]) == ["TF_GPU", "IEEE", "CPU_FTZ_DAZ"]
    for s in r["semantics"].values():
        assert {"collapse_gap", "additivity", "homogeneity", "affine_fit_residual",
                "occupancy", "seconds"} <= set(s)


def test_table_output_one_semantics(capsys):
    assert main([*SMALL, "--semantics", "TF_GPU"]) == 0
    out = capsys.readouterr().out
    assert "distributivity" in out and "associativity" in out and "2^23" in out
    assert "additivity defect" in out and "dead-zone occupancy, layer 1" in out
    assert "IEEE " not in out.split("Blog algebra")[1].splitlines()[1]  # only the asked column


def test_plot_writes_a_png(tmp_path, capsys):
    path = tmp_path / "probe.png"
    assert main([*SMALL, "--semantics", "TF_GPU,IEEE", "--plot", str(path)]) == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[0] > 200
    assert str(path) in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["--semantics", "GPU"], "unknown semantics"),
    (["--sizes", "64,x,10"], "bad sizes"),
    (["--sizes", "64,10"], "hidden layer"),
    (["--n", "0"], "--n"),
    (["--n-fit", "20"], "n_fit"),
    (["--plot", "/nonexistent-dir/p.png"], "does not exist"),
    (["--plot", "out.txt"], ".png"),
])
def test_bad_input_is_one_line_exit_2(args, words, capsys):
    assert main([*SMALL, *args]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("deeplinear probe: error:")
    assert words in err and "Traceback" not in captured.err + captured.out


def test_plot_path_is_checked_before_computing(tmp_path, capsys):
    (tmp_path / "p.png").mkdir()
    assert main(["probe", "--plot", str(tmp_path / "p.png")]) == 2  # the big default net
    captured = capsys.readouterr()
    assert captured.out == "" and "is a directory" in captured.err
