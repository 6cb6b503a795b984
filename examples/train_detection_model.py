"""Train the detection model bundled with deeptaylor (``deeptaylor/data/detection_1568_400_1.npz``).

    python examples/train_detection_model.py [--steps 30000] [--out python/deeptaylor/data/detection_1568_400_1.npz]

Recipe (recorded in python/deeptaylor/data/README.md): 60,000 training images of the 28x56 detection
task built from MNIST train (``mnist_detection(..., seed=1)``), ``train_detection`` with 400 hidden
units, batch 20, lr 0.005, weight_std 0.1/sqrt(1568), seed 0; the weights are stored as float32.
Accuracy is measured on 2,000 images built from MNIST t10k (``seed=2``) and on the demo's images
built from the bundled sample (``seed=0``).
"""

import argparse
import time

import numpy as np

import deeptaylor as dt
from deeptaylor import datasets as ds
from deeptaylor import train as tr

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=30000)
p.add_argument("--mnist", default=None)
p.add_argument("--out", default="python/deeptaylor/data/detection_1568_400_1.npz")
args = p.parse_args()

mnist = args.mnist or ds.find_mnist()
if mnist is None:
    raise SystemExit("MNIST not found: pass --mnist DIR")
xi, yi = ds.load_mnist(mnist, "train")
xt, yt = ds.load_mnist(mnist, "test")
train_set = ds.mnist_detection(xi, yi, 60000, seed=1)
test_set = ds.mnist_detection(xt, yt, 2000, seed=2)
t0 = time.perf_counter()
res = tr.train_detection(train_set.flat(), train_set.labels, args.steps, lr=0.005,
                         weight_std=0.1 / np.sqrt(1568), seed=0, log_every=5000,
                         val=(test_set.flat(), test_set.labels), progress=True)
print(res.log)
print(f"trained {args.steps} steps in {time.perf_counter() - t0:.0f} s")
dt.save(res.net, args.out)
net = dt.load(args.out)
images, labels = ds.load_sample()
demo = ds.mnist_detection(images, labels, 200, seed=0)
print(f"test accuracy (2000 t10k images): {tr.detection_accuracy(net, test_set.flat(), test_set.labels):.2%}")
print(f"demo accuracy (200 images from the bundled sample): {tr.detection_accuracy(net, demo.flat(), demo.labels):.2%}")
print(f"max bias {float(net[0].bias.max()):.3g} (must be <= 0)")
