import math
import re

import pytest
import torch

from deeplinear.arithmetic import CPU_FTZ_DAZ, FORMATS, IEEE, TF_GPU, Semantics
from deeplinear.es import physical_memory
from deeplinear.nets import DeepLinear
from deeplinear.probes import (
    BLOG_EXAMPLES,
    additivity_defect,
    affine_fit_residual,
    algebra_table,
    find_counterexamples,
    homogeneity_defect,
    implicit_activation,
    input_bytes,
    law_sides,
    make_nets,
    occupancy,
    plot_implicit_activation,
    probe_report,
    unit_ray,
)

FTZ_DAZ_ELEMENTWISE = Semantics("float32", "ftz_daz", "elementwise")
ALL = {"TF_GPU": TF_GPU, "IEEE": IEEE, "CPU_FTZ_DAZ": CPU_FTZ_DAZ, "ftz_daz": FTZ_DAZ_ELEMENTWISE}
F32 = torch.finfo(torch.float32)


@pytest.fixture(scope="module")
def blog():
    """The 2017 net at init, with a few pixel-like input pairs (the full default uses 256)."""
    nets = make_nets("784,512,512,10", ["TF_GPU", "IEEE", "CPU_FTZ_DAZ"], seed=0)
    g = torch.Generator().manual_seed(1)
    return nets, torch.rand(32, 784, generator=g), torch.rand(32, 784, generator=g)


def _rows(law):
    return {r["semantics"]: r for r in algebra_table(ALL) if r["law"] == law}


def test_blog_inputs_are_the_nearest_float32_and_subnormal():
    a, b, c = BLOG_EXAMPLES[0].tensors(TF_GPU)
    assert 0 < a.item() < b.item() < F32.smallest_normal  # 0.4min, 0.5min: subnormal inputs
    assert a.item() == pytest.approx(0.4 * F32.smallest_normal, rel=2**-23 / 0.4)
    assert c.item() == 2.0**126


def test_distributivity_fails_only_with_ftz_without_daz():
    rows = _rows("distributivity")
    assert (rows["TF_GPU"]["lhs"], rows["TF_GPU"]["rhs"]) == (0.0, pytest.approx(0.9, rel=1e-6))
    assert rows["IEEE"]["lhs"] == rows["IEEE"]["rhs"] == pytest.approx(0.9, rel=1e-6)
    for daz in ("CPU_FTZ_DAZ", "ftz_daz"):
        assert rows[daz]["lhs"] == rows[daz]["rhs"] == 0.0
    assert {k for k, r in rows.items() if r["differs"]} == {"TF_GPU"}
    assert "without DAZ" in rows["TF_GPU"]["needs"]


def test_associativity_fails_under_any_flush():
    rows = _rows("associativity")
    for flush in ("TF_GPU", "CPU_FTZ_DAZ", "ftz_daz"):
        assert (rows[flush]["lhs"], rows[flush]["rhs"]) == (1.0, 2.5)  # min vs 2.5 min
        assert rows[flush]["unit"] == "min"
    assert rows["IEEE"]["lhs"] == rows["IEEE"]["rhs"] == pytest.approx(1.9, rel=1e-6)
    assert not rows["IEEE"]["differs"]


@pytest.mark.parametrize("law", ["distributivity", "associativity"])
@pytest.mark.parametrize("sem", [TF_GPU, FTZ_DAZ_ELEMENTWISE, Semantics("float16", "ftz")])
def test_search_finds_flush_caused_counterexamples_that_recompute(law, sem):
    found = find_counterexamples(law, sem, n=20_000, seed=3)
    assert found.summary()["n_flush_caused"] > 10
    # the reported triples really break the law: recompute both sides from the inputs
    a, b, c = (v.to(sem.fmt.dtype) for v in (found.a, found.b, found.c))
    lhs, rhs = (v.double() for v in law_sides(law, a, b, c, sem))
    assert torch.equal(lhs, found.lhs) and torch.equal(rhs, found.rhs)
    assert (lhs != rhs).all()
    # flush-caused means: the law holds for that triple under IEEE gradual underflow
    ieee = Semantics(sem.format, "ieee", sem.scope)
    il, ir = (v.double() for v in law_sides(law, a, b, c, ieee))
    assert torch.equal(il == ir, found.flush_caused)


