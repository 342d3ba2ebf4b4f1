import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deeplinear import es
from deeplinear.nets import DeepLinear

TABLE = 1 << 16


def strategy(sizes=(3, 5, 4, 2), **kw) -> es.Strategy:
    kw.setdefault("table_size", TABLE)
    kw.setdefault("pop", 8)
    return es.Strategy(es.Layout.of(sizes), **kw)


# --- fitness shaping --------------------------------------------------------------------------

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=2, max_size=40))
def test_centered_ranks_sum_to_zero_lie_in_range_and_keep_order(values):
    x = torch.tensor(values)
    r = es.centered_ranks(x)
    assert abs(float(r.double().sum())) < 1e-4
    assert float(r.min()) >= -0.5 and float(r.max()) <= 0.5
    for i in range(len(values)):
        for j in range(len(values)):
            if values[i] < values[j]:
                assert r[i] < r[j]
            elif values[i] == values[j]:
                assert r[i] == r[j]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(-1000, 1000), min_size=2, max_size=30, unique=True))
def test_centered_ranks_ignore_monotone_transforms_and_span_the_range(values):
    x = torch.tensor(values, dtype=torch.float64)
    r = es.centered_ranks(x)
    assert torch.equal(r, es.centered_ranks(torch.exp(x / 100) * 3 - 7))
    assert float(r.min()) == -0.5 and float(r.max()) == 0.5


def test_non_finite_losses_rank_worst_and_all_non_finite_is_an_error():
    r = es.shaped_fitness(torch.tensor([1.0, float("nan"), 0.5, float("inf"), 2.0]))
    assert r[1] == r[3] == r.max() and r[2] == r.min()
    with pytest.raises(es.DivergedError, match="generation 7"):
        es.shaped_fitness(torch.tensor([float("nan"), float("inf")]), generation=7)


# --- layout -----------------------------------------------------------------------------------


def test_layout_round_trips_a_net_and_scales_by_fan_in():
    net = DeepLinear([3, 5, 2], generator=torch.Generator().manual_seed(0))
    layout = es.Layout.of(net.sizes)
    flat = layout.flatten(net)
    assert flat.shape == (3 * 5 + 5 + 5 * 2 + 2,)
    w, b = layout.layer(flat, 1)
    assert torch.equal(w, net.weights[1].detach()) and torch.equal(b, net.biases[1].detach())
    other = DeepLinear([3, 5, 2], generator=torch.Generator().manual_seed(1))
    layout.load(flat, other)
    assert torch.equal(layout.flatten(other), flat)
    s = layout.scale("fan_in")
    assert torch.equal(layout.layer(s, 0)[0], torch.full((3, 5), 1 / math.sqrt(3)))
    assert torch.equal(layout.layer(s, 1)[1], torch.ones(2))
    with pytest.raises(ValueError, match="does not match"):
        es.Layout.of([3, 4, 2]).flatten(net)


# --- noise ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 2])
def test_antithetic_members_are_centre_plus_minus_one_draw(rank):
    s = strategy(rank=rank, sigma=0.3)
    state = es.init(s, torch.randn(s.layout.n))
    pop = es.ask(s, state)
    for p in range(s.pairs):
        d = pop.delta(p)
        assert torch.equal(pop.member(2 * p), state.theta + d)
        assert torch.equal(pop.member(2 * p + 1), state.theta - d)
        assert d.abs().max() > 0


@pytest.mark.parametrize("rank", [0, 2])
def test_noise_is_a_pure_function_of_seed_generation_and_pair(rank):
    s = strategy(rank=rank, pop=6, seed=3)
    theta = torch.randn(s.layout.n)
    first = [es.ask(s, es.init(s, theta)).member(j) for j in range(6)]
    es.noise_table.cache_clear()  # the table itself is regenerated from the seed
    fresh = strategy(rank=rank, pop=10, seed=3)  # more pairs: the first ones do not change
    again = es.ask(fresh, es.init(fresh, theta))
    assert all(torch.equal(m, again.member(j)) for j, m in enumerate(first))
    later = es.init(s, theta)
    later.generation = 1
    assert es.ask(s, later).offsets != es.ask(s, es.init(s, theta)).offsets
    assert strategy(rank=rank, pop=6, seed=4).offsets(0) != s.offsets(0)


