import contextlib
import copy

import pytest
import torch
from helpers import ENGINE_BATCH as BATCH
from helpers import ENGINE_SIZES as SIZES
from helpers import engine_setup, one_by_one
from hypothesis import given
from hypothesis import strategies as st

from deeplinear import engine as engine_module
from deeplinear import es
from deeplinear.arithmetic import CPU_FTZ_DAZ, IEEE, TF_GPU
from deeplinear.engine import (
    ALIGN,
    CHUNK_CACHE_BYTES,
    Engine,
    aligned,
    inplace_rule,
    inplace_staircase,
    member_accuracy,
    member_errors,
    member_losses,
    stacked_logits,
)
from deeplinear.nets import DeepLinear, dead_zone, staircase
from deeplinear.regimes import Regime


@contextlib.contextmanager
def one_thread():
    """The reference kernel: bmm runs every product single-threaded (see deeplinear.engine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("semantics", [TF_GPU, IEEE, CPU_FTZ_DAZ], ids=["tf_gpu", "ieee", "daz"])
def test_full_rank_is_bit_identical_to_the_net_member_by_member(semantics):
    net, s, pop, x, y = engine_setup(semantics)
    engine = Engine(net, s)
    out = engine.logits(pop, x)
    with one_thread():
        ref = one_by_one(net, pop, x)
    assert torch.equal(out, ref)
    if semantics.flushes:
        assert (out == 0).any() and (out != 0).any()  # the rule really acted
    assert torch.equal(engine.losses(pop, x, y), member_losses(ref, y))


@pytest.mark.parametrize("rank", [0, 2])
def test_an_engine_follows_the_net_when_its_semantics_or_scale_change(rank):
    """An engine built for a net computes what that net computes now: after ``net.semantics =``
    or ``net.scale_exp =`` it equals a fresh engine (and, full rank, the net member by member)."""
    net, s, pop, x = tiny_layer1(TF_GPU, rank)
    engine = Engine(net, s)
    before = engine.logits(pop, x)
    for change in ({"semantics": CPU_FTZ_DAZ}, {"semantics": IEEE}, {"scale_exp": 6}):
        for name, value in change.items():
            setattr(net, name, value)
        out = engine.logits(pop, x)
        assert torch.equal(out, Engine(net, s).logits(pop, x))
        if not rank:
            with one_thread():
                assert torch.equal(out, one_by_one(net, pop, x))
    assert not torch.equal(out, before)


def tiny_layer1(semantics, rank=0):
    """At k = 4, layer-1 products around 2^-126 and biases at the threshold 2^-122, one hidden
    layer and no output bias, so whether a product is flushed decides units and shows in the
    logits; the biases are not perturbed (their sigma factor is 0)."""
    sizes = [24, 40, 5]
    net = engine_setup(semantics, sizes=sizes)[0]
    net.scale_exp = 4
    with torch.no_grad():
        net.biases[0].copy_(net.biases[0].sign() * 2.0**-122)
        net.biases[1].zero_()
    s = es.Strategy(es.Layout.of(sizes), pop=10, sigma=0.3, rank=rank, table_size=1 << 16,
                    sigma_blocks="biases.0=0,biases.1=0")
    pop = es.ask(s, es.init(s, s.layout.flatten(net)))
    x = (torch.rand(BATCH, 24, generator=torch.Generator().manual_seed(3)) + 0.5) * 2.0**-125
    u1 = x @ s.layout.layer(pop.theta, 0)[0]
    assert ((u1 != 0) & (u1.abs() < 2.0**-126)).any()  # the case exists in this batch
    return net, s, pop, x


def test_layer1_products_below_the_smallest_normal_are_kept_where_products_are_kept(monkeypatch):
    """TF_GPU flushes results but not products (cuBLAS keeps subnormals): layer 1's subnormal
    products reach the bias, in the engine as in the net, and flushing them changes units."""
    net, s, pop, x = tiny_layer1(TF_GPU)
    out = Engine(net, s).logits(pop, x)
    with one_thread():
        assert torch.equal(out, one_by_one(net, pop, x))
    flush = engine_module.inplace_dead_zone(2.0**-126)
    monkeypatch.setattr(engine_module, "layer1_flush", lambda net: flush)
    assert not torch.equal(out, Engine(net, s).logits(pop, x))


@pytest.mark.parametrize("rank", [0, 3])
def test_layer1_products_below_the_smallest_normal_are_flushed_as_the_net_does(rank, monkeypatch):
    """CPU_FTZ_DAZ: layer 1's products are at true scale, so those below 2^-126 are lost before
    the bias, in the net (see DeepLinear.pre_activation) and here; full rank bit for bit."""
    net, s, pop, x = tiny_layer1(CPU_FTZ_DAZ, rank)
    out = Engine(net, s).logits(pop, x)
    if rank == 0:
        with one_thread():
            assert torch.equal(out, one_by_one(net, pop, x))
    monkeypatch.setattr(engine_module, "layer1_flush", lambda net: None)
    assert not torch.equal(out, Engine(net, s).logits(pop, x))  # the flush decides units here


def test_full_rank_2017_shapes_are_bit_identical_to_the_net():
    net, s, pop, x, _y = engine_setup(sizes=[784, 512, 10], pop=4, sigma=0.1, table_size=1 << 20)
    x = torch.rand(100, 784, generator=torch.Generator().manual_seed(3))
    with one_thread():
        ref = one_by_one(net, pop, x)
    assert torch.equal(Engine(net, s).logits(pop, x), ref)


@pytest.mark.parametrize("sizes, batch", [([24, 40, 32, 5], 2), ([2, 64, 64, 2], 3),
                                         ([3, 5, 2], 37), ([24, 40, 1, 5], BATCH)])
def test_small_and_one_column_products_are_bit_identical_to_the_net(sizes, batch):
    """Products under 400 multiply-adds (torch's bmm runs its own loop there) and a layer one
    unit wide (mm treats it as a matrix-vector product) round as the net's ``h @ w``."""
    net, s, pop, x, _y = engine_setup(sizes=sizes, pop=6)
    x = torch.rand(batch, sizes[0], generator=torch.Generator().manual_seed(3)) * 2
    with one_thread():
        ref = one_by_one(net, pop, x)
    assert torch.equal(Engine(net, s, chunk=4).logits(pop, x), ref)


@pytest.mark.parametrize("sizes", [[784, 512, 10], SIZES, [24, 40, 1, 5]])
def test_a_lone_member_is_bit_identical_to_the_net(sizes):
    """One member: a bmm over one matrix would run as a multi-threaded mm (the 2017 shapes split
    their sums across threads), so it runs twice in one batch."""
    net, s, pop, x, _y = engine_setup(sizes=sizes, pop=2, table_size=1 << 20)
    x = torch.rand(100, sizes[0], generator=torch.Generator().manual_seed(3))
    member = pop.member(1)
    with one_thread():
        ref = one_by_one(net, pop, x)[1]
    assert torch.equal(stacked_logits(net, s.layout, member[None], x)[0], ref)


def test_lowrank_with_a_one_unit_layer_does_not_depend_on_the_chunk():
    net, s, pop, x, _y = engine_setup(sizes=[24, 40, 1, 5], rank=1, pop=14)
    whole = Engine(net, s, chunk=4).logits(pop, x)
    assert torch.equal(Engine(net, s, chunk=6).logits(pop, x), whole)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_chunking_does_not_change_a_bit(rank):
    net, s, pop, x, y = engine_setup(rank=rank, pop=14)
    whole = Engine(net, s).losses(pop, x, y, with_accuracy=True)
    for chunk in (2, 4, 6):
        parts = Engine(net, s, chunk=chunk).losses(pop, x, y, with_accuracy=True)
        assert all(torch.equal(a, b) for a, b in zip(whole, parts, strict=True))
    assert Engine(net, s, max_bytes=1).members_per_chunk(BATCH) == 2


@pytest.mark.parametrize("pop, chunk", [(2, 2), (2, 16), (6, 4), (6, 16), (14, 4), (14, 6)])
def test_full_rank_is_bit_identical_for_any_chunk_and_population(pop, chunk):
    """Chunks that do not divide the population (a last chunk of one pair) and chunks larger than
    the population give the members' own forward passes exactly."""
    net, s, p, x, _y = engine_setup(pop=pop)
    with one_thread():
        ref = one_by_one(net, p, x)
    assert torch.equal(Engine(net, s, chunk=chunk).logits(p, x), ref)


@pytest.mark.parametrize("rank", [0, 2])
def test_buffers_are_allocated_once_and_reused(rank):
    net, s, pop, x, y = engine_setup(rank=rank, pop=14)
    engine = Engine(net, s, chunk=4)
    engine.losses(pop, x, y)
    first = {k: v.data_ptr() for k, v in engine._bufs.items()}
    nxt = es.ask(s, es.State(pop.theta * 1.01, pop.theta, pop.theta, generation=1))
    engine.losses(nxt, x, y)
    assert {k: v.data_ptr() for k, v in engine._bufs.items()} == first


def test_every_member_starts_on_a_cache_line(monkeypatch):
    net, s, pop, x, y = engine_setup(pop=8)
    assert s.layout.n % ALIGN  # 2,477 parameters: back to back, members would start misaligned
    seen = []

    def spy(net, layout, members, *args):
        seen.append(members)
        return stacked_logits(net, layout, members, *args)

    monkeypatch.setattr(engine_module, "stacked_logits", spy)
    Engine(net, s, chunk=8).losses(pop, x, y)
    (members,) = seen
    assert members.shape == (8, s.layout.n)
    assert all(m.data_ptr() % 64 == 0 for m in members)


@given(st.integers(0, 10**7))
def test_aligned_is_the_next_multiple_of_align(n):
    assert aligned(n) % ALIGN == 0 and n <= aligned(n) < n + ALIGN


def test_a_diverged_member_is_nan_alone_and_its_error_is_nan_too():
    """sigma 10**12.4: 13 of 20 members overflow to NaN logits. The others keep their own exact
    losses; a NaN member's argmax still names a class (accuracy up to 42% here), so its error
    fitness is NaN, to rank worst as its loss does."""
    net, s, pop, x, y = engine_setup(sigma=10**12.4, pop=20)
    loss, acc = Engine(net, s, chunk=4).losses(pop, x, y, with_accuracy=True)
    with one_thread():
        logits = one_by_one(net, pop, x)
    ref = member_losses(logits, y)
    bad = ~torch.isfinite(loss)
    assert 0 < bad.sum() < pop.size and (acc[bad] > 0).any()
    assert torch.equal(loss[~bad], ref[~bad]) and not torch.isfinite(ref[bad]).any()
    assert torch.equal(acc[~bad], member_accuracy(logits, y)[~bad])
    err = member_errors(loss, acc)
    assert err[bad].isnan().all() and torch.equal(err[~bad], 1 - acc[~bad].double())
    fitness = es.shaped_fitness(err)
    assert (fitness[bad] == fitness.max()).all() and (fitness[~bad] < fitness.max()).all()


@pytest.mark.parametrize("batch", [100, 1000])
def test_chunks_are_the_largest_whose_working_set_fits_the_cache_budget(batch):
    sizes = [784, 512, 512, 10]
    net = DeepLinear(sizes)
    full, low = (es.Strategy(es.Layout.of(sizes), pop=1000, rank=r) for r in (0, 1))
    activations = 4 * batch * (512 + 512 + 10)
    working_set = {0: 4 * full.layout.n + activations, 1: activations * 1.5}  # per member
    for s in (full, low):
        c = Engine(net, s).members_per_chunk(batch)
        per_member = working_set[s.rank]
        assert c % 2 == 0 and c * per_member <= CHUNK_CACHE_BYTES < (c + 2) * per_member


@pytest.mark.parametrize("semantics, rank, sizes", [
    (TF_GPU, 3, SIZES), (CPU_FTZ_DAZ, 3, SIZES), (TF_GPU, 7, SIZES), (TF_GPU, 3, [24, 40, 1, 5]),
    (CPU_FTZ_DAZ, 3, [24, 40, 1, 5])],
    ids=["tf_gpu", "daz", "rank_above_the_output_width", "one_unit", "one_unit_daz"])
def test_lowrank_is_exactly_its_claimed_formulation(semantics, rank, sizes):
    """``h @ W +- (h @ A) @ Bs.T``, then bias and rule as in the net's scaled mode; a rank above a
    layer's width (7 > 5 outputs) is allowed: the perturbation is then full rank. Ranks 1-2 are
    left to the tolerance test below: for products that narrow MKL picks kernels whose sums run
    in another order than a member's own ``h @ A`` (last bits, measured up to 5e-6)."""
    net, s, pop, x, _y = engine_setup(semantics, rank=rank, sizes=sizes)
    rule, layout = net.under(), s.layout
    factors = pop.lowrank_factors(range(s.pairs))
    refs = []
    with one_thread():
        for j in range(pop.size):
            p, sign = j // 2, 1 - 2 * (j % 2)
            h = x
            for i, (a, bs, db) in enumerate(factors):
                w, b = layout.layer(pop.theta, i)
                m = h @ w
                m = m + (h @ a[p]) @ bs[p].T if sign > 0 else m - (h @ a[p]) @ bs[p].T
                bj = b + db[p] if sign > 0 else b - db[p]
                if i == 0 and semantics is CPU_FTZ_DAZ:  # the product at true scale
                    m = dead_zone(m, semantics.fmt.min_normal)
                u = m + bj if i == 0 else (rule(m) if semantics is CPU_FTZ_DAZ else m) + rule(bj)
                h = rule(u)
            refs.append(h)
    assert torch.equal(Engine(net, s).logits(pop, x), torch.stack(refs))


@pytest.mark.parametrize("sizes", [SIZES, [24, 40, 1, 5]], ids=["wide", "one_unit"])
@pytest.mark.parametrize("rank", [1, 2])
def test_lowrank_matches_the_explicit_perturbed_net_to_float_tolerance(sizes, rank):
    # IEEE: no threshold a rounding error could cross
    net, s, pop, x, _y = engine_setup(IEEE, rank=rank, sizes=sizes)
    out = Engine(net, s).logits(pop, x)
    ref = one_by_one(net, pop, x)  # x @ (W + A @ Bs.T), materialised
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, one_by_one(net, es.ask(s, es.init(s, pop.theta * 1.01)), x))


