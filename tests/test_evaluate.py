import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest  # scipy comes with scikit-learn

from deeplinear import evaluate
from deeplinear.arithmetic import IEEE, PRESETS, TF_GPU, Semantics
from deeplinear.collapse import collapse, collapse_gap
from deeplinear.data import Dataset
from deeplinear.nets import MLP, DeepLinear


def toy_data(n: int = 300, d: int = 6, k: int = 3, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n, d, generator=g)
    y = torch.randint(0, k, (2 * n,), generator=g)
    return Dataset("toy", x[:n], y[:n], x[n:], y[n:], k, (d,))


def net(seed: int = 0, sem: Semantics = TF_GPU) -> DeepLinear:
    return DeepLinear([6, 32, 32, 3], semantics=sem, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", ["scaled", "exact"])
def test_batched_accuracy_equals_one_batch(mode):
    data, model = toy_data(), net()
    whole = evaluate.accuracy(model, data.x_test, data.y_test, mode, batch_size=10_000)
    pred = model(data.x_test, mode=mode).argmax(1)
    assert whole == float((pred == data.y_test).double().mean())
    assert evaluate.accuracy(model, data.x_test, data.y_test, mode, batch_size=7) == whole


def test_exact_mode_is_scored_in_exact_mode_where_the_modes_differ():
    """At 2**149 under IEEE the hidden products sit on the subnormal grid, where exact and scaled
    mode round differently (nets.py): ``mode`` must reach the forward pass, which the nets at
    2**125 of the test above cannot tell."""
    from deeplinear.data import load_dataset

    data = load_dataset("rings", seed=0, n_test=200)
    model = DeepLinear([2, 64, 64, 2], scale_exp=149, semantics=IEEE,
                       generator=torch.Generator().manual_seed(0))
    exact = evaluate.accuracy(model, data.x_test, data.y_test, "exact", batch_size=64)
    assert exact == float((model(data.x_test, mode="exact").argmax(1) == data.y_test).double()
                          .mean())
    assert exact != evaluate.accuracy(model, data.x_test, data.y_test, "scaled")


def test_accuracy_of_a_baseline_ignores_mode():
    data = toy_data()
    torch.manual_seed(0)
    mlp = MLP([6, 16, 3])
    a = evaluate.accuracy(mlp, data.x_test, data.y_test)
    assert a == evaluate.accuracy(mlp, data.x_test, data.y_test, "exact", batch_size=11)


def test_accuracy_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        evaluate.accuracy(net(), torch.empty(0, 6), torch.empty(0, dtype=torch.long))
    with pytest.raises(ValueError, match=re.escape("got 5 inputs but labels of shape (3,)")):
        evaluate.accuracy(net(), torch.rand(5, 6), torch.zeros(3, dtype=torch.long))


def test_accuracy_refuses_what_would_score_without_meaning():
    data, model = toy_data(), net()
    x, y = data.x_test, data.y_test
    n_out = model.sizes[-1]
    for labels, message in ((y + n_out, rf"labels span {n_out}\.\.\d+ but the model has {n_out} "
                                        rf"outputs \(classes 0\.\.{n_out - 1}\)"),
                            (y - 1, r"labels span -1\.\."),  # would count as wrong, silently
                            (y.float(), r"labels are torch\.float32; pass integer class"),
                            (y.bool(), r"labels are torch\.bool"),
                            (y.tolist(), r"labels must be a torch tensor, got list")):
        with pytest.raises(ValueError, match=message):
            evaluate.accuracy(model, x, labels)
    with pytest.raises(ValueError, match=re.escape("labels of shape ()")):  # 0-d: no len()
        evaluate.accuracy(model, x, y[0])
    with pytest.raises(ValueError, match="inputs must be a torch tensor, got ndarray"):
        evaluate.accuracy(model, x.numpy(), y)
    assert evaluate.accuracy(model, x, y.int()) == evaluate.accuracy(model, x, y)
    with pytest.raises(ValueError, match=re.escape(f"labels of shape ({len(y)}, 1)")):
        evaluate.accuracy(model, x, y[:, None])  # would broadcast to an N x N comparison
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        evaluate.accuracy(model, x, y, batch_size=0)
    with pytest.raises(ValueError, match="inputs contain NaN"):
        evaluate.accuracy(model, torch.where(x > 1, math.nan, x), y)
    with torch.no_grad():
        model.weights[1][0, 0] = math.nan  # argmax would read every NaN row as class 0
    for score in (lambda: evaluate.accuracy(model, x, y), lambda: evaluate.portability(model, data),
                  lambda: collapse(model)):
        with pytest.raises(ValueError, match=re.escape("non-finite weights in weights.1;")):
            score()


def test_portability_refuses_a_net_of_other_widths_than_the_data():
    wide = DeepLinear([6, 32, 32, 10])  # 10 outputs for 3 classes: it would still "score"
    with pytest.raises(ValueError, match=re.escape(
            "model maps 6 -> 10 but toy has 6 features and 3 classes; fix the sizes")):
        evaluate.portability(wide, toy_data())


def test_portability_covers_every_preset_and_the_collapse_without_touching_the_net():
    data, model = toy_data(), net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = evaluate.portability(model, data)
    assert res["own"] == "TF_GPU"
    assert set(res["test_acc"]) == {*PRESETS, "collapsed"}
    assert res["test_acc"]["TF_GPU"] == evaluate.accuracy(model, data.x_test, data.y_test, "exact")
    assert model.semantics == TF_GPU
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # under IEEE at k=125 the net is its collapse up to rounding: same predictions, nearly always
    w, b = collapse(model)
    ieee = DeepLinear([6, 32, 32, 3], semantics=IEEE)
    ieee.load_state_dict(model.state_dict())
    agree = (ieee(data.x_test, mode="exact").argmax(1)
             == (data.x_test.double() @ w + b).argmax(1)).double().mean()
    assert agree > 0.99
    assert abs(res["test_acc"]["IEEE"] - res["test_acc"]["collapsed"]) <= 1 - agree + 1e-12


def test_portability_names_a_custom_semantics():
    sem = Semantics("float32", "ftz", "all")
    assert sem not in PRESETS.values()
    res = evaluate.portability(net(sem=sem), toy_data())
    assert res["own"] == "custom" and set(res["test_acc"]) == {"custom", *PRESETS, "collapsed"}


def test_paired_counts_the_samples_only_one_model_gets_right():
    a = torch.tensor([1, 1, 1, 0, 0, 1], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 1, 0, 1], dtype=torch.bool)
    r = evaluate.paired(a, b)
    assert (r["a_only"], r["b_only"]) == (2, 1)
    assert r["p_value"] == 1.0  # 2 * P(X <= 1), X ~ Bin(3, 1/2) = 2 * 4/8
    assert evaluate.paired(a, a) == {"a_only": 0, "b_only": 0, "p_value": 1.0}


