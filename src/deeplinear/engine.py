"""Loss of every member of an ES population on one minibatch, in a few large batched GEMMs.

Why a separate engine: a generation of the 2017 net (784-512-512-10, pop 500, batch 100) is 67
GFLOP, and a naive loop over members spends more time allocating, drawing noise and dispatching
than multiplying. Here the population is cut into chunks of members that fit a memory budget;
every chunk runs through preallocated buffers (writing a fresh 32 MiB tensor took 7.6 ms here,
a reused one 2.0 ms: the rest is page faults; the CPU timings in this module's comments come
from ``benchmarks/source_figures.py``), each layer is one ``torch.bmm`` over the
stacked member weights (or one shared GEMM plus thin low-rank corrections) and the underflow
rule is applied in place.

Semantics: exactly the net's ``scaled`` mode (:meth:`DeepLinear.trace`), including its per-layer
rule (``net.under()``). Under a flushing semantics the dead zone ``|u| < t -> 0`` runs as one
in-place ``hardshrink`` with ``lambd`` the float32 just below ``t`` (``|u| <= lambd`` is
``|u| < t`` in float32, NaN passes through as in ``dead_zone``); the only difference is that a
flushed negative value becomes ``+0`` instead of ``-0``, which no later op here can observe
(a zero's sign only survives into a sum of zeros, and the loss reads logits through ``exp``).

Full-rank mode materialises each member's weights (``theta +- noise * sigma_vec``, the same float
ops as :meth:`Population.member`) and on the CPU is *bit-identical* to running the net on them one
by one with one thread: CPU bmm (MKL's batched sgemm) runs each product with the single-threaded
kernel whatever the thread count, while a multi-threaded ``mm`` may split the inner reduction
across threads for some shapes (measured for 100x784 @ 784x512), which changes the last bits.

Low-rank mode never forms ``W + A @ Bs.T``; per layer it computes ``h @ W`` once for all members
(layer 1: once per generation, the input is shared) and adds the member's ``(h @ A) @ Bs.T``
(antithetic partners share ``A`` and ``Bs``, so they share one bmm). In floats this is close to,
but not bit-identical with, ``h @ (W + A @ Bs.T)``; a trained net is always evaluated with the
real forward pass.

Device: the engine computes on ``strategy.device`` (buffers, inputs and losses there). On CUDA the
bit-identity above is not promised: cuBLAS may choose another algorithm for a batched product
than for a single one (tested there to rounding, ``tests/test_cuda.py``). There every op is a
kernel launch, so a chunk is as large as ``max_bytes`` allows and the pairs' noise is gathered in
one op (see :data:`CHUNK_CACHE_BYTES`, :meth:`Population.deltas`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deeplinear.data import check_labels
from deeplinear.es import Layout, Population, Strategy
from deeplinear.nets import DeepLinear, staircase

DEFAULT_MAX_BYTES = 256 << 20
# A chunk's working set (its members' weights, full rank, and activations) stays within this
# many bytes, so it is still in cache when the next op reads it. Measured on the 2-core Xeon VM,
# results bit-identical for every chunk size (benchmarks/source_figures.py, kept in
# benchmarks/results/source_figures_cpu2_s22.txt): 2017 net, full rank, pop 500, 2 threads,
# batch 100: 1.12x faster with the 10 members per chunk this gives (29 MiB) than with 60; low
# rank, pop 300, one thread: 1.15x with 54 (32 MiB) than with 300 at batch 100, 1.13x with 4
# than with 32 at batch 1000. Counting the activations too (until then only the weights, full
# rank) made the 64-256-256-10 net 1.15x (2 threads) and 1.24x (one) faster at batch 1000, 12
# members per chunk instead of 98, and the 2017 net 1.02x (4 instead of 12).
# On a GPU there is no such cache to fit and every op of a chunk is a kernel launch (~5-10 us):
# there only ``max_bytes`` bounds a chunk (measured on an H100, see benchmarks/README.md).
CHUNK_CACHE_BYTES = 32 << 20
ALIGN = 16
# Each member's weights start on a 64-byte boundary (16 float32, a cache line and an AVX-512
# vector): the 2017 net has 669,706 parameters, so back to back every member but the first starts
# misaligned, and MKL's batched sgemm ran its layers 1-2 slower on such matrices (2 threads, 12
# members, batch 100: 299 -> 310 and 296 -> 306 GFLOP/s padded).


def aligned(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`ALIGN` (a member's row length in the buffer)."""
    return -(-n // ALIGN) * ALIGN


def member_bytes(layout: Layout, batch: int, rank: int = 0) -> float:
    """A member's bytes in a chunk (what :data:`CHUNK_CACHE_BYTES` bounds on the CPU): its
    activations and, full rank (``rank`` 0), its weights."""
    activations = 4 * batch * sum(layout.sizes[1:]) * (1.5 if rank else 1.0)
    return activations + (0 if rank else 4 * layout.n)


def inplace_dead_zone(threshold: float) -> Callable[[Tensor], Tensor]:
    """``dead_zone(u, threshold)`` in place: ``|u| < threshold -> 0`` as one ``hardshrink``."""
    lambd = float(np.nextafter(np.float32(threshold), np.float32(0)))
    return lambda u: torch.hardshrink(u, lambd, out=u)


def inplace_staircase(threshold: float, step: float) -> Callable[[Tensor], Tensor]:
    """``staircase(u, threshold, step)`` in place, for float32's staircase (threshold = 2**23
    step): ``u / step``, rounded to even, times ``step``, with no mask.

    Why it is the same bit for bit wherever ``u / step`` is finite: below the threshold it is the
    staircase's own expression; at or above it, ``u / step`` is exact (a power of two) and at
    least 2**23, so already an integer: rounding leaves it and ``* step`` gives ``u`` back. For
    ``step >= 1`` it is always finite. For smaller steps (IEEE at the 2017 scale: 2**-24) one
    reduction checks the values first, and the masked form takes any chunk holding one beyond
    ``2**127 step``, inf or NaN (also on a GPU, where the check would wait on the device).
    Why: the masked form allocates five tensors per layer; side by side, ES (2-64-64-2, pop 100,
    batch 256, one thread, 300 generations) took 6.25 s with it and 2.41 s in place on the
    staircase regime, 7.55 s and 2.64 s for an IEEE net at k=125, to the same weights
    (``benchmarks/source_figures.py``, kept in
    ``benchmarks/results/source_figures_cpu2_s21.txt``)."""
    def inplace(u: Tensor) -> Tensor:
        return u.div_(step).round_().mul_(step)

    if step >= 1:
        return inplace
    limit = math.ldexp(step, 127)

    def checked(u: Tensor) -> Tensor:
        if u.device.type == "cpu" and u.numel():
            lo, hi = torch.aminmax(u)
            if -limit <= lo.item() and hi.item() <= limit:  # False for NaN
                return inplace(u)
        return u.copy_(staircase(u, threshold, step))  # the masked form
    return checked


def inplace_rule(net: DeepLinear) -> Callable[[Tensor], Tensor]:
    """The net's underflow rule (``net.under()``) as an in-place function of a float32 tensor."""
    if net.semantics.flushes:
        return inplace_dead_zone(net.threshold)
    grid = net.staircase_grid()
    if grid is not None:
        return inplace_staircase(*grid)
    rule = net.under()
    return lambda u: u.copy_(rule(u))


def layer1_flush(net: DeepLinear) -> Callable[[Tensor], Tensor] | None:
    """Where the semantics flush a product (scope ``all``) or read it through DAZ, layer 1's
    product (at true scale, before the bias) loses values below the format's smallest normal, as
    in the net's scaled mode; None where nothing is flushed there."""
    sem = net.semantics
    return inplace_dead_zone(sem.fmt.min_normal) if sem.matmul_flush else None


def member_losses(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of each member: ``logits`` (members, batch, classes) -> (members,)."""
    c, b, k = logits.shape
    ce = F.cross_entropy(logits.reshape(c * b, k), y.expand(c, b).reshape(-1), reduction="none")
    return ce.view(c, b).mean(1)


def member_accuracy(logits: Tensor, y: Tensor) -> Tensor:
    return (logits.argmax(-1) == y).float().mean(-1)


def member_errors(loss: Tensor, accuracy: Tensor) -> Tensor:
    """``1 - accuracy`` as a fitness, NaN where the loss is not finite.

    Why: a diverged member's argmax over NaN logits still names a class, so its accuracy is
    whatever that class scores (measured up to 42% on a 5-class batch); its error must rank it
    worst as its loss would, and a generation of only such members must stop the run.
    """
    return torch.where(torch.isfinite(loss), 1 - accuracy.double(), math.nan)


BMM_LOOP_BELOW = 400
# torch's CPU bmm computes a product of fewer than this many multiply-adds (rows x inner x
# columns) in its own loop, not MKL's, and MKL's mm handles a single output column as a
# matrix-vector product: both round unlike the net's ``h @ w`` (measured: 399 differs, 400 not).


def member_products(h: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """``h[j] @ w[j]`` for every member ``j``, rounded exactly as the net's own ``h @ w``.

    One bmm where that rounds like ``mm`` (every product of :data:`BMM_LOOP_BELOW` or more
    multiply-adds with two or more columns, the shapes that cost time), else ``mm`` member by
    member. A bmm over one matrix runs as a plain multi-threaded ``mm``, which may split its sums
    across threads and round otherwise: a lone member runs twice in one batch, one copy kept.
    """
    m, b, k = h.shape
    n = w.shape[2]
    if b * k * n < BMM_LOOP_BELOW or n == 1:
        if out is None:
            out = torch.empty(m, b, n, device=h.device)
        for j in range(m):
            torch.mm(h[j], w[j], out=out[j])
        return out
    if m == 1:
        twice = torch.bmm(h.expand(2, b, k), w.expand(2, k, n))[:1]
        return twice if out is None else out.copy_(twice)
    return torch.bmm(h, w, out=out)


def stacked_logits(net: DeepLinear, layout: Layout, members: Tensor, x: Tensor,
                   buf: Callable[..., Tensor] | None = None,
                   rule: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Logits ``(m, batch, classes)`` of ``m`` parameter vectors ``members`` ``(m, layout.n)`` on
    ``x``, in the net's scaled mode: one ``bmm`` per layer (:func:`member_products`), the rule
    applied in place.

    Bit-identical to loading each member into ``net`` and running ``net(x, mode="scaled")`` with
    one thread, up to the sign of a flushed zero (see the module docstring). ``buf(name,
    *shape)`` supplies reused output tensors (the engine's buffers); without it each layer
    allocates. ``rule`` replaces :func:`inplace_rule` (the engine passes its own, so swapping it
    out, as ``bench`` does to time the flush, reaches this path too).
    """
    rule, flush_matmul = rule or inplace_rule(net), net.semantics.matmul_flush
    flush1 = layer1_flush(net)
    m, b = len(members), len(x)
    h = x.expand(m, *x.shape)
    for i in range(len(layout.weights)):
        w, bias = layout.layer(members, i)
        out = buf(f"u{i}", m, b, w.shape[2]) if buf is not None else None
        u = member_products(h, w, out)
        if i == 0:
            if flush1 is not None:
                flush1(u)
            u += bias[:, None]
        else:
            if flush_matmul:
                rule(u)
            u += rule(bias.clone())[:, None]
        h = rule(u)
    return h


class Engine:
    """Preallocated buffers and the batched forward for one net shape and strategy.

    ``max_bytes`` bounds the chunk buffers (weights and activations); ``chunk`` (an even member
    count) overrides it. Results do not depend on the chunk size.
    """

    def __init__(self, net: DeepLinear, strategy: Strategy, max_bytes: int = DEFAULT_MAX_BYTES,
                 chunk: int | None = None) -> None:
        if tuple(net.sizes) != strategy.layout.sizes:
            raise ValueError(f"net sizes {net.sizes} do not match the strategy's layout "
                             f"{list(strategy.layout.sizes)}")
        if chunk is not None and (chunk < 2 or chunk % 2):
            raise ValueError(f"chunk must be an even number of members >= 2, got {chunk}")
        self.net, self.strategy, self.device = net, strategy, torch.device(strategy.device)
        self.max_bytes, self.chunk = max_bytes, chunk
        self._bufs: dict[str, Tensor] = {}
        self._net_key: tuple[object, int] | None = None
        self._follow_net()

    def _follow_net(self) -> None:
        """The net's rule, read again whenever its semantics or scale changed since last time.

        Why: ``net.semantics = ...`` on a net an engine was built for must change what the
        engine computes, as it changes the net's own forward. Only on a change, so a rule swapped
        in by hand (``bench`` times the flush against the identity) stays until then."""
        key = (self.net.semantics, self.net.scale_exp)
        if key != self._net_key:
            self._net_key = key
            self.rule, self.flush_matmul = inplace_rule(self.net), self.net.semantics.matmul_flush
            self.flush1 = layer1_flush(self.net)

    # -- buffers ---------------------------------------------------------------------------------
    def _buf(self, name: str, *shape: int) -> Tensor:
        """A contiguous float32 tensor of ``shape`` backed by a reused flat buffer."""
        numel = math.prod(shape)
        flat = self._bufs.get(name)
        if flat is None or flat.numel() < numel:
            flat = self._bufs[name] = torch.empty(numel, device=self.device)
        return flat[:numel].view(shape)

    def members_per_chunk(self, batch: int) -> int:
        s = self.strategy
        if self.chunk is not None:
            return min(self.chunk, s.pop)
        budget = self.max_bytes
        if self.device.type == "cpu":
            budget = min(budget, CHUNK_CACHE_BYTES)
        c = int(budget // member_bytes(s.layout, batch, s.rank))
        return max(2, min(c // 2 * 2, s.pop))

    # -- evaluation ------------------------------------------------------------------------------
    @overload
    def losses(self, pop: Population, x: Tensor, y: Tensor,
               with_accuracy: Literal[False] = False) -> Tensor: ...

    @overload
    def losses(self, pop: Population, x: Tensor, y: Tensor,
               with_accuracy: Literal[True]) -> tuple[Tensor, Tensor]: ...

    @torch.no_grad()
    def losses(self, pop: Population, x: Tensor, y: Tensor,
               with_accuracy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Mean cross-entropy of each member on ``(x, y)``, shape ``(pop.size,)`` (+ accuracy).

        A member whose weights overflow gets its own NaN or inf loss (the fitness shaping ranks
        it worst); no other member's value changes, as each row of a product is its own sum.
        """
        self._check_x(x)  # first: a lone row (n_in,) would count its features as rows
        if len(y) != len(x):
            raise ValueError(f"got {len(x)} inputs but {len(y)} labels; pass one label per row")
        if len(x) == 0:
            raise ValueError("the minibatch is empty: every loss would be NaN; pass rows")
        check_labels(y, self.net.sizes[-1], values=y.device.type == "cpu")
        y = y.to(self.device, torch.long)
        loss, acc = (torch.empty(pop.size, device=self.device) for _ in range(2))
        for start, logits in self._chunks(pop, x):
            loss[start:start + len(logits)] = member_losses(logits, y)
            if with_accuracy:
                acc[start:start + len(logits)] = member_accuracy(logits, y)
        return (loss, acc) if with_accuracy else loss

    @torch.no_grad()
    def logits(self, pop: Population, x: Tensor) -> Tensor:
        """Every member's output on ``x``, ``(pop.size, batch, classes)`` (a new tensor)."""
        self._check_x(x)
        return torch.cat([out.clone() for _, out in self._chunks(pop, x)])

    def _check_x(self, x: Tensor) -> None:
        """``x`` of shape ``(batch, n_in)``: checked by each public entry; ``_chunks`` trusts it."""
        n_in = self.strategy.layout.sizes[0]
        if x.dim() != 2 or x.shape[1] != n_in:
            raise ValueError(f"need x of shape (batch, {n_in}), got {tuple(x.shape)}")

    def _chunks(self, pop: Population, x: Tensor) -> Iterator[tuple[int, Tensor]]:
        """``(first member, logits of the chunk)``; the logits live in a reused buffer."""
        if pop.strategy != self.strategy:
            raise ValueError("population comes from another strategy than this engine's")
        self._follow_net()
        x = x.to(self.device, torch.float32).contiguous()
        c = self.members_per_chunk(len(x))
        base = None  # low rank: x @ W1, shared by every member
        if self.strategy.rank:
            w1, _ = self.strategy.layout.layer(pop.theta, 0)
            base = torch.mm(x, w1, out=self._buf("base", len(x), w1.shape[1]))
        for start in range(0, pop.size, c):
            pairs = range(start // 2, min(start + c, pop.size) // 2)
            if base is not None:
                yield start, self._chunk_lowrank(pop, pairs, x, base)
            else:
                yield start, self._chunk_full(pop, pairs, x)

    def _chunk_full(self, pop: Population, pairs: range, x: Tensor) -> Tensor:
        n, k = self.strategy.layout.n, len(pairs)
        members = self._buf("members", k, 2, aligned(n))[..., :n]
        d = pop.deltas(pairs, out=members[:, 1])  # the minus member's slot holds the delta first
        torch.add(pop.theta, d, out=members[:, 0])
        torch.sub(pop.theta, d, out=d)
        return stacked_logits(self.net, self.strategy.layout, members.flatten(0, 1), x, self._buf,
                              self.rule)

    def _chunk_lowrank(self, pop: Population, pairs: Sequence[int], x: Tensor,
                       base: Tensor) -> Tensor:
        if len(pairs) == 1:
            # A bmm over a batch of one matrix runs as a plain mm, and for rank 1 that is a gemv
            # whose sums round differently from the batched kernel: so a lone pair would depend
            # on the chunking. Evaluate it twice in one batch instead and keep one copy.
            return self._chunk_lowrank(pop, [pairs[0], pairs[0]], x, base)[:2]
        layout, k, b = self.strategy.layout, len(pairs), len(x)
        factors = pop.lowrank_factors(pairs)
        h = x  # the layer's input (layer 1 reads it through base and x @ A)
        for i, (a, bs, db) in enumerate(factors):
            w, bias = layout.layer(pop.theta, i)
            n_in, n_out = w.shape
            u = self._buf(f"u{i}", k, 2, b, n_out)
            if i == 0:
                xa = torch.bmm(x.expand(k, b, n_in), a, out=self._buf("ha", k, b, a.shape[2]))
                delta = torch.bmm(xa, bs.transpose(1, 2), out=self._buf("delta", k, b, n_out))
                torch.add(base, delta, out=u[:, 0])
                torch.sub(base, delta, out=u[:, 1])
                if self.flush1 is not None:
                    self.flush1(u)
            elif n_out == 1:
                # mm with one output column rounds a row by its position in the matrix, which
                # would tie a member's result to its chunk: every product member by member (a
                # rare shape, so the pair's factors are simply copied for both members)
                hm = h.view(2 * k, b, n_in)
                member_products(hm, w.expand(2 * k, n_in, 1), out=u.view(2 * k, b, 1))
                a2, bs2 = (t.repeat_interleave(2, dim=0) for t in (a, bs.transpose(1, 2)))
                delta = member_products(member_products(hm, a2), bs2).view(k, 2, b, 1)
                u[:, 0] += delta[:, 0]
                u[:, 1] -= delta[:, 1]
                if self.flush_matmul:
                    self.rule(u)
            else:
                torch.mm(h.view(2 * k * b, n_in), w, out=u.view(2 * k * b, n_out))
                ha = torch.bmm(h.view(k, 2 * b, n_in), a, out=self._buf("ha", k, 2 * b, a.shape[2]))
                delta = torch.bmm(ha, bs.transpose(1, 2), out=self._buf("delta", k, 2 * b, n_out))
                delta = delta.view(k, 2, b, n_out)
                u[:, 0] += delta[:, 0]
                u[:, 1] -= delta[:, 1]
                if self.flush_matmul:
                    self.rule(u)
            member_bias = self._buf(f"b{i}", k, 2, n_out)
            torch.add(bias, db, out=member_bias[:, 0])
            torch.sub(bias, db, out=member_bias[:, 1])
            if i > 0:
                self.rule(member_bias)
            u += member_bias[:, :, None]
            h = self.rule(u.view(2 * k, b, n_out))
        return h
