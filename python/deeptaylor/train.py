"""A small, plain NumPy SGD trainer for the seeds' networks (no framework, float32, seeded).

Three trainers:

* :func:`train_detection` - the detection-pooling network of Montavon et al. 2017 (slides 003,
  "Example MNIST"): ``x_j = max(0, sum_i x_i w_ij + b_j)``, ``f(x) = x_k = sum_j x_j`` (as
  ``Dense(1568 -> 400), ReLU, GlobalSumPool``), trained with the squared loss
  ``0.5 * (f(x) - y)^2`` by minibatch SGD (batch 20 as in the paper). Biases start at zero and are
  kept ``b <= 0`` by clipping after every step, the condition under which deep Taylor decomposition
  of this network is consistent (f(x) = 0 has a root at the origin of every hidden unit).
* :func:`train_classifier` - an MLP ``Dense, ReLU, ..., Dense`` with softmax cross-entropy.
* :func:`train_network` - any chain of Dense, Conv2d, ReLU, p-norm / sum / max pooling, Flatten and
  a global sum (:data:`TRAINABLE_LAYERS`), from the weights the network holds: the deep
  detection-pooling networks of :mod:`deeptaylor.relevance_models` (Montavon et al. 2017, Sec. 4-5),
  with the squared loss or softmax cross-entropy, optional momentum and ``b <= 0`` kept by clipping.

Larger models (VGG, ResNet...) are best trained in PyTorch and imported (``examples/torch_import.py``).

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

from .errors import InputError, ShapeError, UnsupportedError
from .layers import Conv2d, Dense, Flatten, GlobalSumPool, LpPool, MaxPool2d, ReLU, SumPool2d
from .network import Sequential
from .stream import progress_bar

__all__ = [
    "TRAINABLE_LAYERS",
    "TrainLog",
    "TrainResult",
    "classifier_accuracy",
    "detection_accuracy",
    "train_classifier",
    "train_detection",
    "train_network",
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
    return _loop(lambda xb, yb: _sgd_step(params, xb, yb, lr, head, loss, bias_max),
                 lambda xv, yv: _evaluate(params, xv, yv, head, loss), lambda: _to_net(params, head),
                 x, y, steps, batch_size, lr, rng, checkpoints, log_every, val, progress, callback)


def _loop(step_fn: Callable[[np.ndarray, np.ndarray], tuple[float, float]],
          eval_fn: Callable[[np.ndarray, np.ndarray], tuple[float, float]], to_net: Callable[[], Sequential],
          x: np.ndarray, y: np.ndarray, steps: int, batch_size: int, lr: float, rng: np.random.Generator,
          checkpoints: Iterable[int], log_every: int, val: tuple[np.ndarray, np.ndarray] | None, progress: bool,
          callback: Callable[[int, Sequential], None] | None) -> TrainResult:
    """The SGD loop shared by the trainers: minibatches cycle over seeded permutations of ``x``;
    ``step_fn(xb, yb)`` does one update and returns (loss, accuracy) of the minibatch, ``eval_fn`` the
    same on a validation set without updating, ``to_net()`` the current network."""
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
            snapshots[step] = to_net()
            if callback is not None:
                callback(step, snapshots[step])

    def record(step: int, losses: list[float], accs: list[float]) -> None:
        vl, va = eval_fn(val[0], val[1]) if val is not None else (np.nan, np.nan)
        log.step.append(step)
        log.loss.append(float(np.mean(losses)) if losses else np.nan)
        log.accuracy.append(float(np.mean(accs)) if accs else np.nan)
        log.val_loss.append(float(vl))
        log.val_accuracy.append(float(va))

    checkpoint(0)
    bar = progress_bar(steps, progress and steps > 0, desc="training", unit="step")
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
            v, a = step_fn(x[idx], y[idx])
        if not np.isfinite(v):
            raise InputError(f"training diverged at step {step} (loss {v}); lower the learning rate")
        losses.append(v)
        accs.append(a)
        if step % log_every == 0 or step == steps:
            record(step, losses, accs)
            bar.set_postfix(loss=f"{log.loss[-1]:.4g}", acc=f"{log.accuracy[-1]:.3f}")
            losses, accs = [], []
        checkpoint(step)
        bar.update(1)
    bar.close()
    return TrainResult(net=to_net(), log=log, snapshots=snapshots)


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


# ----------------------------------------------------------------------------------------------
# Any chain of Dense / Conv2d / ReLU / pooling layers (the deep detection-pooling networks of
# deeptaylor.relevance_models): float32 forward and backward passes written out per layer kind.

#: the layer kinds :func:`train_network` trains through
TRAINABLE_LAYERS = (Dense, Conv2d, ReLU, LpPool, SumPool2d, MaxPool2d, GlobalSumPool, Flatten)


def _conv_cols(a: np.ndarray, layer: Conv2d) -> tuple[np.ndarray, tuple[int, int]]:
    """im2col of a (N, C, H, W) for ``layer``: (N*OH*OW, C*KH*KW) and (OH, OW)."""
    t, b, lft, r = layer.padding
    ap = np.pad(a, ((0, 0), (0, 0), (t, b), (lft, r))) if (t or b or lft or r) else a
    kh, kw = layer.kernel_size
    sh, sw = layer.stride
    win = np.lib.stride_tricks.sliding_window_view(ap, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    n, c, oh, ow = win.shape[:4]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw), (oh, ow)


def _conv_col2im(gcols: np.ndarray, layer: Conv2d, shape: tuple[int, ...], out: tuple[int, int]) -> np.ndarray:
    """Transpose of :func:`_conv_cols`: (N*OH*OW, C*KH*KW) -> the input's gradient (N, C, H, W)."""
    n, c, h, w = shape
    t, b, lft, r = layer.padding
    kh, kw = layer.kernel_size
    sh, sw = layer.stride
    oh, ow = out
    g6 = gcols.reshape(n, oh, ow, c, kh, kw)
    gp = np.zeros((n, c, h + t + b, w + lft + r), dtype=gcols.dtype)
    for i in range(kh):
        for j in range(kw):
            gp[:, :, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw] += g6[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return gp[:, :, t:t + h, lft:lft + w]


def _lp_windows(layer: LpPool, a: np.ndarray) -> np.ndarray | None:
    """Non-overlapping windows (stride = kernel) as a view (N, C, OH, KH, OW, KW), else None."""
    if layer.kernel_size is None or layer.stride != layer.kernel_size:
        return None
    (kh, kw), (h, w) = layer.kernel_size, a.shape[2:]
    oh, ow = h // kh, w // kw
    return a[:, :, :oh * kh, :ow * kw].reshape(a.shape[0], a.shape[1], oh, kh, ow, kw)


def _lp_forward(layer: LpPool, a: np.ndarray) -> np.ndarray:
    """p-norm pooling ``(sum |a|^p)^(1/p)`` over each window (or the whole sample), computed as
    ``m (sum (|a|/m)^p)^(1/p)`` with ``m`` the window's largest ``|a|`` so that it neither under- nor
    overflows."""
    from .reference import ops

    p = layer.p
    ab = np.abs(a)
    if layer.kernel_size is None:
        flat = ab.reshape(a.shape[0], -1)
        m = flat.max(axis=1, keepdims=True)
        s = (np.divide(flat, m, out=np.zeros_like(flat), where=m > 0) ** p).sum(axis=1, keepdims=True)
        return m * s ** (1.0 / p)
    win = _lp_windows(layer, ab)
    if win is not None:
        m = win.max(axis=(3, 5), keepdims=True)
        s = (np.divide(win, m, out=np.zeros_like(win), where=m > 0) ** p).sum(axis=(3, 5))
        return m[:, :, :, 0, :, 0] * s ** (1.0 / p)
    # overlapping windows have different maxima: scale tap by tap, in the output's layout
    m, _ = ops.maxpool_forward(ab, layer.kernel_size, layer.stride, layer.padding)
    taps = ops.window_taps(a.shape[2], a.shape[3], layer.kernel_size, layer.stride, layer.padding)
    next(taps)
    s = np.zeros_like(m)
    safe = np.where(m > 0, m, 1)
    for _, _, rows, cols in taps:
        s += (ab[:, :, rows, cols] / safe) ** p
    return m * s ** (1.0 / p)


def _lp_backward(layer: LpPool, a: np.ndarray, y: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Gradient of :func:`_lp_forward`: ``dy/da_i = sign(a_i) (|a_i| / y)^(p-1)`` (0 where y = 0)."""
    from .reference import ops

    p = layer.p
    if layer.kernel_size is None:
        yb = y.reshape((-1,) + (1,) * (a.ndim - 1))
        gb = g.reshape(yb.shape)
        ratio = np.divide(np.abs(a), yb, out=np.zeros_like(a), where=yb > 0)
        return np.sign(a) * ratio ** (p - 1) * gb
    win = _lp_windows(layer, a)
    if win is not None:
        yb, gb = y[:, :, :, None, :, None], g[:, :, :, None, :, None]
        ratio = np.divide(np.abs(win), yb, out=np.zeros_like(win), where=yb > 0)
        ga = np.zeros_like(a)
        n, c, oh, kh, ow, kw = win.shape
        ga[:, :, :oh * kh, :ow * kw] = (np.sign(win) * ratio ** (p - 1) * gb).reshape(n, c, oh * kh, ow * kw)
        return ga
    taps = ops.window_taps(a.shape[2], a.shape[3], layer.kernel_size, layer.stride, layer.padding)
    next(taps)
    ga = np.zeros_like(a)
    safe = np.where(y > 0, y, 1)
    for _, _, rows, cols in taps:
        v = a[:, :, rows, cols]
        ga[:, :, rows, cols] += np.where(y > 0, np.sign(v) * (np.abs(v) / safe) ** (p - 1) * g, 0)
    return ga


class _Chain:
    """Parameters and float32 passes of a Sequential of :data:`TRAINABLE_LAYERS` for :func:`train_network`."""

    def __init__(self, net: Sequential, loss: str, lr: float, momentum: float, bias_max: float | None) -> None:
        self.layers = list(net.layers)
        self.loss, self.lr, self.momentum, self.bias_max = loss, lr, momentum, bias_max
        self.params: dict[int, list[np.ndarray]] = {}
        for i, layer in enumerate(self.layers):
            if isinstance(layer, (Dense, Conv2d)):
                self.params[i] = [np.array(layer.weight, dtype=np.float32), np.array(layer.bias, dtype=np.float32)]
        self.velocity = {i: [np.zeros_like(w), np.zeros_like(b)] for i, (w, b) in self.params.items()}

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[Any]]:
        from .reference import ops

        a = x
        caches: list[Any] = []
        for i, layer in enumerate(self.layers):
            if isinstance(layer, Dense):
                w, b = self.params[i]
                caches.append(a)
                a = a @ w.T + b
            elif isinstance(layer, Conv2d):
                w, b = self.params[i]
                cols, (oh, ow) = _conv_cols(a, layer)
                caches.append((cols, a.shape, (oh, ow)))
                z = cols @ w.reshape(w.shape[0], -1).T + b
                a = z.reshape(a.shape[0], oh, ow, -1).transpose(0, 3, 1, 2)
            elif isinstance(layer, ReLU):
                caches.append(a > 0)
                a = np.maximum(a, 0)
            elif isinstance(layer, LpPool):
                y = _lp_forward(layer, a)
                caches.append((a, y))
                a = y
            elif isinstance(layer, SumPool2d):
                pad = layer.resolved_padding(*a.shape[2:])
                caches.append((a.shape, pad))
                a = ops.window_sum(a, layer.kernel_size, layer.stride, pad)
            elif isinstance(layer, MaxPool2d):
                pad = layer.resolved_padding(*a.shape[2:])
                y, arg = ops.maxpool_forward(a, layer.kernel_size, layer.stride, pad)
                caches.append((a.shape, pad, arg))
                a = y
            elif isinstance(layer, GlobalSumPool):
                caches.append(a.shape)
                a = a.reshape(a.shape[0], -1).sum(axis=1, keepdims=True)
            else:  # Flatten
                caches.append(a.shape)
                a = a.reshape(a.shape[0], -1)
        return a, caches

    def backward(self, g: np.ndarray, caches: list[Any]) -> dict[int, list[np.ndarray]]:
        from .reference import ops

        grads: dict[int, list[np.ndarray]] = {}
        for i in range(len(self.layers) - 1, -1, -1):
            layer, cache = self.layers[i], caches[i]
            if isinstance(layer, Dense):
                w, _ = self.params[i]
                grads[i] = [g.T @ cache, g.sum(axis=0)]
                if i > 0:
                    g = g @ w
            elif isinstance(layer, Conv2d):
                w, _ = self.params[i]
                cols, shape, out = cache
                g2 = g.transpose(0, 2, 3, 1).reshape(-1, w.shape[0])
                grads[i] = [(g2.T @ cols).reshape(w.shape), g2.sum(axis=0)]
                if i > 0:
                    g = _conv_col2im(g2 @ w.reshape(w.shape[0], -1), layer, shape, out)
            elif isinstance(layer, ReLU):
                g = g * cache
            elif isinstance(layer, LpPool):
                g = _lp_backward(layer, cache[0], cache[1], g)
            elif isinstance(layer, SumPool2d):
                shape, pad = cache
                g = ops.window_scatter(g, layer.kernel_size, layer.stride, pad, shape)
            elif isinstance(layer, MaxPool2d):
                shape, pad, arg = cache
                g = ops.maxpool_scatter(g, arg, layer.kernel_size, layer.stride, pad, shape)
            elif isinstance(layer, GlobalSumPool):
                g = np.broadcast_to(g.reshape((-1,) + (1,) * (len(cache) - 1)), cache)
            else:  # Flatten
                g = g.reshape(cache)
        return grads

    def step(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        out, caches = self.forward(x)
        value, g, correct = _loss_grad(out, y, self.loss)
        grads = self.backward(g, caches)
        for i, (w, b) in self.params.items():
            vw, vb = self.velocity[i]
            gw, gb = grads[i]
            if self.momentum:
                vw *= self.momentum
                vb *= self.momentum
                vw -= self.lr * gw
                vb -= self.lr * gb
                w += vw
                b += vb
            else:
                w -= self.lr * gw
                b -= self.lr * gb
            if self.bias_max is not None:
                np.minimum(b, self.bias_max, out=b)
        return value, float(correct.mean())

    def evaluate(self, x: np.ndarray, y: np.ndarray, chunk: int = 500) -> tuple[float, float]:
        tot_loss = tot_ok = 0.0
        for s in range(0, x.shape[0], chunk):
            out, _ = self.forward(x[s:s + chunk])
            v, _, ok = _loss_grad(out, y[s:s + chunk], self.loss)
            tot_loss += v * out.shape[0]
            tot_ok += float(ok.sum())
        return tot_loss / x.shape[0], tot_ok / x.shape[0]

    def to_net(self) -> Sequential:
        layers: list[Any] = []
        for i, layer in enumerate(self.layers):
            if i in self.params:
                w, b = (p.astype(np.float64) for p in self.params[i])
                if isinstance(layer, Dense):
                    layers.append(Dense(w, b))
                else:
                    layers.append(Conv2d(w, b, stride=layer.stride, padding=layer.padding))
            else:
                layers.append(layer)
        return Sequential(layers)


def train_network(net: Sequential, x: Any, y: Any, steps: int, *, loss: str = "mse", batch_size: int = 20,
                  lr: float = 0.01, momentum: float = 0.0, bias_max: float | None = 0.0, seed: int | None = 0,
                  checkpoints: Iterable[int] = (), log_every: int = 500, val: tuple[Any, Any] | None = None,
                  progress: bool = False, callback: Callable[[int, Sequential], None] | None = None) -> TrainResult:
    """Train the Dense and Conv2d layers of ``net``, a chain of :data:`TRAINABLE_LAYERS`, by minibatch SGD.

    This trains the deep detection-pooling networks of :mod:`deeptaylor.relevance_models` (convolutions,
    ReLU, p-norm / sum / max pooling, Flatten, Dense, a global sum at the top), starting from the
    weights ``net`` holds (build it with :func:`deeptaylor.relevance_models.training_free_network`,
    which seeds them). Forward and backward passes run in float32.

    Parameters
    ----------
    net : Sequential of Dense, Conv2d (``groups=1``, ``dilation=1``), ReLU, LpPool, SumPool2d,
        MaxPool2d, GlobalSumPool and Flatten layers; the initial weights
    x : float inputs (N, ...) in the network's input shape (e.g. (N, 1, 28, 56))
    y : (N,) targets: with ``loss="mse"`` the wanted output f(x) (the network ends in one output;
        accuracy counts ``f(x) > 0.5`` as positive), with ``loss="xent"`` integer classes (softmax
        cross-entropy on the outputs, top-1 accuracy)
    steps : number of SGD steps (minibatches)
    batch_size, lr : minibatch size and learning rate
    momentum : heavy-ball momentum ``v <- momentum v - lr g; w <- w + v`` (0: plain SGD)
    bias_max : biases are clipped to ``<= bias_max`` after every step (default 0: ``b <= 0``, the
        premise of deep Taylor decomposition's consistency); None: unconstrained
    seed : seeds the minibatch order
    checkpoints, log_every, val, progress, callback : as :func:`train_detection`

    Returns
    -------
    TrainResult
        ``net`` (and the snapshots) with the same layers as the input network and the trained
        weights (float32 values in float64 arrays).
    """
    if not isinstance(net, Sequential):
        raise InputError(f"train_network trains a deeptaylor.Sequential, got {type(net).__name__}")
    for i, layer in enumerate(net.layers):
        if type(layer) not in TRAINABLE_LAYERS:
            raise UnsupportedError(f"train_network: layer {i} ({layer.kind}) is not trainable here; it trains "
                                   f"{', '.join(t.__name__ for t in TRAINABLE_LAYERS)}")
        if isinstance(layer, Conv2d) and (layer.groups != 1 or layer.dilation != (1, 1)):
            raise UnsupportedError(f"train_network: layer {i} (Conv2d) has groups={layer.groups}, "
                                   f"dilation={layer.dilation}; only groups=1, dilation=1 are trained")
    if loss not in ("mse", "xent"):
        raise InputError(f"loss must be 'mse' or 'xent', got {loss!r}")
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise InputError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if bias_max is not None and not (isinstance(bias_max, (int, float)) and np.isfinite(bias_max)):
        raise InputError(f"bias_max must be a finite number or None, got {bias_max!r}")

    def prepare(xv: Any, yv: Any) -> tuple[np.ndarray, np.ndarray]:
        xa = np.asarray(xv)
        if xa.dtype.kind != "f":
            raise InputError(f"x must be a float array (scale uint8 images by 1/255), got dtype {xa.dtype}")
        xa = np.ascontiguousarray(xa, dtype=np.float32)
        if xa.ndim < 2 or xa.shape[0] == 0:
            raise ShapeError(f"x must be (N, ...) with N >= 1, got shape {xa.shape}")
        out = net.shapes(xa.shape)[-1]   # ShapeError naming the layer when x does not fit
        if loss == "mse" and out[1:] != (1,):
            raise ShapeError(f"loss 'mse' needs a network with one output, this one gives {out[1:]}")
        _, ya = _check_xy(xa.reshape(xa.shape[0], -1), yv, classes=loss == "xent")
        if not np.all(np.isfinite(xa)):
            raise InputError("x contains NaN or Inf")
        return xa, ya

    xa, ya = prepare(x, y)
    vals = prepare(*val) if val is not None else None
    chain = _Chain(net, loss, float(lr) if isinstance(lr, (int, float)) else lr, float(momentum),
                   None if bias_max is None else float(bias_max))
    if chain.bias_max is not None:
        for w_b in chain.params.values():
            np.minimum(w_b[1], chain.bias_max, out=w_b[1])
    rng = np.random.default_rng(seed)
    return _loop(chain.step, chain.evaluate, chain.to_net, xa, ya, steps, batch_size, lr, rng, checkpoints,
                 log_every, vals, progress, callback)