@settings(deadline=None)
@given(st.integers(0, 400), st.integers(0, 400))
def test_paired_p_value_is_the_exact_two_sided_binomial_test(n10, n01):
    a = torch.tensor([True] * n10 + [False] * n01 + [True] * 5)
    b = torch.tensor([False] * n10 + [True] * n01 + [True] * 5)
    r = evaluate.paired(a, b)
    assert (r["a_only"], r["b_only"]) == (n10, n01)
    expected = binomtest(n10, n10 + n01, 0.5).pvalue if n10 + n01 else 1.0
    assert r["p_value"] == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert r == {**evaluate.paired(b, a), "a_only": n10, "b_only": n01}  # symmetric p


@settings(deadline=None)
@given(st.integers(1, 5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_interval_is_the_wilson_score_interval(kn):
    k, n = kn
    expected = binomtest(k, n).proportion_ci(0.95, method="wilson")
    lo, hi = evaluate.interval(k / n, n)
    assert lo == pytest.approx(expected.low, abs=1e-4) and hi == pytest.approx(expected.high,
                                                                               abs=1e-4)
    assert 0 <= lo <= k / n <= hi <= 1


def test_interval_of_known_cases_and_bad_input():
    assert evaluate.interval(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert evaluate.interval(0.0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    for acc, n in ((0.5, 0), (1.5, 10), (0.5, 2.5), (float("nan"), 10)):
        with pytest.raises(ValueError, match="need an accuracy in \\[0, 1\\] over n >= 1"):
            evaluate.interval(acc, n)


def test_paired_needs_the_same_samples():
    with pytest.raises(ValueError, match="same length"):
        evaluate.paired(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))


def test_the_collapsed_map_keeps_the_biases():
    """Zero weights and an output bias favouring class 1: the collapsed map predicts 1 for all."""
    net = DeepLinear([2, 3, 2])
    with torch.no_grad():
        for w in net.weights:
            w.zero_()
        net.biases[-1].copy_(torch.tensor([-100.0, 100.0]))
    x, y = torch.rand(4, 2), torch.tensor([1, 1, 1, 0])
    acc = evaluate.portability(net, Dataset("t", x, y, x, y, 2, (2,)))["test_acc"]
    assert acc["collapsed"] == 0.75


def test_the_collapsed_accuracy_checks_its_inputs_like_accuracy():
    data, model = toy_data(), net()
    with pytest.raises(ValueError, match=re.escape("inputs of shape (300, 5) do not fit the net")):
        evaluate.collapsed_accuracy(model, data.x_test[:, :5], data.y_test)
    with pytest.raises(ValueError, match=re.escape("labels of shape (300, 1)")):
        evaluate.collapsed_accuracy(model, data.x_test, data.y_test[:, None])


def test_portability_and_the_collapse_name_a_model_that_is_not_a_deep_linear_net():
    mlp = MLP([6, 32, 32, 3])
    with pytest.raises(ValueError, match=r"a MLP has none: score it with evaluate\.accuracy"):
        evaluate.portability(mlp, toy_data())
    with pytest.raises(ValueError, match="a MLP is not one"):
        collapse(mlp)
    with pytest.raises(ValueError, match="a MLP is not one"):
        collapse_gap(mlp, torch.rand(4, 6))


def test_logits_of_no_rows_are_no_rows():
    model = net()
    assert evaluate.logits(model, torch.empty(0, 6)).shape == (0, model.sizes[-1])


def test_float64_inputs_score_every_model_alike():
    """DeepLinear reads any float input in its format; a baseline's layers need their own dtype:
    float64 inputs must score, and the same as their float32 rounding."""
    from deeplinear.nets import SoftmaxRegression

    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (40,), generator=g)
    for model in (DeepLinear([3, 8, 2]), MLP([3, 8, 2]), SoftmaxRegression(3, 2)):
        assert evaluate.accuracy(model, x, y) == evaluate.accuracy(model, x.float(), y)


def test_a_deep_linear_net_runs_float32_weights_whatever_the_default_dtype():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        net = DeepLinear([3, 4, 2], generator=torch.Generator().manual_seed(0))
        assert {p.dtype for p in net.parameters()} == {torch.float32}
        net(torch.rand(2, 3), mode="exact")
    finally:
        torch.set_default_dtype(before)
    same = DeepLinear([3, 4, 2], generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), same.parameters(), strict=True))


def test_inputs_on_another_device_are_one_line():
    net = DeepLinear([3, 4, 2])
    with pytest.raises(ValueError, match=r"inputs are on meta, the net on cpu; move one of them"):
        net(torch.rand(2, 3, device="meta"))
