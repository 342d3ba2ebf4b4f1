"""``benchmarks/source_figures.py``: the run that the source comments' timing figures come from."""

import pytest
import torch
from helpers import load_benchmark

from deeplinear.engine import ALIGN
from deeplinear.es import Layout


@pytest.fixture(scope="module")
def sf():
    return load_benchmark("source_figures")


def test_side_by_side_interleaves_and_prepares_every_call(sf):
    calls = []
    t = sf.side_by_side({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3,
                        before=lambda: calls.append("reset"))
    assert calls == ["reset", "a", "reset", "b"] * 4  # warm-up, then 3 rounds A, B, A, B, ...
    assert set(t) == {"a", "b"} and all(v >= 0 for v in t.values())


def test_misaligned_rows_are_the_ones_measured(sf):
    """The 'packed' variant really starts members off a 64-byte line, the 'aligned' one never:
    for the net timed here and for the 2017 net the script times."""
    for sizes in ((16, 32, 32, 10), (784, 512, 512, 10)):
        n = Layout.of(sizes).n
        assert n % ALIGN and not sf.engine_mod.aligned(n) % ALIGN
    t = sf.misaligned_bmm((16, 32, 32, 10), 4, 8, 1)
    assert set(t) == {f"layer {i} {v}" for i in (1, 2) for v in ("packed", "aligned")}
    assert all(v > 0 for v in t.values())


def test_adam_moments_stay_subnormal_without_ftz(sf):
    """The premise of the timed step: from the subnormal start, a plain step keeps the stopped
    parameters' moments subnormal (the slow case), a step under FTZ+DAZ zeroes them."""
    from deeplinear.arithmetic import hardware_ftz

    tiny = torch.finfo(torch.float32).tiny
    for ftz in (False, True):
        opt, starts, _ = sf.adam_state((8, 16, 4), 0.5)
        p = opt.param_groups[0]["params"][0]
        dead = p.grad == 0
        assert 0 < int(dead.sum()) < p.numel()
        for k, v in starts["subnormal moments"].items():
            opt.state[p][k].copy_(v)
        with hardware_ftz(ftz):
            opt.step()
        m = opt.state[p]["exp_avg"][dead]
        if ftz:
            assert (m == 0).all()
        else:
            assert ((m != 0) & (m.abs() < tiny)).all()
        assert (opt.state[p]["exp_avg"][~dead].abs() >= tiny).all()
    assert {"subnormal moments, plain", "subnormal moments, FTZ+DAZ", "normal moments, plain",
            "zero tiny moments"} <= set(sf.adam_subnormal((8, 16, 4), 0.5, 1))


def test_quick_run_prints_every_figure(sf, capsys):
    torch.manual_seed(0)
    sf.main(["--quick", "--rounds", "1", "--threads", "1"])
    out = capsys.readouterr().out
    for section in ("sgemm peak", "[engine.py]", "CHUNK_CACHE_BYTES", "[engine.py ALIGN]",
                    "[es.py noise table]", "[backprop.py _step]", "[data.py Dataset.subset]",
                    "[engine.py inplace_staircase]"):
        assert section in out
    assert out.count(" rank, pop ") == 6
    assert out.count("same weights: True") == 2  # both rules train the same nets, bit for bit
