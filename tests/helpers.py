"""Shared by several test modules (``tests/`` is on ``sys.path`` under pytest)."""

import copy
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from deeplinear import es
from deeplinear.arithmetic import TF_GPU
from deeplinear.nets import DeepLinear

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """The script ``benchmarks/<name>.py`` as a module (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ENGINE_SIZES = [24, 40, 32, 5]
ENGINE_BATCH = 19


def engine_setup(semantics=TF_GPU, rank=0, pop=10, sigma=0.3, sizes=ENGINE_SIZES,
                 table_size=1 << 16, device="cpu"):
    """A net, strategy, population and minibatch for the ES engine's tests (test_engine on the
    CPU, test_cuda on a GPU): ``(net, strategy, population, x, y)``, all on ``device``."""
    net = DeepLinear(sizes, semantics=semantics, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # biases large enough that hidden ones survive their own flush
        for b in net.biases:
            b.normal_(0, 0.8, generator=torch.Generator().manual_seed(1))
    layout = es.Layout.of(sizes)
    s = es.Strategy(layout, pop=pop, sigma=sigma, rank=rank, table_size=table_size,
                    device=device)
    pop_ = es.ask(s, es.init(s, layout.flatten(net)))
    g = torch.Generator().manual_seed(2)
    x = torch.rand(ENGINE_BATCH, sizes[0], generator=g) * 2
    y = torch.randint(0, sizes[-1], (ENGINE_BATCH,), generator=g)
    return net.to(device), s, pop_, x.to(device), y.to(device)


def one_by_one(net, pop, x):
    """Reference: load each member into a copy of the net and run its scaled forward pass."""
    m = copy.deepcopy(net)
    outs = []
    for j in range(pop.size):
        pop.strategy.layout.load(pop.member(j), m)
        outs.append(m(x, mode="scaled"))
    return torch.stack(outs)
