"""Streaming: Explainer.explain(out=), explain_batches, page release of memory maps, the CLI's stream."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor import heatmap as hm
from deeptaylor import stream
from deeptaylor.cli import main


@pytest.fixture
def images(rng) -> np.ndarray:
    return rng.uniform(0, 1, (137, 1, 28, 28)).astype(np.float32)


def _backends() -> list[str]:
    return dt.available_backends()


@pytest.mark.parametrize("backend", _backends())
def test_out_memmap_equals_in_memory(tmp_path, lenet, images, backend):
    ex = dt.Explainer(lenet, "deep-taylor", backend=backend)
    ref = ex.explain(images, batch_size=40)
    np.save(tmp_path / "x.npy", images)
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    out = np.lib.format.open_memmap(tmp_path / "r.npy", mode="w+", dtype=ref.relevance.dtype, shape=images.shape)
    res = ex.explain(x, batch_size=40, out=out)
    assert res.relevance is out
    np.testing.assert_array_equal(np.asarray(out), ref.relevance)  # bitwise
    np.testing.assert_array_equal(res.output, ref.output)
    np.testing.assert_array_equal(res.target, ref.target)
    assert res.conservative_expected == ref.conservative_expected
    out.flush()
    del out, res
    np.testing.assert_array_equal(np.load(tmp_path / "r.npy"), ref.relevance)  # in the file
    # a plain writable array, one chunk; float64 out takes float32 heatmaps exactly
    plain = np.full(images.shape, np.nan, np.float64)
    res2 = ex.explain(images, target=3, out=plain)
    assert res2.relevance is plain
    np.testing.assert_array_equal(plain, ex.explain(images, target=3).relevance)


@pytest.mark.parametrize("target", ["all", ("top", 3), "array"])
def test_out_memmap_with_many_targets(tmp_path, lenet, images, target):
    """K targets per sample: out is (N, K, *sample), written chunk by chunk, bitwise as in memory."""
    images = images[:40]
    if target == "array":
        target = np.stack([np.arange(len(images)) % 10, np.full(len(images), 7)], axis=1)
    ex = dt.Explainer(lenet, "deep-taylor", backend="cpu")
    ref = ex.explain(images, target=target, batch_size=15)
    out = np.lib.format.open_memmap(tmp_path / "r.npy", mode="w+", dtype=np.float32, shape=ref.relevance.shape)
    res = ex.explain(images, target=target, batch_size=15, out=out)
    assert res.relevance is out and out.ndim == 5
    np.testing.assert_array_equal(np.asarray(out), ref.relevance)
    with pytest.raises(dt.ShapeError, match="out has shape"):
        ex.explain(images, target=target, out=np.zeros(images.shape, np.float32))


def test_out_is_checked_before_any_work(lenet, images):
    ex = dt.Explainer(lenet, "deep-taylor", backend="numpy")
    good = np.zeros(images.shape, np.float32)
    with pytest.raises(dt.ShapeError, match="out has shape"):
        ex.explain(images, out=np.zeros((137, 784), np.float32))
    with pytest.raises(dt.InputTypeError, match="dtype int32"):
        ex.explain(images, out=np.zeros(images.shape, np.int32))
    with pytest.raises(dt.InputTypeError, match="NumPy array"):
        ex.explain(images, out=[[0.0]])
    ro = good.copy()
    ro.setflags(write=False)
    with pytest.raises(dt.InputError, match="read-only"):
        ex.explain(images, out=ro)
    with pytest.raises(dt.InputError, match="overlaps"):
        ex.explain(images, out=images)
    assert not good.any()


def _rss_file_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    raise AssertionError("no RssFile")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"),
                    reason="page release (madvise) and /proc are Linux-specific")
def test_release_drops_pages_of_shared_maps_only(tmp_path):
    a = np.lib.format.open_memmap(tmp_path / "a.npy", mode="w+", dtype=np.float32, shape=(4096, 1024))  # 16 MiB
    a[:] = 1.5
    before = _rss_file_kib()
    assert stream.release(a[:2048])
    assert _rss_file_kib() < before - 6 * 1024   # half of 16 MiB left the resident set
    assert stream.release(a)
    a.flush()
    del a
    r = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert float(r[1234, 5]) == 1.5   # written data stay in the file
    c = np.load(tmp_path / "a.npy", mmap_mode="c")
    c[0, 0] = 7.0
    assert not stream.release(c)       # copy-on-write: never released (it would drop the change)
    assert c[0, 0] == 7.0
    assert not stream.release(np.ones(10))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux-specific")
def test_explain_memmap_to_memmap_keeps_pages_out(tmp_path, rng):
    """x and out both 24 MiB memory maps: the resident file pages stay far below their 48 MiB."""
    net = dt.Sequential([dt.Dense(rng.normal(size=(3, 1024)) * 0.05, -np.full(3, 0.01)), dt.ReLU(),
                         dt.GlobalSumPool()])
    x = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float32, shape=(6144, 1024))
    for s in range(0, 6144, 1024):
        x[s:s + 1024] = rng.uniform(0, 1, (1024, 1024))
    x.flush()
    del x
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    out = np.lib.format.open_memmap(tmp_path / "r.npy", mode="w+", dtype=np.float32, shape=x.shape)
    ex = dt.Explainer(net, "deep-taylor", backend="numpy")
    before = _rss_file_kib()
    res = ex.explain(x, out=out, batch_size=512)
    grew = _rss_file_kib() - before
    assert grew < 12 * 1024, f"{grew} KiB of file pages resident after the stream"
    np.testing.assert_array_equal(np.asarray(out[:512]), ex.explain(np.asarray(x[:512])).relevance.astype(np.float32))
    assert res.relevance is out


def test_windowed_checks_name_the_global_index(tmp_path, lenet, images, monkeypatch):
    monkeypatch.setattr(stream, "WINDOW_BYTES", 10 * 28 * 28 * 4)   # 10 images per window
    bad = images.copy()
    bad[93, 0, 4, 7] = np.nan
    bad[120, 0, 0, 0] = np.inf
    np.save(tmp_path / "bad.npy", bad)
    ex = dt.Explainer(lenet, "deep-taylor", backend="numpy")
    with pytest.raises(dt.InputError, match=r"2 NaN/Inf value\(s\), first at index \(93, 0, 4, 7\)"):
        ex.explain(np.load(tmp_path / "bad.npy", mmap_mode="r"))
    outside = images.copy()
    outside[77, 0, 3, 3] = 1.5
    with pytest.raises(dt.InputError, match=rf"got values in \[{outside.min():.4g}, 1\.5\]"):
        ex.explain(outside)
    assert stream.min_max(images) == (images.min(), images.max())
    lo, hi = stream.min_max(images, axis0=True)
    np.testing.assert_array_equal(lo, images.min(axis=0))
    np.testing.assert_array_equal(hi, images.max(axis=0))


@pytest.mark.parametrize("backend", _backends())
def test_explain_batches_equals_one_call(lenet, images, backend):
    ex = dt.Explainer(lenet, "epsilon-plus-flat", backend=backend)
    labels = np.arange(len(images)) % 10
    ref = ex.explain(images, target=labels, batch_size=32)
    # an iterator of single samples, regrouped into batches of 32
    got = list(ex.explain_batches(iter(images), batch_size=32, target=labels))
    assert [i for i, _ in got] == [0, 32, 64, 96, 128]
    assert [len(r.relevance) for _, r in got] == [32, 32, 32, 32, 9]
    np.testing.assert_array_equal(np.concatenate([r.relevance for _, r in got]), ref.relevance)
    np.testing.assert_array_equal(np.concatenate([r.output for _, r in got]), ref.output)
    np.testing.assert_array_equal(np.concatenate([r.target for _, r in got]), labels)
    # batches of any size in any mix (a data loader), and a generator that is consumed lazily
    pieces = [images[:5], images[5], images[6:50], images[50:51], images[51:]]
    got2 = list(ex.explain_batches((p for p in pieces), batch_size=32, target=labels))
    np.testing.assert_array_equal(np.concatenate([r.relevance for _, r in got2]), ref.relevance)


@pytest.mark.parametrize("backend", _backends())
def test_explain_batches_with_seeds_equals_one_call(lenet, images, backend, tmp_path):
    ex = dt.Explainer(lenet, "epsilon-plus-flat", backend=backend)
    # a Seed object applies to every batch; a contrast explains f3 - f5 per sample
    ref = ex.explain(images, seed=dt.seeds.contrast(3, 5), batch_size=40)   # the same chunks: bitwise
    got = list(ex.explain_batches(iter(images), batch_size=40, seed=dt.seeds.contrast(3, 5)))
    np.testing.assert_array_equal(np.concatenate([r.relevance for _, r in got]), ref.relevance)
    np.testing.assert_allclose(np.concatenate([r.explained for _, r in got]), ref.explained)
    # an array of seeds read by stream position, here memory-mapped, with a K axis (N, 2, 10)
    rng = np.random.default_rng(3)
    seeds = rng.normal(size=(len(images), 2, 10)).astype(np.float32)
    np.save(tmp_path / "seeds.npy", seeds)
    mm = np.load(tmp_path / "seeds.npy", mmap_mode="r")
    ref = ex.explain(images, seed=seeds, batch_size=32)
    got = list(ex.explain_batches((p for p in [images[:7], images[7:90], images[90:]]), batch_size=32, seed=mm))
    assert [i for i, _ in got] == [0, 32, 64, 96, 128]
    np.testing.assert_array_equal(np.concatenate([r.relevance for _, r in got]), ref.relevance)
    with pytest.raises(dt.InputError, match="either target or seed"):
        list(ex.explain_batches(iter(images[:4]), target=1, seed=seeds[:4]))
    with pytest.raises(dt.ShapeError, match="seed has 3 entries"):
        list(ex.explain_batches(iter(images[:8]), batch_size=4, seed=seeds[:3]))


def test_explain_batches_is_lazy_and_bounded(lenet, images):
    ex = dt.Explainer(lenet, "deep-taylor", backend="numpy")
    pulled = []

    def source():
        for i, im in enumerate(images):
            pulled.append(i)
            yield im

    gen = ex.explain_batches(source(), batch_size=16)
    index, res = next(gen)
    assert index == 0 and res.relevance.shape == (16, 1, 28, 28)
    assert len(pulled) == 16            # nothing read beyond the first batch
    gen.close()


def test_explain_batches_errors(lenet, images):
    ex = dt.Explainer(lenet, "deep-taylor", backend="numpy")
    with pytest.raises(dt.InputError, match="batch_size"):
        list(ex.explain_batches(iter(images), batch_size=0))
    with pytest.raises(dt.ShapeError, match="shape"):
        list(ex.explain_batches([images[0, 0, 0]], batch_size=4))   # (28,) is no MNIST sample
    with pytest.raises(dt.ShapeError, match="earlier ones"):
        list(ex.explain_batches([images[0], np.zeros((1, 2, 28, 28), np.float32)], batch_size=4))
    with pytest.raises(dt.ShapeError, match="target has 3 entries"):
        list(ex.explain_batches(iter(images[:8]), batch_size=4, target=np.zeros(3, np.int64)))
    with pytest.raises(dt.ShapeError):
        list(ex.explain_batches([np.zeros((2, 2, 2, 2, 2), np.float32)]))


def test_progress_bar_counts_images(lenet, images, capsys):
    pytest.importorskip("tqdm")
    ex = dt.Explainer(lenet, "deep-taylor", backend="numpy")
    ex.explain(images, batch_size=50, progress=True)
    err = capsys.readouterr().err
    assert "img/s" in err and "137/137" in err
    list(ex.explain_batches(iter(images), batch_size=64, progress=True, total=len(images)))
    assert "137/137" in capsys.readouterr().err


@pytest.fixture
def model_file(tmp_path, lenet):
    path = tmp_path / "lenet.npz"
    dt.save(lenet, path, input_shape=(1, 28, 28))
    return path


def test_cli_streams_a_memmapped_npy(tmp_path, lenet, rng, model_file, capsys):
    n = 70
    x = rng.uniform(0, 1, (n, 28, 28)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    ex = dt.Explainer(lenet, "deep-taylor", backend="cpu")
    ref = ex.explain(x[:, None])
    out = tmp_path / "o"
    # several windows (--batch-size 16); the default --png: the first 64
    assert main(["explain", "--model", str(model_file), "--input", str(tmp_path / "x.npy"), "--out", str(out),
                 "--backend", "cpu", "--batch-size", "16", "--no-progress"]) == 0
    r = np.load(out / "relevance.npy")
    assert r.shape == (n, 28, 28) and r.dtype == np.float32
    np.testing.assert_array_equal(r, ref.relevance[:, 0])   # bitwise: the cpu engine does not depend on the batch
    np.testing.assert_array_equal(np.load(out / "output.npy"), ref.output)
    pngs = sorted(out.glob("heatmap_*.png"))
    assert len(pngs) == 64 and pngs[-1].name == "heatmap_0063.png"
    np.testing.assert_array_equal(hm.read_png(out / "heatmap_0050.png")[::4, ::4],
                                  hm.to_rgb(ref.relevance[50, 0]))
    text = capsys.readouterr().out
    assert f"explained {n} input(s)" in text and "images/s" in text
    assert "for the first 64 of 70 inputs" in text
    for png, count in (("3", 3), ("none", 0), ("all", n)):
        o = tmp_path / f"o_{png}"
        assert main(["explain", "--model", str(model_file), "--input", str(tmp_path / "x.npy"), "--out", str(o),
                     "--backend", "cpu", "--png", png, "--no-progress"]) == 0
        assert len(list(o.glob("heatmap_*.png"))) == count
        np.testing.assert_array_equal(np.load(o / "relevance.npy"), r)
    assert "--png none" in capsys.readouterr().out
    assert main(["explain", "--model", str(model_file), "--input", str(tmp_path / "x.npy"), "--out", str(out),
                 "--png", "some"]) == 2
    assert "--png" in capsys.readouterr().err


def test_cli_streams_uint8_and_image_directories(tmp_path, lenet, rng, model_file, capsys):
    x8 = rng.integers(0, 256, (9, 28, 28)).astype(np.uint8)
    np.save(tmp_path / "u8.npy", x8)
    # the same windows of 4 (the float64 reference's BLAS products may round differently in other batch sizes)
    ref = dt.Explainer(lenet, "deep-taylor", backend="numpy").explain(
        x8[:, None].astype(np.float32) / np.float32(255), batch_size=4)
    assert main(["explain", "--model", str(model_file), "--input", str(tmp_path / "u8.npy"), "--out",
                 str(tmp_path / "o8"), "--backend", "numpy", "--batch-size", "4", "--no-progress"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "o8" / "relevance.npy"), ref.relevance[:, 0])
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(9):
        hm.save_png(d / f"im{i}.png", x8[i])
    assert main(["explain", "--model", str(model_file), "--input", str(d), "--out", str(tmp_path / "od"),
                 "--backend", "numpy", "--batch-size", "4", "--png", "2", "--no-progress"]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "od" / "relevance.npy"), ref.relevance[:, 0])
    assert sorted(p.name for p in (tmp_path / "od").glob("*.png")) == ["heatmap_im0.png", "heatmap_im1.png"]
    capsys.readouterr()
    hm.save_png(d / "im9.png", np.zeros((20, 20), np.uint8))   # read in the third window: named
    assert main(["explain", "--model", str(model_file), "--input", str(d), "--out", str(tmp_path / "oe"),
                 "--backend", "numpy", "--batch-size", "4", "--no-progress"]) == 2
    assert "im9.png" in capsys.readouterr().err
