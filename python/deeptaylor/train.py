"""A small, plain NumPy SGD trainer for the seeds' networks (no framework, float32, seeded).

Two models, both chains of :class:`~deeptaylor.Dense` and :class:`~deeptaylor.ReLU`:

* :func:`train_detection` - the detection-pooling network of Montavon et al. 2017 (slides 003,
  "Example MNIST"): ``x_j = max(0, sum_i x_i w_ij + b_j)``, ``f(x) = x_k = sum_j x_j`` (as
  ``Dense(1568 -> 400), ReLU, GlobalSumPool``), trained with the squared loss
  ``0.5 * (f(x) - y)^2`` by minibatch SGD (batch 20 as in the paper). Biases start at zero and are
  kept ``b <= 0`` by clipping after every step, the condition under which deep Taylor decomposition
  of this network is consistent (f(x) = 0 has a root at the origin of every hidden unit).
* :func:`train_classifier` - an MLP ``Dense, ReLU, ..., Dense`` with softmax cross-entropy.

Deeper models (CNNs, VGG...) are best trained in PyTorch and imported (``examples/torch_import.py``).

Every run is determined by ``seed``: initial weights and minibatch order come from
``numpy.random.default_rng(seed)``. Minibatches are drawn by cycling over seeded permutations of the
training set (epochs). A progress bar is shown with ``progress=True`` when ``tqdm`` is installed.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError, ShapeError
from .layers import Dense, GlobalSumPool, ReLU
from .network import Sequential

__all__ = [
    "TrainLog",
    "TrainResult",
    "classifier_accuracy",
    "detection_accuracy",
    "train_classifier",
    "train_detection",
]


@dataclass
class TrainLog:
    """Loss and accuracy during training, one row per logged step.

    ``loss``/``accuracy`` are averages over the minibatches since the previous row (training data);
    ``val_loss``/``val_accuracy`` are on the validation set (NaN when none was given).
    """

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)

    def rows(self) -> list[tuple[int, float, float, float, float]]:
        return list(zip(self.step, self.loss, self.accuracy, self.val_loss, self.val_accuracy, strict=False))

    def __str__(self) -> str:
        lines = [f"{'step':>8} {'loss':>10} {'acc':>7} {'val_loss':>10} {'val_acc':>7}"]
        lines += [f"{s:>8d} {lo:>10.4g} {a:>7.3f} {vl:>10.4g} {va:>7.3f}" for s, lo, a, vl, va in self.rows()]
        return "\n".join(lines)


@dataclass
class TrainResult:
    """Result of a training run.

    Attributes
    ----------
    net : Sequential, the trained network (float32-exact weights, so ``dt.save`` stores float32)
    log : TrainLog
    snapshots : dict step -> Sequential, the network after each requested checkpoint step
        (step 0 = the initial network)
    """

    net: Sequential
    log: TrainLog
    snapshots: dict[int, Sequential]


# ----------------------------------------------------------------------------------------------
# model: a list of (W (out, in), b (out,)) float32 arrays, ReLU after every layer except the last
# when head == "logits"; head == "sum" puts a ReLU after the last Dense and sums its outputs.


def _forward(params: list[list[np.ndarray]], x: np.ndarray, head: str) -> tuple[np.ndarray, list[np.ndarray],
                                                                              list[np.ndarray]]:
    """Returns (output (B, K), inputs of every Dense, pre-activations z of every Dense)."""
    a = x
    inputs, zs = [], []
    for i, (w, b) in enumerate(params):
        inputs.append(a)
        z = a @ w.T + b
        zs.append(z)
        last = i == len(params) - 1
        a = z if (last and head == "logits") else np.maximum(z, 0)
    if head == "sum":
        a = a.sum(axis=1, keepdims=True)
    return a, inputs, zs


def _loss_grad(out: np.ndarray, y: np.ndarray, loss: str) -> tuple[float, np.ndarray, np.ndarray]:
    """(mean loss, dL/dout (B, K), per-sample correctness (B,) bool)."""
    b = out.shape[0]
    if loss == "mse":  # detection: y (B,) target output, decision threshold 0.5
        diff = out[:, 0] - y
        return float(0.5 * np.mean(diff * diff)), (diff / b)[:, None].astype(out.dtype), (out[:, 0] > 0.5) == (y > 0.5)
    z = out - out.max(axis=1, keepdims=True)  # softmax cross-entropy, y (B,) int classes
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    rows = np.arange(b)
    g = np.exp(logp)
    g[rows, y] -= 1.0
    return float(-logp[rows, y].mean()), (g / b).astype(out.dtype), np.argmax(out, axis=1) == y


def _sgd_step(params: list[list[np.ndarray]], x: np.ndarray, y: np.ndarray, lr: float, head: str, loss: str,
              bias_max: float | None) -> tuple[float, float]:
    out, inputs, zs = _forward(params, x, head)
    value, g, correct = _loss_grad(out, y, loss)
    if head == "sum":
        g = np.broadcast_to(g, zs[-1].shape)
    for i in range(len(params) - 1, -1, -1):
        w, b = params[i]
        if not (i == len(params) - 1 and head == "logits"):
            g = g * (zs[i] > 0)
        gw = g.T @ inputs[i]
        gb = g.sum(axis=0)
        if i > 0:
            g = g @ w
        w -= lr * gw
        b -= lr * gb
        if bias_max is not None:
            np.minimum(b, bias_max, out=b)
    return value, float(correct.mean())


def _to_net(params: list[list[np.ndarray]], head: str) -> Sequential:
    layers: list[Any] = []
    for i, (w, b) in enumerate(params):
        layers.append(Dense(w.astype(np.float64), b.astype(np.float64)))
        if not (i == len(params) - 1 and head == "logits"):
            layers.append(ReLU())
    if head == "sum":
        layers.append(GlobalSumPool())
    return Sequential(layers)


def _evaluate(params: list[list[np.ndarray]], x: np.ndarray, y: np.ndarray, head: str, loss: str,
              chunk: int = 2000) -> tuple[float, float]:
    tot_loss = tot_ok = 0.0
    for s in range(0, x.shape[0], chunk):
        out, _, _ = _forward(params, x[s:s + chunk], head)
        v, _, ok = _loss_grad(out, y[s:s + chunk], loss)
        tot_loss += v * out.shape[0]
        tot_ok += float(ok.sum())
    return tot_loss / x.shape[0], tot_ok / x.shape[0]


def _check_xy(x: Any, y: Any, classes: bool) -> tuple[np.ndarray, np.ndarray]:
    xa = np.asarray(x)
    if xa.ndim < 2 or xa.shape[0] == 0:
        raise ShapeError(f"x must be (N, ...) with N >= 1, got shape {xa.shape}")
    if xa.dtype.kind != "f":
        raise InputError(f"x must be a float array (scale uint8 images by 1/255), got dtype {xa.dtype}")
    xa = np.ascontiguousarray(xa.reshape(xa.shape[0], -1), dtype=np.float32)
    if not np.all(np.isfinite(xa)):
        raise InputError("x contains NaN or Inf")
    ya = np.asarray(y)
    if ya.shape != (xa.shape[0],):
        raise ShapeError(f"y must have shape ({xa.shape[0]},), got {ya.shape}")
    if classes:
        if ya.dtype.kind not in "iu":
            raise InputError(f"class labels must be integers, got dtype {ya.dtype}")
        ya = ya.astype(np.int64)
        if ya.min() < 0:
            raise InputError("class labels must be >= 0")
    else:
        ya = ya.astype(np.float32)
    return xa, ya


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _run(params: list[list[np.ndarray]], x: np.ndarray, y: np.ndarray, steps: int, batch_size: int, lr: float,
         rng: np.random.Generator, head: str, loss: str, bias_max: float | None, checkpoints: Iterable[int],
         log_every: int, val: tuple[np.ndarray, np.ndarray] | None, progress: bool,
         callback: Callable[[int, Sequential], None] | None) -> TrainResult:
    steps = _positive_int(steps, "steps", 0)
    batch_size = _positive_int(batch_size, "batch_size")
    log_every = _positive_int(log_every, "log_every")
    if not (isinstance(lr, (int, float)) and np.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a positive number, got {lr!r}")
    cps = sorted({_positive_int(c, "checkpoint", 0) for c in checkpoints})
    if cps and cps[-1] > steps:
        raise InputError(f"checkpoint {cps[-1]} is beyond the number of steps ({steps})")
    snapshots: dict[int, Sequential] = {}
    log = TrainLog()

    def checkpoint(step: int) -> None:
        if step in cps:
            snapshots[step] = _to_net(params, head)
            if callback is not None:
                callback(step, snapshots[step])

    def record(step: int, losses: list[float], accs: list[float]) -> None:
        vl, va = _evaluate(params, val[0], val[1], head, loss) if val is not None else (np.nan, np.nan)
        log.step.append(step)
        log.loss.append(float(np.mean(losses)) if losses else np.nan)
        log.accuracy.append(float(np.mean(accs)) if accs else np.nan)
        log.val_loss.append(float(vl))
        log.val_accuracy.append(float(va))

    checkpoint(0)
    bar = None
    if progress and steps > 0:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="training", unit="step")
        except ImportError:
            bar = None
    n = x.shape[0]
    order = rng.permutation(n)
    pos = 0
    losses: list[float] = []
    accs: list[float] = []
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            order = rng.permutation(n)
            pos = 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        with np.errstate(over="ignore", invalid="ignore"):  # divergence is reported below, not warned
            v, a = _sgd_step(params, x[idx], y[idx], lr, head, loss, bias_max)
        if not np.isfinite(v):
            raise InputError(f"training diverged at step {step} (loss {v}); lower the learning rate")
        losses.append(v)
        accs.append(a)
        if step % log_every == 0 or step == steps:
            record(step, losses, accs)
            if bar is not None:
                bar.set_postfix(loss=f"{log.loss[-1]:.4g}", acc=f"{log.accuracy[-1]:.3f}")
            losses, accs = [], []
        checkpoint(step)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return TrainResult(net=_to_net(params, head), log=log, snapshots=snapshots)


def train_detection(x: Any, y: Any, steps: int, *, hidden: int = 400, batch_size: int = 20, lr: float = 0.005,
                    weight_std: float | None = None, seed: int | None = 0, checkpoints: Iterable[int] = (),
                    log_every: int = 500, val: tuple[Any, Any] | None = None, progress: bool = False,
                    callback: Callable[[int, Sequential], None] | None = None) -> TrainResult:
    """Train the detection-pooling network ``Dense(F -> hidden), ReLU, GlobalSumPool`` by SGD.

    Parameters
    ----------
    x : float (N, F) or (N, H, W) inputs (flattened in C order), e.g. the 28x56 detection images in [0, 1]
    y : (N,) target outputs, e.g. 1.0 where a target digit is present, 0.0 otherwise
    steps : number of SGD steps (minibatches); the paper uses 300,000
    hidden : hidden units (the paper: 400)
    batch_size : minibatch size (the paper: 20)
    lr : learning rate of plain SGD on the loss ``0.5 * mean((f(x) - y)^2)``
    weight_std : standard deviation of the normal initial weights (default ``0.1 / sqrt(F)``: small, so
        the untrained weights of pixels that are always 0 do not dominate the w² and zB heatmaps);
        biases start at 0
    seed : seeds the initial weights and the minibatch order
    checkpoints : step counts after which a copy of the network is kept in ``result.snapshots``
        (0 = the untrained network)
    log_every : log the mean training loss/accuracy (and the validation ones) every this many steps
    val : optional ``(x_val, y_val)`` evaluated at every log step
    progress : show a tqdm progress bar (if tqdm is installed)
    callback : called as ``callback(step, net)`` at every checkpoint

    Returns
    -------
    TrainResult
        ``net`` has ``b <= 0`` everywhere (clipped after every step). Accuracy counts
        ``f(x) > 0.5`` as "target present".
    """
    xa, ya = _check_xy(x, y, classes=False)
    if val is not None:
        val = _check_xy(val[0], val[1], classes=False)
        if val[0].shape[1] != xa.shape[1]:
            raise ShapeError(f"validation inputs have {val[0].shape[1]} features, training inputs {xa.shape[1]}")
    hidden = _positive_int(hidden, "hidden")
    rng = np.random.default_rng(seed)
    f = xa.shape[1]
    std = 0.1 / np.sqrt(f) if weight_std is None else float(weight_std)
    w = (rng.standard_normal((hidden, f)) * std).astype(np.float32)
    b = np.zeros(hidden, dtype=np.float32)
    return _run([[w, b]], xa, ya, steps, batch_size, lr, rng, "sum", "mse", 0.0, checkpoints, log_every, val,
                progress, callback)


def train_classifier(x: Any, y: Any, steps: int, *, hidden: Sequence[int] = (100,), classes: int | None = None,
                     batch_size: int = 20, lr: float = 0.05, seed: int | None = 0, checkpoints: Iterable[int] = (),
                     log_every: int = 500, val: tuple[Any, Any] | None = None, progress: bool = False,
                     callback: Callable[[int, Sequential], None] | None = None) -> TrainResult:
    """Train an MLP classifier ``Dense, ReLU, ..., Dense`` (logits) with softmax cross-entropy.

    Parameters
    ----------
    x : float (N, F) or (N, ...) inputs (flattened in C order)
    y : (N,) integer class labels in ``[0, classes)``
    hidden : sizes of the hidden layers
    classes : number of outputs (default ``max(y) + 1``)
    other parameters : as :func:`train_detection`; weights start He-normal, biases at 0, no bias
        constraint

    Returns
    -------
    TrainResult
        ``net`` outputs logits ``(N, classes)``; accuracy is top-1.
    """
    xa, ya = _check_xy(x, y, classes=True)
    k = int(ya.max()) + 1 if classes is None else _positive_int(classes, "classes")
    if ya.max() >= k:
        raise InputError(f"labels go up to {int(ya.max())} but classes={k}")
    if val is not None:
        val = _check_xy(val[0], val[1], classes=True)
    rng = np.random.default_rng(seed)
    sizes = [xa.shape[1], *[_positive_int(h, "hidden size") for h in hidden], k]
    params = [[(rng.standard_normal((o, i)) * np.sqrt(2.0 / i)).astype(np.float32), np.zeros(o, dtype=np.float32)]
              for i, o in itertools.pairwise(sizes)]
    return _run(params, xa, ya, steps, batch_size, lr, rng, "logits", "xent", None, checkpoints, log_every, val,
                progress, callback)


def detection_accuracy(net: Sequential, x: Any, y: Any, threshold: float = 0.5) -> float:
    """Share of samples where ``f(x) > threshold`` agrees with ``y > threshold``."""
    xa, ya = _check_xy(x, y, classes=False)
    out = net.forward(xa.astype(np.float64))[:, 0]
    return float(np.mean((out > threshold) == (ya > threshold)))


def classifier_accuracy(net: Sequential, x: Any, y: Any) -> float:
    """Top-1 accuracy of a classifier network."""
    xa, ya = _check_xy(x, y, classes=True)
    return float(np.mean(np.argmax(net.forward(xa.astype(np.float64)), axis=1) == ya))