@pytest.mark.parametrize("rank", [0, 2])
def test_every_flush_goes_through_the_engines_rule(rank):
    """``bench.ftz_share`` times the flush by swapping ``Engine.rule`` for the identity: swapped,
    the engine must compute the float-blind net (no flush left anywhere), full rank bit for bit."""
    net, s, pop, x, _y = engine_setup(TF_GPU, rank=rank)
    engine = Engine(net, s)
    real = engine.logits(pop, x)
    engine.rule = lambda u: u
    m, blind = copy.deepcopy(net), []
    with one_thread():
        swapped = engine.logits(pop, x)
        for j in range(pop.size):
            s.layout.load(pop.member(j), m)
            blind.append(m(x, mode="scaled", under=lambda u: u))
    blind = torch.stack(blind)
    assert not torch.allclose(real, blind)
    if rank:
        torch.testing.assert_close(swapped, blind, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(swapped, blind)


def test_inplace_rule_is_the_dead_zone():
    net = DeepLinear([2, 3, 2])
    t = net.threshold
    below = torch.nextafter(torch.tensor(t), torch.tensor(0.0)).item()
    u = torch.tensor([0.0, -0.0, t, -t, below, -below, 2 * t, float("nan"), float("inf"),
                      -float("inf"), 1e-30, -3.0])
    expected = net.under()(u)
    got = inplace_rule(net)(u.clone())
    assert torch.equal(got.nan_to_num(7.0), expected.nan_to_num(7.0))


def _bits(t):
    """Bit patterns, every NaN as one (signed zeros and infinities told apart)."""
    return t.nan_to_num(float("nan")).view(torch.int32).masked_fill(t.isnan(), 0x7FC00000)


@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1,
                max_size=64), st.sampled_from([-24, -9, 0, 1, 10, 100]), st.booleans())