def test_search_under_ieee_reports_only_rounding():
    with pytest.raises(ValueError, match=r"n must be a positive number of triples, got 10\.0"):
        find_counterexamples("associativity", IEEE, n=10.0)  # type: ignore[arg-type]
    by_name = find_counterexamples("associativity", "IEEE", n=100, seed=3)  # a preset's name
    assert by_name.semantics == IEEE and torch.equal(
        by_name.a, find_counterexamples("associativity", IEEE, n=100, seed=3).a)
    found = find_counterexamples("associativity", IEEE, n=20_000, seed=3)
    assert len(found) > 0 and not found.flush_caused.any()
    with pytest.raises(ValueError, match="unknown law"):
        find_counterexamples("commutativity", IEEE)  # type: ignore[arg-type]


def test_defects_of_known_functions():
    g = torch.Generator().manual_seed(0)
    x, y = (torch.rand(64, 8, generator=g, dtype=torch.float64) for _ in range(2))
    a = torch.randn(8, 3, generator=g, dtype=torch.float64)
    affine = lambda z: z.double() @ a + 5.0  # noqa: E731
    assert additivity_defect(affine, x, y) < 1e-12
    assert homogeneity_defect(affine, x, 3.0) < 1e-12
    square = lambda z: z.double() ** 2  # noqa: E731
    assert additivity_defect(square, x, y) > 0.3
    assert homogeneity_defect(square, x, 2.0) == pytest.approx(1.0)  # 4x^2 vs 2x^2
    fit_x = torch.rand(200, 8, generator=g)
    assert affine_fit_residual(affine, fit_x) < 1e-10
    assert affine_fit_residual(lambda z: torch.sin(6 * z).double(), fit_x) > 0.3
    with pytest.raises(ValueError, match="n_fit"):
        affine_fit_residual(affine, x[:10])
    with pytest.raises(ValueError, match=r"shape \(inputs, features\), got \(200,\)"):
        affine_fit_residual(affine, fit_x[:, 0])


def test_algebra_table_takes_names_as_the_other_probes_do():
    named = algebra_table({"TF_GPU": TF_GPU, "IEEE": IEEE})
    assert algebra_table(["TF_GPU", IEEE]) == named
    assert algebra_table("IEEE") == [r for r in named if r["semantics"] == "IEEE"]


def test_blog_net_is_nonlinear_under_ftz_and_linear_under_ieee(blog):
    nets, x, y = blog
    add = {k: additivity_defect(lambda z, n=n: n(z, mode="exact"), x, y) for k, n in nets.items()}
    hom = {k: homogeneity_defect(lambda z, n=n: n(z, mode="exact"), x, 0.5)
           for k, n in nets.items()}
    # measured: TF_GPU ~0.23, IEEE ~6e-7
    assert add["IEEE"] < 1e-4 and hom["IEEE"] < 1e-4
    assert add["TF_GPU"] > 0.05 and add["TF_GPU"] > 10 * add["IEEE"]
    assert hom["TF_GPU"] > 0.05 and hom["TF_GPU"] > 10 * hom["IEEE"]


def test_occupancy(blog):
    nets, x, _ = blog
    occ = {k: occupancy(n, x) for k, n in nets.items()}
    for values in occ.values():
        assert len(values) == 3 and all(0.0 <= v <= 1.0 for v in values)
    assert occ["TF_GPU"][0] > 0.2  # measured ~0.46 at init on uniform pixels
    assert occ["IEEE"] == [0.0, 0.0, 0.0]
    # layer 1 needs no matmul emulation: scaled and exact agree bit for bit
    assert occupancy(nets["TF_GPU"], x, "scaled")[0] == occ["TF_GPU"][0]


def test_occupancy_counts_a_flush_inside_the_matmul():
    """Under scope 'all' the hidden flush happens in the matmul, before trace's u: still counted."""
    net = make_nets("64,32,32,10", ["CPU_FTZ_DAZ"], seed=0)["CPU_FTZ_DAZ"]
    x = torch.rand(64, 64, generator=torch.Generator().manual_seed(1))
    assert all(v > 0.05 for v in occupancy(net, x, "scaled"))


