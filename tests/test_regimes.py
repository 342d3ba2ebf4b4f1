"""regimes: each implicit activation against its exact float operations, the FTZ/IEEE facts,
DeepLinear built under a regime, and the hardware report on this machine."""

from __future__ import annotations

import json
import math
import platform
import re

import numpy as np
import pytest
import torch

from deeplinear import regimes as rg
from deeplinear.arithmetic import FORMATS, IEEE, TF_GPU
from deeplinear.collapse import collapse_gap
from deeplinear.nets import DeepLinear
from deeplinear.regimes import KINDS, Regime
from deeplinear.surrogate import make_under

FORMAT_NAMES = ("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2", "float64")
X86 = platform.machine().lower() in ("x86_64", "amd64")


def phi(t: float) -> float:
    return math.exp(-t * t / 2) / math.sqrt(2 * math.pi)


def dead_zone_theory(t: float) -> tuple[float, float]:
    """For z ~ N(0,1) and f(z) = z 1{|z| >= t}: P(|z| < t) and 1 - R^2 of the best linear fit.

    The slope is a = E[z f] = 1 - E[z^2; |z| < t], Var f = a, so 1 - R^2 = 1 - a."""
    inside = math.erf(t / math.sqrt(2))
    return inside, inside - 2 * t * phi(t)


def edge_values(r: Regime) -> torch.Tensor:
    """Values at and around each regime's thresholds, ties and clamp levels, both signs."""
    t, e = r.threshold, r.extent
    base = [0.0, t, t / 2, 3 * t / 2, 2 * t, t / 4, e, e / 2, 1.0, 3.0, 1e-30]
    x = torch.tensor(base, dtype=torch.float32)
    x = torch.cat([x, torch.nextafter(x, torch.tensor(math.inf)),
                   torch.nextafter(x, torch.tensor(-math.inf))])
    return torch.cat([x, -x])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    both_nan = a.isnan() & b.isnan()
    return bool(((a.view(torch.int32) == b.view(torch.int32)) | both_nan).all())


# --- the function, twice -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_activation_is_bit_identical_to_the_exact_float_ops(kind: str, fmt: str) -> None:
    z = rg.normal_sample(1 << 13, seed=1) * 2
    for k in rg.default_sweep(kind, fmt):
        r = Regime(kind, k, fmt)  # type: ignore[arg-type]
        u = torch.cat([z, edge_values(r)])
        assert same_bits(r.activation(u), r.exact(u)), r.label


def test_closed_forms() -> None:
    u = rg.normal_sample(1 << 14, seed=2) * 3
    # absorption: for 0 <= u < c, (u + c) - c is u rounded half-even to the ulp of c
    for fmt, j in (("float32", 22), ("float16", 9), ("bfloat16", 6)):
        r = Regime("absorption", j, fmt)
        v = u.abs()
        want = torch.round(v.double() / r.threshold) * r.threshold
        if fmt != "float32":  # the input is first rounded to the format
            want = torch.round(rg.fm.round_to(v, fmt).double() / r.threshold) * r.threshold
        assert torch.equal(r.activation(v).double(), want)
    # staircase at k = 149 rounds every N(0,1) value to an integer (|u| < 2^23)
    s = Regime("subnormal-staircase", 149).activation(u)
    assert torch.equal(s, torch.round(u))
    # float32 saturation is a clamp at max 2^-k
    m = FORMATS["float32"].max * 2.0**-128
    assert torch.equal(Regime("saturation", 128).activation(u), u.clamp(-m, m))
    # float8_e4m3fn saturation clamps at 448 2^-8 = 1.75 and keeps 4 significant bits
    q = Regime("saturation", 8, "float8_e4m3fn").activation(u)
    assert q.abs().max() == 1.75 and torch.unique(q).numel() <= 253


