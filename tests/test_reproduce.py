import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from deeplinear import report
from deeplinear.arithmetic import IEEE, TF_GPU
from deeplinear.cli import main
from deeplinear.data import DataError, load_dataset
from deeplinear.nets import SoftmaxRegression
from deeplinear.reproduce import (
    BUDGETS,
    SETTINGS_FILE,
    Budget,
    Method,
    command,
    default_threads,
    reproduce,
    run_method,
)
from deeplinear.train import Interrupted

TINY = Budget(backprop_steps=30, es={"steps": 4, "pop": 8})


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    reproduce(("checkerboard",), TINY, out, seed=0)
    return out


def test_writes_results_report_and_plots(out):
    results = json.loads((out / "results.json").read_text())
    task = results["tasks"][0]
    assert set(task["methods"]) == {
        "softmax regression", "deep linear, float-blind backprop", "deep linear, OpenAI-ES",
        "deep linear, float-aware backprop", "ReLU MLP"}
    aware = task["methods"]["deep linear, float-aware backprop"]
    assert aware["evaluated_in"].startswith("exact")
    assert set(aware["portability"]["test_acc"]) >= {"TF_GPU", "IEEE", "CPU_FTZ_DAZ", "collapsed"}
    assert aware["test_acc"] == aware["portability"]["test_acc"]["TF_GPU"]
    spec = torch.load(out / "checkerboard" / "deep-linear-openai-es" / "final.pt",
                      weights_only=False)["model"]
    assert f"scale 2^{spec['scale_exp']}." in task["description"]  # the nets' own, not a copy
    for plot in task["plots"]:
        assert (out / plot).read_bytes().startswith(b"\x89PNG")
    assert any(p.endswith("_regions.png") for p in task["plots"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(task["plots"])
    assert "http" not in html and "<script" not in html  # self-contained
    md = (out / "report.md").read_text()
    assert "Portability" in md
    assert md.count(results["header"]) == 1
    assert "--seed 0" in md and "--semantics TF_GPU" in md and "Machine: " in md
    for r in task["methods"].values():  # each row names the run its figures come from
        assert (out / r["run"] / "final.pt").is_file() and f"`{r['run']}`" in md
    assert "smoke budget" not in md  # a Budget of the caller's own: no budget name to warn of
    assert "Total wall time" in md


def test_resume_reuses_finished_methods(out):
    final = out / "checkerboard" / "softmax-regression" / "final.pt"
    before = final.stat().st_mtime_ns
    again = reproduce(("checkerboard",), TINY, out, seed=0, resume=True)
    assert final.stat().st_mtime_ns == before
    first = json.loads((out / "results.json").read_text())["tasks"][0]["methods"]
    assert again["tasks"][0]["methods"]["ReLU MLP"]["test_acc"] == first["ReLU MLP"]["test_acc"]


@pytest.mark.parametrize("study", ["methods", "regimes"])
@pytest.mark.parametrize(("given", "named"), [("nope", "'nope'"), ("", "(none)"), (",", "(none)")])
def test_cli_rejects_unknown_dataset(capsys, tmp_path, study, given, named):
    out = tmp_path / "out"
    assert main(["reproduce", "--study", study, "--dataset", given, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"unknown dataset {named}; choose from spirals" in err
    assert not out.exists()


def test_reproduce_takes_one_dataset_name_and_refuses_unknown_ones_before_writing(tmp_path):
    """``reproduce("spirals")`` is one dataset (it was iterated letter by letter: "unknown
    dataset 's'"), and an unknown name leaves no directory behind."""
    with pytest.raises(DataError, match=r"unknown dataset 'nope'; choose from spirals"):
        reproduce("nope", TINY, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    result = reproduce("checkerboard", TINY, tmp_path / "one", seed=0)
    assert [t["dataset"] for t in result["tasks"]] == ["checkerboard"]


def test_cli_unwritable_out_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["reproduce", "--budget", "smoke", "--out", str(tmp_path / "file" / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot create directory" in err and "writable --out" in err


def test_cli_resume_says_when_there_is_nothing_to_resume(tmp_path, capsys):
    out = tmp_path / "new"
    assert main(["reproduce", "--budget", "smoke", "--dataset", "checkerboard", "--out", str(out),
                 "--resume"]) == 0
    assert f"nothing to resume in {out}" in capsys.readouterr().err
    assert main(["reproduce", "--budget", "smoke", "--dataset", "checkerboard", "--out", str(out),
                 "--resume"]) == 0
    assert "nothing to resume" not in capsys.readouterr().err


def test_cli_data_dir_with_only_built_in_datasets_is_an_error(tmp_path, capsys):
    assert main(["reproduce", "--budget", "smoke", "--dataset", "checkerboard", "--data-dir",
                 str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "checkerboard are built in, so drop it" in err


@pytest.mark.parametrize("flags, named", [(["--semantics", "IEEE"],
                                           "--semantics applies to --study methods only (the "
                                           "regimes study sets its own semantics per regime); "
                                           "drop it"),
                                          (["--semantics", "TF_GPU"], "--semantics applies to "
                                           "--study methods only"),  # even its default, named
                                          (["--threads", "0"], "--threads must be between 1 and")])
def test_cli_regimes_study_refuses_the_methods_flags(tmp_path, capsys, flags, named):
    """The regimes study sets its own semantics: a flag it would ignore is refused, not dropped
    silently."""
    assert main(["reproduce", "--study", "regimes", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and named in err


def test_small_nets_run_on_one_thread():
    assert default_threads([[2, 64, 64, 2], [64, 256, 256, 10]]) == 1
    assert default_threads([[2, 64, 64, 2], [784, 512, 512, 10]]) == torch.get_num_threads()


def test_a_second_run_gives_the_same_numbers(out, tmp_path):
    """Seeds fix everything, baselines included (their nn.Linear init uses the global RNG)."""
    torch.rand(7)  # whatever ran before must not matter
    again = reproduce(("checkerboard",), TINY, tmp_path, seed=0)["tasks"][0]["methods"]
    first = json.loads((out / "results.json").read_text())["tasks"][0]["methods"]
    assert {k: v["test_acc"] for k, v in again.items()} == {
        k: v["test_acc"] for k, v in first.items()}


@pytest.mark.parametrize(("changes", "differs", "per_run"), [
    ({"seed": 1}, "seed (run: 0, now: 1)", "trainer.seed (run: 0, now: 1)"),
    ({"budget": Budget(31, TINY.es)}, "budget (run: ", "trainer.steps (run: 30, now: 31)"),
    ({"semantics": IEEE}, 'semantics (run: "TF_GPU", now: "IEEE")', "semantics.underflow"),
])
def test_resume_refuses_a_reproduction_made_with_other_settings(out, tmp_path, changes, differs,
                                                                per_run):
    """Up front, by the setting the user changed; in a directory of an older version (no
    settings file), by the first finished run, naming its trainer's field."""
    args = {"budget": TINY, "seed": 0, **changes}
    budget = args.pop("budget")
    with pytest.raises(ValueError, match=re.escape(f"differs in {differs}")):
        reproduce(("checkerboard",), budget, out, resume=True, **args)
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    (tmp_path / SETTINGS_FILE).unlink()
    with pytest.raises(ValueError, match=f"finished run differs in .*{re.escape(per_run)}"):
        reproduce(("checkerboard",), budget, tmp_path, resume=True, **args)


def test_a_new_reproduction_into_a_used_out_is_refused_before_training(out, capsys):
    assert main(["reproduce", "--budget", "smoke", "--dataset", "checkerboard", "--out",
                 str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing trained, no method announced
    assert captured.err.count("\n") == 1 and "differs in budget" in captured.err
    settings = json.loads((out / SETTINGS_FILE).read_text())
    with pytest.raises(FileExistsError, match="reproduction on checkerboard; add --resume"):
        reproduce(("checkerboard",), TINY, out, seed=settings["seed"])


def test_a_corrupt_settings_file_is_one_line(out, tmp_path, capsys):
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    (tmp_path / SETTINGS_FILE).write_text("{torn")
    assert main(["reproduce", "--budget", "smoke", "--dataset", "checkerboard", "--out",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / SETTINGS_FILE} is not a reproduction's" in err


def test_the_settings_bind_only_while_runs_exist(out, tmp_path):
    """A reproduction that failed before its first run leaves no claim; a directory of an older
    version (runs, no settings file) is not given one by a refused resume."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / SETTINGS_FILE).write_text('{"budget": "full", "seed": 0}')
    reproduce(("parity",), TINY, tmp_path / "empty")
    assert "Budget(" in json.loads((tmp_path / "empty" / SETTINGS_FILE).read_text())["budget"]
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / SETTINGS_FILE).unlink()
    with pytest.raises(ValueError, match=r"finished run differs in .*trainer\.seed"):
        reproduce(("checkerboard",), TINY, old, seed=1, resume=True)
    assert not (old / SETTINGS_FILE).exists()
    reproduce(("checkerboard",), TINY, old, seed=0, resume=True)  # its own settings still resume


def test_the_python_api_defaults_to_the_budgets_own_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reproduce(("parity",), "smoke")
    assert (tmp_path / "runs" / "reproduce-smoke" / "results.json").exists()
    assert not (tmp_path / "runs" / "reproduce").exists()


@pytest.mark.parametrize(("budget", "default_out"), [
    ("quick", "runs/reproduce"), ("smoke", "runs/reproduce-smoke"), ("full", "runs/reproduce-full"),
])
def test_each_budget_has_its_own_default_out(tmp_path, monkeypatch, budget, default_out):
    """A smoke run must not take the place the README's main command writes to."""
    seen = {}
    monkeypatch.setattr("deeplinear.cli.reproduce.reproduce",
                        lambda datasets, budget, out, *a: seen.update(out=out))
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--budget", budget]) == 0
    assert seen == {"out": default_out}


def test_eval_reads_a_method_of_the_reproduction(out, capsys):
    results = json.loads((out / "results.json").read_text())["tasks"][0]["methods"]
    assert main(["eval", str(out / "checkerboard" / "deep-linear-openai-es"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_acc"] == results["deep linear, OpenAI-ES"]["portability"]["test_acc"]


def test_header_command_names_every_setting_that_changes_the_numbers():
    assert command(("spirals",), "quick", 0, TF_GPU, None, None, False) == (
        "deeplinear reproduce --budget quick --seed 0 --dataset spirals --semantics TF_GPU")
    assert command(("mnist", "digits"), "full", 3, IEEE, "/data", 2, True) == (
        "deeplinear reproduce --budget full --seed 3 --dataset mnist,digits --semantics IEEE "
        "--data-dir /data --threads 2 --resume")


def test_eval_measures_an_unfinished_method_at_its_checkpoint(out, tmp_path, capsys):
    """A killed reproduction leaves checkpoint.pt and config.json: eval reads them."""
    results = json.loads((out / "results.json").read_text())["tasks"][0]["methods"]
    for slug, name, key in [("deep-linear-openai-es", "deep linear, OpenAI-ES", "portability"),
                            ("relu-mlp", "ReLU MLP", None)]:
        shutil.copytree(out / "checkerboard" / slug, tmp_path / slug)
        (tmp_path / slug / "final.pt").unlink()
        assert main(["eval", str(tmp_path / slug), "--json"]) == 0
        got = json.loads(capsys.readouterr().out)["test_acc"]
        assert got == (results[name][key]["test_acc"] if key
                       else {"float32": results[name]["test_acc"]})


def test_eval_of_a_reproduction_directory_names_a_method_directory(out, capsys):
    assert main(["eval", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass one method's run directory, e.g. " in err
    suggested = Path(err.strip().rsplit("e.g. ", 1)[1])
    assert (suggested / "final.pt").exists()


@pytest.mark.parametrize("content", [b"", b"garbage"])
def test_resume_with_a_torn_final_pt_is_one_line_naming_it(tmp_path, capsys, content):
    final = tmp_path / "checkerboard" / "softmax-regression" / "final.pt"
    final.parent.mkdir(parents=True)
    final.write_bytes(content)
    assert main(["reproduce", "--budget", "smoke", "--dataset", "checkerboard", "--out",
                 str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{final}: corrupt" in err
    assert err.endswith("; delete it and run the same command again (that method is trained "
                        "again)\n")
    final.unlink()  # as it says
    assert main(["reproduce", "--budget", "smoke", "--dataset", "checkerboard", "--out",
                 str(tmp_path), "--resume"]) == 0


def test_cli_trains_each_dataset_once_and_records_data_dir_absolute(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("deeplinear.cli.reproduce.reproduce",
                        lambda datasets, budget, out, seed, data_dir, *a: seen.update(
                            datasets=datasets, data_dir=data_dir))
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--dataset", "mnist, digits,mnist", "--data-dir", "idx"]) == 0
    assert seen == {"datasets": ("mnist", "digits"), "data_dir": str(tmp_path / "idx")}


def test_eval_seconds_exclude_training(tmp_path):
    @dataclass
    class Config:
        seed: int = 0
        batch_size: int = 1

    def train(model, data, cfg, run):
        time.sleep(0.3)
        return [{"step": 1, "wall_s": 0.3, "test_acc": 0.5}]

    method = Method("softmax regression", lambda s, g: SoftmaxRegression(s[0], s[-1]),
                    SimpleNamespace(Config=Config, train=train), {})
    _, res = run_method(method, load_dataset("checkerboard"), [2, 2], 0, tmp_path, False)
    assert res["wall_s"] == 0.3 and res["eval_s"] < 0.3


def test_a_deep_linear_method_is_measured_in_exact_mode(tmp_path):
    """At 2**149 under IEEE exact and scaled mode score differently (test_evaluate): the figures
    labelled "exact float32" must be exact mode's, train and test alike."""
    from deeplinear import evaluate
    from deeplinear.nets import DeepLinear
    from deeplinear.reproduce import TRAIN_EVAL_N

    @dataclass
    class Config:
        seed: int = 0
        batch_size: int = 1

    def make(sizes, g):
        return DeepLinear(sizes, scale_exp=149, semantics=IEEE, generator=g)

    method = Method("deep linear, untrained", make,
                    SimpleNamespace(Config=Config, train=lambda *_, **__: []), {})
    data = load_dataset("rings", seed=0, n_train=300, n_test=200)
    model, res = run_method(method, data, [2, 64, 64, 2], 0, tmp_path, False)
    n = TRAIN_EVAL_N
    train_exact = evaluate.accuracy(model, data.x_train[:n], data.y_train[:n], "exact")
    test_exact = evaluate.accuracy(model, data.x_test, data.y_test, "exact")
    assert res["evaluated_in"] == "exact float32, IEEE"
    assert (res["train_acc"], res["test_acc"]) == (train_exact, test_exact)
    assert test_exact != evaluate.accuracy(model, data.x_test, data.y_test, "scaled")


def test_the_report_tables_show_each_methods_own_figures(out):
    """Every row of report.md's results and portability tables is its own method's (a table that
    repeated one method's figures would still look plausible)."""
    results = json.loads((out / "results.json").read_text())
    md = (out / "report.md").read_text()
    rows: dict[str, list[list[str]]] = {}  # a method's row in each table, in order
    for line in md.splitlines():
        if line.startswith("| "):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], []).append(cells[1:])
    methods, n = results["tasks"][0]["methods"], results["tasks"][0]["n_test"]
    ported = 0
    for name, r in methods.items():
        assert rows[name][0][:3] == [report._pct(r["train_acc"]), report._pct(r["test_acc"]),
                                     report._interval(r["test_acc"], n)]
        if r.get("portability"):
            ported += 1
            shown = rows[name][1]
            assert shown == [report._pct(a) for a in r["portability"]["test_acc"].values()]
    assert ported == 3  # the deep linear methods, whose figures differ from each other
    assert len({str(r["portability"]["test_acc"]) for r in methods.values()
                if r.get("portability")}) > 1


def test_the_activation_figure_starts_at_and_collapses_the_test_inputs(tmp_path, monkeypatch):
    from deeplinear import probes

    seen = []
    real = probes.plot_implicit_activation
    monkeypatch.setattr(probes, "plot_implicit_activation",
                        lambda *a, **k: seen.append(k.get("inputs")) or real(*a, **k))
    reproduce(("checkerboard",), TINY, tmp_path, seed=0)
    assert torch.equal(seen[0], load_dataset("checkerboard", seed=0).x_test)


def test_same_weights_under_presets_gives_one_net_per_preset_and_leaves_the_net():
    from deeplinear.arithmetic import PRESETS
    from deeplinear.nets import DeepLinear
    from deeplinear.reproduce import same_weights_under_presets

    net = DeepLinear([2, 8, 2], semantics=IEEE, generator=torch.Generator().manual_seed(0))
    before = [p.clone() for p in net.parameters()]
    nets = same_weights_under_presets(net)
    assert {k: n.semantics for k, n in nets.items()} == PRESETS and net.semantics == IEEE
    assert all(torch.equal(a, b) for n in nets.values()
               for a, b in zip(n.parameters(), before, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), before, strict=True))


def captured_figure(monkeypatch):
    figs = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figs.append(fig) or path)
    return figs


def test_occupancy_plot_ticks_each_layer_at_the_centre_of_its_bars(monkeypatch, tmp_path):
    figs = captured_figure(monkeypatch)
    methods = {"a": {"occupancy": [0.1, 0.2, 0.3]}, "b": {"occupancy": [0.3, 0.2, 0.1]},
               "softmax": {}}
    report.plot_occupancy({"dataset": "toy", "methods": methods}, tmp_path / "o.png")
    ax = figs[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "3"]
    centres = np.array([p.get_x() + p.get_width() / 2 for p in ax.patches]).reshape(2, 3)
    assert np.allclose(centres.mean(0), ax.get_xticks())
    report.plt.close(figs[0])


def test_decision_regions_plot_has_a_title(monkeypatch, tmp_path):
    figs = captured_figure(monkeypatch)
    xx, yy = np.meshgrid(np.linspace(0, 1, 4), np.linspace(0, 1, 4))
    report.plot_decision_regions({"m": (xx, yy, (xx > yy).astype(int))}, np.zeros((2, 2)),
                                 np.array([0, 1]), tmp_path / "r.png", "toy: predicted class", 2)
    assert figs[0].get_suptitle() == "toy: predicted class"
    report.plt.close(figs[0])


def test_decision_regions_give_each_of_many_classes_its_own_colour(monkeypatch, tmp_path):
    """Four classes on a grid: four filled bands, and each test point coloured as the band of its
    class (one level for every class; with two bands, classes 1-3 shared a colour)."""
    figs = captured_figure(monkeypatch)
    xx, yy = np.meshgrid(np.linspace(0, 4, 41), np.linspace(0, 1, 5))
    zz = np.minimum(xx, 3.99).astype(int)  # class c on the strip c <= x < c + 1
    points = np.array([[0.5, 0.5], [1.5, 0.5], [2.5, 0.5], [3.5, 0.5]])
    report.plot_decision_regions({"m": (xx, yy, zz)}, points, np.arange(4), tmp_path / "r.png",
                                 "toy", 4)
    ax = figs[0].axes[0]
    bands, dots = ax.collections
    band_colours = bands.get_facecolors()  # one per level interval, in class order
    assert len(band_colours) == 4 and len({tuple(c) for c in band_colours}) == 4
    assert np.allclose(dots.to_rgba(dots.get_array())[:, :3], band_colours[:, :3])
    report.plt.close(figs[0])


def test_resume_reuses_runs_written_before_config_recorded_model_and_data(out, tmp_path):
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    for final in tmp_path.glob("checkerboard/*/final.pt"):
        payload = torch.load(final, weights_only=False)
        del payload["config"]["model"], payload["config"]["data"]
        torch.save(payload, final)
    before = {f: f.stat().st_mtime_ns for f in tmp_path.glob("checkerboard/*/final.pt")}
    reproduce(("checkerboard",), TINY, tmp_path, seed=0, resume=True)
    assert {f: f.stat().st_mtime_ns for f in before} == before


def test_html_renders_inline_code_and_bold_as_tags():
    page = report._to_html("Command: `deeplinear reproduce --seed 0` <b>, **bold**\n\n"
                           "| a | `b` |\n|---|---|\n| **1** | 2 |\n", [])
    assert "<code>deeplinear reproduce --seed 0</code>" in page and "`" not in page
    assert "<strong>bold</strong>" in page and "<td><strong>1</strong></td>" in page
    assert "&lt;b&gt;" in page  # the text itself stays escaped


def test_a_set_smaller_than_the_batch_trains_on_all_of_it(tmp_path):
    """parity has 192 training samples; the budgets' ES batch is 256."""
    budget = Budget(backprop_steps=3, es={"steps": 2, "pop": 4, "batch_size": 256})
    task = reproduce(("parity",), budget, tmp_path, seed=0)["tasks"][0]
    es_run = json.loads((tmp_path / "parity" / "deep-linear-openai-es" / "config.json")
                        .read_text())
    assert es_run["trainer"]["batch_size"] == 192 and len(task["methods"]) == 5


def test_an_interrupted_reproduction_names_the_command_that_continues_it(tmp_path, monkeypatch,
                                                                          capsys):
    def stopped(*_):
        raise Interrupted(3, f"; checkpoint in {tmp_path}: continue with --resume")

    monkeypatch.setattr("deeplinear.cli.reproduce.reproduce", stopped)
    assert main(["reproduce", "--budget", "smoke", "--seed", "2", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted (stopped after step 3; finished methods" in err
    assert err.strip().endswith("continue with deeplinear reproduce --budget smoke --seed 2 "
                                "--dataset spirals,digits --semantics TF_GPU --resume "
                                f"--out {tmp_path})")


def test_progress_numbers_every_method_and_announces_the_slow_exact_evaluation(tmp_path, capsys):
    reproduce(("checkerboard", "parity"), Budget(2, {"steps": 2, "pop": 4}), tmp_path)
    lines = capsys.readouterr().out.splitlines()
    numbered = [line for line in lines if line.startswith("[")]
    assert [line.split("]")[0] for line in numbered] == [f"[{i}/10" for i in range(1, 11)]
    assert numbered[0] == "[1/10] checkerboard: softmax regression"
    assert numbered[5] == "[6/10] parity: softmax regression"
    announced = [f"  evaluating {n} test samples in exact mode under TF_GPU, IEEE, CPU_FTZ_DAZ, "
                 f"collapsed ({m} train samples under TF_GPU)"
                 for n, m in ((500, 1500), (64, 192))]  # checkerboard's sets, then parity's
    evaluating = [line for line in lines if "in exact mode" in line]
    assert evaluating == [announced[0]] * 3 + [announced[1]] * 3  # each dataset's 3 deep nets


def test_another_dataset_joins_a_reproduction_whose_report_keeps_every_dataset(out, tmp_path,
                                                                              capsys):
    shutil.copytree(out, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(FileExistsError, match=re.escape(
            f"{tmp_path}/results.json reports on checkerboard too, which a report of parity alone "
            "would replace; pass --dataset checkerboard,parity --resume to report on all")):
        reproduce(("parity",), TINY, tmp_path)
    assert (tmp_path / "results.json").read_text() == before and not (tmp_path / "parity").exists()
    results = reproduce(("checkerboard", "parity"), TINY, tmp_path, resume=True)
    assert [t["dataset"] for t in results["tasks"]] == ["checkerboard", "parity"]
    first = json.loads(before)["tasks"][0]["methods"]
    assert {k: v["test_acc"] for k, v in results["tasks"][0]["methods"].items()} == {
        k: v["test_acc"] for k, v in first.items()}  # reused, not trained again


#     json, reproduce, Budget) ---

def test_regimes_study_runs_with_the_seed_given(tmp_path, monkeypatch):
    import deeplinear.regimes as rg

    calls = []

    def fake_study(name, **kw):
        calls.append((name, kw))
        return {"dataset": name, "sizes": [2, 8, 2], "n_train": 1, "n_test": 1,
                "seed": kw.get("seed", 0), "budget": {"budget": kw["budget"]}, "baselines": {},
                "rows": [{"regime": "r", "method": "m", "test_acc": 0.5, "scaled_acc": 0.5,
                          "collapsed_acc": 0.5}]}

    monkeypatch.setattr(rg, "study", fake_study)
    assert main(["reproduce", "--study", "regimes", "--dataset", "spirals", "--seed", "7",
                 "--budget", "smoke", "--out", str(tmp_path)]) == 0
    assert [(n, kw.get("seed"), kw["budget"]) for n, kw in calls] == [("spirals", 7, "smoke")]
    assert json.loads((tmp_path / "regimes_spirals.json").read_text())["seed"] == 7


def test_results_table_columns_are_train_then_test():
    task = {"methods": {"m": {"train_acc": 0.9, "test_acc": 0.8, "wall_s": 1.25,
                              "evaluated_in": "float32", "run": "d/m"},
                        "older": {"train_acc": 0.5, "test_acc": 0.4}}}  # results before "run"
    table = report.results_table(task)
    assert table.splitlines()[0] == ("| method | train | test | test, 95% interval | wall (s) | "
                                     "evaluated in | run directory |")
    assert table.splitlines()[2] == "| m | 90.0% | 80.0% | — | 1.2 | float32 | `d/m` |"
    assert table.splitlines()[3] == "| older | 50.0% | 40.0% | — | 0.0 |  | — |"
    task["n_test"] = 100  # recorded since: the Wilson interval of 80 of 100 is 71.1-86.7%
    row = report.results_table(task).splitlines()[2]
    assert row.startswith("| m | 90.0% | 80.0% | 71.1-86.7 |")


def test_paired_tests_count_the_test_samples_each_method_alone_gets_right(out):
    """The paired table agrees with the accuracy table: over the same n test samples, 'only A
    right' minus 'only B right' is the difference of their counts of correct answers."""
    results = json.loads((out / "results.json").read_text())
    task = results["tasks"][0]
    methods, n = task["methods"], task["n_test"]
    assert n == len(load_dataset("checkerboard").y_test)
    pairs = task["paired"]
    assert len(pairs) == math.comb(len(methods), 2)
    for p in pairs:
        a, b = methods[p["a"]]["test_acc"], methods[p["b"]]["test_acc"]
        assert p["a_only"] - p["b_only"] == round(n * a) - round(n * b)
        assert 0 < p["p_value"] <= 1
    md = (out / "report.md").read_text()
    assert "| A / B | only A right | only B right | p (exact McNemar) |" in md
    assert md.count(f"| {pairs[0]['a']} / {pairs[0]['b']} | {pairs[0]['a_only']} |") == 1
    assert f"Wilson score interval over the {n} test samples" in md


def test_html_tables_have_a_header_row():
    page = report._to_html("| a | b |\n|---|---|\n| 1 | 2 |\n", [])
    assert "<tr><th>a</th><th>b</th></tr>" in page and "<tr><td>1</td><td>2</td></tr>" in page


def test_reproduce_gives_the_callers_thread_count_back(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # small nets train on 1 (default_threads)
    try:
        reproduce(("parity",), Budget(backprop_steps=2, es={"steps": 1, "pop": 4}), tmp_path,
                  seed=0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_smoke_report_says_its_figures_mean_nothing(tmp_path):
    reproduce(("checkerboard",), "smoke", tmp_path, seed=0)
    notice = "A smoke budget: a check that the pipeline runs, too short for its figures to mean"
    assert notice in (tmp_path / "report.md").read_text()
    assert notice in (tmp_path / "report.html").read_text()


def test_cli_regimes_study_keeps_finished_models_and_resumes(tmp_path, capsys):
    args = ["reproduce", "--study", "regimes", "--budget", "smoke", "--dataset", "spirals",
            "--out", str(tmp_path)]
    assert main(args) == 0
    table = (tmp_path / "regimes.md").read_text()
    assert not (tmp_path / "regimes_spirals.partial.json").exists()
    assert "\n![regimes_spirals.png](regimes_spirals.png)\n" in table
    assert (tmp_path / "regimes_spirals.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(args) == 2  # not written over without being asked
    err = capsys.readouterr().err
    assert err == (f"deeplinear reproduce: error: {tmp_path} already holds a regimes study "
                   "(regimes_spirals.json); add --resume to reuse its finished models, or pass "
                   "another --out\n")
    assert main([*args, "--resume"]) == 0
    assert re.search(r"regimes_spirals.json: \d+ finished models reused", capsys.readouterr().err)
    assert (tmp_path / "regimes.md").read_text() == table
    final = tmp_path / "regimes_spirals.json"  # a study of other settings (another torch, say)
    final.write_text(final.read_text().replace(f'"torch": "{torch.__version__}"', '"torch": "0"'))
    assert main([*args, "--resume"]) == 2  # refused, naming the file that has to go
    assert capsys.readouterr().err == (f"deeplinear reproduce: error: {final}: written by a study "
                                       f'with other settings, torch (run: "0", now: '
                                       f'"{torch.__version__}"); repeat them if a flag sets them, '
                                       "else delete it (or pass another --out) to start again\n")
    final.unlink()
    assert main([*args, "--resume"]) == 0 and (tmp_path / "regimes.md").read_text() == table


def test_cli_regimes_study_trains_on_the_default_or_recorded_threads(tmp_path, capsys):
    """Small nets' default is one thread, as in the methods study; --threads is taken; a resume
    keeps the count the partial results were written with and refuses another."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        args = ["reproduce", "--study", "regimes", "--budget", "smoke", "--dataset", "parity"]
        assert main([*args, "--out", str(tmp_path / "a")]) == 0
        assert json.loads((tmp_path / "a" / "regimes_parity.json").read_text())["threads"] == 1
        assert main([*args, "--out", str(tmp_path / "b"), "--threads", "2"]) == 0
        final = tmp_path / "b" / "regimes_parity.json"
        assert json.loads(final.read_text())["threads"] == 2
        capsys.readouterr()
        assert main([*args, "--out", str(tmp_path / "b"), "--resume", "--threads", "1"]) == 2
        assert capsys.readouterr().err == (
            f"deeplinear reproduce: error: {final} was written with --threads 2, not 1: a wide "
            "net's sums depend on the count; resume without --threads (or with 2), or pass "
            "another --out\n")
        torch.set_num_threads(1)
        assert main([*args, "--out", str(tmp_path / "b"), "--resume"]) == 0  # on its 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_resumed_reproduction_keeps_the_thread_count_its_runs_were_trained_with(tmp_path):
    from deeplinear.reproduce import SETTINGS_FILE, settle_threads

    (tmp_path / SETTINGS_FILE).write_text('{"budget": "smoke"}')
    assert settle_threads(tmp_path, None, 4, None) == 4  # fresh: the default
    assert json.loads((tmp_path / SETTINGS_FILE).read_text()) == {"budget": "smoke", "threads": 4}
    assert settle_threads(tmp_path, None, 2, recorded=1) == 1  # resumed elsewhere: the run's
    assert settle_threads(tmp_path, 1, 2, recorded=1) == 1
    with pytest.raises(ValueError, match=r"was written with --threads 1, not 2: a wide net's "
                                         r"sums depend on the count"):
        settle_threads(tmp_path, 2, 2, recorded=1)


def test_claim_hands_back_the_recorded_threads_and_compares_the_rest(out):
    from deeplinear.reproduce import SETTINGS_FILE, claim

    saved = json.loads((out / SETTINGS_FILE).read_text())
    assert "threads" in saved
    settings = {k: v for k, v in saved.items() if k != "threads"}
    assert claim(out, ("checkerboard",), settings, resume=True) == saved["threads"]
    assert json.loads((out / SETTINGS_FILE).read_text()) == saved  # kept for the next resume
    with pytest.raises(ValueError, match="differs in seed"):
        claim(out, ("checkerboard",), {**settings, "seed": 9}, resume=True)
    (out / SETTINGS_FILE).write_text(json.dumps(saved))  # as it was


def test_a_budget_gives_a_dataset_its_own_es_settings(tmp_path):
    quick = BUDGETS["quick"]
    assert quick.es_for("spirals")["steps"] == 8000 and quick.es_for("digits")["steps"] == 4000
    assert quick.es_for("spirals")["pop"] == quick.es["pop"]  # only what it names changes
    budget = Budget(2, {"steps": 2, "pop": 4}, {"checkerboard": {"steps": 3}})
    reproduce(("checkerboard", "parity"), budget, tmp_path, seed=0)
    steps = {name: json.loads((tmp_path / name / "deep-linear-openai-es" / "config.json")
                              .read_text())["trainer"]["steps"]
             for name in ("checkerboard", "parity")}
    assert steps == {"checkerboard": 3, "parity": 2}
