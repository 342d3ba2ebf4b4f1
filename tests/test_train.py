"""What the trainers share (``deeplinear.train``): the model comes back on its own device."""

import math

import pytest
import torch

from deeplinear import es
from deeplinear.data import load_dataset
from deeplinear.nets import DeepLinear
from deeplinear.train import backprop, cmaes
from deeplinear.train import es as es_train

CPU = torch.device("cpu")


class Tracked(DeepLinear):
    """Records where it is moved (a GPU cannot be assumed, so the moves are what is checked)."""

    def __init__(self) -> None:
        super().__init__([2, 8, 8, 2], generator=torch.Generator().manual_seed(0))
        self.moves: list = []

    def to(self, *args, **kwargs):
        self.moves.append(args[0] if args else kwargs.get("device"))
        return super().to(*args, **kwargs)

    def cpu(self):
        self.moves.append("cpu")
        return super().cpu()


@pytest.fixture(scope="module")
def rings():
    return load_dataset("rings", seed=0)


@pytest.mark.parametrize("module, bad, moves", [
    (backprop, {"lr": -1.0}, [CPU]),  # refused before it moved: home
    (es_train, {"steps": 0}, [CPU]),
    (cmaes, {"sigma": -1.0}, ["cpu", CPU]),  # CMA-ES computes on the CPU, then home
])
def test_a_refused_run_gives_the_model_back_on_its_device(module, bad, moves, rings):
    model = Tracked()
    with pytest.raises(ValueError):
        module.train(model, rings, module.Config(**bad), progress=False)
    assert model.moves == moves


def test_a_diverged_es_run_gives_the_model_back_on_its_device(rings):
    """ES used to move the model home only after a finished run."""
    model = Tracked()

    def diverged(pop, idx):
        return torch.full((pop.size,), math.nan), torch.zeros(pop.size)

    with pytest.raises(es.DivergedError):
        es_train.train(model, rings, es_train.Config(steps=3, pop=4), progress=False,
                       evaluate=diverged)
    assert model.moves == [CPU, CPU]  # to cfg.device, then home