def test_float32_facts_on_normal_inputs() -> None:
    z = rg.normal_sample(1 << 18, seed=3)
    for k, t in ((125, 0.5), (126, 1.0)):
        s = rg.strength(Regime("ftz-deadzone", k), z)
        inside, resid = dead_zone_theory(t)
        assert s.threshold == t
        assert abs(s.zeroed - inside) < 0.005 and abs(s.residual**2 - resid) < 0.004
    assert round(dead_zone_theory(0.5)[0], 2) == 0.38 and round(dead_zone_theory(1)[0], 2) == 0.68
    assert round(dead_zone_theory(0.5)[1], 3) == 0.031 and round(dead_zone_theory(1)[1], 3) == 0.199
    weak = rg.strength(Regime("subnormal-staircase", 125), z)
    assert weak.max_error <= 2.0**-25 and weak.residual**2 < 1e-12 and weak.zeroed == 0
    strong = rg.sweep("subnormal-staircase", params=[141, 145, 149], z=z)
    for s, half_step in zip(strong, (2.0**-9, 2.0**-5, 0.5), strict=True):
        assert 0.99 * half_step < s.max_error <= half_step
    r2 = [s.residual**2 for s in strong]  # 1 - R^2
    assert r2[0] < 1e-5 < r2[1] < 1e-3 < 0.05 < r2[2]


@pytest.mark.parametrize("format", ["float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"])
def test_strength_is_the_regimes_own_effect_not_the_formats_rounding(format) -> None:
    """Against z rounded to the format: a regime that touches no N(0,1) value changes nothing
    (against z itself every value of a narrow format 'changed'), and a dead zone changes
    exactly the values it zeroes."""
    z = rg.normal_sample(1 << 16, seed=5)
    fmt = FORMATS[format]
    k = int(math.log2(fmt.max)) - 3
    none = rg.strength(Regime("saturation", k, format), z)
    assert none.threshold >= 8  # no N(0,1) value reaches the clamp
    # only values in the format's subnormal range at that scale may change (float8_e4m3fn's
    # range is narrow enough for some of 2^16 samples to land there: 0.02%)
    subnormal = math.ldexp(fmt.min_normal, -k)
    assert none.changed <= float((z.abs() < subnormal).double().mean()) < 0.001
    assert none.zeroed == 0 and none.max_error < subnormal
    dead = rg.strength(Regime("ftz-deadzone", -3 - fmt.min_exp, format), z)  # below 2^-3
    assert 0 < dead.zeroed == dead.changed < 0.5, dead
    assert dead.max_error < 0.2


def test_no_samples_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="at least one value of z"):  # was torch's max() error
        rg.strength(Regime("ftz-deadzone", 125), torch.zeros(0))
    with pytest.raises(ValueError, match="n must be a positive number of samples, got 0"):
        rg.probe_report("ftz-deadzone:125", n=0)


def test_a_non_finite_activation_has_no_residual() -> None:
    """u 2^112 overflows float16 for every input: not 'perfectly affine' (it read 0 before)."""
    s = rg.strength(Regime.parse("ftz-deadzone:-112", "float16"))
    assert math.isnan(s.residual) and s.max_error == math.inf


def test_strength_grows_with_the_parameter() -> None:
    z = rg.normal_sample(1 << 15, seed=4)
    for kind in KINDS:
        rows = rg.sweep(kind, "float16", z=z)
        res = [s.residual**2 for s in rows]  # 1 - R^2
        assert res[-1] > 0.05 and res[0] < 0.01, (kind, res)
        text = rg.format_sweep(rows)
        assert len(text.splitlines()) == len(rows) + 1 and rows[0].regime in text


def test_regime_parameters_and_errors() -> None:
    assert Regime.parse("ftz-deadzone").param == 125
    assert Regime.parse("subnormal-staircase").param == 149
    assert Regime.parse("absorption", "float16") == Regime("absorption", 9, "float16")
    assert Regime.parse("saturation:8", "float8_e4m3fn").threshold == 1.75
    assert Regime("ftz-deadzone", 125).semantics == TF_GPU
    assert Regime("saturation", 8, "float8_e4m3fn").semantics.saturates
    with pytest.raises(ValueError, match="unknown regime"):
        Regime.parse("relu")
    with pytest.raises(ValueError, match="KIND:INTEGER"):
        Regime.parse("ftz-deadzone:1.5")
    with pytest.raises(ValueError, match="normal float32"):
        Regime("ftz-deadzone", 300)
    with pytest.raises(ValueError, match="normal float16"):
        Regime("absorption", 16, "float16")
    with pytest.raises(ValueError, match="integer exponent"):
        Regime("ftz-deadzone", 125.0)  # type: ignore[arg-type]
    assert Regime("ftz-deadzone", np.int64(125)) == Regime("ftz-deadzone", 125)  # type: ignore
    with pytest.raises(ValueError, match="unknown format 'float99'"):  # it said "bad regime"
        Regime.parse("ftz-deadzone", "float99")


