"""MNIST IDX loading (real files and corrupt ones), the bundled sample, the 28x56 detection task."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor import datasets as ds


def _find_real_mnist() -> Path | None:
    """The real MNIST IDX files: ``$DEEPTAYLOR_MNIST`` or ``shared/data/mnist`` above the current directory
    (:func:`deeptaylor.datasets.find_mnist`), else ``shared/data/mnist`` above this file (the repository's
    ``../shared/data/mnist``, wherever the checkout or worktree sits)."""
    return ds.find_mnist() or ds.find_mnist(Path(__file__).resolve().parent)


MNIST = _find_real_mnist() or Path("/nonexistent/mnist")
needs_mnist = pytest.mark.skipif(not MNIST.is_dir(),
                                 reason="real MNIST not found: set DEEPTAYLOR_MNIST or put it in ../shared/data/mnist")


def _idx(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in dims) + payload


def _write_split(d: Path, images: np.ndarray, labels: np.ndarray, prefix: str = "t10k", gz: bool = True) -> None:
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(d / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as fh:
        fh.write(_idx(2051, images.shape, images.tobytes()))
    with opener(d / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as fh:
        fh.write(_idx(2049, labels.shape, labels.tobytes()))


@needs_mnist
def test_real_mnist_test_split():
    images, labels = ds.load_mnist(MNIST, "test")
    assert images.shape == (10000, 28, 28)
    assert images.dtype == np.uint8
    assert labels.shape == (10000,)
    assert labels.dtype == np.uint8
    # label counts and pixel mean as documented in shared/data/mnist/README.md
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    assert images.mean() == pytest.approx(33.791, abs=1e-3)
    train_images, train_labels = ds.load_mnist(MNIST, "train")
    assert train_images.shape == (60000, 28, 28)
    assert np.bincount(train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_find_mnist(monkeypatch, tmp_path):
    # a checkout next to shared/data/mnist (only the file names matter to the search)
    mnist = tmp_path / "shared" / "data" / "mnist"
    mnist.mkdir(parents=True)
    (mnist / "train-images-idx3-ubyte.gz").write_bytes(b"")
    below = tmp_path / "repo" / "tests"
    below.mkdir(parents=True)
    monkeypatch.delenv("DEEPTAYLOR_MNIST", raising=False)
    assert ds.find_mnist(below) == mnist.resolve()  # found from a directory below .../shared/data/mnist's base
    assert ds.find_mnist(tmp_path / "repo" / "missing") == mnist.resolve()
    monkeypatch.chdir(below)
    assert ds.find_mnist() == mnist.resolve()  # default start: the current directory
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.setenv("DEEPTAYLOR_MNIST", str(other))  # $DEEPTAYLOR_MNIST wins
    assert ds.find_mnist(below) == other
    monkeypatch.setenv("DEEPTAYLOR_MNIST", str(tmp_path / "missing"))
    assert ds.find_mnist(below) is None


@needs_mnist
def test_bundled_sample_is_the_first_30_test_digits_per_class():
    images, labels = ds.load_sample()
    assert images.shape == (300, 28, 28)
    assert images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [30] * 10
    t_images, t_labels = ds.load_mnist(MNIST, "test")
    idx = np.sort(np.concatenate([np.flatnonzero(t_labels == c)[:30] for c in range(10)]))
    np.testing.assert_array_equal(images, t_images[idx])
    np.testing.assert_array_equal(labels, t_labels[idx])


def test_sample_licence_note_is_installed():
    """The CC BY-SA 3.0 note of the bundled MNIST sample travels with the package (package data, and in
    the wheel's dist-info/licenses beside the MIT LICENSE)."""
    import importlib.metadata

    note = Path(ds.__file__).parent / "data" / "README.md"
    text = note.read_text(encoding="utf-8")
    assert "CC BY-SA 3.0" in text
    assert "LeCun" in text
    try:
        files = importlib.metadata.distribution("deeptaylor").files or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("deeptaylor is not installed as a distribution")
    licences = {f.name for f in files if "licenses" in f.parts}
    if not licences:
        pytest.skip("this install records no dist-info/licenses (not built by scikit-build-core)")
    assert {"LICENSE", "README.md"} <= licences


@pytest.mark.parametrize("gz", [True, False])
def test_roundtrip_synthetic_idx(tmp_path, rng, gz):
    images = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=7).astype(np.uint8)
    _write_split(tmp_path, images, labels, gz=gz)
    got_i, got_l = ds.load_mnist(tmp_path, "test")
    np.testing.assert_array_equal(got_i, images)
    np.testing.assert_array_equal(got_l, labels)


