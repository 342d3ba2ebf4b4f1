"""What the trainers share (``deeplinear.train``): the model comes back on its own device, and
Ctrl-C stops a run after a finished step with a checkpoint to resume from."""

import dataclasses
import math
import os
import re
import signal

import pytest
import torch

from deeplinear import es
from deeplinear.data import load_dataset
from deeplinear.nets import DeepLinear
from deeplinear.runs import Run
from deeplinear.train import Interrupted, backprop, cmaes
from deeplinear.train import es as es_train

CPU = torch.device("cpu")


class Tracked(DeepLinear):
    """Records where it is moved (a GPU cannot be assumed, so the moves are what is checked)."""

    def __init__(self) -> None:
        super().__init__([2, 8, 8, 2], generator=torch.Generator().manual_seed(0))
        self.moves: list = []

    def to(self, *args, **kwargs):
        self.moves.append(args[0] if args else kwargs.get("device"))
        return super().to(*args, **kwargs)

    def cpu(self):
        self.moves.append("cpu")
        return super().cpu()


@pytest.fixture(scope="module")
def rings():
    return load_dataset("rings", seed=0)


@pytest.fixture(autouse=True)
def signals_delivered():
    """These tests send Ctrl-C and SIGTERM to pytest itself; under a shell's background job
    SIGINT is ignored (and a trainer rightly leaves an ignored signal so), so give both their
    default handlers meanwhile, whatever runs the suite."""
    previous = {signal.SIGINT: signal.signal(signal.SIGINT, signal.default_int_handler),
                signal.SIGTERM: signal.signal(signal.SIGTERM, signal.SIG_DFL)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


@pytest.mark.parametrize("module, bad, moves", [
    (backprop, {"lr": -1.0}, [CPU]),  # refused before it moved: home
    (es_train, {"steps": 0}, [CPU]),
    (cmaes, {"sigma": -1.0}, ["cpu", CPU]),  # CMA-ES computes on the CPU, then home
])
def test_a_refused_run_gives_the_model_back_on_its_device(module, bad, moves, rings):
    model = Tracked()
    with pytest.raises(ValueError):
        module.train(model, rings, module.Config(**bad), progress=False)
    assert model.moves == moves


def test_a_diverged_es_run_gives_the_model_back_on_its_device(rings):
    """ES used to move the model home only after a finished run."""
    model = Tracked()

    def diverged(pop, idx):
        return torch.full((pop.size,), math.nan), torch.zeros(pop.size)

    with pytest.raises(es.DivergedError):
        es_train.train(model, rings, es_train.Config(steps=3, pop=4), progress=False,
                       evaluate=diverged)
    assert model.moves == [CPU, CPU]  # to cfg.device, then home


CONFIGS = {  # short runs with an evaluation every 2 steps and no checkpoint before the end
    backprop: {"steps": 8, "batch_size": 16, "eval_every": 2, "checkpoint_every": 100,
               "eval_n": 50},
    es_train: {"steps": 8, "pop": 4, "batch_size": 16, "eval_every": 2, "checkpoint_every": 100,
               "eval_n": 50},
    cmaes: {"steps": 8, "pop": 6, "batch_size": 16, "eval_every": 2, "checkpoint_every": 100,
            "eval_n": 50},
}


def ctrl_c_at_first_eval(monkeypatch, module, presses=1, sig=signal.SIGINT, at=1):
    """Press Ctrl-C (or send ``sig``) ``presses`` times while the trainer scores its ``at``-th
    evaluation (step ``2 * at``)."""
    real, calls = module.scores, []

    def scores(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            for _ in range(presses):
                os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "scores", scores)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
@pytest.mark.parametrize("module", [backprop, es_train, cmaes], ids=["backprop", "es", "cmaes"])
def test_ctrl_c_checkpoints_the_finished_step_and_resume_ends_as_an_unbroken_run(
        module, sig, rings, tmp_path, monkeypatch):
    if module is cmaes:
        pytest.importorskip("cma")
    cfg = module.Config(**CONFIGS[module])
    unbroken = DeepLinear([2, 8, 8, 2], generator=torch.Generator().manual_seed(0))
    module.train(unbroken, rings, cfg, run=Run.open(tmp_path / "a", {}), progress=False)

    model = DeepLinear([2, 8, 8, 2], generator=torch.Generator().manual_seed(0))
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with monkeypatch.context() as m:
        ctrl_c_at_first_eval(m, module, sig=sig)
        with pytest.raises(Interrupted, match=r"stopped after step 3; checkpoint in .*--resume"):
            module.train(model, rings, cfg, run=Run.open(tmp_path / "b", {}), progress=False)
    # the trainer's handlers are gone again
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    run = Run.open(tmp_path / "b", {}, resume=True)
    assert run.resumed_state["step"] == 3  # read at step 3: step 2 was past its checkpoint
    module.train(model, rings, cfg, run=run, progress=False)
    expected = weights(unbroken)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(rings, tmp_path, monkeypatch, sig):
    ctrl_c_at_first_eval(monkeypatch, backprop, presses=2, sig=sig)
    model = DeepLinear([2, 8, 8, 2], generator=torch.Generator().manual_seed(0))
    with pytest.raises(KeyboardInterrupt) as e:
        backprop.train(model, rings, backprop.Config(**CONFIGS[backprop]),
                       run=Run.open(tmp_path, {}), progress=False)
    assert not isinstance(e.value, Interrupted) and not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("run", [True, False], ids=["run", "no_run"])
def test_the_stop_notice_promises_a_checkpoint_only_where_one_is_written(rings, tmp_path,
                                                                         monkeypatch, capsys, run):
    ctrl_c_at_first_eval(monkeypatch, backprop)
    model = DeepLinear([2, 8, 8, 2], generator=torch.Generator().manual_seed(0))
    with pytest.raises(Interrupted) as e:
        backprop.train(model, rings, backprop.Config(**CONFIGS[backprop]),
                       run=Run.open(tmp_path, {}) if run else None, progress=False)
    notice = capsys.readouterr().err.strip()
    if run:
        assert notice == "stopping after this step, with a checkpoint (Ctrl-C again: stop now)"
        assert (tmp_path / "checkpoint.pt").exists() and "--resume" in str(e.value)
    else:
        assert notice == ("stopping after this step; no run directory, so no checkpoint: the "
                          "model keeps that step's weights (Ctrl-C again: stop now)")
        assert str(e.value) == "stopped after step 3; the model holds that step's weights"
    assert [row["step"] for row in e.value.rows] == [2]  # what train would have returned


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_an_ignored_signal_stays_ignored(rings, monkeypatch, sig):
    """A background job (``nohup ... &``) ignores SIGINT (``nohup`` SIGHUP, some launchers
    SIGTERM); a trainer must not start catching what its caller ignores."""
    seen = []
    monkeypatch.setattr(backprop, "scores",
                        lambda *a, **k: seen.append(signal.getsignal(sig)) or {})
    previous = signal.signal(sig, signal.SIG_IGN)
    try:
        backprop.train(DeepLinear([2, 8, 8, 2]), rings, backprop.Config(**CONFIGS[backprop]),
                       progress=False)
    finally:
        signal.signal(sig, previous)
    assert seen and all(h is signal.SIG_IGN for h in seen)


@pytest.mark.parametrize("module", [backprop, es_train, cmaes], ids=["backprop", "es", "cmaes"])
def test_a_signal_during_the_last_step_is_not_lost(module, rings, tmp_path, monkeypatch):
    """Asked after the trainer's last look (while it scores its final step), the stop still
    happens: the run ends with its final checkpoint and says so, and --resume finishes it."""
    if module is cmaes:
        pytest.importorskip("cma")
    cfg = module.Config(**CONFIGS[module])
    ctrl_c_at_first_eval(monkeypatch, module, sig=signal.SIGTERM, at=cfg.steps // 2)
    model = DeepLinear([2, 8, 8, 2], generator=torch.Generator().manual_seed(0))
    with pytest.raises(Interrupted, match=rf"stopped after step {cfg.steps}; checkpoint in .*"):
        module.train(model, rings, cfg, run=Run.open(tmp_path, {}), progress=False)
    assert Run.open(tmp_path, {}, resume=True).resumed_state["step"] == cfg.steps


TRAINERS = [(backprop, {}), (es_train, {"pop": 4}), (cmaes, {})]


@pytest.mark.parametrize("module, base", TRAINERS)
@pytest.mark.parametrize("changes, message", [
    ({"steps": 2.5}, "steps = 2.5: must be an integer >= 1"),
    ({"steps": "3"}, "steps = '3': must be an integer >= 1"),
    ({"batch_size": True}, "batch_size = True: must be an integer >= 1"),
    ({"seed": 1.5}, "seed must be an integer in [0, 2**63), got 1.5"),
    ({"seed": -1}, "seed must be an integer in [0, 2**63), got -1"),
    ({"seed": 2**63}, "seed must be an integer in [0, 2**63), got 9223372036854775808"),
])
def test_every_trainer_refuses_counts_and_seeds_that_are_not_integers(module, base, changes,
                                                                       message, rings):
    cfg = module.Config(**{**base, "steps": 1, "batch_size": 8, **changes})
    with pytest.raises(ValueError, match=re.escape(message)):
        module.train(DeepLinear([2, 8, 8, 2]), rings, cfg, progress=False)


@pytest.mark.parametrize("module, base", TRAINERS)
def test_non_finite_starting_weights_are_named_not_reported_as_divergence(module, base, rings):
    net = DeepLinear([2, 8, 8, 2])
    with torch.no_grad():
        net.biases[2][1] = math.inf
    cfg = module.Config(**{**base, "steps": 1, "batch_size": 8, "init_gain": None})
    with pytest.raises(ValueError, match=re.escape(
            "the model has non-finite weights in biases.2; initialise the model again")):
        module.train(net, rings, cfg, progress=False)


@pytest.mark.parametrize("module, base", TRAINERS)
def test_wrong_argument_types_are_named(module, base, rings):
    with pytest.raises(ValueError, match=r"data must be a deeplinear\.data\.Dataset .*got str"):
        module.train(DeepLinear([2, 8, 8, 2]), "rings", module.Config(**base), progress=False)
    other = backprop.Config() if module is not backprop else es_train.Config()
    for cfg in (None, {"steps": 1}, other):
        with pytest.raises(ValueError, match=f"cfg must be a {module.__name__}.Config, got"):
            module.train(DeepLinear([2, 8, 8, 2]), rings, cfg, progress=False)


def test_the_largest_seed_is_accepted(rings):
    cfg = backprop.Config(steps=1, batch_size=8, seed=2**63 - 1)
    assert len(backprop.train(DeepLinear([2, 8, 8, 2]), rings, cfg, progress=False)) == 1


@pytest.mark.parametrize("module", [backprop, es_train, cmaes], ids=["backprop", "es", "cmaes"])
def test_a_trained_net_is_not_calibrated_again(module, rings):
    """A second ``train`` with ``init_gain`` set used to rescale every layer and reset the first
    bias of the trained net: it is refused, the weights untouched, and ``init_gain=None``
    continues from them."""
    net = DeepLinear([2, 8, 8, 2], generator=torch.Generator().manual_seed(0))
    cfg = module.Config(**CONFIGS[module])
    assert cfg.init_gain is not None
    module.train(net, rings, cfg, progress=False)
    trained = weights(net)
    with pytest.raises(ValueError, match=r"this net was trained already, and init_gain=.*; pass "
                                         "init_gain=None to continue from its weights"):
        module.train(net, rings, cfg, progress=False)
    assert all(torch.equal(trained[k], v) for k, v in net.state_dict().items())
    module.train(net, rings, dataclasses.replace(cfg, init_gain=None), progress=False)
    assert not all(torch.equal(trained[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("module", [backprop, es_train, cmaes], ids=["backprop", "es", "cmaes"])
def test_the_callers_thread_count_comes_back(module, rings):
    before = torch.get_num_threads()
    other = 1 if before > 1 else 2
    cfg = module.Config(**CONFIGS[module], threads=other)
    module.train(DeepLinear([2, 8, 8, 2]), rings, cfg, progress=False)
    assert torch.get_num_threads() == before


def test_the_thread_count_comes_back_after_a_divergence(rings):
    before = torch.get_num_threads()

    def diverged(pop, idx):
        assert torch.get_num_threads() != before  # the run's own count applied
        return torch.full((pop.size,), math.nan), torch.zeros(pop.size)

    with pytest.raises(es.DivergedError):
        es_train.train(DeepLinear([2, 8, 8, 2]), rings, es_train.Config(
            steps=3, pop=4, threads=1 if before > 1 else 2), progress=False, evaluate=diverged)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("module, base", TRAINERS)
def test_number_fields_of_another_type_are_named(module, base, rings):
    cfg = module.Config(**{**base, "steps": 1, "batch_size": 8, "init_gain": "2", "threads": 1.5})
    with pytest.raises(ValueError, match=re.escape(
            "init_gain = '2' must be a number; threads = 1.5 must be an integer")):
        module.train(DeepLinear([2, 8, 8, 2]), rings, cfg, progress=False)


@pytest.mark.parametrize("module, base", TRAINERS)
def test_a_net_cast_to_float64_is_named_before_anything_runs(module, base, rings):
    with pytest.raises(ValueError, match=r"parameters are torch\.float64; .*call net\.float\(\)"):
        module.train(DeepLinear([2, 8, 8, 2]).double(), rings,
                     module.Config(**{**base, "steps": 1, "batch_size": 8}), progress=False)


def test_the_step_tail_every_trainer_shares():
    """due: evaluate every eval_every and at the end, checkpoint every checkpoint_every, at the end
    and on a stop; show: the step's loss and the latest evaluation's test accuracy."""
    import math
    import types

    from deeplinear import train as tr

    cfg = types.SimpleNamespace(steps=12, eval_every=5, checkpoint_every=4)
    assert [tr.due(d, cfg)[:2] for d in (4, 5, 8, 10, 11, 12)] == [
        (False, True), (True, False), (False, True), (True, False), (False, False), (True, True)]
    shown = []

    class Bar:
        def update(self, step, force=False, **metrics):
            shown.append((step, force, metrics))

    tr.show(Bar(), 12, cfg, 0.5, [{"test_acc": 0.1}, {"test_acc": 0.9}])
    tr.show(Bar(), 3, cfg, 0.25, [])
    tr.show(None, 3, cfg, 0.25, [])  # no bar: nothing shown
    assert shown[0] == (12, True, {"loss": 0.5, "test_acc": 0.9})
    assert shown[1][:2] == (3, False) and math.isnan(shown[1][2]["test_acc"]) and len(shown) == 2
    rows, logged = [], []
    tr.record({"step": 5}, rows, types.SimpleNamespace(log=logged.append))
    tr.record({"step": 10}, rows, None)
    assert rows == [{"step": 5}, {"step": 10}] and logged == [{"step": 5}]
