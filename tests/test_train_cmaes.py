import dataclasses
import math
import sys

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_info, threadpool_limits

from deeplinear import es
from deeplinear.data import load_dataset
from deeplinear.engine import member_accuracy, member_losses
from deeplinear.nets import DeepLinear, SoftmaxRegression
from deeplinear.runs import Run
from deeplinear.train import cmaes
from deeplinear.train.cmaes import Config, train

SIZES = [2, 8, 8, 2]
FAST = {"pop": 40, "batch_size": 500, "sigma": 0.3, "threads": 1}


@pytest.fixture(autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def rings():
    return load_dataset("rings", seed=0)


def net(seed=0, sizes=SIZES):
    return DeepLinear(sizes, generator=torch.Generator().manual_seed(seed))


def test_cma_es_learns_rings_beyond_the_best_linear_model():
    data = rings()
    linear = LogisticRegression().fit(data.x_train.numpy(), data.y_train.numpy())
    linear_acc = linear.score(data.x_test.numpy(), data.y_test.numpy())
    model = net()
    rows = train(model, data, Config(steps=150, eval_every=75, **FAST), progress=False)
    assert [r["step"] for r in rows] == [75, 150]
    exact = (model(data.x_test, mode="exact").argmax(1) == data.y_test).double().mean()
    assert float(exact) > linear_acc + 0.2  # the model holds the mean, right in real float32
    assert rows[-1]["test_acc"] == pytest.approx(float(exact), abs=0.01)


def test_resume_is_bit_identical_and_the_global_numpy_rng_is_not_used(tmp_path):
    """The candidates come from the strategy's own RandomState, pickled into the checkpoint:
    stopping at a checkpoint and resuming ends exactly where one uninterrupted run ends, however
    the global numpy generator is disturbed in between."""
    cfg = Config(steps=30, eval_every=5, checkpoint_every=10, **FAST)
    config = dataclasses.asdict(cfg)
    whole = net()
    ref = train(whole, rings(), cfg, Run.open(tmp_path / "whole", config), progress=False)

    part = net()
    train(part, rings(), dataclasses.replace(cfg, steps=20),
          Run.open(tmp_path / "part", config), progress=False)
    import numpy as np
    np.random.seed(123)
    run = Run.open(tmp_path / "part", config, resume=True)
    assert run.resumed_state["step"] == 20
    resumed = net(seed=1)  # its initial weights must not matter
    rows = train(resumed, rings(), cfg, run, progress=False)
    assert all(torch.equal(a, b) for a, b in
               zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True))
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(rows) == strip(ref)


@pytest.mark.parametrize("kind", ["loss", "error"])
def test_fitness_scores_each_candidate_exactly_as_its_own_forward_pass(kind, monkeypatch):
    model, data = net(), rings()
    layout = es.Layout.of(SIZES)
    theta = layout.flatten(model).double().numpy()
    rng = np.random.default_rng(0)
    candidates = [theta + 0.3 * rng.standard_normal(layout.n) for _ in range(7)]
    x, y = data.x_train[:300], data.y_train[:300]
    chunk_of_3 = 4 * (layout.n + 300 * sum(SIZES[1:])) * 3  # a candidate's weights + activations
    monkeypatch.setattr(cmaes, "CHUNK_CACHE_BYTES", chunk_of_3)  # chunks 3, 3, 1
    values, _ = cmaes.fitness(model, layout, candidates, x, y, kind, 0)
    torch.set_num_threads(1)
    for c, value in zip(candidates, values, strict=True):
        layout.load(torch.from_numpy(c.astype(np.float32)), model)
        with torch.no_grad():
            logits = model(x, mode="scaled")[None]
        accuracy = member_accuracy(logits, y).double()
        ref = member_losses(logits, y) if kind == "loss" else 1 - accuracy
        assert value == float(ref)
    assert len(set(values)) > 1


