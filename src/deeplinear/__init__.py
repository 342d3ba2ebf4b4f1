"""deeplinear: nonlinear computation in deep linear networks, through float underflow.

The names a notebook reaches for first are here (``dl.DeepLinear``, ``dl.load_dataset``, ...),
and every module (``dl.probes``, ``dl.train``, ...); each is imported on first use, so
``import deeplinear`` and the CLI's start do not pay for torch until something needs it.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

_NAMES = {  # name -> the module that defines it (the one source of truth)
    "DeepLinear": "nets", "MLP": "nets", "SoftmaxRegression": "nets", "build_model": "nets",
    "Semantics": "arithmetic", "get_semantics": "arithmetic", "TF_GPU": "arithmetic",
    "IEEE": "arithmetic", "CPU_FTZ_DAZ": "arithmetic",
    "Dataset": "data", "load_dataset": "data",
    "collapse_gap": "collapse",
    "accuracy": "evaluate", "portability": "evaluate",
    "load_model": "runs",
}
_MODULES = ("arithmetic", "bench", "collapse", "data", "distributed", "engine", "es", "evaluate",
            "formats", "nets", "probes", "regimes", "report", "reproduce", "runs", "surrogate",
            "train")
__all__ = [*_NAMES, *_MODULES]


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        return getattr(importlib.import_module(f"deeplinear.{_NAMES[name]}"), name)
    if name in _MODULES:
        return importlib.import_module(f"deeplinear.{name}")
    raise AttributeError(f"module 'deeplinear' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
