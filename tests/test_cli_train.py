import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from deeplinear.arithmetic import PRESETS
from deeplinear.cli import main
from deeplinear.collapse import collapse
from deeplinear.data import load_dataset
from deeplinear.evaluate import accuracy
from deeplinear.nets import DeepLinear
from deeplinear.runs import Run, load_model
from deeplinear.train import backprop

TINY = ["--dataset", "rings", "--sizes", "2,16,16,2", "--lr", "0.01", "--quiet"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny nets gain nothing from threads, and on a loaded machine idle OpenMP workers cost 10x;
    the killed subprocess and the in-process runs also agree on the thread count this way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(tmp_path, *extra, name="run"):
    out = tmp_path / name
    return main(["train", *TINY, "--out", str(out), *extra]), out


@pytest.fixture(scope="module")
def float_aware_run(tmp_path_factory):
    rc, out = train(tmp_path_factory.mktemp("fa"), "--steps", "150", "--eval-every", "50")
    assert rc == 0
    return out


def test_train_writes_a_complete_run_directory(float_aware_run, capsys):
    out = float_aware_run
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.pt",
                                               "final.pt"}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"] == "float-aware" and cfg["trainer"]["surrogate"] == "smooth"
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [50, 100, 150]
    final = torch.load(out / "final.pt", weights_only=False)
    assert final["model"] == {"kind": "deeplinear", "sizes": [2, 16, 16, 2], "scale_exp": 125}
    assert final["semantics"]["underflow"] == "ftz" and final["method"] == "float-aware"
    assert set(final["results"]["test_acc"]) == {*PRESETS, "collapsed"}


def test_load_model_gives_the_trained_net_from_python(float_aware_run):
    """``runs.load_model``: the run's net with its weights, scale and semantics, scoring what
    the run recorded (the Python side of ``deeplinear eval``)."""
    final = torch.load(float_aware_run / "final.pt", weights_only=False)
    net = load_model(float_aware_run)
    assert isinstance(net, DeepLinear) and (net.sizes, net.scale_exp) == ([2, 16, 16, 2], 125)
    assert net.semantics == PRESETS["TF_GPU"]
    assert all(torch.equal(v, final["state_dict"][k]) for k, v in net.state_dict().items())
    data = load_dataset("rings", n_test=final["data"]["n_test"])
    assert accuracy(net, data.x_test, data.y_test, "exact") == final["results"]["test_acc"][
        "TF_GPU"]


def test_a_run_driven_from_python_is_named_not_a_keyerror(tmp_path):
    """A run that ``train(..., run=Run.open(...))`` wrote has a checkpoint and the caller's own
    config.json, which does not say how to rebuild the model."""
    run = Run.open(tmp_path, {"lr": 1e-3})
    backprop.train(DeepLinear([2, 8, 8, 2]), load_dataset("rings"),
                   backprop.Config(steps=2, batch_size=8), run=run, progress=False)
    with pytest.raises(ValueError, match=r"config\.json has no 'model' entry: the run was not "
                                         r"written by deeplinear train .*runs\.save_model\("):
        load_model(tmp_path)