def test_inplace_staircase_is_the_staircase_bit_for_bit(values, e, large):
    """Float32's staircase (threshold 2^23 steps) in place, for steps 2^e, on any float32: ties to
    even, signed zeros, subnormals, inf and NaN, with and without the largest values (which send
    a step below 1 to the masked form)."""
    step = 2.0**e
    edges = [0.5, 1.5, 2.5, -0.5, -2.5, 2.0**23 - 0.5, 2.0**23, 1e-45 / step, -0.0]
    u = torch.cat([torch.tensor(values, dtype=torch.float32),
                   torch.tensor(edges, dtype=torch.float32) * step,
                   torch.tensor([3.4e38, -3.4e38] if large else [], dtype=torch.float32)])
    expected = staircase(u, 2.0**23 * step, step)
    assert torch.equal(_bits(inplace_staircase(2.0**23 * step, step)(u.clone())), _bits(expected))


def test_the_staircase_below_unit_steps_runs_in_place_unless_a_value_is_too_large(monkeypatch):
    """IEEE at the 2017 scale (step 2^-24): in place (no mask built) while every |u| / step is
    finite; the masked form, to the same bits, for a chunk holding a larger value, inf or NaN."""
    import deeplinear.engine as engine_mod

    built = []
    monkeypatch.setattr(engine_mod, "staircase",
                        lambda *a: built.append(1) or staircase(*a))
    step = 2.0**-24
    rule = inplace_staircase(2.0**23 * step, step)
    u = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 4
    assert torch.equal(_bits(rule(u.clone())), _bits(staircase(u, 2.0**23 * step, step)))
    assert built == []
    for odd in (2.0**104, float("inf"), float("nan")):
        v = torch.cat([u, torch.tensor([odd])])
        assert torch.equal(_bits(rule(v.clone())), _bits(staircase(v, 2.0**23 * step, step)))
    assert len(built) == 3


