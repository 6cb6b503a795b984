"""Shared fixtures: seeded random generators, backend parametrisation, optional-dependency helpers."""

from __future__ import annotations

import os
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


# ------------------------------------------------------------------------------------------------------
# In CI (CI=true, or DEEPTAYLOR_STRICT_SKIPS=1) a test or module skipped because a package, the compiled
# core, an exporter or the MNIST data is missing fails the run: `pip install ".[test]"` (the README's
# set-up) must bring everything the suite uses. The skips are still listed as such; the session's exit
# status becomes 1 and the summary names them.

_MISSING = ("could not import", "No module named", "not built", "not installed", "does not import",
            "stand-in", "unavailable", "real MNIST not found", "records no dist-info")
_missing_skips: list[str] = []


def _strict_skips() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("DEEPTAYLOR_STRICT_SKIPS") == "1"


def _note_skip(report) -> None:
    if not report.skipped or not _strict_skips():
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if getattr(report, "wasxfail", None) is None and any(m in reason for m in _MISSING):
        _missing_skips.append(f"{report.nodeid or 'collection'}: {reason}")


def pytest_runtest_logreport(report) -> None:
    _note_skip(report)


def pytest_collectreport(report) -> None:
    _note_skip(report)


def pytest_terminal_summary(terminalreporter) -> None:
    if _missing_skips:
        terminalreporter.section("skipped for a missing package or build (fails in CI)", red=True)
        for line in _missing_skips:
            terminalreporter.line(line)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _missing_skips and exitstatus in (0, 5):   # 5: nothing but such skips
        session.exitstatus = 1


@pytest.fixture
def lenet(rng: np.random.Generator) -> dt.Sequential:
    """A small MNIST-shaped CNN (1x28x28 -> 10) with b <= 0, so deep_taylor's premises hold."""
    return dt.Sequential([
        dt.Conv2d(rng.normal(size=(4, 1, 5, 5)) * 0.3, -rng.uniform(0, 0.1, 4)), dt.ReLU(), dt.MaxPool2d(2),
        dt.Flatten(), dt.Dense(rng.normal(size=(10, 4 * 12 * 12)) * 0.05, -rng.uniform(0, 0.1, 10)),
    ])