def _expect(tmp_path: Path, match: str) -> None:
    with pytest.raises(ds.DatasetError, match=match):
        ds.load_mnist(tmp_path, "test")


def test_corrupt_files(tmp_path, rng):
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.arange(5, dtype=np.uint8)
    ipath = tmp_path / "t10k-images-idx3-ubyte"
    lpath = tmp_path / "t10k-labels-idx1-ubyte"
    lpath.write_bytes(_idx(2049, (5,), labels.tobytes()))

    ipath.write_bytes(_idx(2051, (5, 28, 28), images.tobytes())[:-10])
    _expect(tmp_path, "truncated")
    ipath.write_bytes(_idx(2051, (5, 28, 28), images.tobytes()) + b"xx")
    _expect(tmp_path, "trailing")
    ipath.write_bytes(_idx(2052, (5, 28, 28), images.tobytes()))
    _expect(tmp_path, "magic")
    ipath.write_bytes(b"\x00\x00")
    _expect(tmp_path, "too short")
    ipath.write_bytes(_idx(2051, (5, 14, 56), images.tobytes()))
    _expect(tmp_path, "28x28")
    ipath.write_bytes(_idx(2051, (4, 28, 28), images[:4].tobytes()))
    _expect(tmp_path, "4 images but .* 5 labels")
    ipath.write_bytes(_idx(2049, (5,), labels.tobytes()))  # a label file where images belong
    _expect(tmp_path, "3 dimensions")
    ipath.write_bytes(gzip.compress(_idx(2051, (5, 28, 28), images.tobytes()))[:-20])
    _expect(tmp_path, "gzip")
    ipath.write_bytes(_idx(2051, (5, 28, 28), images.tobytes()))
    lpath.write_bytes(_idx(2049, (5,), (labels + 6).tobytes()))
    _expect(tmp_path, "labels must be digits")
    lpath.unlink()
    _expect(tmp_path, "no MNIST labels file")


def test_bad_directory_and_split(tmp_path):
    with pytest.raises(ds.DatasetError, match="does not exist"):
        ds.load_mnist(tmp_path / "nope")
    with pytest.raises(ds.DatasetError, match="unknown MNIST split"):
        ds.load_mnist(tmp_path, "validation")
    assert issubclass(ds.DatasetError, dt.DeepTaylorError)
    assert issubclass(ds.DatasetError, ValueError)