@pytest.mark.parametrize("net", [
    lambda: DeepLinear([2, 3, 2], scale_exp=149, semantics=IEEE),
    lambda: DeepLinear([2, 3, 2], regime=Regime("subnormal-staircase", 149)),
    lambda: DeepLinear([2, 3, 2], regime=Regime("subnormal-staircase", 140)),  # step 2^-9
    lambda: DeepLinear([2, 3, 2], semantics=IEEE),  # step 2^-24: checked, then in place
    lambda: DeepLinear([2, 3, 2], regime=Regime("absorption", 9, "float16")),
], ids=["ieee-149", "staircase-149", "staircase-140", "ieee-125", "absorption"])
def test_inplace_rule_is_the_nets_rule(net):
    net = net()
    u = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 4
    u = torch.cat([u, torch.tensor([0.5, -0.5, 1.5, 2.0**23, -0.0, float("inf"), float("nan")])])
    assert torch.equal(_bits(inplace_rule(net)(u.clone())), _bits(net.under()(u)))


@pytest.mark.parametrize("net", [
    lambda: DeepLinear(SIZES, scale_exp=149, semantics=IEEE,
                       generator=torch.Generator().manual_seed(0)),
    lambda: DeepLinear(SIZES, regime=Regime("subnormal-staircase", 149),
                       generator=torch.Generator().manual_seed(0)),
], ids=["ieee-149", "staircase-149"])
def test_full_rank_on_the_staircase_is_bit_identical_member_by_member(net):
    net = net()
    _, s, pop, x, _y = engine_setup(IEEE)
    out = Engine(net, s).logits(pop, x)
    with one_thread():
        ref = one_by_one(net, pop, x)
    assert torch.equal(out, ref)
    h = net.trace(x)[0][1]  # the rule really acted: hidden values on the integer grid
    assert torch.equal(h, h.round()) and not torch.equal(h, net.trace(x, under=lambda u: u)[0][1])


