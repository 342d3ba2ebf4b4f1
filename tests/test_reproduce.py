import json

import pytest
import torch

from deeplinear.arithmetic import IEEE
from deeplinear.cli import main
from deeplinear.reproduce import Budget, default_threads, reproduce

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
    for plot in task["plots"]:
        assert (out / plot).read_bytes().startswith(b"\x89PNG")
    assert any(p.endswith("_regions.png") for p in task["plots"])
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(task["plots"])
    assert "Portability" in (out / "report.md").read_text()


def test_resume_reuses_finished_methods(out):
    final = out / "checkerboard" / "softmax-regression" / "final.pt"
    before = final.stat().st_mtime_ns
    again = reproduce(("checkerboard",), TINY, out, seed=0, resume=True)
    assert final.stat().st_mtime_ns == before
    first = json.loads((out / "results.json").read_text())["tasks"][0]["methods"]
    assert again["tasks"][0]["methods"]["ReLU MLP"]["test_acc"] == first["ReLU MLP"]["test_acc"]


def test_cli_rejects_unknown_dataset(capsys):
    assert main(["reproduce", "--dataset", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown dataset nope" in err


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
    assert "\n" not in err and "checkerboard are built in, so drop --data-dir" in err


def test_cli_regimes_study_refuses_resume(tmp_path, capsys):
    assert main(["reproduce", "--study", "regimes", "--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "without --resume" in err


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


@pytest.mark.parametrize(("changes", "differs"), [
    ({"seed": 1}, "trainer.seed"), ({"budget": Budget(31, TINY.es)}, "trainer.steps"),
    ({"semantics": IEEE}, "semantics.underflow"),
])
def test_resume_refuses_finished_runs_made_with_other_settings(out, changes, differs):
    args = {"budget": TINY, "seed": 0, **changes}
    with pytest.raises(ValueError, match=f"differs in {differs}.*another --out"):
        reproduce(("checkerboard",), args.pop("budget"), out, resume=True, **args)


def test_eval_reads_a_method_of_the_reproduction(out, capsys):
    results = json.loads((out / "results.json").read_text())["tasks"][0]["methods"]
    assert main(["eval", str(out / "checkerboard" / "deep-linear-openai-es"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_acc"] == results["deep linear, OpenAI-ES"]["portability"]["test_acc"]
