"""OpenAI-ES (Salimans et al. 2017) as explicit ``init`` / ``ask`` / ``tell`` over a small state.

Why ES: the network's only nonlinearity is the underflow rule, a dead zone whose derivative is zero
almost everywhere and which jumps at the threshold; backprop cannot see the jump, a search
distribution smooths it. The strategy is the textbook one: antithetic pairs, centred-rank fitness
shaping, Adam on the gradient estimate, decoupled L2 weight decay (``theta *= 1 - lr * wd`` per
generation, as AdamW: its strength does not depend on the scale of the noisy estimate; so
``lr * weight_decay < 1``), and schedules ``max(sigma_min, sigma * sigma_decay**g)`` (likewise
for ``lr``) that are pure functions of the generation ``g`` (a floor is at most its start, and a
decaying sigma needs one: 0 is no floor, sigma would reach 0 and the estimate divides by it).

Coordinates. The strategy works in *normalised* coordinates ``theta' = theta / scale``, one scale
per parameter from the :class:`Layout`: with ``sigma_scale='fan_in'`` a weight matrix gets
``1/sqrt(fan_in)`` and a bias 1, so ``sigma`` is the std of each layer's pre-activation change (in
the scaled units the dead zone lives in, half-width ``net.threshold``) for inputs of unit rms,
whatever the layer's width; a plain sigma on 784 inputs moves layer 1 by ~28x more than on 1.
Noise, Adam's ``lr`` and ``weight_decay`` all act on ``theta'``; a member is
``theta + sigma * scale * eps`` in the net's own units.

Noise is never stored per member: it comes from one shared table of N(0, 1) float32 drawn once from
``seed`` (as in evolution-strategies-starter), and antithetic pair ``p`` of generation ``g`` reads
the slice at an offset that is a counter-based hash of ``(seed, g, p)``. Why a table rather than a
generator per pair: a slice costs nothing, while drawing 250 pairs x 670k normals per generation
with torch's CPU generator takes longer than the generation's GEMMs (264 M normals/s on 2 cores:
0.63 s, against 0.20 s for its 67 GFLOP at the same run's sgemm peak;
``benchmarks/source_figures.py``). Both members of a pair read the same slice.

Low-rank noise (EGGROLL, Sarkar et al. 2025, ``rank=r >= 1``): a pair's noise vector holds, per
layer, ``A`` (in x r), ``B`` (out x r) and a full bias perturbation; the matrix perturbation is
``sigma * scale_l * A @ B.T / sqrt(r)``. The gradient estimate uses the same ``A``, ``B``.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from deeplinear.arithmetic import integer
from deeplinear.nets import parse_sizes

SIGMA_SCALES = ("fan_in", "none")
TABLE_SIZE = 1 << 25  # default noise table: 128 MiB of float32, 50x the 2017 net's parameters
# Host memory a generation takes per member, whatever the net: its offset, loss and fitness rank
# (measured with `deeplinear train --method es --dataset spirals --steps 1`: peak resident
# 664 MB at pop 10^6, 943 MB at 4 * 10^6, so ~95 bytes a member)
MEMBER_BYTES = 100
_MASK64 = (1 << 64) - 1
MIN_SIGMA = 1e-18
# The estimate grows as 1/sigma (up to ~3/sigma per coordinate): somewhere below 1e-20 Adam's
# squared estimate overflows float32 and every update is silently 0 (measured: updates at 1e-20,
# none at 1e-30), below ~1e-38 the estimate itself is inf. No useful sigma is that small: a
# perturbation of 1e-18 is below float32's resolution of any weight larger than 1e-11, so every
# member would equal the centre.


class DivergedError(RuntimeError):
    """Every member of a generation had a non-finite loss: the run cannot continue."""


# --- parameter layout ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One parameter tensor of a DeepLinear inside the flat vector."""

    name: str  # its state_dict key: weights.i or biases.i
    layer: int
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class Layout:
    """Where each weight and bias of a DeepLinear lives in one flat float32 vector.

    Order ``W1, b1, W2, b2, ...`` with each matrix row-major ``(in, out)``, so a batch of flat
    vectors ``(members, n)`` gives every layer as a strided view ``(members, in, out)`` for bmm.
    """

    sizes: tuple[int, ...]
    weights: tuple[Block, ...]
    biases: tuple[Block, ...]
    n: int

    @classmethod
    def of(cls, sizes: Sequence[int] | str) -> Layout:
        sizes = tuple(parse_sizes(sizes))
        weights, biases, offset = [], [], 0
        for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
            weights.append(Block(f"weights.{i}", i, (n_in, n_out), offset))
            offset += n_in * n_out
            biases.append(Block(f"biases.{i}", i, (n_out,), offset))
            offset += n_out
        return cls(sizes, tuple(weights), tuple(biases), offset)

    @property
    def blocks(self) -> tuple[Block, ...]:
        return tuple(b for pair in zip(self.weights, self.biases, strict=True) for b in pair)

    def layer(self, flat: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """Views ``(W, b)`` of layer ``i`` in ``flat`` of shape ``(..., n)``."""
        w, b = self.weights[i], self.biases[i]
        lead = flat.shape[:-1]
        return flat[..., w.offset:w.end].view(*lead, *w.shape), flat[..., b.offset:b.end]

    def flatten(self, net: nn.Module) -> Tensor:
        """The net's parameters as one new flat float32 vector."""
        params = self._params(net)
        return torch.cat([params[b.name].detach().reshape(-1).float() for b in self.blocks])

    def load(self, flat: Tensor, net: nn.Module) -> None:
        """Copy ``flat`` into the net's parameters (in place)."""
        params = self._params(net)
        if flat.shape != (self.n,):
            raise ValueError(f"need a flat vector of {self.n} parameters for layout "
                             f"{','.join(map(str, self.sizes))}, got shape {tuple(flat.shape)}")
        with torch.no_grad():
            for b in self.blocks:
                params[b.name].copy_(flat[b.offset:b.end].view(b.shape))

    def scale(self, kind: str, blocks: str = "") -> Tensor:
        """Per-parameter scale of the normalised coordinates (see the module docstring), times
        the per-block multipliers of ``blocks`` (:func:`parse_sigma_blocks`)."""
        if kind not in SIGMA_SCALES:
            raise ValueError(f"unknown sigma_scale {kind!r}; use {', '.join(SIGMA_SCALES)}")
        s = torch.ones(self.n)
        if kind == "fan_in":
            for w in self.weights:
                s[w.offset:w.end] = 1.0 / math.sqrt(w.shape[0])
        by_name = {b.name: b for b in self.blocks}
        for name, factor in parse_sigma_blocks(blocks).items():
            if name not in by_name:
                raise ValueError(f"sigma block {name!r} is not in this net; its blocks are "
                                 f"{', '.join(by_name)}")
            s[by_name[name].offset:by_name[name].end] *= factor
        if not s.any():
            raise ValueError(f"sigma blocks {blocks!r} freeze every block; leave one to search")
        return s

    def _params(self, net: nn.Module) -> dict[str, Tensor]:
        params: dict[str, Tensor] = dict(net.named_parameters())
        if {k: tuple(v.shape) for k, v in params.items()} != {b.name: b.shape for b in self.blocks}:
            raise ValueError(f"net does not match layout {','.join(map(str, self.sizes))}: "
                             "build the strategy from this net's sizes")
        return params


# --- the strategy's fixed part -------------------------------------------------------------------


def physical_memory() -> int | None:
    """This machine's RAM in bytes, where the OS says (None elsewhere)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(need: int, what: str, fix: str, use: str = "") -> None:
    """Refuse, in one line, work that needs more than this machine's RAM: ``"{what} X GiB{use},
    more than this machine's Y GiB; {fix}"``. Why: past RAM the OOM killer ends the process
    without a word (where overcommit lets it allocate), or torch raises deep inside."""
    memory = physical_memory()
    if memory and need > memory:
        raise ValueError(f"{what} {need / 2**30:.1f} GiB{use}, more than this machine's "
                         f"{memory / 2**30:.1f} GiB; {fix}")


@functools.lru_cache(maxsize=4)
def noise_table(seed: int, size: int, device: str = "cpu") -> Tensor:
    """``size`` N(0, 1) float32 values, a pure function of ``seed`` (cached: it is read-only).

    Drawn on the CPU and copied to ``device``, so a run on a GPU uses the very same noise. The
    cache keeps the last four tables (128 MiB each at the default size, whatever the net's):
    ``noise_table.cache_clear()`` frees them, e.g. in a notebook after a sweep over seeds."""
    if torch.device(device).type != "cpu":
        return noise_table(seed, size).to(device)
    return torch.randn(size, generator=torch.Generator().manual_seed(seed))


_SPLITMIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def _splitmix64(x: int) -> int:
    z = (x + _SPLITMIX[0]) & _MASK64
    z = ((z ^ (z >> 30)) * _SPLITMIX[1]) & _MASK64
    z = ((z ^ (z >> 27)) * _SPLITMIX[2]) & _MASK64
    return z ^ (z >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """:func:`_splitmix64` of each uint64 in ``x`` (uint64 arithmetic wraps as ``& _MASK64``)."""
    a, b, c = (np.uint64(k) for k in _SPLITMIX)
    z = x + a
    z = (z ^ (z >> np.uint64(30))) * b
    z = (z ^ (z >> np.uint64(27))) * c
    return z ^ (z >> np.uint64(31))


def counter_hash(*keys: int) -> int:
    """A 64-bit hash of integer keys (splitmix64 chained): counter-based, no generator state."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (k & _MASK64))
    return h


def counter_hashes(*keys: int, n: int) -> np.ndarray:
    """``counter_hash(*keys, i)`` for ``i`` in ``range(n)``, as uint64, in one vectorised pass.

    Why: a population of 10^6 members has 5 * 10^5 pairs, and hashing each in Python took 0.8 s
    per generation; this takes milliseconds."""
    return _splitmix64_array(np.uint64(counter_hash(*keys)) ^ np.arange(n, dtype=np.uint64))


@dataclass(frozen=True)
class Strategy:
    """Hyperparameters and derived constants of one ES run (nothing here changes during a run).

    ``rank=0`` is full-rank noise; ``rank>=1`` low-rank (EGGROLL). ``pop`` counts members (even:
    antithetic pairs). ``device`` holds the noise table, the centre and the optimiser state; the
    shaped fitness and everything derived from the layout stay on the CPU, so a run on a GPU
    uses the same noise and ranks as one on the CPU.
    """

    layout: Layout
    pop: int
    sigma: float = 0.1
    sigma_decay: float = 1.0
    sigma_min: float = 0.0
    sigma_scale: str = "fan_in"
    sigma_blocks: str = ""  # per-block multipliers, e.g. "weights.0=0" (see parse_sigma_blocks)
    lr: float = 0.01
    lr_decay: float = 1.0
    lr_min: float = 0.0
    weight_decay: float = 0.0
    rank: int = 0
    seed: int = 0
    table_size: int = TABLE_SIZE
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    device: str = "cpu"

    def __post_init__(self) -> None:
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"unknown device {self.device!r}; use cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r}: torch sees no CUDA device here; use cpu")
        for name in ("pop", "rank", "seed", "table_size"):
            value = getattr(self, name)
            if integer(value) is None:
                raise ValueError(f"{name} must be an integer, got {value!r}")
        if self.pop < 2 or self.pop % 2:
            raise ValueError(f"pop must be even and >= 2 (antithetic pairs), got {self.pop}")
        for name, ok, need in (("sigma", self.sigma > 0, "> 0"),
                               ("sigma_decay", 0 < self.sigma_decay <= 1, "in (0, 1]"),
                               ("sigma_min", self.sigma_min >= 0, ">= 0"),
                               ("lr", self.lr > 0, "> 0"),
                               ("lr_decay", 0 < self.lr_decay <= 1, "in (0, 1]"),
                               ("lr_min", self.lr_min >= 0, ">= 0"),
                               ("weight_decay", self.weight_decay >= 0, ">= 0"),
                               ("beta1", 0 <= self.beta1 < 1, "in [0, 1)"),
                               ("beta2", 0 <= self.beta2 < 1, "in [0, 1)"),
                               ("eps", self.eps > 0, "> 0")):
            if not ok:  # NaN fails every comparison, so it lands here too
                raise ValueError(f"{name} must be {need}, got {getattr(self, name)}")
        self._check_schedules()
        if self.rank < 0:
            raise ValueError(f"rank must be 0 (full-rank noise) or >= 1, got {self.rank}")
        _ = self.scale  # building it checks sigma_scale and sigma_blocks, with their own errors
        check_memory(MEMBER_BYTES * self.pop, f"a population of {self.pop} needs about",
                     "lower pop (--pop)", use=" for its offsets, losses and ranks")
        check_memory(4 * self.table_size, f"a noise table of {self.table_size} values needs",
                     f"lower table_size (default {TABLE_SIZE})")
        if self.table_size <= self.noise_dim:
            raise ValueError(f"noise table of {self.table_size} values is too small for "
                             f"{self.noise_dim} noise values per member; raise table_size or "
                             "lower rank")

    def _check_schedules(self) -> None:
        """Schedules that cannot work: an infinite value, a floor above the start (it would
        silently replace it), a sigma or floor below :data:`MIN_SIGMA`, a decaying sigma without
        a floor (it reaches 0 in float64, after ~1080 generations at decay 0.5 or ~74,000 at
        0.99, and the estimate divides by it: NaN weights, then ZeroDivisionError), and a decay
        factor ``1 - lr * weight_decay`` that is not positive (it flips or zeroes theta)."""
        for name in ("sigma", "sigma_min", "lr", "lr_min", "weight_decay"):
            if math.isinf(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")
        for name in ("sigma", "lr"):
            start, floor = getattr(self, name), getattr(self, f"{name}_min")
            if floor > start:
                raise ValueError(f"{name}_min {floor} is above {name} {start}: the floor would "
                                 f"replace the start; lower {name}_min")
        for name in ("sigma", "sigma_min"):
            value = getattr(self, name)
            if 0 < value < MIN_SIGMA:
                raise ValueError(f"{name} {value:g} is below {MIN_SIGMA:g}: the ES estimate "
                                 "divides by it and overflows float32; use a larger "
                                 f"{name}{' or 0 (no floor)' if name == 'sigma_min' else ''}")
        if self.sigma_decay < 1 and self.sigma_min == 0:
            raise ValueError(f"sigma_decay {self.sigma_decay} needs sigma_min > 0: without a "
                             "floor sigma decays to 0 and the ES estimate divides by it")
        if self.lr * self.weight_decay >= 1:
            raise ValueError(f"lr * weight_decay = {self.lr * self.weight_decay:g} must be < 1 "
                             "(theta is multiplied by 1 - lr * weight_decay each generation); "
                             "lower weight_decay")

    @property
    def pairs(self) -> int:
        return self.pop // 2

    @property
    def noise_dim(self) -> int:
        """Noise values per pair: every parameter (full rank) or A, B and bias per layer."""
        if self.rank == 0:
            return self.layout.n
        return sum(self.rank * sum(w.shape) + b.size
                   for w, b in zip(self.layout.weights, self.layout.biases, strict=True))

    @functools.cached_property
    def scale(self) -> Tensor:
        """Per-parameter scale of the normalised coordinates, on the CPU (read by Python code)."""
        return self.layout.scale(self.sigma_scale, self.sigma_blocks)

    @functools.cached_property
    def device_scale(self) -> Tensor:
        """:attr:`scale` on ``device`` (the same tensor on the CPU)."""
        return self.scale.to(self.device)

    @functools.cached_property
    def searched(self) -> list[slice]:
        """The parameter ranges ``sigma_blocks`` leaves free (scale not 0), adjacent blocks
        merged: one range over everything unless a block is frozen, so ``tell`` decays them in
        place, maskless."""
        parts: list[slice] = []
        for b in self.layout.blocks:
            if not self.scale[b.offset:b.end].any():  # frozen
                continue
            if parts and parts[-1].stop == b.offset:
                parts[-1] = slice(parts[-1].start, b.end)
            else:
                parts.append(slice(b.offset, b.end))
        return parts

    @functools.cached_property
    def table(self) -> Tensor:
        return noise_table(self.seed, self.table_size, self.device)

    def sigma_at(self, generation: int) -> float:
        return max(self.sigma_min, self.sigma * self.sigma_decay**generation)

    def lr_at(self, generation: int) -> float:
        return max(self.lr_min, self.lr * self.lr_decay**generation)

    def offsets(self, generation: int) -> tuple[int, ...]:
        """Table offset of every pair of ``generation``: a pure function of (seed, g, pair)."""
        span = self.table_size - self.noise_dim + 1
        hashes = counter_hashes(self.seed, generation, n=self.pairs)
        return tuple((hashes % np.uint64(span)).tolist())

    def lowrank_slices(self) -> list[tuple[slice, slice, slice]]:
        """Per layer, where ``A``, ``B`` and the bias noise sit in a pair's noise vector."""
        out, o, r = [], 0, self.rank
        for w in self.layout.weights:
            n_in, n_out = w.shape
            out.append((slice(o, o + n_in * r), slice(o + n_in * r, o + (n_in + n_out) * r),
                        slice(o + (n_in + n_out) * r, o + (n_in + n_out) * r + n_out)))
            o = out[-1][2].stop
        return out


def parse_sigma_blocks(spec: str) -> dict[str, float]:
    """``"weights.0=0,biases.1=2"`` -> ``{"weights.0": 0.0, "biases.1": 2.0}``.

    Why per block: sigma is one number for 670k parameters, but the blocks matter unequally; the
    hidden biases alone decide where each unit's dead zone sits, and layer 1 holds 60% of the
    2017 net's weights. A multiplier scales a block's noise *and* its step (both are in
    normalised coordinates), so 0 freezes it: never perturbed, never updated, not decayed.
    """
    out: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, eq, value = item.partition("=")
        try:
            factor = float(value) if eq else math.nan
        except ValueError:
            factor = math.nan
        if not factor >= 0 or math.isinf(factor):
            raise ValueError(f"bad sigma block {item!r}: write NAME=FACTOR with a finite "
                             "FACTOR >= 0, e.g. weights.0=0,biases.1=2")
        if name.strip() in out:
            raise ValueError(f"sigma block {name.strip()!r} is given twice; keep one")
        out[name.strip()] = factor
    return out


# --- state, ask, tell ----------------------------------------------------------------------------


@dataclass
class State:
    """What changes during a run: the centre (net units), Adam moments (normalised), generation."""

    theta: Tensor
    m: Tensor
    v: Tensor
    generation: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"theta": self.theta.clone(), "m": self.m.clone(), "v": self.v.clone(),
                "generation": self.generation}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any], device: str = "cpu") -> State:
        theta, m, v = (d[k].to(device, copy=True) for k in ("theta", "m", "v"))
        return cls(theta, m, v, int(d["generation"]))