def test_a_candidate_alone_in_its_chunk_is_scored_as_its_own_forward_pass(monkeypatch):
    """A bmm over one matrix runs as a plain mm, which with 2 threads splits its reduction for
    these shapes (measured: ~800 of the 1000 logits differ in their last bits, and so does the
    loss of most candidates); the third candidate, alone in the last chunk, must still get the
    loss of its own one-thread forward pass."""
    sizes = [784, 512, 10]
    model = DeepLinear(sizes, generator=torch.Generator().manual_seed(0))
    layout = es.Layout.of(sizes)
    g = torch.Generator().manual_seed(0)  # the third's loss does differ, run alone
    theta = layout.flatten(model).double()
    candidates = [(theta + 0.1 * torch.randn(layout.n, generator=g, dtype=torch.float64)).numpy()
                  for _ in range(3)]
    x, y = torch.rand(100, 784, generator=g), torch.randint(0, 10, (100,), generator=g)
    monkeypatch.setattr(cmaes, "CHUNK_CACHE_BYTES", 1)  # the fewest per chunk: 2, 1
    torch.set_num_threads(2)
    values, _ = cmaes.fitness(model, layout, candidates, x, y, "loss", 0)
    torch.set_num_threads(1)
    for c, value in zip(candidates, values, strict=True):
        layout.load(torch.from_numpy(c.astype(np.float32)), model)
        with torch.no_grad():
            assert value == float(member_losses(model(x, mode="scaled")[None], y))


@pytest.mark.parametrize("kind", ["loss", "error"])
def test_a_non_finite_candidate_ranks_worst_and_all_non_finite_is_a_clear_error(kind):
    """With ``error`` too: the diverged candidate's NaN logits still have an argmax, and on a
    batch of class-0 rows it would score 0 error, the best there is."""
    model, data = net(), rings()
    layout = es.Layout.of(SIZES)
    good = layout.flatten(model).double().numpy()
    bad = good.copy()
    bad[0] = math.inf
    rows = torch.nonzero(data.y_train == 0)[:100, 0]
    x, y = data.x_train[rows], data.y_train[rows]
    values, mean = cmaes.fitness(model, layout, [good, bad], x, y, kind, 0)
    assert math.isfinite(values[0]) and values[1] > values[0] and mean == values[0]
    with pytest.raises(es.DivergedError, match="generation 7"):
        cmaes.fitness(model, layout, [bad], x, y, kind, 7)


def test_runs_are_reproducible_from_the_seed_and_leave_numpy_global_rng_alone():
    cfg = Config(steps=5, eval_every=5, **FAST)
    np.random.seed(7)
    before = np.random.get_state()
    a, b, c = net(), net(), net()
    train(a, rings(), cfg, progress=False)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and \
        before[2:] == after[2:]
    np.random.seed(8)  # the global generator does not matter either
    train(b, rings(), cfg, progress=False)
    train(c, rings(), dataclasses.replace(cfg, seed=1), progress=False)
    assert torch.equal(a.weights[0], b.weights[0]) and not torch.equal(a.weights[0], c.weights[0])