@pytest.mark.parametrize("fmt", FORMAT_NAMES)
@pytest.mark.parametrize("kind", KINDS)
def test_parameter_range_is_tight_and_anything_outside_is_a_value_error(kind: str,
                                                                        fmt: str) -> None:
    """param_range is exactly where threshold and extent are normal float32 values; beyond it,
    even 2^9999 (which math.ldexp cannot form), Regime raises a ValueError naming the range."""
    lo, hi = rg.param_range(kind, fmt)
    assert lo <= rg.default_param(kind, fmt) <= hi
    assert all(lo <= p <= hi for p in rg.default_sweep(kind, fmt))
    f32 = FORMATS["float32"]
    for p in (lo, hi):
        r = Regime(kind, p, fmt)  # type: ignore[arg-type]
        assert f32.min_normal <= min(r.threshold, r.extent) <= max(r.threshold, r.extent) <= f32.max
    in_range = re.escape(f"in [{lo}, {hi}]")
    for p in (lo - 1, hi + 1, 9999, -9999, 10**6, -(10**6), 10**400):
        with pytest.raises(ValueError, match=in_range):
            Regime(kind, p, fmt)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=in_range):
            Regime.parse(f"{kind}:{p}", fmt)


def test_rounding_activations_have_zero_derivative_and_ste_passes_through() -> None:
    u = torch.randn(64, requires_grad=True)
    r = Regime("absorption", 9, "float16")
    r.activation(u).sum().backward()
    assert torch.equal(u.grad, torch.zeros(64))
    u.grad = None
    net = DeepLinear([8, 16, 4], regime=r, generator=torch.Generator().manual_seed(0))
    net(torch.randn(32, 8), under=make_under(net, "ste")).square().sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in net.weights)


# --- DeepLinear under a regime -------------------------------------------------------------------

def test_default_net_is_unchanged_and_native_regimes_are_the_2017_layout() -> None:
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    for regime, sem in ((Regime("ftz-deadzone", 125), TF_GPU),
                        (Regime("subnormal-staircase", 140), IEEE)):
        base = DeepLinear([32, 48, 48, 10], scale_exp=regime.param, semantics=sem,
                          generator=torch.Generator().manual_seed(6))
        net = DeepLinear([32, 48, 48, 10], regime=regime,
                         generator=torch.Generator().manual_seed(6))
        assert net.regime is None and base.regime is None
        assert (net.scale_exp, net.semantics, net.threshold) == (base.scale_exp, sem,
                                                                 base.threshold)
        for mode in ("scaled", "exact"):
            assert torch.equal(net(x, mode), base(x, mode))
        assert torch.equal(net.under()(x), regime.activation(x))


@pytest.mark.parametrize("regime", [Regime("absorption", 9, "float16"),
                                    Regime("absorption", 2, "float8_e4m3fn"),
                                    Regime("saturation", 127),
                                    Regime("saturation", 8, "float8_e4m3fn"),
                                    Regime("ftz-deadzone", 13, "float16")],
                         ids=lambda r: r.label)
def test_regime_net_scaled_mode_equals_its_exact_float_ops(regime: Regime) -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(128, 32, generator=g)
    net = DeepLinear([32, 64, 64, 10], regime=regime, generator=g)
    with torch.no_grad():
        for b in net.biases:
            b.normal_(0, 0.3, generator=g)
    assert net.regime == regime and net.threshold == regime.threshold
    assert net.semantics == IEEE and net.scale_exp == regime.scale_exp
    assert torch.equal(net(x, "scaled"), net(x, "exact"))
    assert collapse_gap(net, x, "exact").relative > 1e-3  # the regime is doing real work


