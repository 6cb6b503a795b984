"""Which heatmaps are faithful? Samek et al.'s perturbation experiment on MNIST with our own LeNet.

Samek, Binder, Montavon, Lapuschkin & Müller, "Evaluating the visualization of what a deep neural network
has learned" (IEEE TNNLS 2017): remove the input's regions in the order a heatmap ranks them (most
relevant first, MoRF), replace them by uniform noise, and measure how fast the explained output falls.
The area over that curve (AOPC) is larger for a heatmap that ranks the evidence first; the paper found
LRP above sensitivity analysis, and both above a random order.

This script

1. trains a LeNet-5 (conv5x5(6, p2)-ReLU-maxpool2-conv5x5(16)-ReLU-maxpool2-120-84-10, ReLU) on the real
   MNIST training set with PyTorch (seeded; 2 epochs of Adam, a minute or so on 2 cores), imports it with
   ``dt.from_torch`` and saves it (``lenet5_mnist.npz``; reused on the next run unless ``--retrain``);
2. explains the first ``--n`` test digits with the DTD/LRP composites, the gradient methods and the
   baselines (integrated gradients, SmoothGrad, occlusion), each for the predicted class;
3. runs ``dt.evaluate.compare``, most relevant first (MoRF), with three protocols: pixel flipping (8 pixels
   per step, replaced by 0 = black), region perturbation (4x4 regions, black) and region perturbation with
   uniform noise in [0, 1] (Samek et al.'s fill, at MNIST's scale), plus the random order, all on the
   compiled engine;
4. prints the table (AOPC, mean +- standard error over the digits, and the paired difference to
   sensitivity) and writes the curve plot
   (``faithfulness_mnist.png``) and ``faithfulness_mnist.json``.

    python examples/faithfulness_mnist.py                       # --n 1000: a few minutes on 2 cores
    python examples/faithfulness_mnist.py --n 200 --out /tmp/f  # quicker

MNIST is searched in ``$DEEPTAYLOR_MNIST`` and ``shared/data/mnist`` / ``data/mnist`` above the current
directory; or pass ``--mnist DIR``. Needs PyTorch (training) and matplotlib (the plot).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import deeptaylor as dt
from deeptaylor import evaluate as ev

METHODS = {
    "deep-taylor (zB, z+)": lambda: dt.composites.deep_taylor(0.0, 1.0),
    "epsilon-plus (LRP)": lambda: dt.composites.epsilon_plus(),
    "epsilon-alpha2-beta1 (LRP)": lambda: dt.composites.epsilon_alpha2_beta1(),
    "gradient x input": lambda: dt.methods.GradientXInput(),
    "integrated gradients": lambda: dt.methods.IntegratedGradients(steps=32),
    "occlusion 4x4/2": lambda: dt.methods.Occlusion(window=4, stride=2),
    "smoothgrad": lambda: dt.methods.SmoothGrad(n=20, sigma=0.1),
    "sensitivity": lambda: dt.methods.Sensitivity(),
    "random": lambda: None,
}


def train_lenet(mnist: Path, epochs: int, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    images, labels = dt.datasets.load_mnist(mnist, "train")
    x = torch.from_numpy(images[:, None].astype(np.float32) / 255)
    y = torch.from_numpy(labels.astype(np.int64))
    model = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        print(f"  epoch {epoch + 1}: training loss {total / len(x):.4f}", flush=True)
    return dt.from_torch(model.eval(), input_shape=(1, 28, 28))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000, help="test digits evaluated (default 1000)")
    ap.add_argument("--mnist", default=None, help="directory with the MNIST IDX files (default: search)")
    ap.add_argument("--out", default="deeptaylor-faithfulness", help="output directory")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--retrain", action="store_true", help="train even if the saved model exists")
    ap.add_argument("--backend", default="auto", choices=["auto", "cpu", "numpy"])
    args = ap.parse_args()
    mnist = Path(args.mnist) if args.mnist else dt.datasets.find_mnist()
    if mnist is None:
        sys.exit("MNIST not found: pass --mnist DIR or set DEEPTAYLOR_MNIST")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_file = out / "lenet5_mnist.npz"
    t0 = time.perf_counter()
    if model_file.is_file() and not args.retrain:
        net = dt.load(model_file)
        print(f"loaded {model_file}")
    else:
        print("training LeNet-5 on MNIST (60,000 digits)")
        net = train_lenet(mnist, args.epochs, args.seed)
        dt.save(net, model_file, input_shape=(1, 28, 28))
        print(f"  {time.perf_counter() - t0:.0f} s; saved {model_file}")
    images, labels = dt.datasets.load_mnist(mnist, "test")
    x_all = images[:, None].astype(np.float32) / np.float32(255)
    fwd = dt.Explainer(net, dt.methods.Gradient(), backend=args.backend)
    acc = float((np.argmax(fwd.forward(x_all), axis=1) == labels).mean())
    print(f"test accuracy {acc:.2%} (10,000 digits)")
    x = x_all[:args.n]
    target = np.argmax(fwd.forward(x), axis=1)
    methods = {name: make() for name, make in METHODS.items()}

    protocols = {
        "pixel flipping (8 pixels per step, black)": dict(
            measure="pixel_flipping", features_per_step=8, baseline=0.0, order="morf"),
        "region perturbation (4x4, black)": dict(
            measure="region_perturbation", region_size=4, baseline=0.0, order="morf"),
        "region perturbation (4x4, uniform noise)": dict(
            measure="region_perturbation", region_size=4, baseline="uniform", order="morf", seed=args.seed),
    }
    results: dict[str, dict[str, ev.PerturbationCurves]] = {}
    for title, kw in protocols.items():
        t = time.perf_counter()
        results[title] = ev.compare(net, x, methods, target, backend=args.backend, **kw)
        runs = sum(r.evaluated for r in results[title].values())
        print(f"{title}: {time.perf_counter() - t:.1f} s ({runs} perturbed inputs run)")

    names = list(methods)
    print(f"\nMoRF AOPC on {args.n} MNIST test digits (mean +- standard error; larger = more faithful);")
    print("in brackets: the paired difference to sensitivity (mean +- standard error over the same digits)")
    print(f"{'method':<28}" + "".join(f"{t:>44}" for t in protocols))
    table: dict[str, dict] = {}
    for name in names:
        cells = []
        for title in protocols:
            r, s = results[title][name], results[title]["sensitivity"]
            sem = float(r.aopc.std(ddof=1) / np.sqrt(r.aopc.size))
            d = r.aopc - s.aopc
            dsem = float(d.std(ddof=1) / np.sqrt(d.size))
            cells.append(f"{r.mean_aopc:.3f} +- {sem:.3f} [{d.mean():+.3f} +- {dsem:.3f}]")
            table.setdefault(name, {})[title] = {"aopc": r.mean_aopc, "sem": sem, "minus_sensitivity": float(d.mean()),
                                                 "minus_sensitivity_sem": dsem}
        print(f"{name:<28}" + "".join(f"{c:>44}" for c in cells))

    report = {"samples": args.n, "test_accuracy": acc, "model": "LeNet-5 (conv6-pool-conv16-pool-120-84-10, ReLU)",
              "epochs": args.epochs, "seed": args.seed, "table": table,
              "curves": {t: ev.summary(r) for t, r in results.items()}}
    (out / "faithfulness_mnist.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"wrote {out / 'faithfulness_mnist.json'} (no plot: matplotlib is not installed)")
        return 0
    fig, axes = plt.subplots(1, len(protocols), figsize=(15, 4.4), dpi=100)
    for ax, (title, res) in zip(axes, results.items(), strict=True):
        for name, r in res.items():
            ax.plot(r.removed / r.units, r.mean_curve, label=f"{name}: {r.mean_aopc:.2f}",
                    linestyle="--" if name == "random" else "-", linewidth=1.4)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("share of " + ("regions" if "region" in title else "pixels") + " replaced (MoRF)")
        ax.set_ylabel("logit of the predicted class (mean)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="method: AOPC", title_fontsize=7)
    fig.suptitle(f"LeNet-5 on MNIST ({args.n} test digits): perturbation curves", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "faithfulness_mnist.png")
    print(f"wrote {out / 'faithfulness_mnist.json'}, {out / 'faithfulness_mnist.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
