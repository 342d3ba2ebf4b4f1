import math
import re

import pytest
import torch

from deeplinear import evaluate
from deeplinear.arithmetic import CPU_FTZ_DAZ, FORMATS, IEEE, TF_GPU, ftz_is_on
from deeplinear.collapse import collapse
from deeplinear.data import load_dataset
from deeplinear.nets import MLP, DeepLinear, SoftmaxRegression
from deeplinear.runs import Run
from deeplinear.surrogate import identity
from deeplinear.train import backprop
from deeplinear.train.backprop import Config, calibrate, lr_at, train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny nets gain nothing from threads; on a loaded machine idle OpenMP workers cost 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def rings():
    return load_dataset("rings", seed=0)


def deep(sizes=(2, 32, 32, 2), seed=0, **kw) -> DeepLinear:
    return DeepLinear(list(sizes), generator=torch.Generator().manual_seed(seed), **kw)


QUICK = dict(steps=300, lr=1e-2, eval_every=300, checkpoint_every=10**9)


@pytest.fixture(scope="module")
def trained(rings):
    """One float-aware and one float-blind net, same init and batches (measured on 3 seeds:
    smooth 98-100% test, blind 52-64%)."""
    nets = {}
    for surrogate in ("smooth", "blind"):
        nets[surrogate] = deep()
        train(nets[surrogate], rings, Config(surrogate=surrogate, **QUICK), progress=False)
    return nets


def test_float_aware_learns_what_float_blind_cannot(rings, trained):
    acc = {k: evaluate.accuracy(n, rings.x_test, rings.y_test, "exact") for k, n in trained.items()}
    assert acc["smooth"] >= 0.9
    assert acc["blind"] <= 0.75
    assert acc["smooth"] - acc["blind"] >= 0.25


def test_float_aware_weights_fall_back_to_a_linear_map_under_ieee(rings, trained):
    net = trained["smooth"]
    ieee = DeepLinear(net.sizes, semantics=IEEE)
    ieee.load_state_dict(net.state_dict())
    assert evaluate.accuracy(ieee, rings.x_test, rings.y_test, "exact") <= 0.7


def test_float_blind_function_stays_affine(rings, trained):
    net = trained["blind"]
    w, b = collapse(net)
    with torch.no_grad():
        out = net(rings.x_test, "scaled", under=identity).double()
    lin = rings.x_test.double() @ w + b
    assert float((out - lin).norm() / lin.norm()) < 1e-5


def test_baselines_train(rings):
    torch.manual_seed(0)
    for model in (MLP([2, 32, 32, 2]), SoftmaxRegression(2, 2)):
        rows = train(model, rings, Config(**QUICK), progress=False)
        assert rows[-1]["step"] == 300 and math.isfinite(rows[-1]["loss"])
    assert rows[-1]["test_acc"] <= 0.7  # softmax regression: rings are not linearly separable


def run_to(tmp, rings, cfg, stop_after=None, model=None):
    """Train in run dir ``tmp``; with ``stop_after`` k, die right after the k-th checkpoint."""
    model = model or deep(seed=3)
    run = Run.open(tmp, {"cfg": cfg.__dict__}, resume=(tmp / "checkpoint.pt").exists())
    if stop_after is not None:
        saves, real = [], run.checkpoint

        def checkpoint(state):
            real(state)
            saves.append(state["step"])
            if len(saves) == stop_after:
                raise KeyboardInterrupt  # a kill right after the atomic rename

        run.checkpoint = checkpoint
        with pytest.raises(KeyboardInterrupt):
            train(model, rings, cfg, run=run, progress=False)
        return None, run
    return train(model, rings, cfg, run=run, progress=False), model