def init(strategy: Strategy, theta: Tensor) -> State:
    """A fresh state centred on ``theta`` (flat, net units; e.g. ``layout.flatten(net)``)."""
    if theta.shape != (strategy.layout.n,):
        raise ValueError(f"theta has shape {tuple(theta.shape)}; the layout needs "
                         f"({strategy.layout.n},)")
    theta = theta.detach().to(strategy.device, torch.float32, copy=True)
    return State(theta, torch.zeros_like(theta), torch.zeros_like(theta))


def gathers(device: torch.device, gather: bool | None) -> bool:
    """Whether full-rank noise is gathered for many pairs at once rather than read pair by pair:
    as asked, else on any device but the CPU (where each per-pair op is a kernel launch)."""
    return device.type != "cpu" if gather is None else gather


@dataclass(frozen=True)
class Population:
    """One generation's members, described (not materialised): member ``2p`` is
    ``theta + delta_p``, member ``2p + 1`` is ``theta - delta_p``.

    ``theta`` is the state's centre itself, not a copy (a copy per generation would cost a
    full-size allocation): :func:`tell` moves it in place, so evaluate a population before
    telling it, as ``tell`` itself requires (it refuses a stale one).
    """

    strategy: Strategy
    theta: Tensor
    sigma: float
    generation: int
    offsets: tuple[int, ...] = field(repr=False)

    @property
    def size(self) -> int:
        return 2 * len(self.offsets)

    @functools.cached_property
    def sigma_vec(self) -> Tensor:
        """Per-parameter std of the perturbation in net units: ``sigma * scale``."""
        return self.strategy.device_scale * self.sigma

    def noise(self, pairs: Sequence[int] | range, out: Tensor | None = None) -> Tensor:
        """The raw N(0, 1) noise vectors of ``pairs``, ``(len(pairs), noise_dim)`` (a copy)."""
        table = self.strategy.table
        windows = table.unfold(0, self.strategy.noise_dim, 1)
        idx = torch.tensor([self.offsets[p] for p in pairs], dtype=torch.long, device=table.device)
        if out is None:
            return windows.index_select(0, idx)
        return torch.index_select(windows, 0, idx, out=out)

    def deltas(self, pairs: Sequence[int] | range, out: Tensor | None = None,
               gather: bool | None = None) -> Tensor:
        """Full-rank perturbations ``noise * sigma_vec`` of ``pairs``, ``(len(pairs), n)``.

        On the CPU each pair's table slice is multiplied straight into its row (no gathered
        copy of the noise first): one memory pass instead of two. On a GPU, where each of those
        per-pair products would be a kernel launch, the slices are gathered in one kernel and
        multiplied in another (``gather``; None: on any device but the CPU). The same float
        products either way.
        """
        s = self.strategy
        if s.rank:
            raise ValueError("deltas() is full-rank only; use lowrank_factors()")
        n = s.noise_dim
        if out is None:
            out = torch.empty(len(pairs), n, device=self.theta.device)
        elif out.shape != (len(pairs), n):
            raise ValueError(f"out has shape {tuple(out.shape)}; deltas of {len(pairs)} pairs "
                             f"need ({len(pairs)}, {n})")
        if gathers(out.device, gather):
            return self.noise(pairs, out=out).mul_(self.sigma_vec)
        for row, p in zip(out, pairs, strict=True):
            torch.mul(s.table[self.offsets[p]:self.offsets[p] + n], self.sigma_vec, out=row)
        return out

    def lowrank_factors(self, pairs: Sequence[int] | range) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per layer ``(A, Bs, db)`` of ``pairs``: ``A`` (k, in, r), ``Bs`` (k, out, r) already
        multiplied by ``sigma * scale_l / sqrt(r)``, bias perturbation ``db`` (k, out). The
        matrix perturbation is ``A @ Bs.T``.
        """
        s = self.strategy
        if not s.rank:
            raise ValueError("lowrank_factors() needs rank >= 1; use deltas()")
        noise = self.noise(pairs)
        k, out = len(noise), []
        for (sa, sb, se), w, b in zip(s.lowrank_slices(), s.layout.weights, s.layout.biases,
                                      strict=True):
            n_in, n_out = w.shape
            coef = self.sigma * float(s.scale[w.offset]) / math.sqrt(s.rank)
            a = noise[:, sa].view(k, n_in, s.rank)
            bs = noise[:, sb].view(k, n_out, s.rank) * coef
            db = noise[:, se] * self.sigma_vec[b.offset:b.end]
            out.append((a, bs, db))
        return out

    def delta(self, pair: int) -> Tensor:
        """The explicit flat perturbation of one pair (the slow reference path)."""
        if not self.strategy.rank:
            return self.deltas([pair])[0]
        d = torch.empty(self.strategy.layout.n, device=self.theta.device)
        for (a, bs, db), w, b in zip(self.lowrank_factors([pair]), self.strategy.layout.weights,
                                     self.strategy.layout.biases, strict=True):
            d[w.offset:w.end] = (a[0] @ bs[0].T).reshape(-1)
            d[b.offset:b.end] = db[0]
        return d

    def member(self, j: int) -> Tensor:
        """Member ``j``'s flat parameters, materialised one at a time (the reference path; the
        engine builds full-rank members a chunk at a time and never forms low-rank ones)."""
        d = self.delta(j // 2)
        return self.theta + d if j % 2 == 0 else self.theta - d


def ask(strategy: Strategy, state: State) -> Population:
    g = state.generation
    return Population(strategy, state.theta, strategy.sigma_at(g), g, strategy.offsets(g))


def centered_ranks(x: Tensor) -> Tensor:
    """Ranks of ``x`` mapped to [-0.5, 0.5] (ties share their mean rank, so the result sums to 0
    and is invariant to any strictly increasing transform of ``x``).
    """
    x = x.reshape(-1)
    if x.numel() < 2:
        return torch.zeros(x.numel())
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    end = counts.cumsum(0).double()
    mean_rank = end - (counts.double() + 1) / 2  # 0-based mean rank of each distinct value
    return (mean_rank[inverse] / (x.numel() - 1) - 0.5).float()


def shaped_fitness(losses: Tensor, generation: int = 0) -> Tensor:
    """Centred ranks of ``losses`` with NaN/inf ranked worst (tied); all non-finite -> error."""
    losses = losses.detach().reshape(-1).double()
    finite = torch.isfinite(losses)
    if not finite.any():
        raise DivergedError(f"all {losses.numel()} members of generation {generation} have a "
                            "non-finite loss; lower lr or sigma and start again")
    return centered_ranks(torch.where(finite, losses, torch.inf))


GRADIENT_CHUNK_BYTES = 256 << 20  # noise gathered at once for the full-rank gradient on a GPU


def gradient(pop: Population, losses: Tensor, gather: bool | None = None) -> Tensor:
    """The ES estimate of the loss gradient in normalised coordinates, ``(n,)``.

    ``1/(pop * sigma) * sum_j r_j eps_j`` with ``r`` the shaped fitness, i.e. per pair
    ``(r_2p - r_2p+1) * eps_p``. Full rank sums pair by pair on the CPU and, on a GPU
    (``gather``; None: on any device but the CPU), chunk by chunk of gathered pairs, which
    rounds otherwise.
    """
    s = pop.strategy
    if losses.numel() != pop.size:
        raise ValueError(f"got {losses.numel()} losses for a population of {pop.size}")
    r = shaped_fitness(losses.cpu(), pop.generation)
    w = r[0::2] - r[1::2]
    norm = 1.0 / (pop.size * pop.sigma)
    g = torch.zeros(s.layout.n, device=pop.theta.device)
    if not s.rank:
        n = s.layout.n
        if not gathers(g.device, gather):
            for p, o in enumerate(pop.offsets):  # axpy per pair: elementwise, thread-independent
                g.add_(s.table[o:o + n], alpha=float(w[p]))
            return g.mul_(norm)
        # on a GPU a launch per pair dominated tell (18 ms of a 46 ms generation of the 2017 net
        # at pop 2000 on an H100): gathered chunks of pairs, one matrix-vector product each
        w = w.to(g.device)
        step = max(1, GRADIENT_CHUNK_BYTES // (4 * n))
        for start in range(0, len(pop.offsets), step):
            pairs = range(start, min(start + step, len(pop.offsets)))
            g.addmv_(pop.noise(pairs).T, w[start:pairs.stop])
        return g.mul_(norm)
    noise = pop.noise(range(len(pop.offsets)))
    k, w = len(noise), w.to(noise.device)
    for (sa, sb, se), wb, bb in zip(s.lowrank_slices(), s.layout.weights, s.layout.biases,
                                    strict=True):
        n_in, n_out = wb.shape
        a = noise[:, sa].view(k, n_in, s.rank) * w[:, None, None]
        b = noise[:, sb].view(k, n_out, s.rank)
        gw = a.permute(1, 0, 2).reshape(n_in, -1) @ b.permute(1, 0, 2).reshape(n_out, -1).T
        g[wb.offset:wb.end] = gw.reshape(-1) / math.sqrt(s.rank)
        g[bb.offset:bb.end] = w @ noise[:, se]
    return g.mul_(norm)


def tell(strategy: Strategy, state: State, pop: Population, losses: Tensor) -> State:
    """Update ``state`` in place from the members' losses (lower is better) and return it.

    Adam step on the gradient estimate in normalised coordinates, then decoupled decay. A frozen
    block (scale 0) keeps its values: it is not decayed, and its step is multiplied by its scale
    (its Adam moments still follow the estimate, unused).
    """
    if pop.strategy != strategy:  # its noise and scale would mix with this one's lr and scale
        raise ValueError("population comes from another strategy than the one told; ask this one")
    if pop.generation != state.generation:
        raise ValueError(f"population of generation {pop.generation} told to a state at "
                         f"generation {state.generation}; ask again")
    s = strategy
    g = gradient(pop, losses)
    lr, t = s.lr_at(state.generation), state.generation + 1
    state.m.mul_(s.beta1).add_(g, alpha=1 - s.beta1)
    state.v.mul_(s.beta2).addcmul_(g, g, value=1 - s.beta2)
    step_size = lr * math.sqrt(1 - s.beta2**t) / (1 - s.beta1**t)
    step = state.v.sqrt().add_(s.eps * math.sqrt(1 - s.beta2**t)).reciprocal_().mul_(state.m)
    if s.weight_decay:
        for part in s.searched:  # frozen blocks keep their values
            state.theta[part].mul_(1 - lr * s.weight_decay)
    state.theta.addcmul_(step, s.device_scale, value=-step_size)
    state.generation = t
    return state
