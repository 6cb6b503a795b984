"""Weight initialisers with the Keras formulas (keras.io/initializers), seeded by a NumPy Generator.

Fans follow Keras: for a Dense weight ``(out, in)`` fan_in = in, fan_out = out; for a Conv2d weight
``(out, in, kh, kw)`` fan_in = in*kh*kw, fan_out = out*kh*kw. The "normal" variants draw from a
normal truncated at two standard deviations, with the standard deviation corrected by
0.87962566103423978 as Keras does, so the variance matches the formula.

===================  =====================================
glorot_uniform       U(-l, l), l = sqrt(6 / (fan_in + fan_out))
glorot_normal        TN(0, 2 / (fan_in + fan_out))
he_uniform           U(-l, l), l = sqrt(6 / fan_in)
he_normal            TN(0, 2 / fan_in)
lecun_uniform        U(-l, l), l = sqrt(3 / fan_in)
lecun_normal         TN(0, 1 / fan_in)
===================  =====================================

``xavier_*`` and ``kaiming_*`` are aliases of ``glorot_*`` and ``he_*``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputTypeError, ShapeError

__all__ = [
    "fans",
    "glorot_uniform",
    "glorot_normal",
    "he_uniform",
    "he_normal",
    "lecun_uniform",
    "lecun_normal",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "zeros",
    "constant",
]

_TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]

RngLike = int | np.random.Generator | None


def _rng(rng: RngLike) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _shape(shape: object, where: str) -> tuple[int, ...]:
    """``shape`` as a tuple of Python ints; InputTypeError naming ``where`` unless it is a sequence
    of ints (NumPy integers included, bools and floats not), ShapeError for a negative size."""
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not all(
        isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_)) for s in shape
    ):
        raise InputTypeError(f"{where}: shape must be a sequence of ints, got {shape!r}")
    out = tuple(int(s) for s in shape)
    if any(s < 0 for s in out):
        raise ShapeError(f"{where}: shape must have non-negative sizes, got {out}")
    return out


def _fans(shape: object, where: str) -> tuple[tuple[int, ...], int, int]:
    shape = _shape(shape, where)
    if len(shape) < 2 or min(shape) < 1:
        raise ShapeError(f"{where}: weight shape must have >= 2 positive dimensions, got {shape}")
    receptive = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape, shape[1] * receptive, shape[0] * receptive


def fans(shape: Sequence[int]) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a weight of ``shape`` (PyTorch layout: (out, in[, kh, kw])).

    Raises :class:`~deeptaylor.errors.InputTypeError` unless ``shape`` is a sequence of ints and
    :class:`~deeptaylor.errors.ShapeError` unless it has >= 2 dimensions, all positive."""
    _, fi, fo = _fans(shape, "fans")
    return fi, fo


def _uniform(shape: Sequence[int], limit: float, rng: RngLike) -> np.ndarray:
    return _rng(rng).uniform(-limit, limit, size=tuple(shape))


def _truncated_normal(shape: Sequence[int], std: float, rng: RngLike) -> np.ndarray:
    g = _rng(rng)
    stddev = std / _TRUNC_STD
    out = g.standard_normal(size=tuple(shape))
    bad = np.abs(out) > 2.0
    while bad.any():  # resample outside [-2, 2] standard deviations
        out[bad] = g.standard_normal(size=int(bad.sum()))
        bad = np.abs(out) > 2.0
    return out * stddev


def glorot_uniform(shape: Sequence[int], rng: RngLike = None) -> np.ndarray:
    """Glorot/Xavier uniform (Glorot & Bengio 2010). Returns float64 array of ``shape``."""
    shape, fi, fo = _fans(shape, "glorot_uniform")
    return _uniform(shape, np.sqrt(6.0 / (fi + fo)), rng)


def glorot_normal(shape: Sequence[int], rng: RngLike = None) -> np.ndarray:
    """Glorot/Xavier truncated normal, variance 2 / (fan_in + fan_out)."""
    shape, fi, fo = _fans(shape, "glorot_normal")
    return _truncated_normal(shape, np.sqrt(2.0 / (fi + fo)), rng)


def he_uniform(shape: Sequence[int], rng: RngLike = None) -> np.ndarray:
    """He/Kaiming uniform (He et al. 2015), limit sqrt(6 / fan_in)."""
    shape, fi, _ = _fans(shape, "he_uniform")
    return _uniform(shape, np.sqrt(6.0 / fi), rng)


def he_normal(shape: Sequence[int], rng: RngLike = None) -> np.ndarray:
    """He/Kaiming truncated normal, variance 2 / fan_in."""
    shape, fi, _ = _fans(shape, "he_normal")
    return _truncated_normal(shape, np.sqrt(2.0 / fi), rng)


def lecun_uniform(shape: Sequence[int], rng: RngLike = None) -> np.ndarray:
    """LeCun uniform, limit sqrt(3 / fan_in)."""
    shape, fi, _ = _fans(shape, "lecun_uniform")
    return _uniform(shape, np.sqrt(3.0 / fi), rng)


def lecun_normal(shape: Sequence[int], rng: RngLike = None) -> np.ndarray:
    """LeCun truncated normal, variance 1 / fan_in (Klambauer et al. 2017)."""
    shape, fi, _ = _fans(shape, "lecun_normal")
    return _truncated_normal(shape, np.sqrt(1.0 / fi), rng)


def zeros(shape: Sequence[int], rng: RngLike = None) -> np.ndarray:
    """All zeros (e.g. biases)."""
    return np.zeros(_shape(shape, "zeros"))


def constant(shape: Sequence[int], value: float, rng: RngLike = None) -> np.ndarray:
    """All ``value`` (e.g. a small negative bias for DTD's b <= 0)."""
    return np.full(_shape(shape, "constant"), float(value))


xavier_uniform = glorot_uniform
xavier_normal = glorot_normal
kaiming_uniform = he_uniform
kaiming_normal = he_normal
