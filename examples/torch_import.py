"""Deeper models come from PyTorch: train a small CNN with torch, import it, explain it.

    python examples/torch_import.py            # needs the 'torch' extra; a few seconds on the bundled digits

deeptaylor's own trainer (deeptaylor.train) covers the seeds' small dense networks; anything deeper is
trained in PyTorch and converted with the importer (``dt.from_torch``), then explained like any network.
"""

import sys

import numpy as np

import deeptaylor as dt
from deeptaylor import datasets as ds
from deeptaylor import heatmap as hm

try:
    import torch
    from torch import nn
except ImportError:
    sys.exit("this example needs PyTorch: pip install 'deeptaylor[torch]'")
from_torch = getattr(dt, "from_torch", None) or getattr(dt.io, "from_torch", None)
if from_torch is None:
    sys.exit("this deeptaylor build has no PyTorch importer (dt.from_torch)")

torch.manual_seed(0)
images, labels = ds.load_sample()                      # 300 MNIST test digits bundled with deeptaylor
x = torch.tensor(images[:, None] / 255.0, dtype=torch.float32)
y = torch.tensor(labels.astype(np.int64))
model = nn.Sequential(nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(16 * 7 * 7, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
for _step in range(300):                               # a toy fit of the 300 digits, not a benchmark
    idx = torch.randint(0, len(x), (20,))
    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
model.eval()
print(f"train loss {loss.item():.3f}, accuracy on the 300 digits "
      f"{(model(x).argmax(1) == y).float().mean().item():.1%}")

net = from_torch(model, input_shape=(1, 28, 28))
res = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0)).explain(x[:8].numpy().astype(np.float64))
print(dt.checks.conservation(res))
tiles = [hm.to_rgb(r[0]) for r in res.relevance]
print("wrote", hm.save_png("torch_cnn_heatmaps.png", hm.grid(tiles, ncols=8)))