def test_a_subnormal_float32_matmul_rounds_every_product_to_the_grid() -> None:
    """Why the scaled model cannot follow the staircase inside a layer: at the true scale a float32
    matmul (subnormals kept) returns, bit for bit, the sum of its products *each* rounded to the
    subnormal grid 2^-149 (the grid is uniform, so the partial sums add exactly), not the sum
    rounded once, which is what a per-layer activation models."""
    g = torch.Generator().manual_seed(0)
    grid = 2.0**-149
    h = torch.randint(-40, 41, (64, 128), generator=g).double()  # staircase outputs, in grid steps
    w = torch.randn(128, 32, generator=g) * 0.1
    real = ((h * grid).float() @ w).double() / grid
    per_product = torch.round(h[:, :, None] * w.double()).sum(1)  # round half to even, as IEEE
    assert torch.equal(real, per_product)
    rounded_sum = torch.round(h @ w.double())
    assert (real == rounded_sum).double().mean() < 0.5


def test_regime_and_scale_together_is_an_error() -> None:
    with pytest.raises(ValueError, match="not both"):
        DeepLinear([4, 8, 2], scale_exp=126, regime=Regime("ftz-deadzone", 125))
    # a valid regime the net cannot run: named as a regime, not as a flag the caller never gave
    with pytest.raises(ValueError, match=r"^regime ftz-deadzone:200 \(float32\) is out of range"):
        DeepLinear([4, 8, 2], regime=Regime("ftz-deadzone", 200))


def test_plot_sweeps_writes_a_png(tmp_path) -> None:
    z = rg.normal_sample(1 << 12)
    path = rg.plot_sweeps(tmp_path / "r.png", {k: rg.sweep(k, z=z)[:3] for k in KINDS[:2]})
    assert path.read_bytes()[:4] == b"\x89PNG"


# --- hardware ------------------------------------------------------------------------------------

def test_hardware_report_on_this_machine() -> None:
    rows = rg.hardware_report(cuda=False, jax=False)
    got = {(r.backend.split()[0], r.setting, r.op): r.observed for r in rows}
    text = rg.format_hardware_report(rows)
    assert len(text.splitlines()) == len(rows) + 1
    scale = "x * 2^-125 (elementwise)"
    assert got[("torch", "default", scale)] == "subnormal-staircase"  # PyTorch CPU keeps them
    assert got[("numpy", "default", scale)] == "subnormal-staircase"
    assert got[("torch", "default", "(x + 2^9) - 2^9 in float16")] == "absorption"
    assert got[("torch", "default", "x * 2^127 in float32")] == "inf"
    if X86:
        ftz = "FTZ+DAZ (run_with_hardware_ftz)"
        assert got[("torch", ftz, scale)] == "ftz-deadzone"
        assert got[("torch", ftz, "matmul, subnormal products")] == "ftz-deadzone"
        assert got[("torch", ftz, "matmul, subnormal inputs")] == "read as zero (DAZ)"
    e4m3 = got[("torch", "default", "x * 2^8 cast to float8_e4m3fn")]
    assert e4m3 in ("saturation", "NaN")  # torch 2.13 saturates; older versions give NaN


# --- deeplinear probe --regime / --format --------------------------------------------------------