def test_engine_refuses_mismatched_inputs():
    net, s, pop, x, y = engine_setup()
    with pytest.raises(ValueError, match="do not match"):
        Engine(DeepLinear([24, 8, 5]), s)
    with pytest.raises(ValueError, match="batch, 24"):
        Engine(net, s).losses(pop, x[:, :3], y)
    with pytest.raises(ValueError, match="even"):
        Engine(net, s, chunk=3)
    with pytest.raises(ValueError, match="the minibatch is empty"):
        Engine(net, s).losses(pop, x[:0], y[:0])
    with pytest.raises(ValueError, match=r"labels span .* but the model has 5 outputs"):
        Engine(net, s).losses(pop, x, y + 5)
    with pytest.raises(ValueError, match=r"labels are torch\.float32"):
        Engine(net, s).losses(pop, x, y.float())
    assert torch.equal(Engine(net, s).losses(pop, x, y.int()), Engine(net, s).losses(pop, x, y))
    with pytest.raises(ValueError, match=r"need x of shape \(batch, 24\), got \(24,\)"):
        Engine(net, s).losses(pop, x[0], y[:1])  # a lone row: not 24 rows of one feature
    with pytest.raises(ValueError, match=r"need a flat vector of \d+ parameters for layout "
                                         r"24,.*got shape \(5,\)"):
        s.layout.load(torch.zeros(5), net)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_generation_stays_on_the_strategy_device(rank):
    """Device plumbing, checked on the meta device (CI has no GPU): any tensor the engine or
    ask/tell made on the CPU instead would fail on the mix of devices."""
    net = DeepLinear(SIZES).to("meta")
    s = es.Strategy(es.Layout.of(SIZES), pop=6, rank=rank, table_size=1 << 14, device="meta")
    state = es.init(s, torch.zeros(s.layout.n))  # from the CPU, as a checkpoint loads it
    pop = es.ask(s, state)
    x, y = torch.rand(BATCH, SIZES[0]), torch.randint(0, SIZES[-1], (BATCH,))
    loss, acc = Engine(net, s, chunk=2).losses(pop, x, y, with_accuracy=True)
    assert loss.device.type == acc.device.type == "meta" and loss.shape == (6,)
    es.tell(s, state, pop, torch.rand(6))  # the shaped fitness is computed on the CPU
    assert state.generation == 1
    assert {t.device.type for t in (state.theta, state.m, state.v, pop.member(1))} == {"meta"}
