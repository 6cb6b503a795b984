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


def import_torchvision():
    """Import torchvision (the model zoo), or skip. PyPI's torchvision 0.28.0 is built for CUDA torch:
    beside the CPU torch 2.13 wheel its compiled ops fail to register at import
    (``torchvision._meta_registrations``). The models are pure Python, so an empty module registered
    under that name first makes ``import torchvision`` work; the compiled ops (``torchvision.ops.nms``
    ...) stay unusable, and no test uses them."""
    pytest.importorskip("torch")
    name = "torchvision._meta_registrations"
    registered = "torchvision" not in sys.modules and name not in sys.modules
    if registered:
        sys.modules[name] = types.ModuleType(name)
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - a broken install skips, as an absent one
        if registered:
            del sys.modules[name]
        pytest.skip(f"torchvision does not import: {type(exc).__name__}: {exc}")
    if not hasattr(torchvision, "models") or not hasattr(torchvision.models, "resnet18"):
        pytest.skip("torchvision is a stand-in (no model zoo)")
    return torchvision


def import_zennit():
    """Import zennit, or skip. Zennit 0.5.1 imports torchvision at import time (for its ResNet
    canonizer): the real torchvision is imported where installed (see :func:`import_torchvision`);
    otherwise a minimal stand-in for ``torchvision.models.resnet`` is registered first: two empty
    ``nn.Module`` subclasses ``BasicBlock`` and ``Bottleneck`` (then ``ResNetCanonizer`` matches nothing)."""
    torch = pytest.importorskip("torch")
    if "torchvision.models.resnet" not in sys.modules:
        try:
            import_torchvision()
        except pytest.skip.Exception:
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