def test_cli_probe_regime(capsys, tmp_path) -> None:
    from deeplinear.cli import main

    assert main(["probe", "--regime", "ftz-deadzone:125", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["sweeps"]["ftz-deadzone"]
    assert row["threshold"] == 0.5 and abs(row["zeroed"] - 0.383) < 0.005
    path = tmp_path / "a.png"
    assert main(["probe", "--format", "float16", "--regime", "absorption:9", "--plot",
                 str(path)]) == 0
    out = capsys.readouterr().out
    assert "absorption:9 (float16)" in out and path.read_bytes()[:4] == b"\x89PNG"
    assert main(["probe", "--regime", "relu"]) == 2
    assert "unknown regime" in capsys.readouterr().err


# --- the exploitability study (smoke budget: structure, not accuracy) ---------------------------

def test_study_smoke() -> None:
    regimes = (Regime("ftz-deadzone", 125), Regime("absorption", 9, "float16"))
    r = rg.study("spirals", regimes, budget="smoke", n_train=200, n_test=100)
    assert [(row["regime"], row["method"]) for row in r["rows"]] == [
        (reg.label, m) for reg in regimes for m in ("OpenAI-ES", "float-aware backprop")]
    assert set(r["baselines"]) == {"softmax regression", "ReLU MLP"}
    for row in r["rows"]:
        assert 0 <= row["test_acc"] <= 1 and 0 <= row["collapsed_acc"] <= 1
        assert row["test_acc"] == row["scaled_acc"] or row["regime"].startswith("ftz")
    table = rg.format_study(r)
    assert all(f"| {reg.label} |" in table for reg in regimes)
    assert "200 train / 100 test, seed 0, budget smoke. Test accuracy" in table
    assert rg.float_aware_surrogate(regimes[0]) == "smooth"
    assert rg.float_aware_surrogate(Regime("saturation", 127)) == "exact"
    assert rg.float_aware_surrogate(regimes[1]) == "ste"
    with pytest.raises(ValueError, match="unknown budget"):
        rg.study("spirals", regimes, budget="huge")
    with pytest.raises(ValueError, match="unknown methods"):
        rg.study("spirals", regimes, budget="smoke", methods=("SGD",))
    with pytest.raises(ValueError, match="no regimes to study"):
        rg.study("spirals", (), budget="smoke")


def test_study_takes_the_budgets_generations_for_its_dataset(monkeypatch) -> None:
    """The study's ES runs the budget's generations for the dataset (the quick budget's 8000 on
    spirals, as the methods study), with the study's own sigma and lr."""
    import dataclasses

    from deeplinear.reproduce import BUDGETS

    smoke = dataclasses.replace(BUDGETS["smoke"], es_per_dataset={"spirals": {"steps": 6}})
    monkeypatch.setitem(BUDGETS, "smoke", smoke)
    r = rg.study("spirals", (Regime("ftz-deadzone", 125),), budget="smoke", n_train=200,
                 n_test=100, methods=("OpenAI-ES",))
    assert r["rows"][0]["detail"] == "pop 8, 6 generations, full noise"
    assert r["budget"]["es"] == {**rg.STUDY_ES, "steps": 6, "pop": 8, "init_gain": 2.0,
                                 "batch_size": 200}  # no batch larger than the 200 samples


def test_draw_study_draws_each_cell_and_baseline() -> None:
    """Bar lengths are the exact accuracies, the marks the collapsed ones, in the table's order."""
    from deeplinear.report import plt

    rows = [{"regime": reg, "method": m, "test_acc": acc, "collapsed_acc": acc / 2}
            for reg, m, acc in (("a", "ES", 0.9), ("a", "BP", 0.8), ("b", "ES", 0.7),
                                ("b", "BP", 0.6))]
    result = {"dataset": "d", "sizes": [2, 4, 2], "seed": 3, "budget": {"budget": "quick"},
              "rows": rows, "baselines": {"softmax regression": 0.55, "ReLU MLP": 0.95}}
    fig, ax = plt.subplots()
    rg.draw_study(ax, result)
    bars = sorted((p.get_y() + p.get_height() / 2, p.get_width()) for p in ax.patches)
    assert [w for _, w in bars] == pytest.approx([90, 80, 70, 60])  # regime a first, ES above BP
    width = {round(y, 9): w for y, w in bars}
    marks = [(float(x), round(float(y), 9)) for line in ax.lines[:2]
             for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)]
    assert len(marks) == 4 and all(x == pytest.approx(width[y] / 2) for x, y in marks)
    assert [line.get_xdata()[0] for line in ax.lines[2:]] == pytest.approx([55, 95])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    plt.close(fig)


def test_a_study_killed_midway_resumes_from_its_partial_results(tmp_path, monkeypatch) -> None:
    """Each finished model is saved; a study given them trains only the rest, to the same table
    (each model depends only on the settings), and refuses partial results of other settings."""
    from deeplinear.train import backprop, es

    regimes = (Regime("ftz-deadzone", 125), Regime("absorption", 9, "float16"))
    kw = {"budget": "smoke", "n_train": 200, "n_test": 100}
    partial = tmp_path / "p.json"
    whole = rg.study("spirals", regimes, partial=partial, **kw)
    saved = json.loads(partial.read_text())
    assert saved["rows"] == whole["rows"] and saved["baselines"] == whole["baselines"]
    saved["rows"] = saved["rows"][:1]  # killed while training the second regime model
    partial.write_text(json.dumps(saved))
    trained = []
    for module in (backprop, es):
        monkeypatch.setattr(module, "train", lambda *a, real=module.train, **k: trained.append(
            type(a[0]).__name__) or real(*a, **k))
    resumed = rg.study("spirals", regimes, partial=partial, **kw)
    assert trained == ["DeepLinear"] * 3  # the three regime models left, no baseline

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "train_s"} for r in rows]
    assert strip(resumed["rows"]) == strip(whole["rows"])
    assert resumed["baselines"] == whole["baselines"]
    with pytest.raises(ValueError, match=re.escape(f"{partial}: written by a study with other "
                                                   "settings, seed (run: 0, now: 1); repeat them")):
        rg.study("spirals", regimes, partial=partial, seed=1, **kw)
    old = json.loads(partial.read_text())  # a budget no flag sets back: named to the field
    old["budget"]["es"]["steps"] += 1
    partial.write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"other settings, budget\.es\.steps \(run: \d+, now"):
        rg.study("spirals", regimes, partial=partial, **kw)
    partial.write_text("{")
    with pytest.raises(ValueError, match="not a regimes study's partial results"):
        rg.study("spirals", regimes, partial=partial, **kw)


