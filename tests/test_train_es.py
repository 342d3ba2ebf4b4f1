import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from sklearn.linear_model import LogisticRegression

from deeplinear import es
from deeplinear.data import load_dataset
from deeplinear.nets import DeepLinear, SoftmaxRegression
from deeplinear.runs import Run
from deeplinear.train.es import Config, train

SIZES = [2, 16, 16, 2]
# one thread: a tiny net gains nothing from two, and on a busy 2-core machine OpenMP's waits
# for a descheduled second thread made these runs 20x slower
FAST = {"pop": 40, "batch_size": 256, "sigma": 0.03, "lr": 0.03, "table_size": 1 << 16,
        "threads": 1}


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def rings():
    return load_dataset("rings", seed=0)


def net(seed=0):
    return DeepLinear(SIZES, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("perturbation", ["full", "lowrank"])
def test_es_learns_rings_far_beyond_the_best_linear_model(perturbation):
    data = rings()
    linear = LogisticRegression().fit(data.x_train.numpy(), data.y_train.numpy())
    linear_acc = linear.score(data.x_test.numpy(), data.y_test.numpy())
    model = net()
    cfg = Config(steps=200, eval_every=100, perturbation=perturbation, **FAST)
    rows = train(model, data, cfg, progress=False)
    assert [r["step"] for r in rows] == [100, 200]
    assert rows[-1]["test_acc"] > linear_acc + 0.2
    exact = (model(data.x_test, mode="exact").argmax(1) == data.y_test).double().mean()
    assert float(exact) > linear_acc + 0.2  # the ground truth agrees: the weights are in model


CHILD = """
import json, sys, torch
from deeplinear.data import load_dataset
from deeplinear.nets import DeepLinear
from deeplinear.runs import Run
from deeplinear.train.es import Config, train
cfg = Config(**json.loads(sys.argv[1]))
net = DeepLinear({sizes}, generator=torch.Generator().manual_seed(0))
run = Run.open(sys.argv[2], json.loads(sys.argv[1]))
train(net, load_dataset("rings", seed=0), cfg, run, progress=False)
"""


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    cfg = Config(steps=400, eval_every=5, checkpoint_every=5, **FAST)
    config = dataclasses.asdict(cfg)
    ref_net = net()
    ref_rows = train(ref_net, rings(), cfg, Run.open(tmp_path / "ref", config), progress=False)

    out = tmp_path / "killed"
    script = CHILD.format(sizes=SIZES)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen([sys.executable, "-c", script, json.dumps(config), str(out)],
                             env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / "checkpoint.pt").exists():
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 60 s"
        time.sleep(0.002)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    run = Run.open(out, config, resume=True)
    assert 0 < run.resumed_state["step"] < cfg.steps  # really interrupted mid-run
    resumed_net = net(seed=1)  # its initial weights must not matter
    rows = train(resumed_net, rings(), cfg, run, progress=False)
    assert all(torch.equal(a, b) for a, b in
               zip(ref_net.state_dict().values(), resumed_net.state_dict().values(), strict=True))

    def strip(rs):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]

    assert strip(rows) == strip(ref_rows)
    assert strip(run.metrics()) == strip(ref_rows)
    final = Run.open(out, config, resume=True)  # a finished run resumes to the same end
    assert strip(train(net(seed=2), rings(), cfg, final, progress=False)) == strip(ref_rows)


@pytest.mark.parametrize("fitness", ["loss", "error"])
def test_a_generation_with_no_finite_loss_stops_with_a_clear_error(fitness):
    """Also with fitness=error: NaN logits still have an argmax, so their accuracy alone would
    let a diverged generation go on."""
    data = rings()
    data.x_train[:] = float("nan")
    cfg = Config(steps=3, init_gain=None, fitness=fitness, **FAST)
    with pytest.raises(es.DivergedError, match="generation 0"):
        train(net(), data, cfg, progress=False)


def test_lowrank_resume_with_schedules_and_decay_is_bit_identical(tmp_path):
    """Stopped at a checkpoint and resumed, a low-rank run whose sigma and lr decay to their
    floors and whose weights decay ends exactly as the uninterrupted one: every schedule is a
    function of the checkpointed generation."""
    cfg = Config(steps=24, eval_every=6, checkpoint_every=6, perturbation="lowrank", rank=2,
                 sigma_decay=0.9, sigma_min=0.01, lr_decay=0.9, lr_min=0.01,
                 weight_decay=0.5, fitness="error", **FAST)
    config = dataclasses.asdict(cfg)
    whole = net()
    ref = train(whole, rings(), cfg, Run.open(tmp_path / "whole", config), progress=False)
    assert ref[-1]["sigma"] == cfg.sigma_min  # the floor was reached before the stop
    train(net(), rings(), dataclasses.replace(cfg, steps=18), Run.open(tmp_path / "part", config),
          progress=False)
    run = Run.open(tmp_path / "part", config, resume=True)
    assert run.resumed_state["step"] == 18
    resumed = net(seed=1)
    rows = train(resumed, rings(), cfg, run, progress=False)
    assert all(torch.equal(a, b) for a, b in
               zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True))
    assert [r["test_acc"] for r in rows] == [r["test_acc"] for r in ref]


@pytest.mark.parametrize("changes, match", [
    ({"perturbation": "sparse"}, "perturbation"), ({"fitness": "reward"}, "fitness"),
    ({"pop": 9}, "even"), ({"steps": 0}, "steps"), ({"init_gain": 0.0}, "init_gain"),
    ({"batch_size": 10_000}, "batch_size"), ({"device": "cuda:x"}, "unknown device 'cuda:x'"),
    ({"sigma_decay": 0.9}, "needs sigma_min > 0"), ({"sigma_min": 1.0}, "above sigma"),
    ({"sigma_blocks": "weights.7=0"}, "not in this net"),
])
def test_bad_config_is_a_clear_error(changes, match):
    with pytest.raises(ValueError, match=match):
        train(net(), rings(), Config(**{**FAST, **changes}), progress=False)


