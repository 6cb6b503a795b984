"""A residual and concatenating network built with deeptaylor's graph API, explained on both backends.

    python examples/residual_graph.py [--out residual_heatmaps.png]

Builds a small ResNet-style classifier for 3x32x32 inputs (a stem convolution, two residual blocks
whose ReLU outputs are summed with the skip connection, a concatenation of both blocks' outputs,
global average pooling and a dense head), with seeded He-initialised weights and biases <= 0, then
explains random images with the DTD recipe (zB on the pixels, z+ above) on the float64 NumPy
reference and the compiled float32 engine, prints the agreement and the conservation check, and
writes the heatmaps as a PNG grid.
"""

from __future__ import annotations

import argparse

import numpy as np

import deeptaylor as dt


def build(seed: int = 0) -> dt.Graph:
    """The example network: input (3, 32, 32) -> 10 logits."""
    rng = np.random.default_rng(seed)

    def conv(o: int, c: int, k: int = 3, **kw: object) -> dt.Conv2d:
        w = rng.normal(size=(o, c, k, k)) * np.sqrt(2.0 / (c * k * k))
        return dt.Conv2d(w, -np.abs(rng.normal(size=o)) * 0.05, padding=k // 2, **kw)

    x = dt.Input((3, 32, 32))
    h = dt.ReLU()(conv(16, 3)(x, name="stem"), name="stem.relu")
    h = dt.MaxPool2d(2)(h, name="pool")
    outs = []
    for b in range(2):
        r = dt.ReLU()(conv(16, 16)(h, name=f"block{b}.conv1"))
        r = dt.ReLU()(conv(16, 16)(r, name=f"block{b}.conv2"))
        h = dt.Add()(r, h, name=f"block{b}.add")          # residual: both summands >= 0
        outs.append(h)
    h = dt.Concat(axis=1)(*outs, name="concat")            # (32, 16, 16)
    h = dt.GlobalAvgPool()(h, name="gap")                  # (32,)
    out = dt.Dense(rng.normal(size=(10, 32)) * np.sqrt(2.0 / 32), -np.abs(rng.normal(size=10)) * 0.05)(
        h, name="fc")
    return dt.Graph(x, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="residual_heatmaps.png")
    args = parser.parse_args()
    net = build()
    print(net)
    x = np.random.default_rng(1).uniform(size=(8, 3, 32, 32)).astype(np.float32)
    comp = dt.composites.deep_taylor(0.0, 1.0)
    ref = dt.Explainer(net, comp, backend="numpy").explain(x)
    fast = dt.Explainer(net, comp, backend="cpu").explain(x)
    err = np.abs(fast.relevance - ref.relevance).max() / np.abs(ref.relevance).max()
    print(f"cpu vs numpy: max-normalised difference {err:.2e}")
    print(dt.checks.conservation(fast))
    tiles = dt.heatmap.upscale(dt.heatmap.to_rgb(fast.relevance), 4)
    dt.heatmap.save_png(args.out, dt.heatmap.grid(tiles, ncols=4))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
