"""Acceptance tests of deeplinear.collapse: the single affine map, and the float net's distance."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deeplinear.arithmetic import CPU_FTZ_DAZ, IEEE, TF_GPU
from deeplinear.collapse import collapse, collapse_gap
from deeplinear.nets import DeepLinear

BLOG_SIZES = (784, 512, 512, 10)


def float64_forward(net: DeepLinear, x: torch.Tensor) -> torch.Tensor:
    """The network's definition in float64, where nothing near 2**-125 underflows."""
    s = 2.0**net.scale_exp
    ws = [w.detach().double() for w in net.weights]
    bs = [b.detach().double() for b in net.biases]
    h = (x.double() @ ws[0] + bs[0]) / s
    for w, b in zip(ws[1:-1], bs[1:-1], strict=True):
        h = h @ w + b / s
    return (h @ ws[-1] + bs[-1] / s) * s


@pytest.mark.parametrize("sizes", [(5, 7, 3), (6, 8, 9, 4), (784, 64, 32, 32, 10)])
def test_collapse_is_the_float64_product(sizes):
    g = torch.Generator().manual_seed(0)
    net = DeepLinear(sizes, generator=g)
    with torch.no_grad():
        for b in net.biases:
            b.copy_(torch.randn(b.shape, generator=g))
    w, b = collapse(net)
    assert w.dtype == b.dtype == torch.float64
    assert w.shape == (sizes[0], sizes[-1]) and b.shape == (sizes[-1],)
    product = functools.reduce(torch.matmul, [p.detach().double() for p in net.weights])
    torch.testing.assert_close(w, product, rtol=1e-12, atol=0)
    x = torch.rand(32, sizes[0], generator=g)
    torch.testing.assert_close(x.double() @ w + b, float64_forward(net, x), rtol=1e-10,
                               atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 12), min_size=3, max_size=6), seed=st.integers(0, 2**31),
       scale_exp=st.integers(0, 149))
def test_collapse_is_the_float64_composition_for_any_shape_and_scale(sizes, seed, scale_exp):
    g = torch.Generator().manual_seed(seed)
    net = DeepLinear(sizes, scale_exp=scale_exp, generator=g)
    with torch.no_grad():
        for b in net.biases:
            b.copy_(torch.randn(b.shape, generator=g))
    w, b = collapse(net)
    x = torch.randn(8, sizes[0], generator=g)
    torch.testing.assert_close(x.double() @ w + b, float64_forward(net, x), rtol=1e-9,
                               atol=1e-12)


@pytest.fixture(scope="module")
def uniform_inputs() -> torch.Tensor:
    return torch.rand(256, BLOG_SIZES[0], generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["exact", "scaled"])
def test_collapse_gap_on_the_blog_net(mode, uniform_inputs):
    gaps = {}
    for sem in (IEEE, TF_GPU, CPU_FTZ_DAZ):
        net = DeepLinear(BLOG_SIZES, semantics=sem, generator=torch.Generator().manual_seed(0))
        gaps[sem.underflow] = collapse_gap(net, uniform_inputs, mode)
        print(f"\n{mode}, {sem.underflow}/{sem.scope}: {gaps[sem.underflow].as_dict()}")
    assert gaps["ieee"].relative < 1e-5
    assert gaps["ieee"].argmax_agreement == 1.0
    assert gaps["ftz"].relative > 0.05
    assert gaps["ftz_daz"].relative > 0.05
    assert set(gaps["ieee"].as_dict()) == {"relative", "max_abs", "argmax_agreement"}


def test_collapse_gap_bad_inputs_are_one_line_errors():
    net = DeepLinear((4, 5, 3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="4 features"):
        collapse_gap(net, torch.rand(3, 5))
    with pytest.raises(ValueError, match="torch tensor"):
        collapse_gap(net, [[1.0] * 4])  # type: ignore[arg-type]
    x = torch.rand(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):  # was a silent nan gap with agreement 1.0
        collapse_gap(net, x)
    with pytest.raises(ValueError, match="no inputs"):  # was a RuntimeError from torch's max()
        collapse_gap(net, torch.rand(0, 4))


def test_collapse_gap_of_one_row_and_of_float64_inputs():
    net = DeepLinear((4, 5, 3), semantics=IEEE, generator=torch.Generator().manual_seed(0))
    x = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gap = collapse_gap(net, x)  # one row: was an IndexError from argmax(1)
    assert gap.argmax_agreement == 1.0 and gap.relative < 1e-6


def test_the_collapse_plot_puts_ieee_on_the_diagonal_and_ftz_off_it(monkeypatch, tmp_path):
    """Each net's points are (collapsed map, executed output) for every output of every input;
    IEEE's lie on the diagonal (to rounding), TF_GPU's do not; the legend carries each gap."""
    from deeplinear import report
    from deeplinear.collapse import plot_collapse
    from deeplinear.probes import make_nets, probe_inputs

    figs = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figs.append(fig) or path)
    nets = make_nets("16,32,32,4", ["TF_GPU", "IEEE"], seed=0)
    x = probe_inputs(16, 64)
    assert plot_collapse(tmp_path / "c.png", nets, x, title="toy") == tmp_path / "c.png"
    ax = figs[0].axes[0]
    for points, (name, net) in zip(ax.collections, nets.items(), strict=True):
        lin, out = points.get_offsets().T
        w, b = collapse(net)
        assert torch.equal(torch.tensor(lin), (x.double() @ w + b).reshape(-1))
        assert torch.equal(torch.tensor(out), net(x, mode="exact").double().reshape(-1))
        gap = collapse_gap(net, x)
        assert f"{name}: gap {gap.relative:.2g}" in points.get_label()
        off = abs(torch.tensor(out - lin)).max()
        assert (off < 1e-5) == (name == "IEEE")
    report.plt.close(figs[0])


def test_probe_inputs_are_the_probes_own_x():
    from deeplinear.probes import make_nets, probe_inputs, probe_report

    net = make_nets("8,16,3", ["TF_GPU"], seed=2)["TF_GPU"]
    rep = probe_report("8,16,3", ["TF_GPU"], seed=2, n=32, progress=False)
    assert rep["semantics"]["TF_GPU"]["collapse_gap"] == collapse_gap(
        net, probe_inputs(8, 32, seed=2)).as_dict()


def test_the_collapse_plot_draws_at_most_its_limit_of_rows(monkeypatch, tmp_path):
    from deeplinear import report
    from deeplinear.collapse import draw_collapse
    from deeplinear.probes import make_nets, probe_inputs

    nets = make_nets("4,8,3", ["TF_GPU"], seed=0)
    fig, ax = report.plt.subplots()
    draw_collapse(ax, nets, probe_inputs(4, 50), limit=20)
    assert len(ax.collections[0].get_offsets()) == 20 * 3  # 20 rows, 3 outputs each
    report.plt.close(fig)