def test_deltas_are_the_noise_times_sigma_bit_for_bit():
    s = strategy(pop=8, sigma=0.3)
    pop = es.ask(s, es.init(s, torch.randn(s.layout.n)))
    pairs = [3, 0, 2]
    expected = pop.noise(pairs) * pop.sigma_vec
    assert torch.equal(pop.deltas(pairs), expected)
    out = torch.full((3, s.layout.n), torch.nan)
    assert pop.deltas(pairs, out=out) is out and torch.equal(out, expected)
    short = torch.zeros(3, 2, s.layout.n + 4)[:, 1, :-6]  # two values too few per row
    with pytest.raises(ValueError, match=f"out has shape \\(3, {s.layout.n - 2}\\)"):
        pop.deltas(pairs, out=short)
    # the GPU's way (all pairs gathered, then one product), here on the CPU, into a strided
    # slot as the engine passes it: the same bits
    slot = torch.full((3, 2, s.layout.n + 4), torch.nan)[:, 1, :s.layout.n]
    assert pop.deltas(pairs, out=slot, gather=True) is slot and torch.equal(slot, expected)
    assert torch.equal(pop.deltas(pairs, gather=True), expected)


def test_lowrank_perturbation_is_a_scaled_outer_product():
    s = strategy(sizes=(6, 7, 3), rank=2, sigma=0.5)
    pop = es.ask(s, es.init(s, torch.zeros(s.layout.n)))
    a, _bs, _ = pop.lowrank_factors([1])[0]
    noise = pop.noise([1])[0]
    b = noise[6 * 2:(6 + 7) * 2].view(7, 2)
    expected = a[0] @ b.T * (0.5 / math.sqrt(6) / math.sqrt(2))
    w, _ = s.layout.layer(pop.delta(1), 0)
    torch.testing.assert_close(w, expected)


# --- gradient and tell ------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_gradient_is_the_rank_weighted_sum_of_the_perturbations(rank):
    s = strategy(rank=rank, pop=12, sigma=0.2)
    pop = es.ask(s, es.init(s, torch.randn(s.layout.n)))
    losses = torch.randn(pop.size)
    r = es.shaped_fitness(losses)
    expected = sum((r[2 * p] - r[2 * p + 1]) * pop.delta(p) for p in range(s.pairs))
    expected = expected / (s.scale * pop.sigma) / (pop.size * pop.sigma)
    torch.testing.assert_close(es.gradient(pop, losses), expected, rtol=1e-4, atol=1e-5)
    if not rank:  # the GPU's way: chunks of gathered pairs (here of 5, 5 and 2), same sum
        chunk = 5 * 4 * s.layout.n
        with pytest.MonkeyPatch.context() as m:
            m.setattr(es, "GRADIENT_CHUNK_BYTES", chunk)
            torch.testing.assert_close(es.gradient(pop, losses, gather=True),
                                       es.gradient(pop, losses), rtol=1e-5, atol=1e-6)
    swapped = losses.view(-1, 2).flip(1).reshape(-1)  # antithetic symmetry: the sign flips
    torch.testing.assert_close(es.gradient(pop, swapped), -es.gradient(pop, losses))
    assert torch.equal(es.gradient(pop, torch.ones(pop.size)), torch.zeros(s.layout.n))


@pytest.mark.parametrize("rank", [0, 2])
def test_tell_minimises_the_sphere_function(rank):
    s = strategy(sizes=(8, 8, 4), rank=rank, pop=40, sigma=0.1, lr=0.05, sigma_scale="none")
    target = torch.linspace(-1, 1, s.layout.n)
    state = es.init(s, torch.zeros(s.layout.n))

    def sphere(theta):
        return float(((theta - target) ** 2).sum())

    before = sphere(state.theta)
    for _ in range(150):
        pop = es.ask(s, state)
        es.tell(s, state, pop, torch.tensor([sphere(pop.member(j)) for j in range(pop.size)]))
    assert sphere(state.theta) < 0.1 * before
    assert state.generation == 150


def test_tell_survives_nan_members_and_refuses_a_stale_population():
    s = strategy(pop=8)
    state = es.init(s, torch.zeros(s.layout.n))
    pop = es.ask(s, state)
    losses = torch.arange(8.0)
    losses[[1, 4]] = float("nan")
    es.tell(s, state, pop, losses)
    assert torch.isfinite(state.theta).all() and state.theta.abs().max() > 0
    with pytest.raises(ValueError, match="ask again"):
        es.tell(s, state, pop, losses)
    other = strategy(pop=8, sigma_blocks="weights.0=0")
    with pytest.raises(ValueError, match="another strategy"):
        es.tell(other, state, es.ask(s, state), losses)


def test_weight_decay_pulls_towards_zero_when_the_loss_is_flat():
    s = strategy(pop=4, weight_decay=1.0, lr=0.1)
    state = es.init(s, torch.ones(s.layout.n))
    for _ in range(5):
        es.tell(s, state, es.ask(s, state), torch.zeros(4))
    assert (state.theta < 1).all()


def test_sigma_schedule_decays_to_a_floor_and_state_round_trips():
    s = strategy(sigma=1.0, sigma_decay=0.5, sigma_min=0.2)
    assert [s.sigma_at(g) for g in range(4)] == [1.0, 0.5, 0.25, 0.2]
    state = es.init(s, torch.randn(s.layout.n))
    es.tell(s, state, es.ask(s, state), torch.randn(s.pop))
    back = es.State.from_state_dict(state.state_dict())
    assert back.generation == 1 and torch.equal(back.m, state.m) and torch.equal(back.v, state.v)


