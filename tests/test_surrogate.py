import math

import pytest
import torch

from deeplinear.arithmetic import CPU_FTZ_DAZ, IEEE, TF_GPU
from deeplinear.nets import DeepLinear
from deeplinear.surrogate import KINDS, check_tau, make_under, smooth_dead_zone_grad

FLOAT_AWARE = [k for k in KINDS if k != "blind"]


def probe_values(t: float) -> torch.Tensor:
    """Random values plus every edge of the rule: ±t, its neighbours, signed zeros, tiny steps."""
    g = torch.Generator().manual_seed(0)
    edges = [t, -t, math.nextafter(t, 0), -math.nextafter(t, 0), math.nextafter(t, 1), 0.0, -0.0,
             1e-30, -1e-30, 2.0**-24, 3 * t, -3 * t]
    return torch.cat([torch.tensor(edges), torch.randn(4000, generator=g) * 2 * t])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


@pytest.mark.parametrize("sem", [TF_GPU, IEEE, CPU_FTZ_DAZ], ids=["TF_GPU", "IEEE", "CPU"])
@pytest.mark.parametrize("kind", FLOAT_AWARE)
def test_forward_is_bit_identical_to_the_rule(sem, kind):
    net = DeepLinear([3, 4, 2], semantics=sem)
    u = probe_values(net.threshold)
    assert same_bits(make_under(net, kind)(u.clone().requires_grad_()).detach(), net.under()(u))


@pytest.mark.parametrize("sem", [TF_GPU, IEEE, CPU_FTZ_DAZ], ids=["TF_GPU", "IEEE", "CPU"])
@pytest.mark.parametrize("kind", FLOAT_AWARE)
def test_whole_network_forward_matches_the_real_rule(sem, kind):
    net = DeepLinear([5, 16, 16, 3], semantics=sem, generator=torch.Generator().manual_seed(1))
    x = torch.randn(64, 5, generator=torch.Generator().manual_seed(2))
    assert same_bits(net(x, "scaled", under=make_under(net, kind)).detach(), net(x, "scaled"))


def grad_of(f, u):
    u = u.clone().requires_grad_()
    (g,) = torch.autograd.grad(f(u).sum(), u)
    return g


def test_blind_is_the_identity_both_ways():
    net = DeepLinear([3, 4, 2])
    u = probe_values(net.threshold)
    f = make_under(net, "blind")
    assert same_bits(f(u), u)
    assert torch.equal(grad_of(f, u), torch.ones_like(u))


def test_exact_gradient_is_zero_inside_the_dead_zone_and_one_outside():
    net = DeepLinear([3, 4, 2])
    u = probe_values(net.threshold)
    expected = (u.abs() >= net.threshold).float()
    assert torch.equal(grad_of(make_under(net, "exact"), u), expected)


def test_exact_gradient_of_the_ieee_staircase_is_zero_below_the_threshold():
    net = DeepLinear([3, 4, 2], semantics=IEEE)
    u = probe_values(net.threshold)
    expected = (u.abs() >= net.threshold).float()
    assert torch.equal(grad_of(make_under(net, "exact"), u), expected)


@pytest.mark.parametrize("sem", [TF_GPU, IEEE], ids=["TF_GPU", "IEEE"])
def test_ste_gradient_is_one_everywhere(sem):
    net = DeepLinear([3, 4, 2], semantics=sem)
    u = probe_values(net.threshold)
    assert torch.equal(grad_of(make_under(net, "ste"), u), torch.ones_like(u))


def test_smooth_gradient_is_the_relaxations_derivative():
    net = DeepLinear([3, 4, 2])
    t, tau = net.threshold, 0.3
    u = probe_values(t)
    u = u[u != 0]  # |u| is not differentiable at 0; the closed form takes the limit there
    relaxation = lambda v: v * torch.sigmoid((v.abs() - t) / (tau * t))  # noqa: E731
    got = grad_of(make_under(net, "smooth", tau=tau), u)
    assert torch.allclose(got, grad_of(relaxation, u), rtol=1e-5, atol=1e-6)
    # it sees the jump: the slope at the threshold exceeds 1 by about t / (4 tau t) = 1/(4 tau)
    at_t = smooth_dead_zone_grad(t, tau * t)(torch.tensor([t]))
    assert at_t.item() == pytest.approx(0.5 + 1 / (4 * tau))
    # and fades towards the exact derivative away from it (a leak of sigmoid(-1/tau) at 0)
    far = smooth_dead_zone_grad(t, tau * t)(torch.tensor([0.0, 10 * t]))
    assert far[0].item() == pytest.approx(1 / (1 + math.exp(1 / tau)), rel=1e-5)
    assert far[1].item() == pytest.approx(1.0, abs=1e-6)


def test_smooth_on_a_staircase_is_straight_through():
    net = DeepLinear([3, 4, 2], semantics=IEEE)
    u = probe_values(net.threshold)
    assert torch.equal(grad_of(make_under(net, "smooth"), u), torch.ones_like(u))


def test_bad_kind_and_tau_are_clear_errors():
    net = DeepLinear([3, 4, 2])
    with pytest.raises(ValueError, match="unknown surrogate"):
        make_under(net, "relu")
    with pytest.raises(ValueError, match="tau"):
        make_under(net, "smooth", tau=0.0)


@pytest.mark.parametrize("tau", [float("inf"), float("nan"), -1.0, 1e-45, 1e-310])
@pytest.mark.parametrize("sem", [TF_GPU, IEEE], ids=["TF_GPU", "IEEE"])
def test_unusable_tau_is_a_clear_error(sem, tau):
    """inf relaxed the dead zone to u/2 (slope 0.5 everywhere); a width that is zero or subnormal
    in float32 gave NaN gradients; on a staircase a bad tau was silently accepted."""
    with pytest.raises(ValueError, match="finite tau"):
        make_under(DeepLinear([3, 4, 2], semantics=sem), "smooth", tau=tau)


@pytest.mark.parametrize("tau", [1e-30, 1e-3, 0.3, 30.0])
def test_smooth_gradient_is_finite_for_every_accepted_tau(tau):
    net = DeepLinear([3, 4, 2])
    u = probe_values(net.threshold)
    g = grad_of(make_under(net, "smooth", tau=tau), u)
    assert torch.isfinite(g).all() and (g >= 0).all()
    # at |u| == t the sigmoid is 1/2: slope 1/2 + 1/(4 tau) (in float32)
    at_t = (u.abs() == net.threshold)
    assert at_t.sum() >= 2
    assert g[at_t].tolist() == pytest.approx([0.5 + 1 / (4 * tau)] * int(at_t.sum()), rel=1e-6)


def test_a_width_below_float32s_normals_says_which_tau_or_scale_would_do():
    """At --scale-exp 1 the threshold is 2**-125, and 0.3 of it is subnormal."""
    with pytest.raises(ValueError,
                       match=r"needs tau >= 0\.5 or a larger scale \(scale_exp, --scale-exp\)"):
        check_tau(0.3, 2.0**-125)
    check_tau(0.5, 2.0**-125)  # 2**-126 exactly: the smallest normal width
    with pytest.raises(ValueError, match=r"got tau=inf$"):
        check_tau(math.inf, 1.0)