def _pool(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Digits whose pixels encode their class (value 10*class + 1), so placement can be checked."""
    labels = np.repeat(np.arange(10), 5).astype(np.uint8)
    images = np.zeros((50, 28, 28), dtype=np.uint8)
    images[:, 4:24, 8:20] = (labels * 10 + 1)[:, None, None]
    perm = rng.permutation(50)
    return images[perm], labels[perm]


def test_detection_construction(rng):
    images, labels = _pool(rng)
    d = ds.mnist_detection(images, labels, 101, seed=3)
    assert d.images.shape == (101, 28, 56)
    assert d.images.dtype == np.float32
    assert d.flat().shape == (101, 1568)
    assert 0.0 <= d.images.min()
    assert d.images.max() <= 1.0
    assert int(d.labels.sum()) == round(101 * 0.5)  # exact label balance
    left_cls = np.round(d.images[:, 10, 14] * 255 - 1) / 10
    right_cls = np.round(d.images[:, 10, 28 + 14] * 255 - 1) / 10
    np.testing.assert_array_equal(left_cls, d.digits[:, 0])
    np.testing.assert_array_equal(right_cls, d.digits[:, 1])
    is_target = np.isin(d.digits, ds.TARGET_DIGITS)
    # every image: at most one target, positives exactly one, on the recorded side; the rest distractors
    assert np.all(is_target.sum(axis=1) == d.labels)
    pos = d.side >= 0
    np.testing.assert_array_equal(pos, d.labels == 1)
    np.testing.assert_array_equal(is_target[pos, 1], d.side[pos] == 1)
    assert set(np.unique(d.side[pos])) == {0, 1}  # both sides occur
    mask = d.target_mask()
    assert np.all(mask.sum(axis=(1, 2)) == 28 * 28 * d.labels)
    assert np.all(mask[d.side == 0][:, :, :28])
    assert not np.any(mask[d.side == 0][:, :, 28:])


def test_detection_natural_sampling(rng):
    """positive_fraction=None: every image is a digit of any class next to a distractor; positive iff 0-3."""
    images, labels = _pool(rng)
    d = ds.mnist_detection(images, labels, 400, seed=3, positive_fraction=None)
    assert d.images.shape == (400, 28, 56)
    left_cls = np.round(d.images[:, 10, 14] * 255 - 1) / 10
    right_cls = np.round(d.images[:, 10, 28 + 14] * 255 - 1) / 10
    np.testing.assert_array_equal(left_cls, d.digits[:, 0])
    np.testing.assert_array_equal(right_cls, d.digits[:, 1])
    is_target = np.isin(d.digits, ds.TARGET_DIGITS)
    is_distractor = np.isin(d.digits, ds.DISTRACTOR_DIGITS)
    assert np.all(is_distractor.any(axis=1))  # a distractor in every image
    assert np.all(is_target.sum(axis=1) == d.labels)  # at most one target, label = its presence
    pos = d.labels == 1
    np.testing.assert_array_equal(d.side >= 0, pos)
    np.testing.assert_array_equal(is_target[pos, 1], d.side[pos] == 1)
    assert set(np.unique(d.side[pos])) == {0, 1}
    # the share of positives is the pool's share of 0-3 (here 20/50), not fixed at one half
    share = float(np.isin(labels, ds.TARGET_DIGITS).mean())
    assert abs(float(d.labels.mean()) - share) < 0.08
    assert set(np.unique(d.digits)) == set(range(10))  # the free digit is of any class
    # seeded, and the default (balanced) sampling is unchanged by the option's existence
    e = ds.mnist_detection(images, labels, 400, seed=3, positive_fraction=None)
    np.testing.assert_array_equal(d.images, e.images)
    assert int(ds.mnist_detection(images, labels, 400, seed=3).labels.sum()) == 200
    with pytest.raises(dt.InputError, match="no distractor"):
        ds.mnist_detection(images[labels < 4], labels[labels < 4], 5, positive_fraction=None)
    with pytest.raises(dt.InputError, match="or None"):
        ds.mnist_detection(images, labels, 5, positive_fraction=1.5)


@needs_mnist
def test_natural_sampling_on_real_mnist():
    images, labels = ds.load_mnist(MNIST, "test")
    d = ds.mnist_detection(images, labels, 5000, seed=0, positive_fraction=None)
    share = float(np.isin(labels, ds.TARGET_DIGITS).mean())  # 0.4157 for t10k
    assert abs(float(d.labels.mean()) - share) < 0.03


def test_detection_is_seeded_and_validates(rng):
    images, labels = _pool(rng)
    a = ds.mnist_detection(images, labels, 30, seed=5)
    b = ds.mnist_detection(images, labels, 30, seed=5)
    c = ds.mnist_detection(images, labels, 30, seed=6)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert ds.mnist_detection(images, labels, 10, positive_fraction=0.0).labels.sum() == 0
    with pytest.raises(dt.InputError, match="28, 28"):
        ds.mnist_detection(images[:, :20], labels, 5)
    with pytest.raises(dt.InputError, match="no target digit"):
        ds.mnist_detection(images[labels > 3], labels[labels > 3], 5)
    with pytest.raises(dt.InputError, match="no distractor"):
        ds.mnist_detection(images[labels < 4], labels[labels < 4], 5)
    with pytest.raises(dt.InputError, match="n must be"):
        ds.mnist_detection(images, labels, 0)


def test_load_detection_model_is_the_seeds_network():
    net = ds.load_detection_model()
    assert [layer.kind for layer in net] == ["Dense", "ReLU", "GlobalSumPool"]
    assert net.output_shape((5, 1568)) == (5, 1)
    assert np.all(net[0].bias <= 0)  # b <= 0: the DTD rules' conservation premise