@pytest.mark.parametrize("surrogate", ["smooth", "blind"])
def test_resume_is_bit_identical(tmp_path, rings, surrogate):
    # 1500 samples / 128 = 11 steps per epoch: checkpoints at 20 and 40 fall mid-epoch, and
    # eval_every 25 is no multiple of 20, so the loss accumulators must survive the restart too
    cfg = Config(steps=60, lr=1e-2, surrogate=surrogate, eval_every=25, checkpoint_every=20)
    rows_a, model_a = run_to(tmp_path / "a", rings, cfg)
    run_to(tmp_path / "b", rings, cfg, stop_after=2)
    assert Run.open(tmp_path / "b", {"cfg": cfg.__dict__}, resume=True).resumed_state["step"] == 40
    rows_b, model_b = run_to(tmp_path / "b", rings, cfg)
    sa, sb = model_a.state_dict(), model_b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]  # noqa: E731
    assert strip(rows_a) == strip(rows_b) == strip(Run(tmp_path / "b", {}).metrics())
    assert [r["step"] for r in rows_b] == [25, 50, 60]


def test_divergence_stops_with_a_clear_error_and_keeps_the_good_checkpoint(tmp_path, rings):
    cfg = Config(steps=200, lr=1e30, surrogate="smooth", eval_every=1, checkpoint_every=1)
    run = Run.open(tmp_path, {})
    with pytest.raises(ValueError, match=r"diverged at step \d+.*lower lr \(--lr\)"):
        train(deep(), rings, cfg, run=run, progress=False)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("lr", [1e-2, 1e30])  # a finished run and a diverged one
def test_training_leaves_the_callers_ftz_state_as_it_found_it(rings, lr):
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # FTZ is per thread: one thread, so the probe sees the one we set
    try:
        for before in (True, False):
            torch.set_flush_denormal(before)
            try:
                train(deep(), rings, Config(steps=20, lr=lr, eval_every=10), progress=False)
            except ValueError:
                assert lr > 1  # only the diverging run may stop
            assert ftz_is_on() is before
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def test_nan_data_stops_before_any_checkpoint(tmp_path, rings):
    bad = load_dataset("rings", seed=0)
    bad.x_train[:] = float("nan")
    with pytest.raises(ValueError, match=r"calibrate layer 1.*std nan"):
        train(deep(), bad, Config(steps=5), progress=False)
    with pytest.raises(ValueError, match=r"diverged at step 1.*\(no checkpoint was written yet\)"):
        train(deep(), bad, Config(steps=5, init_gain=None), run=Run.open(tmp_path, {}),
              progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("gain", [0.5, 1.5])
@pytest.mark.parametrize("semantics", [TF_GPU, CPU_FTZ_DAZ], ids=["tf_gpu", "daz"])
def test_calibrate_sets_preactivation_scale_and_centres_layer_one(rings, semantics, gain):
    """Under CPU_FTZ_DAZ the products are flushed too, so the pre-activations' spread is not
    proportional to the scale: one proportional step left layers 2-3 at 0.6-0.9 of the target."""
    net = deep(sizes=(2, 64, 64, 2), semantics=semantics)
    x = rings.x_train[:1000]
    calibrate(net, x, gain=gain)
    with torch.no_grad():
        trace = net.trace(x, "scaled")
    assert float(trace[0][0].mean(0).abs().max()) < 1e-5
    rel = 1e-4 if semantics is TF_GPU else 2e-3  # the search stops within 0.1% of the scale
    for u, _ in trace:
        assert float(u.std()) == pytest.approx(gain * net.threshold, rel=rel)


@pytest.mark.parametrize("output", [True, False])
def test_calibrate_without_centring_keeps_a_trained_nets_collapsed_map(rings, output):
    """Every bias follows its layer's input scale, so a trained net (non-zero biases in every
    layer) keeps its collapsed map up to one positive factor (none with ``output=False``: the
    logits keep their scale) and only moves against the dead zone."""
    net = deep(sizes=(2, 16, 16, 2), semantics=IEEE)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in net.biases:
            b.copy_(torch.randn(b.shape, generator=g))
    x = rings.x_train[:500]
    (w0, b0) = collapse(net)
    calibrate(net, x, gain=10.0, center=False, output=output)
    (w1, b1) = collapse(net)
    with torch.no_grad():
        trace = net.trace(x, "scaled")
    for u, _ in trace if output else trace[:-1]:
        assert float(u.std()) == pytest.approx(10.0 * net.threshold, rel=1e-3)
    factor = float(w1.norm() / w0.norm())
    assert abs(math.log(factor)) > 0.1 if output else factor == pytest.approx(1, rel=1e-5)
    torch.testing.assert_close(w1, factor * w0, rtol=1e-5, atol=0)
    torch.testing.assert_close(b1, factor * b0, rtol=1e-5, atol=0)


def test_lr_schedules():
    cos = Config(steps=100, lr=0.1)
    assert lr_at(cos, 0) == 0.1 and lr_at(cos, 50) == pytest.approx(0.05) and lr_at(cos, 99) < 1e-4
    step = Config(steps=100, lr=0.1, schedule="step")
    assert [lr_at(step, s) for s in (49, 50, 75)] == pytest.approx([0.1, 0.01, 0.001])
    warm = Config(steps=100, lr=0.1, schedule="constant", warmup=10)
    assert lr_at(warm, 0) == pytest.approx(0.01) and lr_at(warm, 9) == lr_at(warm, 60) == 0.1


def adam_with_moments(values):
    p = torch.nn.Parameter(torch.ones(len(values)))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones(len(values))
    opt.step()
    opt.state[p]["exp_avg"].copy_(torch.tensor(values))
    p.grad = torch.zeros(len(values))
    return p, opt


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="CPU cannot flush subnormals")
def test_adam_step_never_leaves_subnormal_moments_and_changes_nothing_else():
    tiny = FORMATS["float32"].min_normal
    p, opt = adam_with_moments([tiny / 4, -tiny / 2, tiny, 1.0])
    backprop._step(opt, ftz=True)
    m = opt.state[p]["exp_avg"]
    assert m[:3].tolist() == [0.0, 0.0, 0.0] and m[3] > 0.5  # 0.9 * tiny would be subnormal
    # where every value stays normal, the step is bit for bit the plain one
    normal = [1e-3, -2.0, 3e-30, 0.5]
    runs = [adam_with_moments(normal) for _ in range(2)]
    backprop._step(runs[0][1], ftz=True)
    backprop._step(runs[1][1], ftz=False)
    (pa, oa), (pb, ob) = runs
    assert torch.equal(pa, pb) and torch.equal(oa.state[pa]["exp_avg"], ob.state[pb]["exp_avg"])