def test_study_runs_only_the_methods_asked() -> None:
    r = rg.study("spirals", (Regime("ftz-deadzone", 125),), budget="smoke", n_train=200,
                 n_test=100, methods=("float-aware backprop",))
    assert [row["method"] for row in r["rows"]] == ["float-aware backprop"]


def test_study_es_settings_can_be_overridden_and_are_recorded() -> None:
    r = rg.study("spirals", (Regime("ftz-deadzone", 125),), budget="smoke", n_train=200,
                 n_test=100, methods=("OpenAI-ES",),
                 es_overrides={"steps": 3, "pop": 4, "perturbation": "lowrank"})
    assert r["rows"][0]["detail"] == "pop 4, 3 generations, lowrank noise"
    assert r["budget"]["es"]["perturbation"] == "lowrank" and r["budget"]["es"]["steps"] == 3
    assert r["budget"]["es"]["batch_size"] == 200  # the batch it ran: the whole training set


def test_study_builds_each_net_under_the_regime_and_parameter_asked_for(monkeypatch) -> None:
    """A non-default parameter must reach the net (the row label alone would not show it)."""
    from deeplinear.nets import DeepLinear
    from deeplinear.train import backprop

    seen = []

    def spy(model, data, cfg, run=None, progress=True):
        if isinstance(model, DeepLinear):
            seen.append(model.threshold)  # native regimes run as the 2017 layout
        return []

    monkeypatch.setattr(backprop, "train", spy)
    regimes = (Regime("ftz-deadzone", 123), Regime("absorption", 7, "float16"))
    rg.study("spirals", regimes, budget="smoke", n_train=200, n_test=100,
             methods=("float-aware backprop",))
    assert seen == [r.threshold for r in regimes] == [2.0**-3, 2.0**-3]


def test_format_study_cells_read_exact_then_scaled_then_collapsed() -> None:
    result = {"dataset": "spirals", "sizes": [2, 8, 2], "n_train": 10, "n_test": 5, "seed": 0,
              "budget": {"budget": "smoke"}, "baselines": {"ReLU MLP": 0.9},
              "rows": [{"regime": "r", "method": "m", "test_acc": 0.1, "scaled_acc": 0.2,
                        "collapsed_acc": 0.3}]}
    table = rg.format_study(result)
    assert "(in brackets: in the scaled model trained / of the affine map" in table
    assert "| r | 10.0% (20.0% / 30.0%) |" in table


def test_zeroed_counts_only_values_that_were_nonzero() -> None:
    z = torch.tensor([0.0, 0.25, 1.0, -2.0])  # dead zone |u| < 1/2: 0.25 is flushed, 0 stays 0
    s = rg.strength(Regime("ftz-deadzone", 125), z)
    assert s.changed == 0.25 and s.zeroed == 0.25


def test_probe_report_draws_its_sample_from_the_seed() -> None:
    r = rg.probe_report("ftz-deadzone:125", n=4096, seed=3)
    expected = rg.strength(Regime("ftz-deadzone", 125), rg.normal_sample(4096, 3)).as_dict()
    assert r["seed"] == 3 and r["sweeps"]["ftz-deadzone"] == [expected]