def test_eval_reproduces_the_final_accuracies(float_aware_run, capsys):
    final = torch.load(float_aware_run / "final.pt", weights_only=False)
    capsys.readouterr()
    assert main(["eval", str(float_aware_run / "final.pt"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["test_acc"] == final["results"]["test_acc"]
    assert main(["eval", str(float_aware_run), "--semantics", "IEEE"]) == 0
    out = capsys.readouterr().out
    ieee = final["results"]["test_acc"]["IEEE"]
    assert "IEEE" in out and f"{100 * ieee:.2f}%" in out
    # a list, as probe takes it, in any case, and the collapsed map alone: the figures of "all"
    assert main(["eval", str(float_aware_run), "--semantics", "ieee,collapsed", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["test_acc"]
    assert listed == {k: final["results"]["test_acc"][k] for k in ("IEEE", "collapsed")}


@pytest.mark.parametrize(("argv", "message"), [
    (["--method", "es", "--model", "mlp"], "needs --model deeplinear"),
    (["--method", "float-aware", "--model", "softmax", "--sizes", "2,2"], "needs --model deep"),
    (["--sizes", "3,8,2"], "must start with 2"),
    (["--sizes", "2,8,3"], "end with 2"),
    (["--model", "softmax", "--method", "backprop", "--sizes", "2,8,2"], "no hidden layer"),
    (["--model", "mlp", "--sizes", "2,2"], "an MLP needs at least one hidden layer, e.g. "
                                           "--sizes 2,64,2 (or --model softmax)"),
    (["--method", "backprop", "--surrogate", "exact"], "--surrogate applies to"),
    (["--method", "backprop", "--pop", "10"], "--pop does not apply"),
    (["--steps", "0"], "steps = 0: must be an integer >= 1"),
    (["--method", "es", "--eval-n", "0", "--batch-size", "0"], "batch_size = 0, eval_n = 0: must"),
    (["--init-gain", "big"], "expected a positive number or 'he'"),
    (["--init-gain", "-1"], "expected a positive number or 'he', got '-1'"),
    (["--init-gain", "nan"], "expected a positive number or 'he', got 'nan'"),
    (["--method", "backprop", "--tau", "0.5"], "--tau applies to --method float-aware with "
                                              "--surrogate smooth, not plain backprop"),
    (["--surrogate", "ste", "--tau", "0.5"], "not --surrogate ste"),
    (["--model", "mlp", "--tau", "0.5"], "--tau applies"),
    (["--method", "float-aware", "--sigma-scale", "none"], "--sigma-scale does not apply"),
    (["--resume"], "config.json: no run to resume there"),
    (["--method", "es", "--device", "tpu"], "unknown device 'tpu'"),
    (["--method", "es", "--device", "he"], "unknown device 'he'"),  # 'he' means He init only
    (["--method", "es", "--sigma-blocks", "he"], "bad sigma block 'he'"),
    (["--model", "mlp", "--semantics", "IEEE"], "--semantics applies to --model deeplinear"),
    (["--model", "softmax", "--sizes", "2,2", "--init-gain", "2"], "--init-gain applies to"),
    (["--model", "mlp", "--scale-exp", "100"], "--scale-exp applies to --model deeplinear"),
    (["--method", "es", "--rank", "4"], "--rank applies to --method es --perturbation lowrank"),
    (["--scale-exp", "500"], "out of range"),
    (["--threads", "100000"], "threads must be between 1 and"),  # torch's pool segfaulted
    (["--method", "es", "--perturbation", "sparse"], "argument --perturbation: invalid choice: "
                                                     "'sparse' (choose from 'full', 'lowrank')"),
    (["--backend", "dask"], "argument --backend: invalid choice: 'dask' (choose from 'local', "
                            "'ray')"),
    (["--method", "es", "--lr", "1e308"], "lr = 1e+308 is beyond float32's range, in which the "
                                          "trainers compute; pass a value below 3.4e38"),
    (["--foo", "3"], "deeplinear train: error: unrecognized arguments: --foo 3"),
])
def test_impossible_configs_exit_2_with_one_line(tmp_path, capsys, argv, message):
    try:
        rc = main(["train", "--dataset", "rings", "--quiet", "--out", str(tmp_path / "x"), *argv])
    except SystemExit as e:  # argparse's own checks
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err


def test_a_closed_pipe_is_not_an_error(float_aware_run):
    """``deeplinear eval RUN --json | head -c1``: the reader is gone before anything is written."""
    p = subprocess.Popen([sys.executable, "-m", "deeplinear", "eval", str(float_aware_run),
                          "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()
    assert p.wait(timeout=120) == 141
    err = p.stderr.read().decode().splitlines()
    assert len(err) == 1 and err[0].startswith("evaluating ")  # its announcement, no error


def test_baseline_eval_does_not_claim_exact_mode(tmp_path, capsys):
    rc, out = train(tmp_path, "--model", "softmax", "--sizes", "2,2", "--steps", "5")
    assert rc == 0
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert "exact mode" not in capsys.readouterr().out


def test_existing_run_is_not_overwritten(float_aware_run, capsys):
    assert main(["train", *TINY, "--steps", "150", "--out", str(float_aware_run)]) == 2
    err = capsys.readouterr().err
    assert "a run with other settings (trainer.eval_every (run: 50, now: 500))" in err
    assert err.rstrip().endswith("; pass another --out for this one")


def test_eval_errors(tmp_path, float_aware_run, capsys):
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", str(tmp_path / "junk.pt")]) == 2
    assert "corrupt" in capsys.readouterr().err
    payload = torch.load(float_aware_run / "final.pt", weights_only=False)
    next(iter(payload["state_dict"].values()))[0] = float("nan")
    torch.save(payload, tmp_path / "nan.pt")
    assert main(["eval", str(tmp_path / "nan.pt")]) == 2
    assert "non-finite" in capsys.readouterr().err
    assert main(["eval", str(float_aware_run), "--semantics", "FP8"]) == 2
    assert "unknown semantics FP8; choose all, or from TF_GPU" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2
    assert "no final.pt or checkpoint.pt here" in capsys.readouterr().err



@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p.update(semantics="TF_GPU"), "malformed semantics entry"),
    (lambda p: p.update(data="fashion"), "malformed data entry"),
    (lambda p: p["semantics"].update(fmt="float99"), "semantics entry is not valid"),
    (lambda p: p["state_dict"].update({"weights.0": torch.zeros(2, 3)}),
     r"do not fit a deeplinear \[2, 16, 16, 2\]: size mismatch for weights.0: .*\[2, 3\]"),
    (lambda p: p["state_dict"].pop("biases.1"), 'Missing key\\(s\\) in state_dict: "biases.1"'),
])
def test_eval_of_a_doctored_final_pt_is_one_line(tmp_path, float_aware_run, capsys, change,
                                                 message):
    payload = torch.load(float_aware_run / "final.pt", weights_only=False)
    change(payload)
    torch.save(payload, tmp_path / "bad.pt")
    assert main(["eval", str(tmp_path / "bad.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err), err


def flip_a_weight_byte(path):
    """Flip one bit in the middle of the largest tensor in a torch file, leaving it a valid zip:
    the damage a bad disk or a copy does, which unpickles as other weights."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    raw = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    raw[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    path.write_bytes(bytes(raw))


def test_a_bit_flipped_in_saved_weights_is_caught_not_loaded(tmp_path, float_aware_run, capsys):
    shutil.copy(float_aware_run / "final.pt", tmp_path / "final.pt")
    flip_a_weight_byte(tmp_path / "final.pt")
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "final.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fails its CRC check" in err and "corrupt" in err, err
    es = ["--method", "es", "--pop", "8", "--checkpoint-every", "2"]
    rc, out = train(tmp_path, *es, "--steps", "2")
    assert rc == 0
    flip_a_weight_byte(out / "checkpoint.pt")
    assert main(["train", *TINY, "--out", str(out), *es, "--steps", "2", "--resume"]) == 2
    assert "checkpoint.pt: corrupt or not a deeplinear checkpoint" in capsys.readouterr().err


def test_baselines_train_and_evaluate(tmp_path, capsys):
    for model, sizes in (("mlp", "2,16,2"), ("softmax", "2,2")):  # --method backprop by default
        rc, out = train(tmp_path, "--model", model, "--sizes", sizes, "--steps", "30", name=model)
        final = torch.load(out / "final.pt", weights_only=False)
        assert final["method"] == "backprop"
        capsys.readouterr()
        assert rc == 0 and main(["eval", str(out), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["test_acc"] == final["results"]["test_acc"]
    assert main(["eval", str(out), "--semantics", "IEEE"]) == 2
    assert "softmax model runs in plain float32" in capsys.readouterr().err


def test_es_method_dispatches(tmp_path, capsys):
    rc, out = train(tmp_path, "--method", "es", "--steps", "3", "--pop", "8", "--batch-size", "32",
                    "--init-gain", "he", "--sigma-scale", "none", "--lr-decay", "0.99",
                    "--sigma-blocks", "weights.0=0")
    assert rc == 0
    final = torch.load(out / "final.pt", weights_only=False)
    assert final["method"] == "es" and "TF_GPU" in final["results"]["test_acc"]
    trainer = json.loads((out / "config.json").read_text())["trainer"]
    assert (trainer["pop"], trainer["init_gain"], trainer["sigma_scale"]) == (8, None, "none")
    assert trainer["lr_decay"] == 0.99 and trainer["sigma_blocks"] == "weights.0=0"


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """A real kill: a subprocess runs the CLI and gets SIGKILL once its first checkpoint is on
    disk; ``--resume`` then finishes the run, which must equal an uninterrupted one bit for bit."""
    args = [*TINY, "--steps", "400", "--checkpoint-every", "20", "--eval-every", "150"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deeplinear", "train", *args, "--out",
                             str(killed)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint after 120 s"
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final.pt").exists(), "the run finished before the kill"
    step = torch.load(killed / "checkpoint.pt", weights_only=False)["step"]
    assert 20 <= step < 400
    assert main(["train", *args, "--out", str(killed), "--resume"]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "whole")]) == 0
    a = torch.load(killed / "final.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "whole" / "final.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda d: [{k: v for k, v in json.loads(r).items() if k != "wall_s"}  # noqa: E731
                      for r in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(killed) == rows(tmp_path / "whole")


@pytest.mark.parametrize("sig, sigint", [(signal.SIGINT, signal.SIG_DFL),
                                         (signal.SIGTERM, signal.SIG_IGN)],
                         ids=["ctrl_c", "kill_a_background_job"])
def test_ctrl_c_before_the_first_checkpoint_keeps_the_work(tmp_path, sig, sigint):
    """A real Ctrl-C (SIGINT to the CLI in a subprocess), or ``kill PID`` (SIGTERM) to a
    background job (which ignores SIGINT), long before the first scheduled checkpoint: the run
    stops after the step with a checkpoint, says how to resume, and the resumed run equals an
    uninterrupted one bit for bit."""
    args = [*TINY, "--steps", "3000", "--checkpoint-every", "5000", "--eval-every", "20"]
    stopped = tmp_path / "stopped"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "deeplinear", "train", *args, "--out",
                             str(stopped)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,  # set, whatever pytest runs in
                            preexec_fn=lambda: (signal.signal(signal.SIGINT, sigint),
                                                signal.signal(signal.SIGTERM, signal.SIG_DFL)))
    try:
        deadline = time.monotonic() + 120
        metrics = stopped / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text()):  # training has begun
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "no metrics after 120 s"
            time.sleep(0.005)
        proc.send_signal(sig)
        err = proc.communicate(timeout=120)[1]
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert re.search(rf"stopped after step \d+; latest checkpoint in {re.escape(str(stopped))}: "
                     rf"continue with deeplinear train --out {re.escape(str(stopped))} --resume",
                     err), err
    assert not (stopped / "final.pt").exists(), "the run finished before the Ctrl-C"
    assert 20 <= torch.load(stopped / "checkpoint.pt", weights_only=False)["step"] < 3000
    assert main(["train", *args, "--out", str(stopped), "--resume"]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "whole")]) == 0
    a = torch.load(stopped / "final.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "whole" / "final.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_accepts_a_run_directory_from_before_a_trainer_setting(tmp_path, capsys):
    """A run written before ``sigma_blocks`` existed (its config lacks it) still resumes."""
    es = ["--method", "es", "--pop", "8", "--checkpoint-every", "2"]
    rc, out = train(tmp_path, *es, "--steps", "2")
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    del config["trainer"]["sigma_blocks"]
    (out / "config.json").write_text(json.dumps(config))
    assert main(["train", *TINY, "--out", str(out), *es, "--steps", "2", "--resume"]) == 0
    assert main(["train", *TINY, "--out", str(out), *es, "--steps", "2", "--resume",
                 "--sigma-blocks", "biases.0=0"]) == 2
    assert ('config differs in trainer.sigma_blocks (run: "", now: "biases.0=0"); resume with '
            "the run's own settings") in capsys.readouterr().err


def test_resume_from_a_hand_edited_checkpoint_is_one_line(tmp_path, capsys):
    es = ["--method", "es", "--pop", "8", "--checkpoint-every", "2"]
    rc, out = train(tmp_path, *es, "--steps", "2")
    assert rc == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    del state["es"]
    torch.save(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", *TINY, "--out", str(out), *es, "--steps", "2", "--resume"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after "resuming ... from step 2"
    assert last.startswith("deeplinear train: error: ") and last.endswith(
        "checkpoint.pt: no es in it, so not this trainer's checkpoint; start the run again in "
        "another --out")


def test_a_rank_that_saves_nothing_is_noted(tmp_path, capsys):
    lowrank = ["--method", "es", "--pop", "8", "--steps", "1", "--perturbation", "lowrank"]
    assert train(tmp_path, *lowrank, "--rank", "2", "--sizes", "2,16,16,2", name="a")[0] == 0
    assert "note:" not in capsys.readouterr().err
    assert train(tmp_path, *lowrank, "--rank", "8", "--sizes", "2,16,16,2", name="b")[0] == 0
    assert ("note: --rank 8 draws 578 noise values per pair, not fewer than the net's 354 "
            "parameters: low rank saves nothing here") in capsys.readouterr().err


def test_cma_es_trains_a_small_net_and_refuses_es_only_flags(tmp_path, capsys):
    cma = ["train", "--dataset", "rings", "--sizes", "2,16,16,2", "--quiet", "--method", "cma-es"]
    out = tmp_path / "run"
    assert main([*cma, "--out", str(out), "--steps", "4", "--pop", "6"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "cma-es" and config["trainer"]["pop"] == 6
    assert "TF_GPU" in capsys.readouterr().out
    assert main([*cma, "--out", str(tmp_path / "x"), "--perturbation", "lowrank"]) == 2
    assert "--perturbation does not apply to --method cma-es" in capsys.readouterr().err
    assert main([*cma, "--out", str(tmp_path / "y"), "--device", "cpu"]) == 2
    assert "--device does not apply to --method cma-es" in capsys.readouterr().err


def test_es_can_start_from_a_finished_run(float_aware_run, tmp_path, capsys):
    """--init-from loads the weights as they are (no calibration): with a negligible lr the ES
    run ends where the source run ended."""
    rc, out = train(tmp_path, "--method", "es", "--steps", "2", "--pop", "8", "--lr", "1e-12",
                    "--init-from", str(float_aware_run))
    assert rc == 0
    source = torch.load(float_aware_run / "final.pt", weights_only=False)["state_dict"]
    final = torch.load(out / "final.pt", weights_only=False)["state_dict"]
    for k, v in source.items():
        torch.testing.assert_close(final[k], v, rtol=1e-6, atol=0)
    config = json.loads((out / "config.json").read_text())
    assert config["init_from"] == str(float_aware_run) and config["trainer"]["init_gain"] is None


def test_init_from_with_init_gain_rescales_the_loaded_net(float_aware_run, tmp_path):
    """--init-gain G with --init-from moves the trained net's hidden layers against the dead zone
    (pre-activation std G thresholds) and keeps its collapsed map, logits included."""
    rc, out = train(tmp_path, "--method", "es", "--steps", "2", "--pop", "8", "--lr", "1e-12",
                    "--init-from", str(float_aware_run), "--init-gain", "8")
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["rescale_gain"], config["trainer"]["init_gain"]) == (8.0, None)
    nets = []
    for run in (float_aware_run, out):
        net = DeepLinear([2, 16, 16, 2])
        net.load_state_dict(torch.load(run / "final.pt", weights_only=False)["state_dict"])
        nets.append(net)
    assert not torch.allclose(nets[0].weights[0], nets[1].weights[0], rtol=0.1)
    (w0, b0), (w1, b1) = collapse(nets[0]), collapse(nets[1])
    torch.testing.assert_close(w1, w0, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(b1, b0, rtol=1e-4, atol=1e-5)


def test_resume_does_not_reload_the_init_from_run(float_aware_run, tmp_path):
    """On --resume the checkpoint holds the weights: the source run may be gone by then."""
    source = tmp_path / "source"
    shutil.copytree(float_aware_run, source)
    args = ["--method", "es", "--steps", "2", "--pop", "8", "--checkpoint-every", "1",
            "--init-from", str(source), "--init-gain", "8"]
    rc, out = train(tmp_path, *args)
    assert rc == 0
    before = torch.load(out / "final.pt", weights_only=False)["state_dict"]
    shutil.rmtree(source)
    assert main(["train", *TINY, "--out", str(out), *args, "--resume"]) == 0
    after = torch.load(out / "final.pt", weights_only=False)["state_dict"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_init_from_is_recorded_absolute_so_resume_takes_any_spelling(float_aware_run, tmp_path,
                                                                     monkeypatch):
    shutil.copytree(float_aware_run, tmp_path / "source")
    monkeypatch.chdir(tmp_path)
    args = ["--method", "es", "--steps", "2", "--pop", "8", "--checkpoint-every", "1"]
    rc, out = train(tmp_path, *args, "--init-from", "source")
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["init_from"] == str(tmp_path.resolve() / "source")
    resumed = ["train", *TINY, "--out", str(out), *args, "--resume"]
    assert main([*resumed, "--init-from", str(tmp_path / "source")]) == 0


@pytest.mark.parametrize(("flags", "message"), [
    (["--sizes", "2,8,8,2"], "holds a deeplinear [2, 16, 16, 2]"),
    (["--scale-exp", "100"], "trained at --scale-exp 125, not 100"),
])
def test_init_from_refuses_another_model(float_aware_run, tmp_path, capsys, flags, message):
    argv = ["train", *TINY, "--out", str(tmp_path / "x"), "--init-from", str(float_aware_run),
            *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_run_that_fails_in_setup_leaves_no_directory(tmp_path, capsys):
    out = tmp_path / "failed"
    assert main(["train", *TINY, "--out", str(out), "--method", "cma-es",
                 "--sizes", "2,128,128,2"]) == 2  # too many parameters for CMA-ES
    assert "cma" in capsys.readouterr().err.lower()
    assert not out.exists()


def test_data_dir_is_recorded_as_an_absolute_path(tmp_path, monkeypatch, capsys):
    from test_data import make_arrays, make_idx_dir  # tests/ is on sys.path under pytest

    src = make_idx_dir(tmp_path / "idx", make_arrays())
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "m"
    assert main(["train", "--dataset", "mnist", "--data-dir", "idx", "--model", "softmax",
                 "--steps", "2", "--batch-size", "10", "--quiet", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())["data"]["data_dir"]
    assert saved == str(src.resolve())
    monkeypatch.chdir(tmp_path.parent)  # eval from elsewhere finds the files
    assert main(["eval", str(out), "--json"]) == 0
    capsys.readouterr()
    moved = src.rename(tmp_path / "moved")  # the files move: eval says where to point it
    assert main(["eval", str(out), "--json"]) == 2
    err = capsys.readouterr().err
    assert "\n" not in err.strip()
    assert "data directory is gone; if its files moved, pass --data-dir" in err
    assert main(["eval", str(out), "--json", "--data-dir", str(moved)]) == 0


def test_a_run_resumes_from_its_data_in_a_new_place_if_it_is_the_same_data(tmp_path, capsys):
    """A run continued after its data directory moved, or on another machine: the new place is
    taken when the data there has the run's fingerprint, refused when it differs."""
    from test_data import make_arrays, make_idx_dir

    src = make_idx_dir(tmp_path / "idx", make_arrays())
    args = ["train", "--dataset", "mnist", "--model", "softmax", "--steps", "4",
            "--checkpoint-every", "2", "--batch-size", "10", "--quiet"]
    assert main([*args, "--data-dir", str(src), "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "run"
    assert main([*args[:-4], "2", *args[-3:], "--data-dir", str(src), "--out", str(out)]) == 0
    (out / "final.pt").unlink()  # as if killed after its checkpoint at step 2
    config = (out / "config.json").read_text()
    moved = src.rename(tmp_path / "moved")
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 2
    assert capsys.readouterr().err == (f"deeplinear train: error: {src}: the run's data directory "
                                       "is gone; if its files moved, pass --data-dir with their "
                                       "new place\n")
    other = make_idx_dir(tmp_path / "other", make_arrays(seed=1))
    assert main(["train", "--out", str(out), "--resume", "--data-dir", str(other)]) == 2
    err = capsys.readouterr().err
    assert "config differs in data.data_dir (run: " in err and ", data.fingerprint (run: " in err
    assert main(["train", "--out", str(out), "--resume", "--steps", "4", "--data-dir",
                 str(moved)]) == 0
    assert f"reading the run's data from {moved} (trained from {src}" in capsys.readouterr().err
    assert (out / "config.json").read_text() == config  # the run still says where it began
    assert main(["eval", str(out), "--json"]) == 0  # final.pt: where its data was read last
    assert json.loads(capsys.readouterr().out)["n_test"] == 10
    whole, resumed = (torch.load(d / "final.pt", weights_only=False)["state_dict"]
                      for d in (tmp_path / "whole", out))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("recorded", [None, "0" * 32], ids=["older_run", "other_cpu"])
def test_a_run_resumes_whatever_fingerprint_its_data_has_in_its_own_place(tmp_path, recorded):
    """Only a new --data-dir is judged by the fingerprint: a run from before fingerprints, or
    one whose synthetic data came out in other last bits on another CPU (sin/cos kernels),
    resumes as it always did."""
    rc, out = train(tmp_path, "--method", "backprop", "--steps", "4", "--checkpoint-every", "2")
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    for saved in (config, state["run_config"]):  # as that run wrote them
        if recorded is None:
            del saved["data"]["fingerprint"]
        else:
            saved["data"]["fingerprint"] = recorded
    torch.save(state, out / "checkpoint.pt")
    (out / "config.json").write_text(json.dumps(config))
    (out / "final.pt").unlink()
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0


def test_eval_measures_a_run_that_has_no_final_yet(tmp_path, capsys):
    """A killed run is measured at its last checkpoint (here: the last step, = the final)."""
    rc, out = train(tmp_path, "--steps", "20", "--checkpoint-every", "10")
    assert rc == 0
    final = torch.load(out / "final.pt", weights_only=False)
    (out / "final.pt").unlink()
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["test_acc"] == final["results"]["test_acc"] and res["checkpoint_step"] == 20
    assert res["weights"] == str((out / "checkpoint.pt").resolve())
    assert main(["eval", str(out)]) == 0
    assert "checkpoint at step 20" in capsys.readouterr().out
    (out / "config.json").unlink()
    assert main(["eval", str(out / "checkpoint.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs its run's config.json" in err


def test_version_is_the_package_version(capsys):
    import importlib.metadata

    import deeplinear

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"deeplinear {deeplinear.__version__}"
    assert importlib.metadata.version("deeplinear") == deeplinear.__version__  # one source


@pytest.mark.parametrize("flag, value", [("--seed", "99999999999999999999"),
                                         ("--data-seed", "-1"), ("--seed", "x")])
def test_a_seed_out_of_range_names_the_flag_and_the_range(capsys, flag, value):
    with pytest.raises(SystemExit) as e:  # argparse's own exit
        main(["train", *TINY, flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"argument {flag}: seed '{value}' must be an integer in 0..4294967295" in err


def test_ctrl_c_in_the_final_evaluation_says_how_to_finish(tmp_path, monkeypatch, capsys):
    """Training is over and checkpointed; the message must say that --resume finishes it."""
    def pressed(*_, **__):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr("deeplinear.cli.train.final_results", pressed)
        rc, out = train(tmp_path, "--steps", "3")
    assert rc == 130 and not (out / "final.pt").exists()
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"latest checkpoint in {out}: continue with deeplinear train --out {out} --resume" in err
    assert train(tmp_path, "--steps", "3", "--resume")[0] == 0 and (out / "final.pt").exists()


def test_a_stop_before_the_first_checkpoint_says_nothing_is_saved(tmp_path, monkeypatch, capsys):
    def pressed(*_, **__):
        raise KeyboardInterrupt  # a second Ctrl-C: stop at once

    monkeypatch.setattr("deeplinear.train.backprop.train", pressed)
    rc, out = train(tmp_path, "--steps", "3")
    assert rc == 130
    assert f"before the first checkpoint in {out}: run the same command again" in \
        capsys.readouterr().err


@pytest.mark.parametrize("flags", [
    ["--method", "es", "--perturbation", "lowrank", "--rank", "2", "--pop", "8",
     "--sigma-blocks", "weights.0=0.5", "--seed", "3", "--data-seed", "2", "--n-train", "300"],
    ["--method", "float-aware", "--surrogate", "ste", "--init-gain", "he", "--semantics", "ieee"],
    ["--method", "float-aware", "--tau", "0.5", "--scale-exp", "120"],
    ["--model", "mlp", "--sizes", "2,8,2", "--schedule", "step"],
    ["--model", "softmax", "--sizes", "2,2"],
])
def test_resume_with_out_alone_takes_the_runs_own_settings(tmp_path, flags):
    rc, out = train(tmp_path, *flags, "--steps", "2", "--checkpoint-every", "2")
    assert rc == 0
    (out / "final.pt").unlink()  # a run killed after its last checkpoint
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert (out / "final.pt").exists()


def test_resume_restores_a_deleted_config_from_the_checkpoint(tmp_path, capsys):
    """deeplinear train --out RUN --resume with config.json gone: the checkpoint's copy fills the
    settings and is written back; a changed flag is still refused; an old checkpoint without a
    copy says so."""
    rc, out = train(tmp_path, "--steps", "4", "--checkpoint-every", "2")
    assert rc == 0
    written = (out / "config.json").read_text()
    (out / "final.pt").unlink()
    (out / "config.json").unlink()
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    assert "differs in trainer.lr (run: 0.01, now: 0.5)" in capsys.readouterr().err
    assert not (out / "config.json").exists()
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    assert (out / "config.json").read_text() == written and (out / "final.pt").exists()
    (out / "final.pt").unlink()
    (out / "config.json").unlink()
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    del state["run_config"]
    torch.save(state, out / "checkpoint.pt")
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume"]) == 2
    assert capsys.readouterr().err == (
        f"deeplinear train: error: {out}/config.json: missing, and {out}/checkpoint.pt (from an "
        "earlier version) keeps no copy; restore it or start the run again in another --out\n")


def test_resume_with_out_alone_from_an_init_from_run(tmp_path):
    rc, source = train(tmp_path, "--steps", "2", name="source")
    assert rc == 0
    rc, out = train(tmp_path, "--init-from", str(source), "--init-gain", "0.8", "--steps", "2",
                    "--checkpoint-every", "2")
    assert rc == 0
    (out / "final.pt").unlink()
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0


def test_resume_with_out_alone_still_refuses_a_changed_flag(tmp_path, capsys):
    rc, out = train(tmp_path, "--steps", "2", "--checkpoint-every", "2")
    assert rc == 0
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    assert "differs in trainer.lr (run: 0.01, now: 0.5)" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "message"), [
    (["--steps", "2"], "--dataset is required (or --out RUN --resume to continue a run)"),
    (["--resume"], "--resume without --dataset continues the run in --out: pass --out RUN"),
    (["--resume", "--out", "nowhere"], "nowhere/config.json: no run to resume there"),
])
def test_without_a_dataset_the_error_says_what_to_pass(tmp_path, monkeypatch, capsys, args,
                                                       message):
    monkeypatch.chdir(tmp_path)
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_resume_from_a_foreign_config_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"lr": 0.1}')
    assert main(["train", "--out", str(tmp_path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a deeplinear train config (KeyError" in err


def test_resume_fills_what_is_left_out_even_with_some_flags_given(tmp_path, monkeypatch):
    """The flags given (here the dataset, as in the original command) must match; the rest is
    the run's own, at --out or at the default directory."""
    monkeypatch.chdir(tmp_path)
    es = ["--method", "es", "--pop", "8", "--eval-every", "2", "--checkpoint-every", "2"]
    assert main(["train", *TINY, *es, "--steps", "2"]) == 0
    out = tmp_path / "runs" / "train" / "rings_deeplinear_es_seed0"
    (out / "final.pt").unlink()
    assert main(["train", "--dataset", "rings", "--method", "es", "--resume", "--quiet"]) == 0
    (out / "final.pt").unlink()
    assert main(["train", "--dataset", "rings", "--out", str(out), "--resume", "--quiet"]) == 0


@pytest.mark.parametrize(("flags", "message"), [
    (["--method", "backprop"], "was trained with --method es, not backprop; resume it with its "
                               "own settings"),
    (["--model", "mlp"], "was trained with --model deeplinear, not mlp"),
    (["--perturbation", "lowrank"], "was trained with --perturbation full, not lowrank"),
    (["--dataset", "digits"], "was trained with --dataset rings, not digits"),  # not --sizes
])
def test_resume_names_a_changed_method_before_the_flags_it_decides(tmp_path, capsys, flags,
                                                                   message):
    rc, out = train(tmp_path, "--method", "es", "--pop", "8", "--steps", "2")
    assert rc == 0
    assert main(["train", "--out", str(out), "--resume", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{out} {message}" in err


def test_resume_of_a_reproductions_run_points_to_reproduce(tmp_path, capsys):
    from deeplinear.reproduce import Budget, reproduce

    reproduce(("checkerboard",), Budget(2, {"steps": 2, "pop": 4}), tmp_path)
    capsys.readouterr()
    run = tmp_path / "checkerboard" / "deep-linear-openai-es"
    assert main(["train", "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a run of a reproduction (deep linear, OpenAI-ES)" in err
    assert err.strip().endswith(f"deeplinear reproduce --resume --out {tmp_path}")


def test_scale_exp_zero_is_kept_not_replaced_by_the_default(tmp_path):
    rc, out = train(tmp_path, "--method", "backprop", "--init-gain", "he", "--scale-exp", "0",
                    "--steps", "2")
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["model"]["scale_exp"] == 0


def test_eval_rebuilds_the_net_at_its_own_scale(tmp_path, capsys):
    rc, out = train(tmp_path, "--scale-exp", "120", "--steps", "60")
    assert rc == 0
    final = torch.load(out / "final.pt", weights_only=False)
    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test_acc"] == final["results"]["test_acc"]


def test_eval_keeps_the_runs_test_subset_only_for_its_own_dataset(tmp_path, capsys):
    from deeplinear.data import load_dataset

    rc, out = train(tmp_path, "--method", "backprop", "--steps", "2", "--n-test", "50")
    assert rc == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--semantics", "IEEE", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_test"] == 50  # as trained
    assert main(["eval", str(out), "--semantics", "IEEE", "--dataset", "spirals", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["dataset"] == "spirals"
    assert got["n_test"] == len(load_dataset("spirals", seed=0).y_test)  # none of the run's


def test_workers_or_ray_address_without_the_ray_backend_is_one_line(tmp_path, capsys):
    for flags in (["--workers", "2"], ["--ray-address", "auto"]):
        rc, _ = train(tmp_path, "--method", "es", "--steps", "1", "--pop", "4", *flags,
                      name="w" + flags[0])
        assert rc == 2
        assert "--workers and --ray-address need --backend ray" in capsys.readouterr().err


def test_threads_hold_for_the_whole_command_final_evaluation_included(tmp_path, monkeypatch):
    """A trainer gives back the thread count it found; the CLI sets --threads before it, so the
    final (exact-mode, slow) evaluation runs on them too."""
    import deeplinear.cli.train as cli_train

    seen, real = [], cli_train.final_results
    monkeypatch.setattr(cli_train, "final_results",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    try:  # the module runs on 1 thread (its fixture); the command asks for another count
        assert train(tmp_path, "--steps", "2", "--threads", "2")[0] == 0
    finally:
        torch.set_num_threads(1)
    assert seen == [2]


def test_a_run_records_its_thread_count_and_a_resume_keeps_it(tmp_path, monkeypatch):
    """Without --threads a run trains on torch's count; a wide net's sums depend on it, so it is
    recorded, and a resume in a process (or on a machine) with another count uses the run's."""
    import json

    import deeplinear.cli.train as cli_train

    seen, real = [], cli_train.final_results
    monkeypatch.setattr(cli_train, "final_results",
                        lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    rc, out = train(tmp_path, "--steps", "2")  # the module runs on 1 thread (its fixture)
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["trainer"]["threads"] == 1
    (out / "final.pt").unlink()  # the run is at its last checkpoint: a resume evaluates it
    torch.set_num_threads(2)
    try:
        assert main(["train", "--out", str(out), "--resume"]) == 0
    finally:
        torch.set_num_threads(1)
    assert seen == [1, 1]


@pytest.fixture(scope="module")
def settings_run(tmp_path_factory):
    """A run whose data, semantics and scale are all not the defaults: the flags must reach the
    model, the split and the saved weights, and eval must score the very split the run saw."""
    rc, out = train(tmp_path_factory.mktemp("settings"), "--method", "backprop", "--steps", "40",
                    "--data-seed", "5", "--n-train", "300", "--n-test", "100",
                    "--semantics", "CPU_FTZ_DAZ", "--scale-exp", "120")
    assert rc == 0
    return out


def test_train_flags_reach_the_saved_model(settings_run):
    from dataclasses import asdict

    from deeplinear.arithmetic import CPU_FTZ_DAZ

    final = torch.load(settings_run / "final.pt", weights_only=False)
    assert final["semantics"] == asdict(CPU_FTZ_DAZ)
    assert final["results"]["own"] == "CPU_FTZ_DAZ" and final["results"]["n_test"] == 100
    net = load_model(settings_run)
    assert net.semantics == CPU_FTZ_DAZ and net.scale_exp == 120
    data = load_dataset("rings", seed=5, n_train=300, n_test=100)
    assert final["results"]["test_acc"]["CPU_FTZ_DAZ"] == accuracy(net, data.x_test, data.y_test,
                                                                   "exact")


def test_eval_scores_the_runs_own_split_or_the_n_test_asked(settings_run, capsys):
    final = torch.load(settings_run / "final.pt", weights_only=False)
    net = load_model(settings_run)
    capsys.readouterr()
    assert main(["eval", str(settings_run), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["own"] == "CPU_FTZ_DAZ" and res["n_test"] == 100
    assert res["weights"] == str((settings_run / "final.pt").resolve())
    assert res["model"] == final["model"] and res["method"] == "backprop"
    assert res["test_acc"] == final["results"]["test_acc"]
    # --n-test draws from the run's data seed, after the run's train subset (one generator)
    assert main(["eval", str(settings_run), "--n-test", "50", "--semantics", "IEEE",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    data = load_dataset("rings", seed=5, n_train=300, n_test=50)
    net.semantics = PRESETS["IEEE"]
    assert res["n_test"] == 50
    assert res["test_acc"] == {"IEEE": accuracy(net, data.x_test, data.y_test, "exact")}


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't "
                 "allocate memory: you tried to allocate 40000000000 bytes. Error code 12 "
                 "(Cannot allocate memory)"),  # torch 2.13's CPU allocator, --sizes 2,1e5,1e5,2
    MemoryError()])
def test_an_allocation_that_fails_is_one_line_naming_the_settings(monkeypatch, capsys, error):
    import deeplinear.cli.train as cli_train

    def fails(args):
        raise error

    monkeypatch.setattr(cli_train, "run", fails)
    assert main(["train", "--dataset", "rings"]) == 2
    err = capsys.readouterr().err
    size = " (one tensor of 37.3 GiB)" if isinstance(error, RuntimeError) else ""
    assert err == (f"deeplinear train: error: out of memory{size}: this asks for more than this "
                   "machine has; lower --sizes, --pop, --batch-size\n")


def test_a_gpu_out_of_memory_names_the_gpu_and_the_cpu_fallback():
    from deeplinear.cli import out_of_memory

    cuda = RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
    assert out_of_memory(cuda, "train") == ("out of memory (one tensor of 2.00 GiB): this asks "
                                            "for more than the GPU has; lower --sizes, --pop, "
                                            "--batch-size or use --device cpu")
    assert out_of_memory(OSError(12, "Cannot allocate memory"), "probe").endswith(
        "lower --sizes, --n")
    assert out_of_memory(RuntimeError("expected a tensor"), "train") is None


def test_train_help_shows_each_methods_defaults_from_the_trainers_configs(capsys, monkeypatch):
    from deeplinear.train import cmaes
    from deeplinear.train import es as es_train

    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    steps = (f"(default: backprop, float-aware {backprop.Config().steps}; es "
             f"{es_train.Config().steps}; cma-es {cmaes.Config().steps})")
    assert f"optimisation steps (es: generations) {steps}" in out
    assert f"es, cma-es: population (default: es {es_train.Config().pop}; cma-es " in out
    assert re.search(rf"--lr LR +default: backprop, float-aware {backprop.Config().lr}; es "
                     rf"{es_train.Config().lr}\n", out)


def test_the_slow_final_evaluation_is_announced_unless_quiet(tmp_path, capsys):
    args = ["train", "--dataset", "rings", "--sizes", "2,8,2", "--steps", "2", "--n-test", "40"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    note = "evaluating 40 test samples in exact mode under TF_GPU, IEEE, CPU_FTZ_DAZ, collapsed\n"
    assert note in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "evaluating" not in capsys.readouterr().err
    # eval announces it too, naming the semantics it was asked for
    assert main(["eval", str(tmp_path / "a")]) == 0
    assert note in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "a"), "--semantics", "IEEE,collapsed"]) == 0
    assert "evaluating 40 test samples in exact mode under IEEE, collapsed\n" in \
        capsys.readouterr().err


def test_a_net_that_flushes_nothing_is_called_a_linear_model(tmp_path, capsys):
    """At --scale-exp 100 the dead zone is 1.5e-8 wide in the net's units and training leaves it
    at once: the net computes its collapsed map, and the command says so (on stderr)."""
    args = ["train", "--dataset", "spirals", "--sizes", "2,16,16,2", "--steps", "50",
            "--n-test", "200", "--quiet"]
    assert main([*args, "--scale-exp", "100", "--out", str(tmp_path / "k100")]) == 0
    err = capsys.readouterr().err
    results = torch.load(tmp_path / "k100" / "final.pt", weights_only=False)["results"]
    assert results["occupancy"][:-1] == [0.0, 0.0]
    acc = results["test_acc"]
    assert acc["TF_GPU"] == acc["collapsed"]
    assert ("note: no hidden value is flushed on the test set, so this net computes its collapsed "
            "affine map, a linear model; its dead zone is |u| < 1.49012e-08 in the net's units "
            "at --scale-exp 100 (the 2017 setting is 125)\n") in err
    assert main([*args, "--out", str(tmp_path / "k125")]) == 0  # flushes: no note
    assert "note:" not in capsys.readouterr().err
    assert main([*args, "--semantics", "IEEE", "--out", str(tmp_path / "ieee")]) == 0
    assert "note:" not in capsys.readouterr().err  # no dead zone to be outside of


def test_the_linear_note_names_what_the_dead_zone_still_flushes():
    from deeplinear.cli.train import linear_note
    from deeplinear.nets import DeepLinear

    net = DeepLinear([2, 4, 4, 2], scale_exp=110)
    res = {"own": "TF_GPU", "test_acc": {"TF_GPU": 0.562, "IEEE": 0.562, "collapsed": 0.562},
           "occupancy": [0.0016, 0.0021, 0.0]}
    assert linear_note(net, res) == (
        "note: this net scores what its collapsed affine map, a linear model, scores (56.20%), "
        "with 0.2% / 0.2% of its hidden values flushed (per layer); its dead zone is |u| < "
        "1.52588e-05 in the net's units at --scale-exp 110 (the 2017 setting is 125)")
    assert linear_note(net, {**res, "test_acc": {"TF_GPU": 0.6, "collapsed": 0.562}}) is None
    # a tie on a few samples by a net that flushes most of its values says nothing about it
    assert linear_note(net, {**res, "occupancy": [0.738, 0.707, 0.5]}) is None
    net.semantics = "IEEE"
    assert linear_note(net, {**res, "own": "IEEE"}) is None  # no dead zone: nothing to say
