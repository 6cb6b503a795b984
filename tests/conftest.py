"""Shared fixtures: seeded random generators, backend parametrisation, optional-dependency helpers."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

import deeptaylor as dt

BACKENDS = dt.available_backends()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


def import_zennit():
    """Import zennit, or skip. Zennit 0.5.1 imports torchvision at import time and PyPI's torchvision
    does not import beside the CPU torch 2.13 wheel, so register a minimal stand-in for
    ``torchvision.models.resnet`` first: two empty ``nn.Module`` subclasses ``BasicBlock`` and
    ``Bottleneck``, used only by zennit's ResNet canonizer (which we do not use)."""
    torch = pytest.importorskip("torch")
    if "torchvision.models.resnet" not in sys.modules:
        try:
            import torchvision.models.resnet  # noqa: F401
        except Exception:
            tv = types.ModuleType("torchvision")
            models = types.ModuleType("torchvision.models")
            resnet = types.ModuleType("torchvision.models.resnet")

            class BasicBlock(torch.nn.Module):
                pass

            class Bottleneck(torch.nn.Module):
                pass

            resnet.BasicBlock = BasicBlock
            resnet.Bottleneck = Bottleneck
            tv.models = models
            models.resnet = resnet
            sys.modules.update({"torchvision": tv, "torchvision.models": models,
                                "torchvision.models.resnet": resnet})
    return pytest.importorskip("zennit")