def test_a_long_sigma_decay_stops_at_its_floor_and_never_reaches_zero():
    """Without a floor, 0.05 * 0.5**g is 5e-324 at g = 1070 (theta turned NaN) and 0.0 at 1100
    (ZeroDivisionError); so a decaying sigma must have one, and with it a late generation is an
    ordinary one."""
    s = strategy(sigma=0.05, sigma_decay=0.5, sigma_min=1e-4)
    state = es.init(s, torch.randn(s.layout.n))
    for state.generation in (1070, 1100):
        pop = es.ask(s, state)
        assert pop.sigma == 1e-4
        es.tell(s, state, pop, torch.randn(pop.size))
        assert torch.isfinite(state.theta).all()


def test_the_first_adam_step_is_lr_along_the_sign_of_the_estimate_in_net_units():
    """Bias correction: after one generation ``m_hat / sqrt(v_hat) = g / |g|``, so every free
    coordinate moves by ``lr`` in normalised units, ``lr * scale`` in the net's."""
    s = strategy(sizes=(6, 5, 3), pop=8, lr=0.02, sigma_blocks="biases.1=3")
    state = es.init(s, torch.zeros(s.layout.n))
    pop = es.ask(s, state)
    losses = torch.randn(pop.size)
    g = es.gradient(pop, losses)
    es.tell(s, state, pop, losses)
    torch.testing.assert_close(state.theta, -0.02 * s.scale * g.sign(), rtol=1e-5, atol=1e-9)


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 10**6), st.integers(0, 40))
def test_every_offset_leaves_a_whole_noise_vector_inside_the_table(seed, generation, extra):
    s = strategy(sizes=(2, 3, 2), rank=0, seed=seed, pop=16, table_size=18 + extra)  # noise_dim 17
    offsets = s.offsets(generation)
    assert len(offsets) == s.pairs
    assert all(o >= 0 and o + s.noise_dim <= s.table_size for o in offsets)


@pytest.mark.parametrize("rank", [0, 2])
def test_a_frozen_block_is_never_perturbed_updated_or_decayed(rank):
    s = strategy(sizes=(6, 5, 3), rank=rank, pop=8, weight_decay=0.5,
                 sigma_blocks="weights.0=0, biases.1=2")
    w0, b1 = s.layout.weights[0], s.layout.biases[1]
    free = strategy(sizes=(6, 5, 3), rank=rank, pop=8, weight_decay=0.5)
    assert torch.equal(s.scale[w0.offset:w0.end], torch.zeros(w0.size))
    assert torch.equal(s.scale[b1.offset:b1.end], 2 * free.scale[b1.offset:b1.end])
    state = es.init(s, torch.randn(s.layout.n))
    start = state.theta.clone()
    for _ in range(3):
        pop = es.ask(s, state)
        assert all(torch.equal(pop.member(j)[w0.offset:w0.end], start[w0.offset:w0.end])
                   for j in range(pop.size))
        es.tell(s, state, pop, torch.randn(pop.size))
    moved = state.theta != start
    assert not moved[w0.offset:w0.end].any() and moved[w0.end:].all()


@pytest.mark.parametrize("spec, match", [
    ("weights.9=0", "not in this net"), ("weights.0", "NAME=FACTOR"), ("biases.0=-1", ">= 0"),
    ("weights.0=x", "NAME=FACTOR"), ("weights.0=inf", "finite"),
    ("weights.0=0, weights.0=2", "'weights.0' is given twice"),
    ("weights.0=0,biases.0=0,weights.1=0,biases.1=0,weights.2=0,biases.2=0", "freeze every"),
])
def test_bad_sigma_blocks_are_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        strategy(sigma_blocks=spec)


