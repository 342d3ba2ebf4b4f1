import json

import matplotlib.image
import pytest

from deeplinear.cli import main
from deeplinear.regimes import KINDS

SMALL = ["probe", "--sizes", "64,32,10", "--n", "32"]


def one_line_error(capsys) -> str:
    """The CLI's contract for bad input: one ``deeplinear probe: error:`` line, no traceback."""
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("deeplinear probe: error:")
    assert "Traceback" not in captured.err + captured.out
    return err


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
    assert main([*SMALL, "--semantics", "tf_gpu"]) == 0  # a preset in any case
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


def test_the_plots_collapse_panel_shows_the_probes_own_inputs(tmp_path, monkeypatch):
    """Its points are the nets' outputs on the very inputs the table measured (seed 3 here)."""
    import torch

    from deeplinear import report
    from deeplinear.probes import make_nets, probe_inputs

    figs = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figs.append(fig) or path)
    assert main([*SMALL, "--seed", "3", "--semantics", "TF_GPU,IEEE", "--plot",
                 str(tmp_path / "p.png")]) == 0
    panel = figs[0].axes[-1]
    assert panel.get_title().startswith("collapse: executed vs affine map")
    x = probe_inputs(64, 32, seed=3)
    for points, net in zip(panel.collections, make_nets("64,32,10", ["TF_GPU", "IEEE"], 3).values(),
                           strict=True):
        assert torch.equal(torch.tensor(points.get_offsets()[:, 1]),
                           net(x, mode="exact").double().reshape(-1))
    report.plt.close(figs[0])


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
    assert words in one_line_error(capsys)


def test_plot_path_is_checked_before_computing(tmp_path, capsys):
    (tmp_path / "p.png").mkdir()
    assert main(["probe", "--plot", str(tmp_path / "p.png")]) == 2  # the big default net
    captured = capsys.readouterr()
    assert captured.out == "" and "is a directory" in captured.err


# --- --regime / --format ------------------------------------------------------------------------

@pytest.mark.parametrize("regime, valid", [
    ("ftz-deadzone:9999", "[0, 253]"),  # used to overflow in math.ldexp
    ("subnormal-staircase:9999", "[23, 253]"),
    ("saturation:-9999", "[0, 253]"),
    ("ftz-deadzone:-9999", "[0, 253]"),
    ("absorption:9999", "[-103, 127]"),
])
def test_out_of_range_regime_parameter_is_one_line_exit_2(regime, valid, capsys):
    assert main(["probe", "--regime", regime]) == 2
    assert f"choose {'j' if 'absorption' in regime else 'k'} in {valid}" in one_line_error(capsys)


@pytest.mark.parametrize("flag, value", [  # given equal to its default is still given
    ("--sizes", "784,512,512,10"), ("--semantics", "all"), ("--n", "256"), ("--n", "0"),
    ("--n-fit", "7"), ("--scale-exp", "125"),
])
@pytest.mark.parametrize("mode", [["--regime", "ftz-deadzone:125"], ["--format", "float16"]])
def test_net_flags_in_regime_mode_are_an_error_naming_the_flag(mode, flag, value, capsys):
    assert main(["probe", *mode, flag, value]) == 2
    err = one_line_error(capsys)
    assert f"{flag} applies to the net probe" in err and mode[0] in err


@pytest.mark.parametrize("value", ["", " "])
def test_empty_regime_is_an_error_not_all(value, capsys):
    assert main(["probe", "--regime", value]) == 2
    assert "--regime is empty" in one_line_error(capsys)


def test_format_alone_sweeps_every_regime_as_the_help_says(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside the phrases checked
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    help_text = capsys.readouterr().out
    assert "without --regime, it sweeps all regimes" in help_text
    assert main(["probe", "--format", "float8_e5m2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["format"] == "float8_e5m2" and list(r["sweeps"]) == list(KINDS)


def test_help_is_plain_text_and_keeps_the_documented_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and "\ndeeplinear probe: how nonlinear" in out
    for default in ("the 2017 net 784,512,512,10", "(default: all)", "(default: 256)",
                    "(default: 125)", "(default: 4 x (input width + 1))"):
        assert default in out


def test_regime_plot_says_where_it_went(tmp_path, capsys):
    path = tmp_path / "r.png"
    assert main(["probe", "--regime", "ftz-deadzone:125", "--plot", str(path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"plot written to {path}"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_regime_sweep_uses_the_seed_given(capsys):
    from deeplinear.regimes import probe_report

    assert main(["probe", "--regime", "ftz-deadzone:125", "--seed", "3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["seed"] == 3
    assert r["sweeps"] == probe_report("ftz-deadzone:125", seed=3)["sweeps"]


def test_table_names_the_last_layer_the_output_layer(capsys):
    assert main([*SMALL, "--semantics", "TF_GPU"]) == 0
    out = capsys.readouterr().out
    assert "dead-zone occupancy, layer 1" in out and "dead-zone occupancy, output layer" in out
    assert "dead-zone occupancy, layer 2" not in out  # 64-32-10: one hidden layer, then output