def test_implicit_activation_is_a_dead_zone_under_ftz_and_the_identity_under_ieee():
    nets = make_nets("64,32,10", ["TF_GPU", "IEEE"], seed=0)
    net = nets["TF_GPU"]
    x0, d = unit_ray(net, unit=3)
    t = torch.linspace(-1.5, 1.5, 601, dtype=torch.float64)
    act = implicit_activation(net, x0, d, t, layer=0, unit=3)
    assert torch.allclose(act.u, t, atol=1e-6)  # the ray makes u = t (zero bias)
    thr = net.threshold
    inside, outside = act.u.abs() < thr * (1 - 1e-5), act.u.abs() > thr * (1 + 1e-5)
    assert inside.sum() > 100 and outside.sum() > 100
    assert (act.h[inside] == 0).all()  # flat: the dead zone
    assert torch.allclose(act.h[outside], act.u[outside], rtol=1e-6)
    ieee = implicit_activation(nets["IEEE"], x0, d, t, layer=0, unit=3)
    assert torch.allclose(ieee.h, ieee.u, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="out of range"):
        implicit_activation(net, x0, d, t, layer=2)


def test_probe_report_small_net():
    r = probe_report("64,32,10", ["TF_GPU", "IEEE"], seed=0, n=64)
    assert r["normal_gap_ratio"] == {"float32": FORMATS["float32"].normal_gap_ratio}
    assert math.log2(r["normal_gap_ratio"]["float32"]) == 23
    assert len(r["algebra"]) == 2 * 2
    tf, ieee = r["semantics"]["TF_GPU"], r["semantics"]["IEEE"]
    assert tf["semantics"].items() >= {"format": "float32", "underflow": "ftz"}.items()
    assert tf["collapse_gap"]["relative"] > 0.05 > 1e-4 > ieee["collapse_gap"]["relative"]
    assert tf["affine_fit_residual"] > 0.05 > 1e-4 > ieee["affine_fit_residual"]
    assert len(tf["occupancy"]) == 2 and tf["occupancy"][0] > 0 == ieee["occupancy"][0]
    with pytest.raises(ValueError, match="unknown semantics"):
        probe_report("64,32,10", ["GPU"])
    with pytest.raises(ValueError, match="n_fit"):
        probe_report("64,32,10", ["IEEE"], n_fit=100)


def test_unit_out_of_range_and_dead_units_are_clear_errors():
    net = make_nets("8,4,3", ["TF_GPU"], seed=0)["TF_GPU"]
    with pytest.raises(ValueError, match="unit 4 out of range"):
        unit_ray(net, unit=4)  # was an IndexError deep in torch
    x0, d = unit_ray(net, unit=0)
    t = torch.linspace(-1, 1, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="unit 3 out of range"):
        implicit_activation(net, x0, d, t, layer=1, unit=3)  # the output has 3 units
    with pytest.raises(ValueError, match="unit -1 out of range"):
        implicit_activation(net, x0, d, t, layer=0, unit=-1)  # was silently the last unit
    with pytest.raises(ValueError, match=r"unit must be an integer index, got 1\.5"):
        unit_ray(net, unit=1.5)  # type: ignore[arg-type]  # was an IndexError
    with torch.no_grad():
        net.weights[0][:, 2] = 0
    with pytest.raises(ValueError, match="pick another unit"):  # was a NaN ray
        unit_ray(net, unit=2)


