"""pytest configuration for the benchmarks (pytest-benchmark).

``python -m pytest bench`` runs every benchmark; ``python -m pytest bench --benchmark-disable`` runs
each case once with small batches as a correctness test (every case asserts its result). bench/ is
not in the default testpaths: the test suite (tests/) does not time anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    """Collect ``bench_*.py`` (pytest's default python_files only matches ``test_*.py``)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(scope="session")
def quick(request: pytest.FixtureRequest) -> bool:
    """True under --benchmark-disable: use CI-sized batches and sizes."""
    return bool(request.config.getoption("benchmark_disable", default=False))


@pytest.fixture(scope="session")
def threads() -> int:
    """Threads for every contender (deeptaylor, NumPy's BLAS, torch)."""
    return 2

