"""Explain a directory of PNG images as a Dask array on a local cluster, and store the heatmaps.

    python examples/dask_directory.py                       # makes a demo directory of MNIST digits
    python examples/dask_directory.py --images DIR --model net.npz --out heatmaps --workers 2

The images are read lazily, ``--chunk`` files per task (``dask.delayed`` + ``dask.array.from_delayed``:
one block per group of files), into an (N, 1, H, W) dask array chunked along the batch axis, explained by ``dt.dask.explain`` on a ``distributed.LocalCluster`` (worker processes; the
Explainer travels to each worker once, as deeptaylor's own format, and each worker builds its plan
once), and the heatmaps are written by the workers, chunk by chunk, into a Zarr store when the
``zarr`` package is installed, else into one ``relevance.npy`` (created here with
``np.lib.format.open_memmap``; each task writes its rows through a memory map of it: any cluster
whose workers share the file system can do the same). The heatmaps, their sums and the outputs come
from one ``dask.compute`` call, so every chunk is explained once. Without ``--model`` it uses the
bundled MNIST detection network's weights on single digits (a 784-400-1 detector of "is it 0-3?").
The same script runs on a real cluster by replacing ``LocalCluster(...)`` with the cluster's address or
a dask-jobqueue / Kubernetes cluster object (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import deeptaylor as dt


def demo_directory(path: Path, n: int) -> None:
    """``n`` PNGs of the bundled MNIST test digits (28x28, grey) in ``path``."""
    images, _labels = dt.datasets.load_sample()
    path.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        dt.heatmap.save_png(path / f"digit_{i:05d}.png", images[i % len(images)])


def demo_model() -> dt.Sequential:
    """The bundled detection network (1568 -> 400 -> sum over 28x56 images) cut to one 28x28 digit:
    the half of its first layer's weights that looks at the left digit."""
    net = dt.datasets.load_detection_model()
    dense = net[0]
    w = dense.weight.reshape(dense.weight.shape[0], 28, 56)[:, :, :28].reshape(dense.weight.shape[0], 784)
    return dt.Sequential([dt.Flatten(), dt.Dense(np.ascontiguousarray(w), dense.bias), *list(net)[1:]])


def read_grey(paths: list[str], shape: tuple[int, int]) -> np.ndarray:
    """PNGs as a (len(paths), 1, H, W) float32 array in [0, 1] (what a reading task of the graph runs);
    every image must be ``shape`` (H, W)."""
    out = np.empty((len(paths), 1, *shape), np.float32)
    for i, path in enumerate(paths):
        img = dt.heatmap.read_png(path)
        if img.ndim == 3:
            img = np.round(img[..., :3] @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        if img.shape != tuple(shape):
            raise dt.ShapeError(f"{path}: {img.shape[1]}x{img.shape[0]} pixels, expected {shape[1]}x{shape[0]}")
        out[i, 0] = img.astype(np.float32) / np.float32(255)
    return out


def write_rows(block: np.ndarray, path: str, block_info: dict | None = None) -> np.ndarray:
    """A task: write ``block`` into rows ``start:stop`` of the ``.npy`` file at ``path`` (through a
    memory map); returns a (rows, 1, 1, 1) placeholder."""
    start, stop = block_info[0]["array-location"][0]
    m = np.load(path, mmap_mode="r+")
    m[start:stop] = block
    m.flush()
    del m
    return np.zeros((len(block), 1, 1, 1), np.int8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default=None, help="directory of PNGs (default: a demo directory of MNIST digits)")
    ap.add_argument("--n", type=int, default=2000, help="images in the demo directory (default 2,000)")
    ap.add_argument("--model", default=None, help="native .npz model taking (1, H, W) images (default: demo)")
    ap.add_argument("--out", default="dask-heatmaps", help="output store (default ./dask-heatmaps)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--chunk", type=int, default=500, help="images per chunk/task (default 500)")
    args = ap.parse_args(argv)
    try:
        import dask
        import dask.array as da
        from distributed import Client, LocalCluster
    except ImportError:
        print('this example needs Dask: pip install "deeptaylor[dask]"', file=sys.stderr)
        return 2

    src = Path(args.images) if args.images else Path(args.out + "-inputs")
    if args.images is None:
        demo_directory(src, args.n)
    files = sorted(str(p) for p in src.glob("*.png"))
    if not files:
        print(f"no PNG images in {src}", file=sys.stderr)
        return 2
    net = dt.load(args.model) if args.model else demo_model()
    ex = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend="cpu")
    shape = dt.heatmap.read_png(files[0]).shape[:2]   # every image must have this size (checked when read)

    # one lazy read per --chunk files: blocks of (k, 1, H, W), stacked along the batch axis
    groups = [files[s:s + args.chunk] for s in range(0, len(files), args.chunk)]
    x = da.concatenate([da.from_delayed(dask.delayed(read_grey, pure=True)(g, shape), shape=(len(g), 1, *shape),
                                        dtype=np.float32) for g in groups])
    with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True,
                      dashboard_address=None, silence_logs=40) as cluster, Client(cluster) as client:
        print(f"{len(files)} images of {shape[0]}x{shape[1]} in {x.numblocks[0]} chunks of {args.chunk}; cluster: "
              f"{len(client.scheduler_info()['workers'])} worker processes x 1 thread")
        res = dt.dask.explain(ex, x, threads=1)          # lazy: nothing has run yet
        try:
            import zarr  # noqa: F401

            store = args.out + ".zarr"
            write = res.relevance.to_zarr(store, overwrite=True, compute=False)
        except ImportError:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            store = str(Path(args.out) / "relevance.npy")
            np.lib.format.open_memmap(store, mode="w+", dtype=res.relevance.dtype, shape=res.relevance.shape).flush()
            write = res.relevance.map_blocks(write_rows, store, dtype=np.int8,
                                             chunks=(res.relevance.chunks[0], (1,), (1,), (1,))).sum()
        t0 = time.perf_counter()
        _, sums, f = dask.compute(write, res.relevance.sum(axis=(1, 2, 3)), res.output[:, 0])
        seconds = time.perf_counter() - t0
    print(f"explained and stored in {seconds:.1f} s ({len(files) / seconds:.0f} images/s): {store}")
    print(f"f(x) mean {float(f.mean()):.4f}, max |sum R - f(x)| {float(np.abs(sums - f).max()):.2e}")
    back = np.asarray(zarr.open(store)) if store.endswith(".zarr") else np.load(store, mmap_mode="r")
    print(f"read back: {back.shape} {back.dtype}, heatmap sums match: {bool(np.allclose(back.sum(axis=(1, 2, 3)), sums))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
