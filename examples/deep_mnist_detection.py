"""The paper's deep-network experiment (Montavon et al. 2017, arXiv 1512.02479, Sec. 5; slides 003).

Trains a deeper detection-pooling network with p-norm pooling on 28x56 images of a target digit 0-3
beside a distractor 4-9 (conv 5x5 (16) - ReLU - 2x2 l2-pooling - conv 5x5 (32) - ReLU - l2-pooling
over each map - Dense 32 - ReLU - sum; docs/experiments.md), then explains the same test images with
sensitivity analysis, Taylor decomposition at the nearest root point, the min-max relevance model, the
training-free relevance model and, as the baseline, deep Taylor decomposition of the one-layer
1568-400-1 network; writes heatmaps.png, the consistency plots (sum of relevance and negative relevance
against f(x)), table.txt and results.json.

    python examples/deep_mnist_detection.py                    # default schedule: a few minutes
    python examples/deep_mnist_detection.py --steps 10000      # longer training
    python examples/deep_mnist_detection.py --paper            # the paper's 300,000 steps (hours)

The same as ``deeptaylor experiment deep-mnist-detection [...]``. MNIST is searched in
``$DEEPTAYLOR_MNIST`` and ``shared/data/mnist`` / ``data/mnist`` above the current directory; or pass
``--mnist DIR``.
"""

import sys

from deeptaylor.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "deep-mnist-detection", *sys.argv[1:]]))