def test_occupancy_counts_flushed_values_not_exact_zeros():
    """A zero input with zero biases gives exact zeros everywhere: nothing was flushed."""
    net = DeepLinear([4, 5, 5, 3], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in net.biases:
            b.zero_()
    assert occupancy(net, torch.zeros(8, 4)) == [0.0, 0.0, 0.0]


def test_probes_refuse_no_rows_instead_of_reading_as_linear():
    net = make_nets([4, 8, 3], "TF_GPU")["TF_GPU"]  # one preset by name, not 'T', 'F', ...
    empty = torch.empty(0, 4)
    f = net.forward
    for call in (lambda: additivity_defect(f, empty, empty),
                 lambda: homogeneity_defect(f, empty, 2.0),
                 lambda: occupancy(net, empty)):
        with pytest.raises(ValueError, match="no inputs: a probe needs at least one row of x"):
            call()
    with pytest.raises(ValueError, match=re.escape("x and y must have one shape, got (3, 4) and "
                                                   "(2, 4)")):
        additivity_defect(f, torch.rand(3, 4), torch.rand(2, 4))


def test_make_nets_draws_nothing_from_the_global_stream():
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    nets = make_nets([4, 8, 3], ["TF_GPU", "IEEE"], seed=1)
    assert torch.equal(torch.rand(2), expected)
    assert nets["IEEE"].semantics == IEEE and nets["TF_GPU"].semantics != IEEE
    assert torch.equal(nets["IEEE"].weights[0], nets["TF_GPU"].weights[0])
    assert nets["IEEE"].weights[0] is not nets["TF_GPU"].weights[0]


def test_implicit_activation_takes_a_list_and_probe_report_a_whole_n():
    net = make_nets([4, 8, 3], ["TF_GPU"], seed=0)["TF_GPU"]
    x0, d = torch.zeros(4), torch.ones(4) * 2.0**-126
    as_list = implicit_activation(net, x0, d, [0.0, 0.5, 1.0], layer=0, unit=1)
    as_tensor = implicit_activation(net, x0, d, torch.tensor([0.0, 0.5, 1.0]), layer=0, unit=1)
    assert torch.equal(as_list.h, as_tensor.h) and torch.equal(as_list.u, as_tensor.u)
    with pytest.raises(ValueError, match="t must be 1-D"):
        implicit_activation(net, x0, d, [[0.0]], layer=0, unit=1)
    with pytest.raises(ValueError, match=r"n must be a positive whole number of inputs, got 1\.5"):
        probe_report([4, 8, 3], ["TF_GPU"], n=1.5)


def test_probe_report_refuses_inputs_larger_than_this_machine():
    memory = physical_memory()
    if not memory:
        pytest.skip("the OS does not say how much memory this machine has")
    assert input_bytes([4, 8, 3]) == 16 * 4 + 28 * 8
    n = memory // input_bytes([4, 8, 3]) + 1  # just over the machine
    with pytest.raises(ValueError, match=rf"n={n} inputs of a 4-8-3 net need about [0-9.]+ GiB, "
                                         r"more than this machine's [0-9.]+ GiB; lower n "
                                         r"\(--n\)"):
        probe_report([4, 8, 3], ["TF_GPU"], n=n)
    wide = memory // input_bytes([2, 20000, 2]) + 1  # the hidden width counts too
    with pytest.raises(ValueError, match=rf"n={wide} inputs of a 2-20000-2 net"):
        probe_report([2, 20000, 2], ["TF_GPU"], n=wide)


def test_probe_report_shows_progress_on_stderr_unless_asked_not_to(capsys):
    probe_report([4, 8, 3], ["TF_GPU", "IEEE"], n=8)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("probe 1/10 ")  # five diagnostics per semantics
    assert lines[-1].startswith("probe 10/10 ")  # the last one always shows
    probe_report([4, 8, 3], ["TF_GPU", "IEEE"], n=8, progress=False)
    assert capsys.readouterr().err == ""


def test_the_activation_plot_with_inputs_starts_its_ray_there_and_draws_the_collapse(
        monkeypatch, tmp_path):
    from deeplinear import report

    figs = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figs.append(fig) or path)
    nets = make_nets("4,8,8,3", ["TF_GPU", "IEEE"], seed=0)
    x = torch.rand(20, 4, generator=torch.Generator().manual_seed(1))
    plot_implicit_activation(tmp_path / "a.png", nets, inputs=x)
    plot_implicit_activation(tmp_path / "b.png", nets)
    with_inputs, without = figs
    assert len(with_inputs.axes) == 3 and len(without.axes) == 2
    assert "x0 the first input" in with_inputs.axes[1].get_title()
    assert "x0 uniform [0, 1]" in without.axes[1].get_title()
    assert with_inputs.axes[2].get_title().startswith("collapse: executed vs affine map")
    for fig in figs:
        report.plt.close(fig)