@pytest.mark.parametrize("kw, match", [
    ({"pop": 7}, "even"), ({"sigma": 0.0}, "sigma must be > 0, got 0.0"),
    ({"lr": -1.0}, "lr must be > 0, got -1.0"), ({"sigma_decay": 1.5}, r"sigma_decay must be in"),
    ({"weight_decay": float("nan")}, "weight_decay must be >= 0, got nan"),
    ({"rank": -1}, "rank"), ({"sigma_scale": "x"}, "sigma_scale"), ({"table_size": 10}, "small"),
    ({"sigma": math.inf}, "sigma must be finite, got inf"),
    ({"lr": math.inf}, "lr must be finite, got inf"),
    ({"weight_decay": math.inf}, "weight_decay must be finite, got inf"),
    ({"sigma": 0.1, "sigma_min": 0.2}, "sigma_min 0.2 is above sigma 0.1"),
    ({"lr": 0.01, "lr_min": 0.1}, "lr_min 0.1 is above lr 0.01"),
    ({"sigma_decay": 0.99}, "sigma_decay 0.99 needs sigma_min > 0"),
    ({"sigma": 1e-30}, "sigma 1e-30 is below 1e-18: the ES estimate divides by it"),
    ({"pop": 4.0}, "pop must be an integer, got 4.0"), ({"rank": 1.5}, "rank must be an integer"),
    ({"table_size": 1000.5}, "table_size must be an integer"),
    ({"pop": True}, "pop must be an integer, got True"),
    ({"beta1": 1.0}, r"beta1 must be in \[0, 1\), got 1.0"),
    ({"beta2": 1.0}, r"beta2 must be in \[0, 1\), got 1.0"), ({"eps": 0.0}, "eps must be > 0"),
    ({"sigma_decay": 0.9, "sigma_min": 1e-40}, "sigma_min 1e-40 is below 1e-18.* or 0 "),
    ({"lr": 0.1, "weight_decay": 10.0}, r"lr \* weight_decay = 1 must be < 1"),
])
def test_bad_hyperparameters_are_clear_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        strategy(**kw)


def test_weight_decay_shrinks_theta_by_lr_times_decay():
    """With every loss equal the estimate and Adam's step are zero: only the decay moves theta."""
    layout = es.Layout.of([2, 3, 2])
    s = es.Strategy(layout, pop=4, lr=0.1, weight_decay=0.5, table_size=1 << 12)
    theta0 = torch.randn(layout.n, generator=torch.Generator().manual_seed(0))
    state = es.init(s, theta0)
    es.tell(s, state, es.ask(s, state), torch.ones(4))
    assert torch.allclose(state.theta, theta0 * (1 - 0.1 * 0.5))


def test_offsets_reach_the_last_window_of_the_table():
    layout = es.Layout.of([1, 1, 1])
    s = es.Strategy(layout, pop=2, table_size=layout.n + 1)
    assert {s.offsets(g)[0] for g in range(64)} == {0, 1}


def test_lr_schedule_starts_at_lr_and_decays_to_its_floor():
    s = es.Strategy(es.Layout.of([1, 1, 1]), pop=2, lr=0.1, lr_decay=0.5, lr_min=0.01,
                    table_size=64)
    assert [s.lr_at(g) for g in (0, 1, 2, 10)] == [0.1, 0.05, 0.025, 0.01]


@given(st.integers(0, 2**64 - 1), st.integers(0, 2**40), st.integers(1, 3000))
@settings(max_examples=40, deadline=None)
def test_vectorised_hashes_are_the_scalar_hash(seed, generation, n):
    """The offsets come from the vectorised hash: it must be the scalar one (the reference that
    the golden values pin) for every pair, wrapping included."""
    got = es.counter_hashes(seed, generation, n=n).tolist()
    assert got == [es.counter_hash(seed, generation, p) for p in range(n)]


def test_the_noise_stream_is_the_one_earlier_runs_drew():
    """A checkpoint names its noise by (seed, generation, pair) only: if the table or the offset
    hash changed, resuming a run written by an earlier version would silently draw other noise.
    Golden values of this version (torch 2.13's CPU generator)."""
    assert es.noise_table(0, 3).tolist() == [1.5409960746765137, -0.293428897857666,
                                             -2.1787893772125244]
    assert es.counter_hash(0, 0, 0) == 2558736989570252433
    assert es.counter_hash(1, 2, 3) == 15020427595393229491  # (seed, generation, pair), in order
    s = es.Strategy(es.Layout.of([2, 4, 2]), pop=4, seed=0)
    assert [s.offsets(g) for g in range(3)] == [(14696910, 12173337), (16774686, 22874857),
                                                (26480551, 19830707)]


def test_a_strategy_refuses_a_device_or_table_this_machine_lacks():
    layout = es.Layout.of([2, 4, 2])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device here; use cpu"):
            es.Strategy(layout, pop=4, device="cuda")
    memory = es.physical_memory()
    if memory:
        too_big = memory // 4 + 1
        with pytest.raises(ValueError, match=r"noise table of \d+ values needs [0-9.]+ GiB, more "
                                             r"than this machine's [0-9.]+ GiB; lower table_size"):
            es.Strategy(layout, pop=4, table_size=too_big)
        too_many = 2 * (memory // es.MEMBER_BYTES // 2 + 1)
        with pytest.raises(ValueError, match=r"a population of \d+ needs about [0-9.]+ GiB for "
                                             r"its offsets, losses and ranks, more than this "
                                             r"machine's [0-9.]+ GiB; lower pop \(--pop\)"):
            es.Strategy(layout, pop=too_many)
        es.Strategy(layout, pop=2 * (too_many // 8))  # a quarter of the machine is allowed
