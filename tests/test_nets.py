"""Acceptance tests of deeplinear.nets: shapes, init, and exact vs scaled mode on real inputs.

Scaled mode is the fast stand-in for exact mode (true float32 at 1e-38): layer 1 and every
flush of a bias are identical by construction, and only the hidden matmuls' rounding differs. The
agreement is measured here on sklearn's digits and Fashion-MNIST, at init and on weights trained
with the dead zone (which pushes many pre-activations to the threshold). Run with ``-s`` to see
the measured figures.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deeplinear.arithmetic import CPU_FTZ_DAZ, IEEE, PRESETS, TF_GPU, Semantics
from deeplinear.data import IDX_FILES, MNIST_LIKE, read_idx
from deeplinear.nets import MLP, DeepLinear, SoftmaxRegression, dead_zone, parse_sizes, staircase

DIGITS_SIZES = (64, 256, 256, 10)
FASHION_SIZES = (784, 512, 512, 10)
N_FASHION = 512
TRAIN_STEPS = 300


def agreement(net: DeepLinear, x: torch.Tensor) -> dict[str, object]:
    """Exact vs scaled mode on ``x``: per layer flush agreement, logits, predictions."""
    with torch.no_grad():
        exact, scaled = net.trace(x, "exact"), net.trace(x, "scaled")
    flush = [float(((he == 0) == (hs == 0)).double().mean())
             for (_, he), (_, hs) in zip(exact, scaled, strict=True)]
    le, ls = exact[-1][1], scaled[-1][1]
    diff = (le - ls).abs().flatten()
    return {
        "layer1_identical": all(torch.equal(e.view(torch.int32), s.view(torch.int32))
                                for e, s in zip(exact[0], scaled[0], strict=True)),
        "flush": flush,
        "max_abs_logit_diff": float(diff.max()),
        "p99_abs_logit_diff": float(diff.quantile(0.99)),
        "argmax": float((le.argmax(1) == ls.argmax(1)).double().mean()),
        "bit_identical_logits": float((le == ls).double().mean()),
    }


def report(tag: str, a: dict[str, object]) -> None:
    flush = ", ".join(f"{f:.6f}" for f in a["flush"])  # type: ignore[union-attr]
    print(f"\n{tag}: flush agreement per layer [{flush}], argmax {a['argmax']:.5f}, |logit "
          f"diff| max {a['max_abs_logit_diff']:.3g} p99 {a['p99_abs_logit_diff']:.3g}, "
          f"bit-identical logits {a['bit_identical_logits']:.1%}")


def check(a: dict[str, object]) -> None:
    assert a["layer1_identical"]
    assert min(a["flush"]) >= 0.999  # type: ignore[type-var]
    assert a["argmax"] >= 0.99


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16, dtype=torch.float32), torch.tensor(y)


@pytest.fixture(scope="module")
def fashion() -> torch.Tensor:
    directory = MNIST_LIKE["fashion-mnist"].system_dir
    path = Path(directory or "/nonexistent") / IDX_FILES[2]
    if not path.exists():
        pytest.skip(f"no Fashion-MNIST at {path}")
    images = read_idx(path)
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:N_FASHION]
    return torch.from_numpy(images[pick.numpy()].reshape(N_FASHION, -1).astype(np.float32) / 255)


@pytest.fixture(scope="module")
def trained(digits) -> tuple[dict[str, torch.Tensor], float]:
    """Dead-zone backprop in scaled mode (autograd through ``dead_zone``), Adam, on digits.

    One intra-op thread: on this shared 2-core machine two OpenMP threads made these small steps
    up to 25x slower under load (measured 25 s vs 1.1 s for the same 300 steps).
    """
    x, y = digits
    net = DeepLinear(DIGITS_SIZES, semantics=TF_GPU, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(TRAIN_STEPS):
            i = torch.randint(0, len(x), (128,), generator=g)
            loss = nn.functional.cross_entropy(net(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    with torch.no_grad():
        accuracy = float((net(x).argmax(1) == y).double().mean())
    return net.state_dict(), accuracy


# --- construction --------------------------------------------------------------------------------


def test_shapes_init_and_seed():
    net = DeepLinear(FASHION_SIZES, generator=torch.Generator().manual_seed(0))
    assert [tuple(w.shape) for w in net.weights] == [(784, 512), (512, 512), (512, 10)]
    assert [tuple(b.shape) for b in net.biases] == [(512,), (512,), (10,)]
    assert all(torch.count_nonzero(b) == 0 for b in net.biases)
    for w in net.weights[:2].parameters():  # He-normal std sqrt(2 / fan_in), to ~0.2% here
        he = math.sqrt(2.0 / w.shape[0])
        assert float(w.detach().std()) == pytest.approx(he, rel=0.01)
        assert abs(float(w.detach().mean())) < 0.01 * he
    again = DeepLinear(FASHION_SIZES, generator=torch.Generator().manual_seed(0))
    other = DeepLinear(FASHION_SIZES, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters(),
                                                  strict=True))
    assert not torch.equal(net.weights[0], other.weights[0])
    assert net.scale_exp == 125 and net.semantics == TF_GPU
    x = torch.rand(3, 784)
    for mode in ("exact", "scaled"):
        assert net(x, mode=mode).shape == (3, 10)
        trace = net.trace(x, mode)
        assert [tuple(h.shape) for _, h in trace] == [(3, 512), (3, 512), (3, 10)]


def test_threshold_and_rules():
    assert DeepLinear(DIGITS_SIZES).threshold == 0.5  # min * 2**125
    assert DeepLinear(DIGITS_SIZES, scale_exp=126).threshold == 1.0
    u = torch.tensor([-0.75, -0.5, -0.375, 0.0, 0.25, 0.5, 0.75])
    assert torch.equal(DeepLinear(DIGITS_SIZES).under()(u), dead_zone(u, 0.5))
    assert dead_zone(u, 0.5).tolist() == [-0.75, -0.5, 0.0, 0.0, 0.0, 0.5, 0.75]
    assert torch.signbit(dead_zone(torch.tensor([-0.1]), 0.5)).item()  # a signed zero
    step = 2.0**-24  # the subnormal spacing 2**-149 in units of 2**-125
    ieee = DeepLinear(DIGITS_SIZES, semantics=IEEE).under()
    v = torch.tensor([0.25 + 2.0**-25, 0.25 + 3 * 2.0**-25, -0.25 - 3 * 2.0**-25, 0.75 + 2.0**-24])
    assert torch.equal(ieee(v), staircase(v, 0.5, step))
    # ties on the grid of step round to even, as IEEE rounding does; normal values are untouched
    assert ieee(v).tolist() == [0.25, 0.25 + 2.0**-23, -0.25 - 2.0**-23, 0.75 + 2.0**-24]


def test_bad_sizes_and_mode_are_clear_errors():
    assert parse_sizes("784,512,10") == [784, 512, 10]
    for bad, match in [("784,x,10", "bad sizes"), ("784", "at least two"),
                       ("5,0,3", "every layer width must be >= 1")]:
        with pytest.raises(ValueError, match=match):
            parse_sizes(bad)
    with pytest.raises(ValueError, match="hidden layer"):
        DeepLinear([784, 10])
    # integers of any kind are widths (numpy's, a tensor's), bools and floats are not
    assert parse_sizes(np.array([3, 4, 2])) == parse_sizes(torch.tensor([3, 4, 2])) == [3, 4, 2]
    assert parse_sizes([np.int64(3), 4, 2]) == [3, 4, 2]
    for bad in ([3, 4.0, 2], [3, True, 2]):
        with pytest.raises(ValueError, match="use integers like 784,512,10"):
            parse_sizes(bad)


def test_semantics_and_scale_set_later_are_checked_like_the_constructor_s():
    net = DeepLinear([4, 8, 3])
    net.semantics = "IEEE"  # a preset's name, as the constructor takes it
    assert net.semantics == IEEE and net.threshold == 0.5
    net.scale_exp = np.int64(120)
    assert net.scale_exp == 120 and isinstance(net.scale_exp, int) and net.threshold == 2.0**-6
    with pytest.raises(ValueError, match="DeepLinear runs float32"):
        net.semantics = Semantics("float16", "ftz", "elementwise")
    with pytest.raises(ValueError,
                       match=r"scale exponent 300 \(scale_exp, --scale-exp\) is out of range"):
        net.scale_exp = 300
    with pytest.raises(ValueError, match=r"scale exponent must be an integer like 125, got 2\.5"):
        net.scale_exp = 2.5
    assert (net.semantics, net.scale_exp) == (IEEE, 120)  # a refused value changes nothing


def test_a_regime_by_name_and_never_beside_scale_or_semantics():
    from deeplinear.regimes import Regime

    by_name = DeepLinear([4, 8, 3], regime="absorption:9")
    assert by_name.regime == Regime.parse("absorption:9")
    for extra in ({"semantics": TF_GPU}, {"scale_exp": 125}):  # even the defaults' values
        with pytest.raises(ValueError, match="pass a regime or scale_exp/semantics, not both"):
            DeepLinear([4, 8, 3], regime="absorption:9", **extra)


def test_a_regime_nets_arithmetic_cannot_be_set_after():
    """A regime's own float ops run the net whatever ``semantics`` says: setting it (or the
    scale) used to be accepted and ignored, the outputs bit-identical."""
    net = DeepLinear([4, 8, 3], regime="absorption:9")
    sem, k = net.semantics, net.scale_exp
    for attr, value in (("semantics", "IEEE"), ("semantics", TF_GPU), ("scale_exp", 120)):
        with pytest.raises(ValueError, match=r"runs regime absorption:9 \(float32\), which "
                                             rf"fixes its {attr}; .*DeepLinear\(4,8,3, semantics="):
            setattr(net, attr, value)
    assert (net.semantics, net.scale_exp) == (sem, k)
    native = DeepLinear([4, 8, 3], regime="ftz-deadzone:125")  # the 2017 layout: no regime kept
    native.semantics = "IEEE"
    assert native.semantics == IEEE


def test_a_net_cast_to_another_dtype_is_refused_not_run_half_in_float32():
    net = DeepLinear([4, 8, 3]).double()
    for mode in ("scaled", "exact"):
        with pytest.raises(ValueError, match=r"parameters are torch\.float64; DeepLinear computes "
                                             r"in float32 .* call net\.float\(\)"):
            net(torch.rand(2, 4), mode=mode)
    assert net.float()(torch.rand(2, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        DeepLinear(DIGITS_SIZES)(torch.rand(2, 64), mode="fast")


# --- exact vs scaled -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PRESETS))
def test_modes_agree_on_digits_at_init(name, digits):
    x, _ = digits
    net = DeepLinear(DIGITS_SIZES, semantics=PRESETS[name],
                     generator=torch.Generator().manual_seed(0))
    a = agreement(net, x)
    report(f"digits {DIGITS_SIZES} init, {name}, {len(x)} images", a)
    check(a)


@pytest.mark.parametrize("name", list(PRESETS))
def test_modes_agree_on_fashion_at_init(name, fashion):
    net = DeepLinear(FASHION_SIZES, semantics=PRESETS[name],
                     generator=torch.Generator().manual_seed(0))
    a = agreement(net, fashion)
    report(f"Fashion-MNIST {FASHION_SIZES} init, {name}, {len(fashion)} images", a)
    check(a)


@pytest.mark.parametrize("name", list(PRESETS))
def test_modes_agree_on_trained_weights(name, digits, trained):
    state, accuracy = trained
    assert accuracy > 0.9  # the training did train: the dead zone is doing work
    x, _ = digits
    net = DeepLinear(DIGITS_SIZES, semantics=PRESETS[name])
    net.load_state_dict(state)
    with torch.no_grad():
        u = torch.cat([u.flatten() for u, _ in net.trace(x)[:-1]])
    near = float(((u.abs() - net.threshold).abs() < 0.1).double().mean())
    a = agreement(net, x)
    report(f"digits trained ({TRAIN_STEPS} Adam steps, train acc {accuracy:.3f}), {name}, "
           f"{near:.1%} of hidden |u| within 0.1 of the threshold", a)
    assert near > 0.05
    check(a)


@pytest.mark.parametrize("scale_exp", [128, 140, 149])
@pytest.mark.parametrize("sem", [IEEE, TF_GPU, CPU_FTZ_DAZ])
def test_exact_mode_beyond_float32_powers_of_two(scale_exp, sem, digits):
    """k > 127: 2**k is no float32 (the staircase regimes go up to k = 149). Exact mode must still
    run the layout, with layer 1 identical to scaled mode by construction."""
    net = DeepLinear(DIGITS_SIZES, scale_exp=scale_exp, semantics=sem,
                     generator=torch.Generator().manual_seed(0))
    x = digits[0][:256]
    with torch.no_grad():
        exact, scaled = net.trace(x, "exact"), net.trace(x, "scaled")
    assert exact[-1][1].isfinite().all()
    assert all(torch.equal(e, s) for e, s in zip(exact[0], scaled[0], strict=True))
    if sem.flushes:  # threshold 2**(k-126) >= 4: both modes flush everything
        assert all(torch.equal(e[1], s[1]) for e, s in zip(exact, scaled, strict=True))


@pytest.mark.parametrize(("sem", "linear"), [(IEEE, True), (TF_GPU, False),
                                             (CPU_FTZ_DAZ, False)])
def test_scaled_mode_is_nearly_linear_only_under_ieee(sem, linear):
    """Additivity f(x1 + x2) = f(x1) + f(x2) (biases are zero at init), uniform [0, 1] inputs."""
    g = torch.Generator().manual_seed(0)
    net = DeepLinear(FASHION_SIZES, semantics=sem, generator=g)
    x1, x2 = torch.rand(256, FASHION_SIZES[0], generator=g), torch.rand(256, FASHION_SIZES[0],
                                                                      generator=g)

    def rel(under=None) -> float:
        with torch.no_grad():
            f = lambda x: net(x, "scaled", under)  # noqa: E731
            return float((f(x1 + x2) - f(x1) - f(x2)).norm() / f(x1 + x2).norm())

    gap, blind = rel(), rel(lambda u: u)
    print(f"\n{sem}: additivity gap {gap:.3g}, float-blind (under=identity) {blind:.3g}")
    assert blind < 1e-5  # identity override: the float-blind network is linear
    assert (gap < 1e-5) if linear else (gap > 0.05)


def test_cpu_ftz_daz_flushes_hidden_matmul_outputs_in_scaled_mode():
    """Under DAZ (or scope all) a tiny matmul output is read as zero before the bias is added."""
    net = DeepLinear((2, 1, 1, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.weights[0].fill_(1.0)
        net.weights[1].fill_(0.4)  # h1 = 1 -> m = 0.4: tiny in scaled units
        net.weights[2].fill_(1.0)
        net.biases[1].fill_(0.7)  # f(b) = 0.7 survives
    x = torch.tensor([[0.5, 0.5]])
    outs = {}
    for sem in (TF_GPU, CPU_FTZ_DAZ, Semantics("float32", "ftz_daz", "elementwise")):
        net.semantics = sem
        with torch.no_grad():
            outs[sem] = (net(x, "scaled").item(), net(x, "exact").item())
    assert outs[TF_GPU] == pytest.approx((1.1, 1.1))  # 0.4 + 0.7: the subnormal m is kept
    for sem in (CPU_FTZ_DAZ, Semantics("float32", "ftz_daz", "elementwise")):
        assert outs[sem] == pytest.approx((0.7, 0.7))  # 0.4 flushed (or read as 0) first


# --- reference models ----------------------------------------------------------------------------


def test_reference_models():
    x = torch.rand(5, 64)
    assert SoftmaxRegression(64, 10)(x).shape == (5, 10)
    for activation in ("relu", "tanh", "gelu", "identity"):
        mlp = MLP([64, 32, 16, 10], activation)
        assert mlp(x).shape == (5, 10)
        assert sum(isinstance(m, nn.Linear) for m in mlp.net) == 3
        assert len(mlp.net) == 5  # an activation between layers, none after the last
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        MLP([64, 10], "swish")
    with pytest.raises(ValueError, match="bad sizes"):
        MLP("64,ten")


@pytest.mark.parametrize("k", [-128, -10, -1, 150, 500])
def test_a_scale_out_of_the_underflow_range_is_refused(k):
    # k < 0 scales hidden values *up*: exact mode overflows where scaled mode cannot follow, and
    # under IEEE the staircase step 2^(k-149) is no float32 (scaled mode gave NaN for -23..-1)
    with pytest.raises(ValueError, match=rf"scale exponent {k} .* 0 <= k <= 149"):
        DeepLinear([2, 3, 2], scale_exp=k)
    assert DeepLinear([2, 3, 2], scale_exp=149).threshold == 2.0**23  # min in units of 2^-149
    assert DeepLinear([2, 3, 2], scale_exp=0).threshold == 2.0**-126


@pytest.mark.parametrize("k", [0, 1, 22, 23])
def test_ieee_scaled_mode_matches_exact_mode_at_small_scales(k):
    g = torch.Generator().manual_seed(k)
    net = DeepLinear([4, 6, 6, 3], scale_exp=k, semantics=IEEE, generator=g)
    x = torch.rand(50, 4, generator=g)
    scaled, exact = net(x), net(x, "exact")
    assert torch.isfinite(scaled).all() and torch.isfinite(exact).all()
    assert torch.equal(scaled.argmax(1), exact.argmax(1))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"scale_exp": 125.5}, "must be an integer"), ({"scale_exp": "125"}, "must be an integer"),
    ({"semantics": "TF_GUP"}, "unknown semantics 'TF_GUP'"),
    ({"semantics": Semantics("bfloat16", "ftz")}, "runs float32.*regime"),
])
def test_bad_constructor_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DeepLinear([2, 3, 2], **kwargs)


def test_semantics_by_preset_name_and_numpy_integer_scale():
    net = DeepLinear([2, 3, 2], scale_exp=np.int64(100), semantics="IEEE")
    assert net.semantics == IEEE and net.scale_exp == 100 and type(net.scale_exp) is int


@pytest.mark.parametrize("sizes", [[4.5, 3, 2], [True, 3, 2], 784, "7,x"])
def test_sizes_must_be_integers(sizes):
    with pytest.raises(ValueError, match="bad sizes"):
        DeepLinear(sizes)


@pytest.mark.parametrize("mode", ["scaled", "exact"])
def test_inputs_are_checked_and_converted(mode):
    g = torch.Generator().manual_seed(0)
    net = DeepLinear([4, 5, 5, 2], generator=g)
    x = torch.rand(3, 4, generator=g, dtype=torch.float64)
    assert torch.equal(net(x, mode), net(x.float(), mode))
    with pytest.raises(ValueError, match=r"shape \(3, 5\) do not fit the net: it takes 4"):
        net(torch.rand(3, 5), mode)
    with pytest.raises(ValueError, match="must be a torch tensor"):
        net(x.numpy(), mode)


@pytest.mark.parametrize("sem", [*PRESETS.values(), Semantics("float32", "ftz_daz", "elementwise")],
                         ids=[*PRESETS, "ftz_daz_elementwise"])
@pytest.mark.parametrize("k", [0, 3, 10, 24])
def test_layer1_is_identical_in_both_modes_when_its_product_underflows(sem, k):
    """Normal inputs, weights and biases whose products land around the smallest normal: where
    the semantics flush a product (or read it through DAZ) exact mode loses the subnormal ones
    before the bias, and so must scaled mode, or a small-k unit lives in one mode and is dead
    in the other (found by an audit: 0 vs 1.2e-35 at k = 10 under CPU_FTZ_DAZ)."""
    g = torch.Generator().manual_seed(k)
    net = DeepLinear([16, 64, 8, 3], scale_exp=k, semantics=sem)
    with torch.no_grad():
        net.weights[0].copy_(torch.randn(16, 64, generator=g) * 2.0**-66)
        # normal biases (DAZ would read a subnormal one as zero in exact mode only, a documented
        # exception) around the rule's threshold t = 2^(k-126), on both sides where k allows
        low = 1.0 if k == 0 else 0.5
        sign = torch.randint(0, 2, (64,), generator=g) * 2 - 1
        net.biases[0].copy_(sign * (low + torch.rand(64, generator=g)) * 2.0**(k - 126))
    x = (torch.rand(512, 16, generator=g) + 0.5) * 2.0**-63  # sums of products near 2^-127
    with torch.no_grad():
        (_, exact), (_, scaled) = net.trace(x, "exact")[0], net.trace(x, "scaled")[0]
    assert torch.equal(exact, scaled)
    if sem.flushes:
        assert 0 < float((scaled == 0).double().mean()) < 1  # the rule acts on some units


def test_a_layer1_sum_that_rounds_up_to_min_is_the_documented_exception():
    """Exact mode decides a flushed product's tininess after rounding, as x86 does; scaled mode
    compares the subnormal-grid result with min (the nets module's docstring says so)."""
    net = DeepLinear([1, 1, 1], scale_exp=0, semantics=CPU_FTZ_DAZ)
    with torch.no_grad():
        net.weights[0].fill_(2.0**-63)
        net.biases[0].zero_()
    x = torch.tensor([[2.0**-63 * (1 - 2.0**-24)]])  # product min (1 - 2^-24) -> min on the grid
    (u_exact, _), (u_scaled, _) = net.trace(x, "exact")[0], net.trace(x, "scaled")[0]
    assert u_exact.item() == 0 and u_scaled.item() == 2.0**-126


@pytest.mark.parametrize("kind", ["deeplinear", "mlp", "softmax"])
def test_building_a_model_leaves_the_callers_random_stream_alone(kind):
    """A model's weights depend on its seed alone, and building it neither reseeds nor draws from
    the caller's global stream (before, every draw after build_model was seed 0's stream)."""
    from deeplinear.nets import build_model

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(kind, [4, 8, 3], seed=5)
    assert torch.equal(torch.rand(3), expected)
    b = build_model(kind, [4, 8, 3], seed=5)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    c = build_model(kind, [4, 8, 3], seed=6)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_with_semantics_copies_the_weights_under_other_arithmetic():
    """The same weights, another function: a copy (the original keeps its semantics and
    gradients), frozen, computing what the original computes once given those semantics."""
    net = DeepLinear([4, 8, 3], semantics="TF_GPU", generator=torch.Generator().manual_seed(0))
    ieee = net.with_semantics("IEEE")
    assert ieee.semantics == IEEE and net.semantics == TF_GPU
    assert not any(p.requires_grad for p in ieee.parameters())
    assert all(p.requires_grad for p in net.parameters())
    assert ieee.weights[0] is not net.weights[0] and torch.equal(ieee.weights[0], net.weights[0])
    x = torch.rand(16, 4, generator=torch.Generator().manual_seed(1))
    net.semantics = "IEEE"
    assert torch.equal(ieee(x, mode="exact"), net(x, mode="exact"))