@pytest.mark.parametrize(("model", "cfg", "match"), [
    (lambda: deep(sizes=(3, 8, 2)), Config(), "features"),
    (lambda: MLP([2, 8, 2]), Config(surrogate="exact"), "needs a deep linear"),
    (lambda: deep(), Config(batch_size=10**6), "exceeds"),
    (lambda: deep(), Config(surrogate="relu"), "unknown surrogate"),
    (lambda: deep(), Config(schedule="linear"), "unknown schedule"),
    (lambda: deep(), Config(lr=0.0), re.escape("lr must be > 0 and at most 3.4e+37")),
    (lambda: deep(), Config(lr=float("inf")), re.escape("lr must be > 0 and at most 3.4e+37")),
    (lambda: deep(), Config(lr=3e38),
     re.escape("lr / (1 - beta1), must be a float32), got 3e+38")),
    (lambda: deep(), Config(weight_decay=float("nan")), "weight_decay must be >= 0, got nan"),
    (lambda: deep(), Config(device="tpu"), "unknown device 'tpu'; use cpu, cuda"),
    (lambda: deep(), Config(device="meta"), "unknown device 'meta'"),
])
def test_bad_settings_are_one_line_errors(rings, model, cfg, match):
    with pytest.raises(ValueError, match=match):
        train(model(), rings, cfg, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_names_the_fix(rings):
    with pytest.raises(ValueError, match=r"no CUDA device here; use device cpu \(--device cpu\)"):
        train(deep(), rings, Config(device="cuda"), progress=False)


def test_flushed_fraction_sees_a_flush_inside_the_matmul():
    """Under scope 'all' (CPU_FTZ_DAZ) trace's u is already flushed inside the matmul, so
    counting ``u != 0 and h == 0`` on it missed every unit whose whole dot product underflowed
    (measured 0.25 instead of 0.46 here); the logged 'flushed' is probes.occupancy's mean."""
    from deeplinear.arithmetic import CPU_FTZ_DAZ, TF_GPU
    from deeplinear.probes import occupancy

    x = torch.rand(64, 64, generator=torch.Generator().manual_seed(1))
    fractions = {}
    for sem in (CPU_FTZ_DAZ, TF_GPU):
        net = DeepLinear((64, 32, 32, 10), semantics=sem,
                         generator=torch.Generator().manual_seed(0))
        hidden = occupancy(net, x, "scaled")[:-1]
        fractions[sem.underflow] = backprop._flushed_fraction(net, x)
        assert fractions[sem.underflow] == pytest.approx(sum(hidden) / len(hidden))
    # same weights and inputs: scope only moves where the flush happens, not how much is flushed
    assert fractions["ftz_daz"] == pytest.approx(fractions["ftz"], abs=0.02)


def test_threads_are_set_once_at_the_start(rings, monkeypatch):
    """Every trainer takes --threads (the CLI refused it for backprop); it is torch's global
    setting, as in the ES trainers, for the run only."""
    before, seen = torch.get_num_threads(), []
    real = backprop.scores
    monkeypatch.setattr(backprop, "scores", lambda *a: seen.append(torch.get_num_threads())
                        or real(*a))
    other = 1 if before > 1 else 2
    train(deep(), rings, Config(steps=2, threads=other, eval_every=2), progress=False)
    assert seen == [other] and torch.get_num_threads() == before
    for bad in (0, 1025):
        with pytest.raises(ValueError, match=f"threads must be between 1 and 1024, got {bad}"):
            Config(threads=bad).validate()


def test_weight_decay_reaches_the_optimiser(rings):
    norms = {}
    for wd in (0.0, 1.0):
        torch.manual_seed(0)
        model = SoftmaxRegression(2, 2)
        train(model, rings, Config(steps=50, lr=1e-2, weight_decay=wd, schedule="constant",
                                   eval_every=50), progress=False)
        norms[wd] = float(model.linear.weight.detach().norm())
    assert norms[1.0] < 0.8 * norms[0.0]  # decoupled decay: x(1 - 0.01) per step


def test_a_batch_of_the_whole_training_set_is_allowed():
    data = load_dataset("rings", seed=0, n_train=64, n_test=64)
    rows = train(deep(), data, Config(steps=2, batch_size=64, eval_every=2), progress=False)
    assert [r["step"] for r in rows] == [2]
    with pytest.raises(ValueError, match="exceeds the 64 training samples"):
        train(deep(), data, Config(steps=2, batch_size=65), progress=False)


def test_logged_epoch_counts_the_finished_steps():
    data = load_dataset("rings", seed=0, n_train=100, n_test=64)  # batch 50: 2 steps per epoch
    rows = train(deep(), data, Config(steps=6, batch_size=50, eval_every=3), progress=False)
    assert [(r["step"], r["epoch"]) for r in rows] == [(3, 1.5), (6, 3.0)]


def test_training_works_inside_no_grad_and_refuses_a_frozen_net(rings):
    """A notebook cell under ``torch.no_grad()`` still trains (backward needs grad mode); a net
    with every parameter frozen gets one line instead of autograd's "element 0 of tensors does
    not require grad"."""
    cfg = Config(steps=3, batch_size=16, eval_every=3, eval_n=20)
    net = DeepLinear([2, 8, 2], generator=torch.Generator().manual_seed(0))
    before = net.weights[0].detach().clone()
    with torch.no_grad():
        train(net, rings, cfg, progress=False)
    assert not torch.equal(net.weights[0], before)
    net.requires_grad_(False)
    with pytest.raises(ValueError, match=r"no parameter of the model requires grad .*"
                                         r"requires_grad_\(True\) first"):
        train(net, rings, cfg, progress=False)
