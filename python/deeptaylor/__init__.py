"""deeptaylor: fast, verified Deep Taylor Decomposition and Layer-wise Relevance Propagation.

>>> import deeptaylor as dt
>>> net = dt.Sequential([dt.Dense(w1, b1), dt.ReLU(), dt.GlobalSumPool()])
>>> res = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0)).explain(x)
>>> print(dt.checks.conservation(res))
"""

from __future__ import annotations

from . import checks, composites, init, io, methods, reference, rules, seeds
# NumPy only at import time; optional extras load lazily
from . import datasets, evaluate, heatmap, relevance_models, train
from .backends import available as available_backends
from .composites import Composite
from .errors import (
    BackendFallbackWarning,
    DeepTaylorError,
    DeepTaylorWarning,
    InputError,
    InputTypeError,
    ModelFormatError,
    RootNotFoundError,
    RootNotFoundWarning,
    RuleError,
    ShapeError,
    UnsupportedError,
)
from .explain import Explainer, Explanation
from .io import load, save
from .layers import (
    ELU,
    GELU,
    Activation,
    AdaptiveAvgPool2d,
    Add,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    ChannelShuffle,
    Concat,
    Conv2d,
    ConvTranspose2d,
    Dense,
    Dropout,
    Flatten,
    GlobalAvgPool,
    GlobalSumPool,
    Hardsigmoid,
    Hardswish,
    Identity,
    Layer,
    LeakyReLU,
    LpPool,
    MaxPool2d,
    Mul,
    ReLU,
    ReLU6,
    Sigmoid,
    SiLU,
    Slice,
    SumPool2d,
    Tanh,
    Upsample,
)
from .network import Graph, Input, Node, Sequential, Tensor

__version__ = "0.1.0"


def __getattr__(name: str):  # PEP 562: torch is imported only when the interop is used
    if name in ("from_torch", "to_torch"):
        from .io import torch as _torch_io

        return getattr(_torch_io, name)
    if name in ("dask", "stream"):  # dt.dask.explain: Dask itself is imported only when it is called
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'deeptaylor' has no attribute {name!r}")


__all__ = [
    "__version__",
    "available_backends",
    "checks",
    "composites",
    "datasets",
    "heatmap",
    "train",
    "relevance_models",
    "evaluate",
    "init",
    "io",
    "load",
    "save",
    "from_torch",
    "to_torch",
    "methods",
    "reference",
    "rules",
    "seeds",
    "Composite",
    "Explainer",
    "Explanation",
    "Sequential",
    "Graph",
    "Input",
    "Node",
    "Tensor",
    "Layer",
    "ConvTranspose2d",
    "BatchNorm2d",
    "BatchNorm1d",
    "Activation",
    "LeakyReLU",
    "ReLU6",
    "ELU",
    "GELU",
    "SiLU",
    "Hardswish",
    "Hardsigmoid",
    "Tanh",
    "Sigmoid",
    "AdaptiveAvgPool2d",
    "GlobalAvgPool",
    "Upsample",
    "ChannelShuffle",
    "Identity",
    "Dropout",
    "Add",
    "Concat",
    "Slice",
    "Mul",
    "Dense",
    "Conv2d",
    "ReLU",
    "MaxPool2d",
    "AvgPool2d",
    "SumPool2d",
    "GlobalSumPool",
    "LpPool",
    "Flatten",
    "DeepTaylorError",
    "InputError",
    "InputTypeError",
    "ShapeError",
    "RuleError",
    "UnsupportedError",
    "ModelFormatError",
    "DeepTaylorWarning",
    "BackendFallbackWarning",
    "RootNotFoundError",
    "RootNotFoundWarning",
]
