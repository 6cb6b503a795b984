"""MNIST in IDX format, the bundled sample, and the paper's 28x56 detection task.

* :func:`read_idx` / :func:`load_mnist` read LeCun's IDX files (gzip-compressed or raw) with every
  header field validated; anything else raises :class:`DatasetError` naming the file and the problem.
* :func:`load_sample` returns the small MNIST test sample shipped with the package (no download).
* :func:`mnist_detection` builds the detection task of Montavon et al. 2017 (arXiv 1512.02479,
  Sec. 3 "Example MNIST"; slides 003): 28x56 images made of two MNIST digits side by side, where the
  network has to detect a digit from 0-3 (the *target*) next to a distractor from 4-9.

What exactly is built (the paper gives the setting, not the sampling; the balanced default is our
choice):

* a **positive** image is one target digit (0-3) and one distractor (4-9), the target on the left or
  the right with equal probability; its label is ``1``;
* a **negative** image is two distractors (4-9); its label is ``0``;
* by default (``positive_fraction=0.5``) exactly ``round(n * positive_fraction)`` images are positive,
  in random order;
* ``positive_fraction=None`` ("natural" sampling, the literal reading of "a digit next to a
  distractor"): every image is a digit drawn from the whole pool (any class 0-9) next to a
  distractor 4-9, the digit on the left or the right with equal probability; the image is positive
  when that digit is 0-3, so the share of positives is the pool's share of 0-3 (about 41 % for MNIST);
* digits are drawn uniformly with replacement from the given pool; pixels are ``uint8 / 255`` so the
  input domain is the box ``[0, 1]`` and the zB rule applies with ``low=0, high=1``.

The label is the number of target digits present, so the network's output ``f(x) = sum_j x_j``
"measures the presence of the target digit" and is ~0 without one, as the relevance model of the
paper assumes (``f(x) >= 0``, ``f = 0`` means absence).
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

__all__ = [
    "DISTRACTOR_DIGITS",
    "TARGET_DIGITS",
    "DatasetError",
    "DetectionSet",
    "find_mnist",
    "load_detection_model",
    "load_mnist",
    "load_sample",
    "mnist_detection",
    "read_idx",
]

TARGET_DIGITS = (0, 1, 2, 3)
DISTRACTOR_DIGITS = (4, 5, 6, 7, 8, 9)

_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension


class DatasetError(InputError):
    """A data file is missing, truncated, corrupt or not what it claims to be."""


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as exc:
        raise DatasetError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
            raise DatasetError(f"{str(path)!r}: corrupt or truncated gzip stream ({exc})") from None
    return raw


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file of unsigned bytes (MNIST images or labels), gzip-compressed or raw.

    The header is validated: two zero bytes, the type code ``0x08`` (unsigned byte), a rank of 1
    (labels, magic 2049) or 3 (images, magic 2051), positive sizes, and a payload of exactly
    ``prod(sizes)`` bytes.

    Returns
    -------
    ndarray uint8
        ``(N,)`` for labels, ``(N, rows, cols)`` for images.

    Raises
    ------
    DatasetError
        Missing or unreadable file, bad gzip stream, unknown magic number, truncated or oversized payload.
    """
    p = Path(path)
    data = _read_bytes(p)
    if len(data) < 8:
        raise DatasetError(f"{str(p)!r}: too short to be an IDX file ({len(data)} bytes)")
    magic = int.from_bytes(data[:4], "big")
    if magic not in (_IMAGES_MAGIC, _LABELS_MAGIC):
        raise DatasetError(f"{str(p)!r}: bad IDX magic number {magic:#010x} (expected 0x00000803 for "
                           "images or 0x00000801 for labels)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{str(p)!r}: truncated IDX header ({len(data)} bytes, need {header})")
    dims = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if min(dims) < 1:
        raise DatasetError(f"{str(p)!r}: IDX sizes must be positive, got {dims}")
    expected = int(np.prod(dims))
    got = len(data) - header
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        raise DatasetError(f"{str(p)!r}: {kind}: header says {'x'.join(map(str, dims))} = {expected} bytes, "
                           f"file holds {got}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_file(directory: Path, prefix: str, kind: str) -> Path:
    names = [f"{prefix}-{kind}-idx{1 if kind == 'labels' else 3}-ubyte",
             f"{prefix}-{kind}.idx{1 if kind == 'labels' else 3}-ubyte"]
    for name in names:
        for cand in (directory / (name + ".gz"), directory / name):
            if cand.is_file():
                return cand
    raise DatasetError(f"no MNIST {kind} file for split {prefix!r} in {str(directory)!r} "
                       f"(looked for {names[0]}[.gz])")


def load_mnist(path: str | os.PathLike[str], split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load an MNIST split from a directory of IDX files (LeCun's names, ``.gz`` or raw).

    Parameters
    ----------
    path : directory holding ``train-images-idx3-ubyte.gz`` etc.
    split : ``"train"`` (60,000 digits) or ``"test"`` (``t10k``, 10,000 digits)

    Returns
    -------
    images : uint8 (N, 28, 28), 0 = background, 255 = ink
    labels : uint8 (N,), digits 0-9

    Raises
    ------
    DatasetError
        Missing files, corrupt or truncated files, images that are not 28x28, counts that differ
        between the images and the labels, labels outside 0-9.
    """
    prefixes = {"train": "train", "test": "t10k", "t10k": "t10k"}
    if split not in prefixes:
        raise DatasetError(f"unknown MNIST split {split!r}; use 'train' or 'test'")
    d = Path(path)
    if not d.is_dir():
        raise DatasetError(f"MNIST directory {str(d)!r} does not exist or is not a directory")
    ipath = _find_file(d, prefixes[split], "images")
    lpath = _find_file(d, prefixes[split], "labels")
    images = read_idx(ipath)
    labels = read_idx(lpath)
    if images.ndim != 3:
        raise DatasetError(f"{str(ipath)!r}: expected an image file (3 dimensions), got shape {images.shape}")
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"{str(ipath)!r}: MNIST images are 28x28, got {images.shape[1]}x{images.shape[2]}")
    if labels.ndim != 1:
        raise DatasetError(f"{str(lpath)!r}: expected a label file (1 dimension), got shape {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise DatasetError(f"{str(ipath)!r} has {images.shape[0]} images but {str(lpath)!r} has "
                           f"{labels.shape[0]} labels")
    if labels.max() > 9:
        raise DatasetError(f"{str(lpath)!r}: labels must be digits 0-9, found {int(labels.max())}")
    return images, labels


def find_mnist(start: str | os.PathLike[str] | None = None) -> Path | None:
    """Locate a directory with the MNIST IDX files, or None.

    Looks at ``$DEEPTAYLOR_MNIST``, then at ``shared/data/mnist`` and ``data/mnist`` in ``start``
    (default: the current directory) and each of its parents.
    """
    env = os.environ.get("DEEPTAYLOR_MNIST")
    if env:
        return Path(env) if Path(env).is_dir() else None
    here = Path(start if start is not None else os.getcwd()).resolve()
    for base in (here, *here.parents):
        for cand in (base / "shared" / "data" / "mnist", base / "data" / "mnist"):
            if (cand / "train-images-idx3-ubyte.gz").is_file() or (cand / "train-images-idx3-ubyte").is_file():
                return cand
    return None


def load_sample() -> tuple[np.ndarray, np.ndarray]:
    """The MNIST test digits bundled with deeptaylor (see ``deeptaylor/data/README.md``).

    Returns
    -------
    images : uint8 (300, 28, 28), the first 30 test digits of each class 0-9, in test-set order
    labels : uint8 (300,)
    """
    path = Path(__file__).parent / "data" / "mnist_sample.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels = z["images"], z["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise DatasetError(f"the bundled MNIST sample {str(path)!r} is missing or corrupt: {exc}") from None
    return images, labels


def load_detection_model() -> Any:
    """The bundled detection network of the seeds (Montavon et al. 2017): a ``dt.Sequential``
    Dense(1568 -> 400) - ReLU - GlobalSumPool with biases <= 0, trained with :mod:`deeptaylor.train`
    on the 28x56 detection task (``examples/train_detection_model.py``; see
    ``deeptaylor/data/README.md``). Input (N, 1568) pixels in [0, 1]; output (N, 1), the evidence
    for a target digit 0-3."""
    from .io import load

    return load(Path(__file__).parent / "data" / "detection_1568_400_1.npz")


@dataclass
class DetectionSet:
    """The detection task's images and labels.

    Attributes
    ----------
    images : float32 (N, 28, 56) in [0, 1]; the left digit in columns 0-27, the right in 28-55
    labels : float32 (N,), 1.0 if a target digit (0-3) is present, else 0.0
    side : int8 (N,), where the target digit is: 0 = left half, 1 = right half, -1 = none
    digits : int64 (N, 2), the class of the left and of the right digit
    """

    images: np.ndarray
    labels: np.ndarray
    side: np.ndarray
    digits: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def flat(self) -> np.ndarray:
        """The images as network inputs ``(N, 1568)`` (row-major, C order)."""
        return self.images.reshape(len(self), -1)

    def target_mask(self) -> np.ndarray:
        """Boolean ``(N, 28, 56)``: the half of each image that holds the target digit (all False if none)."""
        m = np.zeros(self.images.shape, dtype=bool)
        m[self.side == 0, :, :28] = True
        m[self.side == 1, :, 28:] = True
        return m


def _as_unit_images(images: Any) -> np.ndarray:
    arr = np.asarray(images)
    if arr.ndim != 3 or arr.shape[1:] != (28, 28):
        raise InputError(f"images must be (N, 28, 28), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255)
    if arr.dtype.kind != "f":
        raise InputError(f"images must be uint8 (0-255) or float in [0, 1], got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)) or arr.min() < 0 or arr.max() > 1:
        raise InputError("float images must be finite and within [0, 1]")
    return arr.astype(np.float32)


def mnist_detection(images: Any, labels: Any, n: int, seed: int | np.random.Generator | None = 0,
                    positive_fraction: float | None = 0.5) -> DetectionSet:
    """Build ``n`` images of the 28x56 detection task (module docstring) from MNIST digits.

    Parameters
    ----------
    images : (M, 28, 28) uint8 (scaled by 1/255) or float in [0, 1]
    labels : (M,) integer digits 0-9; the pool must hold at least one target (0-3) and one
        distractor (4-9)
    n : number of images to build (>= 1)
    seed : seed or Generator; the same seed gives the same set
    positive_fraction : share of images that contain a target digit, in [0, 1] (exact); or None for
        "natural" sampling: each image is a digit of any class next to a distractor (module docstring)

    Returns
    -------
    DetectionSet
    """
    x = _as_unit_images(images)
    y = np.asarray(labels)
    if y.shape != (x.shape[0],) or y.dtype.kind not in "iu":
        raise InputError(f"labels must be an integer array of shape ({x.shape[0]},), got {y.dtype} {y.shape}")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"n must be a positive int, got {n!r}")
    natural = positive_fraction is None
    if not natural and not 0.0 <= float(positive_fraction) <= 1.0:  # type: ignore[arg-type]
        raise InputError(f"positive_fraction must be in [0, 1] or None, got {positive_fraction!r}")
    targets = np.flatnonzero(np.isin(y, TARGET_DIGITS))
    distractors = np.flatnonzero(np.isin(y, DISTRACTOR_DIGITS))
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if natural:
        if distractors.size == 0:
            raise InputError("the digit pool has no distractor digit (4-9)")
        pool = np.flatnonzero(np.isin(y, TARGET_DIGITS + DISTRACTOR_DIGITS))
        digit = rng.choice(pool, size=n)
        other = rng.choice(distractors, size=n)
        digit_side = rng.integers(0, 2, size=n)
        left = np.where(digit_side == 0, digit, other)
        right = np.where(digit_side == 0, other, digit)
        positive = np.isin(y[digit], TARGET_DIGITS)
        side = np.where(positive, digit_side, -1).astype(np.int8)
        out = np.concatenate([x[left], x[right]], axis=2)
        return DetectionSet(images=out, labels=positive.astype(np.float32), side=side,
                            digits=np.stack([y[left], y[right]], axis=1).astype(np.int64))
    n_pos = round(n * float(positive_fraction))
    if n_pos > 0 and targets.size == 0:
        raise InputError("the digit pool has no target digit (0-3)")
    if distractors.size == 0:
        raise InputError("the digit pool has no distractor digit (4-9)")
    positive = np.zeros(n, dtype=bool)
    positive[:n_pos] = True
    rng.shuffle(positive)
    left = rng.choice(distractors, size=n)
    right = rng.choice(distractors, size=n)
    side = np.full(n, -1, dtype=np.int8)
    side[positive] = rng.integers(0, 2, size=n_pos)
    chosen = rng.choice(targets, size=n_pos) if n_pos else np.zeros(0, dtype=np.int64)
    pos_idx = np.flatnonzero(positive)
    on_left = side[pos_idx] == 0
    left[pos_idx[on_left]] = chosen[on_left]
    right[pos_idx[~on_left]] = chosen[~on_left]
    out = np.concatenate([x[left], x[right]], axis=2)
    return DetectionSet(images=out, labels=positive.astype(np.float32), side=side,
                        digits=np.stack([y[left], y[right]], axis=1).astype(np.int64))