def blas_threads() -> int:
    return next(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")


@pytest.mark.skipif(not any(p["user_api"] == "blas" for p in threadpool_info()),
                    reason="numpy's BLAS is not one threadpoolctl controls (e.g. Accelerate)")
def test_cma_runs_on_one_blas_thread_whatever_the_callers_setting(monkeypatch):
    """numpy's BLAS rounds cma's eigendecompositions by its thread count: the trainer pins it to
    one while it runs (so a run gives the same result on any machine) and gives it back."""
    seen = []
    real = cmaes.fitness
    monkeypatch.setattr(cmaes, "fitness", lambda *a: seen.append(blas_threads()) or real(*a))
    with threadpool_limits(limits=2, user_api="blas"):
        outside = blas_threads()
        train(net(), rings(), Config(steps=2, eval_every=2, **FAST), progress=False)
        assert blas_threads() == outside
    assert seen == [1, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_model_on_a_gpu_trains_as_on_the_cpu_and_stays_on_the_gpu():
    cfg = Config(steps=3, eval_every=3, **FAST)
    on_cpu, on_gpu = net(), net().cuda()
    train(on_cpu, rings(), cfg, progress=False)
    train(on_gpu, rings(), cfg, progress=False)
    assert on_gpu.weights[0].is_cuda and torch.equal(on_gpu.weights[0].cpu(), on_cpu.weights[0])


@pytest.mark.parametrize("changes, match", [
    ({"fitness": "reward"}, "fitness"), ({"pop": 1}, "pop"), ({"steps": 0}, "steps"),
    ({"sigma": -1.0}, "sigma"), ({"init_gain": 0.0}, "init_gain"),
    ({"batch_size": 10_000}, "batch_size"),
    ({"seed": 2**32}, r"seed must be in \[0, 2\*\*32\) for CMA-ES"),
    ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\), got -1"),
])
def test_bad_config_is_a_clear_error(changes, match):
    with pytest.raises(ValueError, match=match):
        train(net(), rings(), Config(**{**FAST, **changes}), progress=False)


def test_refuses_models_it_cannot_train():
    with pytest.raises(ValueError, match="deep linear"):
        train(SoftmaxRegression(2, 2), rings(), Config(**FAST), progress=False)
    with pytest.raises(ValueError, match="fix the sizes"):
        train(DeepLinear([3, 8, 2]), rings(), Config(**FAST), progress=False)
    with pytest.raises(ValueError, match=r"use ES for this net \(--method es\)"):
        train(net(sizes=[2, 128, 64, 2]), rings(), Config(**FAST), progress=False)
    memory = es.physical_memory()
    if memory:  # a population whose candidates do not fit in RAM
        n = es.Layout.of(SIZES).n
        pop = memory // (n * cmaes.CANDIDATE_PARAM_BYTES) + 1
        with pytest.raises(ValueError, match=rf"a CMA-ES population of {pop} over {n} parameters "
                                             r"needs about [0-9.]+ GiB, more than this "
                                             r"machine's [0-9.]+ GiB; lower pop \(--pop\)"):
            train(net(), rings(), Config(**{**FAST, "pop": pop}), progress=False)


def test_without_the_cma_package_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cma", None)
    with pytest.raises(ValueError, match=r"pip install 'deeplinear\[cma\]'"):
        train(net(), rings(), Config(**FAST), progress=False)


def test_resume_between_evaluations_keeps_the_loss_accumulators(tmp_path):
    """A checkpoint that falls between two evaluations (4, with eval_every 6) must carry the
    running loss, or the first row after the resume averages only the generations since."""
    cfg = Config(steps=12, eval_every=6, checkpoint_every=4, **FAST)
    config = dataclasses.asdict(cfg)
    ref = train(net(), rings(), cfg, Run.open(tmp_path / "whole", config), progress=False)

    run = Run.open(tmp_path / "part", config)
    save = run.checkpoint

    def checkpoint(state):
        save(state)
        if state["step"] == 4:
            raise KeyboardInterrupt  # a kill right after the checkpoint

    run.checkpoint = checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(net(), rings(), cfg, run, progress=False)
    run = Run.open(tmp_path / "part", config, resume=True)
    assert run.resumed_state["step"] == 4
    rows = train(net(), rings(), cfg, run, progress=False)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "wall_s"} for r in rs]  # noqa: E731
    assert strip(rows) == strip(ref)


def test_defaults_are_the_documented_measured_settings():
    """The module docstring's measured setting: pop 200, sigma 0.3, batch 1000, init gain 2."""
    cfg = Config()
    assert (cfg.pop, cfg.sigma, cfg.batch_size, cfg.init_gain, cfg.steps) == (200, 0.3, 1000,
                                                                              2.0, 1000)
