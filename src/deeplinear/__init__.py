"""deeplinear: nonlinear computation in deep linear networks, through float underflow.

The names a notebook reaches for first are here (``dl.DeepLinear``, ``dl.load_dataset``, ...),
and every module (``dl.probes``, ``dl.train``, ...); each is imported on first use, so
``import deeplinear`` alone does not import torch.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ imports them
    from deeplinear import (
        arithmetic,
        bench,
        collapse,
        data,
        distributed,
        engine,
        es,
        evaluate,
        formats,
        nets,
        probes,
        regimes,
        report,
        reproduce,
        runs,
        signals,
        surrogate,
        train,
    )
    from deeplinear.arithmetic import CPU_FTZ_DAZ as CPU_FTZ_DAZ
    from deeplinear.arithmetic import IEEE as IEEE
    from deeplinear.arithmetic import TF_GPU as TF_GPU
    from deeplinear.arithmetic import Semantics as Semantics
    from deeplinear.arithmetic import get_semantics as get_semantics
    from deeplinear.collapse import collapse_gap as collapse_gap
    from deeplinear.data import Dataset as Dataset
    from deeplinear.data import load_dataset as load_dataset
    from deeplinear.evaluate import accuracy as accuracy
    from deeplinear.evaluate import portability as portability
    from deeplinear.nets import MLP as MLP
    from deeplinear.nets import DeepLinear as DeepLinear
    from deeplinear.nets import SoftmaxRegression as SoftmaxRegression
    from deeplinear.nets import build_model as build_model
    from deeplinear.runs import load_model as load_model
    from deeplinear.runs import save_model as save_model

__version__ = "0.1.0"

_NAMES = {  # name -> the module that defines it (the one source of truth)
    "DeepLinear": "nets", "MLP": "nets", "SoftmaxRegression": "nets", "build_model": "nets",
    "Semantics": "arithmetic", "get_semantics": "arithmetic", "TF_GPU": "arithmetic",
    "IEEE": "arithmetic", "CPU_FTZ_DAZ": "arithmetic",
    "Dataset": "data", "load_dataset": "data",
    "collapse_gap": "collapse",
    "accuracy": "evaluate", "portability": "evaluate",
    "load_model": "runs", "save_model": "runs",
}
_MODULES = ("arithmetic", "bench", "collapse", "data", "distributed", "engine", "es", "evaluate",
            "formats", "nets", "probes", "regimes", "report", "reproduce", "runs", "signals",
            "surrogate", "train")
__all__ = [*_NAMES, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f"deeplinear.{_NAMES[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"deeplinear.{name}")
    raise AttributeError(f"module 'deeplinear' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
