"""Streaming helpers: windows over the batch axis, and releasing the pages of memory-mapped arrays.

A memory-mapped ``.npy`` file (``np.load(path, mmap_mode="r")``, ``np.lib.format.open_memmap``) is
read and written through the page cache. Every page the process touches is mapped into it and counts
in its resident set size (RSS, ``VmRSS``/``VmHWM``) until the kernel needs the memory back, so a pass
over a 10 GB memory map makes a 10 GB process although it never held more than one window. The
functions here walk arrays in windows along the first axis and, after each window, tell the kernel
that the process no longer needs those pages (``madvise(MADV_DONTNEED)`` on the ``mmap`` behind an
:class:`numpy.memmap`). For a *shared* file mapping (modes ``"r"``, ``"r+"``, ``"w+"``) that only
unmaps them: the data stay in the page cache and in the file (written pages are marked dirty and
written back as usual), and a later read maps them again. Copy-on-write maps (mode ``"c"``) and
ordinary arrays are never touched (there ``MADV_DONTNEED`` would throw away data).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["WINDOW_BYTES", "all_finite", "first_nonfinite", "min_max", "progress_bar", "release", "windows"]

#: bytes per window of the reductions below (and the default window of the command line's stream)
WINDOW_BYTES = 32 << 20
_SHARED_MODES = ("r", "r+", "w+", "readonly", "readwrite", "write")
try:  # NumPy >= 2
    from numpy.lib.array_utils import byte_bounds as _byte_bounds
except ImportError:  # pragma: no cover - NumPy 1.x
    _byte_bounds = np.byte_bounds


def windows(n: int, row_bytes: int, window_bytes: int = WINDOW_BYTES) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` pairs covering ``range(n)`` in windows of about ``window_bytes`` bytes
    (``row_bytes`` per row along the first axis; at least one row per window)."""
    step = max(1, int(window_bytes) // max(1, int(row_bytes)))
    for s in range(0, n, step):
        yield s, min(n, s + step)


def _file_map(a: np.ndarray) -> mmap.mmap | None:
    """The shared ``mmap`` behind ``a`` (an :class:`numpy.memmap` or a view of one), or None."""
    b: Any = a
    while b is not None and not isinstance(b, np.memmap):
        b = getattr(b, "base", None)
    if b is None:
        return None
    mm = getattr(b, "_mmap", None)
    if not isinstance(mm, mmap.mmap) or getattr(b, "mode", None) not in _SHARED_MODES or mm.closed:
        return None
    return mm


def release(a: Any) -> bool:
    """Drop the pages of ``a``'s memory from this process's resident set when ``a`` lives in a shared
    memory map (:class:`numpy.memmap` in mode ``"r"``, ``"r+"`` or ``"w+"``, or a view of one): the
    pages covering ``a``'s byte range are unmapped with ``madvise(MADV_DONTNEED)`` (written data stay
    in the file). Anything else (ordinary arrays, copy-on-write maps, platforms without
    ``mmap.madvise``) is left alone. Returns True when pages were released."""
    if not isinstance(a, np.ndarray) or a.size == 0 or not hasattr(mmap, "MADV_DONTNEED"):
        return False
    mm = _file_map(a)
    if mm is None:
        return False
    try:
        base = np.frombuffer(mm, dtype=np.uint8).ctypes.data
    except (ValueError, TypeError, BufferError):  # pragma: no cover - a closed or empty map
        return False
    lo_addr, hi_addr = _byte_bounds(a)
    page = mmap.PAGESIZE
    lo = max(0, (lo_addr - base) // page * page)
    hi = min(len(mm), -(-(hi_addr - base) // page) * page)
    if hi <= lo:
        return False
    try:
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
    except (OSError, ValueError):  # pragma: no cover - refused by the kernel: nothing lost
        return False
    return True


def _rows(x: np.ndarray) -> int:
    return max(1, x.itemsize * int(np.prod(x.shape[1:], dtype=np.int64)))


def all_finite(x: np.ndarray) -> bool:
    """True if every element of the float array ``x`` is finite: one sum per window (NaN and Inf
    propagate through a sum, so a finite sum proves the window finite; only a sum that overflowed
    takes the element-wise check), releasing a memory map's pages after each window."""
    if x.ndim == 0:
        return bool(np.isfinite(x))
    for s, e in windows(x.shape[0], _rows(x)):
        w = x[s:e]
        with np.errstate(over="ignore", invalid="ignore"):
            total = np.add.reduce(w, axis=None)
        ok = bool(np.isfinite(total)) or bool(np.isfinite(w).all())
        release(w)
        if not ok:
            return False
    return True


def first_nonfinite(x: np.ndarray) -> tuple[int, tuple[int, ...] | None]:
    """``(count, index)``: how many elements of ``x`` are NaN/Inf and the index of the first one (None
    if there is none), window by window (no temporary of the whole array's size)."""
    count, first = 0, None
    for s, e in windows(x.shape[0], _rows(x)):
        bad = ~np.isfinite(x[s:e])
        c = int(bad.sum())
        if c and first is None:
            idx = np.argwhere(bad)[0]
            first = (int(idx[0]) + s, *(int(i) for i in idx[1:]))
        count += c
        release(x[s:e])
    return count, first


def min_max(x: np.ndarray, axis0: bool = False) -> tuple[Any, Any]:
    """The minimum and maximum of ``x`` (``axis0=True``: over the first axis only, arrays of one
    sample's shape), window by window, releasing a memory map's pages after each window."""
    lo = hi = None
    for s, e in windows(x.shape[0], _rows(x)):
        w = x[s:e]
        a, b = (w.min(axis=0), w.max(axis=0)) if axis0 else (w.min(), w.max())
        lo = a if lo is None else np.minimum(lo, a)
        hi = b if hi is None else np.maximum(hi, b)
        release(w)
    return lo, hi


class _NoBar:
    """What :func:`progress_bar` gives when there is no bar: ``update`` and ``close`` do nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass


def progress_bar(total: int | None, enabled: bool = True, desc: str = "explaining", unit: str = "img") -> Any:
    """A tqdm progress bar counting ``unit`` (default images: it shows images/s), or a stand-in with
    ``update(n)``, ``set_postfix(...)`` and ``close()`` that does nothing when ``enabled`` is False or
    tqdm is not installed."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=False, smoothing=0.1)