def test_refuses_models_it_cannot_train():
    with pytest.raises(ValueError, match="deep linear"):
        train(SoftmaxRegression(2, 2), rings(), Config(**FAST), progress=False)
    with pytest.raises(ValueError, match="fix the sizes"):
        train(DeepLinear([3, 8, 2]), rings(), Config(**FAST), progress=False)


def test_fitness_error_and_progress_line(capsys):
    cfg = Config(steps=20, eval_every=10, fitness="error", **FAST)
    rows = train(net(), rings(), cfg, progress=True)
    assert rows[-1]["step"] == 20 and 0 <= rows[-1]["test_acc"] <= 1
    assert "es 20/20" in capsys.readouterr().err


@pytest.mark.parametrize(("fitness", "perturbation"), [("loss", "full"), ("error", "lowrank")])
def test_tell_ranks_by_the_fitness_asked_with_the_noise_asked(monkeypatch, fitness, perturbation):
    """What each generation hands ``es.tell`` is the engine's loss, or ``member_errors`` of its
    loss and accuracy, bit for bit; and a lowrank run's populations carry its rank."""
    from deeplinear.engine import Engine, member_errors

    scored, told = [], []
    losses, tell = Engine.losses, es.tell

    def spy_losses(self, *args, **kwargs):
        scored.append(losses(self, *args, **kwargs))
        return scored[-1]

    def spy_tell(strategy, state, pop, fit):
        told.append((pop.strategy.rank, fit.clone()))
        return tell(strategy, state, pop, fit)

    monkeypatch.setattr(Engine, "losses", spy_losses)
    monkeypatch.setattr(es, "tell", spy_tell)
    cfg = Config(steps=3, eval_every=3, fitness=fitness, perturbation=perturbation, rank=2,
                 **FAST)
    train(net(), rings(), cfg, progress=False)
    assert len(told) == len(scored) == 3
    for (rank, fit), (loss, acc) in zip(told, scored, strict=True):
        assert rank == (2 if perturbation == "lowrank" else 0)
        want = loss if fitness == "loss" else member_errors(loss, acc)
        assert fit.dtype == want.dtype and torch.equal(fit, want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_names_the_fix():
    with pytest.raises(ValueError, match=r"no CUDA device here; use device cpu \(--device cpu\)"):
        train(net(), rings(), Config(**FAST, device="cuda"), progress=False)


def test_a_cuda_device_this_machine_lacks_names_the_ones_it_has(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device cuda:2: torch sees 2 CUDA device\(s\) here; "
                                         r"use cuda or cuda:N with N below 2"):
        train(net(), rings(), Config(**FAST, device="cuda:2"), progress=False)


# torch's per-backend fp32_precision settings arrived in 2.9; older versions have only the others
FP32_PRECISION_API = hasattr(torch.backends.mkldnn, "matmul")
needs_fp32_precision = pytest.mark.skipif(not FP32_PRECISION_API,
                                          reason="torch < 2.9 has no fp32_precision settings")


@pytest.fixture
def restore_matmul_precision():
    yield
    if FP32_PRECISION_API:
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.mkldnn.matmul.fp32_precision = "none"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("reduce, says", [
    pytest.param(lambda: torch.set_float32_matmul_precision("high"),
                 r"precision is 'high'.*'highest'", id="precision_high"),
    pytest.param(lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
                 r"precision is 'high'", id="allow_tf32"),
    pytest.param(lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
                 r"torch.backends.cuda.matmul.fp32_precision is 'tf32'.*'ieee'",
                 id="cuda_fp32_precision", marks=needs_fp32_precision),
    pytest.param(lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
                 r"torch.backends.mkldnn.matmul.fp32_precision is 'bf16'",
                 id="mkldnn_bf16", marks=needs_fp32_precision),
])
def test_reduced_precision_float32_matmuls_are_refused(device, reduce, says, monkeypatch,
                                                        restore_matmul_precision):
    """TF32 (or oneDNN's bfloat16 passes) would round every product's inputs: no float32
    semantics then, on a GPU or a CPU, so training refuses to start and says how to fix it,
    whichever of torch's APIs asked for less."""
    if device == "cuda":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    reduce()
    with pytest.raises(ValueError, match=says):
        train(net(), rings(), Config(**FAST, device=device), progress=False)


TINY_ES = {"pop": 8, "batch_size": 64, "sigma": 0.03, "lr": 0.03, "table_size": 1 << 14}


def _rings_net():
    return DeepLinear([2, 16, 16, 2], generator=torch.Generator().manual_seed(0))


def test_metric_rows_score_the_first_eval_n_samples():
    from deeplinear.evaluate import accuracy

    data, net = load_dataset("rings", seed=0), _rings_net()
    rows = train(net, data, Config(steps=1, eval_every=1, eval_n=7, **TINY_ES), progress=False)
    assert rows[-1]["test_acc"] == accuracy(net, data.x_test[:7], data.y_test[:7])
    assert rows[-1]["train_acc"] == accuracy(net, data.x_train[:7], data.y_train[:7])


def test_center_changes_where_es_starts():
    data = load_dataset("rings", seed=0)
    a, b = _rings_net(), _rings_net()
    train(a, data, Config(steps=1, center=True, **TINY_ES), progress=False)
    train(b, data, Config(steps=1, center=False, **TINY_ES), progress=False)
    assert not torch.equal(a.biases[0], b.biases[0])
