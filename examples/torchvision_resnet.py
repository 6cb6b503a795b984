"""Explain a torchvision ResNet-50 with deeptaylor and with Zennit, and compare heatmaps and speed.

    python examples/torchvision_resnet.py [--model resnet50] [--batch 4] [--out resnet_heatmaps.png]

Needs torch, torchvision and zennit (the ``test`` extra installs them). No weights are downloaded:
the model is randomly initialised (seeded), with random BatchNorm statistics so that folding them
matters. The same model goes to deeptaylor (``dt.Explainer(model, "epsilon_plus_flat",
input_shape=...)``, which imports it through torch.fx) and to Zennit (``EpsilonPlusFlat`` with its
``ResNetCanonizer``); the script prints both timings and the max-normalised heatmap difference per
image, and writes deeptaylor's heatmaps as a PNG grid.
"""

from __future__ import annotations

import argparse
import sys
import time
import types

import numpy as np

import deeptaylor as dt


def _torchvision():
    # PyPI's torchvision wheel is built for CUDA torch; its compiled ops fail to register beside the
    # CPU torch, the pure-Python model zoo works once this module is stubbed
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision

    return torchvision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", default="resnet_heatmaps.png")
    parser.add_argument("--bn-eps", type=float, default=None,
                        help="set every BatchNorm's eps (0 removes the one difference to Zennit: its merged "
                             "BatchNorm keeps eps, x / sqrt(1 + eps))")
    args = parser.parse_args()

    import torch

    tv = _torchvision()
    from zennit.torchvision import ResNetCanonizer
    from zennit.composites import EpsilonPlusFlat

    torch.manual_seed(0)
    model = getattr(tv.models, args.model)(weights=None).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0.0, 0.1, generator=g)
                if args.bn_eps is not None:
                    m.eps = args.bn_eps
    torch.set_num_threads(2)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g)

    t0 = time.perf_counter()
    ex = dt.Explainer(model, "epsilon_plus_flat", backend="cpu", threads=2, input_shape=(3, args.size, args.size))
    t_import = time.perf_counter() - t0
    ex.explain(x[:1])                                   # builds the plan for this input shape
    t0 = time.perf_counter()
    res = ex.explain(x)
    t_dt = (time.perf_counter() - t0) / args.batch
    print(f"{args.model}: {len(ex.net)} nodes imported, {len(ex.graph)} after canonicalisation "
          f"(import {t_import:.1f} s)")
    print(f"deeptaylor cpu: {t_dt * 1e3:.0f} ms per image, predicted classes {res.target.tolist()}")

    xz = x.clone().requires_grad_(True)
    composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])
    with composite.context(model) as modified:
        for _ in range(2):                              # the first call warms up torch's kernels
            t0 = time.perf_counter()
            out = modified(xz)
            onehot = torch.zeros_like(out)
            onehot[torch.arange(args.batch), torch.as_tensor(res.target)] = 1.0
            (rz,) = torch.autograd.grad(out, xz, onehot * out)
            t_z = (time.perf_counter() - t0) / args.batch
    rz = rz.detach().numpy()
    diff = [float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(res.relevance, rz)]
    print(f"Zennit:         {t_z * 1e3:.0f} ms per image ({t_z / t_dt:.1f} x deeptaylor's time)")
    print("max-normalised heatmap difference per image: " + ", ".join(f"{d:.1e}" for d in diff))
    tiles = dt.heatmap.to_rgb(res.relevance)
    dt.heatmap.save_png(args.out, dt.heatmap.grid(tiles, ncols=min(4, args.batch)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
