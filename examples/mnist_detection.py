"""The seeds' MNIST detection experiment (Montavon et al. 2017, arXiv 1512.02479; slides 003).

Trains the 1568-400-1 detection-pooling network (b <= 0, SGD with minibatches of 20) on 28x56 images
of a target digit 0-3 next to a distractor 4-9, snapshots it after each step count, and for fixed test
images writes one PNG grid per step count (input | sensitivity | w2 | z+ | zB), a scatter plot of
sum_p R_p against f(x) per method (with matplotlib) and a table of conservation/positivity/localisation.

    python examples/mnist_detection.py                          # 0,100,1000,10000 steps: a few minutes
    python examples/mnist_detection.py --steps 0,1000,30000     # any schedule
    python examples/mnist_detection.py --paper                  # up to the paper's 300,000 steps (long)

The same as ``deeptaylor experiment mnist-detection [...]``. MNIST is searched in ``$DEEPTAYLOR_MNIST``
and ``shared/data/mnist`` / ``data/mnist`` above the current directory; or pass ``--mnist DIR``.
"""

import sys

from deeptaylor.cli import main

if __name__ == "__main__":
    sys.exit(main(["experiment", "mnist-detection", *sys.argv[1:]]))
