"""Relevance models for deep networks: the min-max and the training-free relevance model.

Montavon et al. 2017 (Pattern Recognition 65, arXiv 1512.02479, Sec. 4; slides 003 "Relevance
Model") explain a deep network layer by layer; where the mapping from a lower layer's activations
``{x_i}`` to the relevance ``R_k`` of a higher layer has no closed-form root point, a *relevance
model* stands in for it: a function of the activations ``{x_i}`` that predicts ``R_k`` and whose
output can be redistributed onto ``{x_i}`` with the one-layer rules. The maths: docs/theory.md,
"Relevance models".

**Min-max relevance model** (:class:`MinMax`, trained). For the layer range that ends at value ``k``
of a :class:`~deeptaylor.Sequential` (the relevance at the input of layer ``k``, ``K`` neurons), each
neuron ``k`` gets ``J`` detection units

    y_j   = max(0, sum_i x_i v_ij + a_j)          (bottom-up: the network's input x)
    a_j   = min(0, sum_l R_l v_lj + d_j)           (top-down: the context, a negative bias)
    R^_k  = sum_{j in k} y_j                       (sum pooling)

with the relevances ``R_l`` of a layer above ``k`` as context. The targets ``R_k`` and the context
``R_l`` come from deeptaylor's own engine: the layers from ``k`` up are explained with an ordinary
composite (z+ by default) on the chosen backend. ``{v_ij, v_lj, d_j}`` minimise ``<(R^_k - R_k)^2>``
(:meth:`MinMax.fit`, Adam, seeded, progress bar). The model is then explained like the one-layer
detection-pooling network: pooling ``R_j = y_j``, detection ``R_i = sum_j q_ij / sum_i' q_i'j R_j``
with ``q_ij = v_ij^2`` (w²), ``x_i v+_ij`` (z+) or ``x_i v_ij - l_i v+_ij - h_i v-_ij`` (zB). That
redistribution is exactly conservative (``sum_i R_i = sum_k R^_k``: the model explains itself
consistently), but ``R^_k`` only approximates ``R_k``, so the explanation of the network is only
*approximately* conservative: ``sum_i R_i = sum_k R^_k ~ sum_k R_k = f(x)``.

In an :class:`~deeptaylor.Explainer` the model acts as the rule of the bottom layer range ``[0, k)``:
``Explainer(net, model.composite())`` runs the layers from ``k`` up (the context) and the forward
pass below ``k`` on the chosen backend (``"cpu"`` or ``"numpy"``) and the model itself in float64
NumPy; :attr:`Explanation.backend <deeptaylor.Explanation>` reads ``"cpu+numpy"`` or
``"numpy+numpy"``.

**Training-free relevance model** (:func:`training_free_network` and the composite
:func:`deeptaylor.composites.training_free`). In a network whose pooling layers are p-norms
``x_k = ||{x_j}||_p`` (:class:`~deeptaylor.LpPool`), z+ above gives ``R_k = (sum_j x_j) *
(||x||_p / ||x||_1) * c_k``; taking the ratio and ``c_k`` as locally constant, the pooling
redistributes in proportion to its inputs, ``R_j = x_j / sum_j' x_j' * R_k``, and the detection
layers use z+ above the first layer and w² or zB on the first. Every step is then exactly
conservative and positive: no training, no approximation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import init as _init
from .composites import Composite
from .composites import get as _get_composite
from .errors import InputError, RuleError, ShapeError, UnsupportedError
from .layers import Conv2d, Dense, Flatten, GlobalSumPool, LpPool, ReLU
from .network import Sequential
from .rules import Flat, Rule, WSquare, ZBox, ZPlus
from .stream import progress_bar

__all__ = [
    "FitLog",
    "MinMax",
    "MinMaxExplanation",
    "ModelComposite",
    "UpperRelevance",
    "rescale_output",
    "training_free_network",
]

#: the rules the min-max model's detection layer can be explained with (slides 003)
MODEL_RULES = (WSquare, ZPlus, ZBox, Flat)


# ------------------------------------------------------------------------------------------------
# The training-free relevance model: a builder for deep detection-pooling networks with p-norm pooling


def _pair_or_none(v: Any, what: str) -> tuple[int, int] | None:
    if v is None:
        return None
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = (int(v), int(v))
    if not (isinstance(v, Sequence) and len(v) == 2 and all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                                                             and t >= 1 for t in v)):
        raise ShapeError(f"{what} must be a positive int, a pair of them or None, got {v!r}")
    return (int(v[0]), int(v[1]))


def _f32(w: np.ndarray) -> np.ndarray:
    """``w`` rounded to float32 values, kept in float64 (the trainer computes in float32)."""
    return np.asarray(w, dtype=np.float32).astype(np.float64)


def training_free_network(input_shape: Sequence[int] = (1, 28, 56), channels: Sequence[int] = (16, 32),
                          kernel_size: int | Sequence[int] = 5, pool: Sequence[Any] = (2, None),
                          hidden: Sequence[int] = (32,), p: float = 2.0, top_p: float = 1.0,
                          init: str = "he_normal", seed: int | None = 0) -> Sequential:
    """A deep detection-pooling network with p-norm pooling (the training-free relevance model).

    Stage ``s`` is a detection layer ``Conv2d(channels[s], kernel_size) -> ReLU`` followed by a
    pooling layer ``LpPool(p, pool[s])``: ``pool[s]`` an int or pair is a window (stride = window),
    None pools each channel's whole map (``(C, 1, 1)``: translation-invariant detectors). Then
    ``Flatten``, ``Dense(hidden[i]) -> ReLU`` per entry of ``hidden`` and the top pooling: with
    ``top_p == 1`` a :class:`~deeptaylor.GlobalSumPool` (the seeds' ``f(x) = sum_j x_j``, the 1-norm of
    the non-negative ReLU outputs), otherwise ``LpPool(top_p)`` over all units. One output.

    Parameters
    ----------
    input_shape : per-sample input ``(C, H, W)``, e.g. ``(1, 28, 56)`` for the detection task
    channels : output channels of the detection (convolution) stages; may be empty
    kernel_size : square kernel of every convolution (int), or one per stage
    pool : per stage, a window (int or pair) or None (global per channel); same length as ``channels``
    hidden : sizes of the Dense detection layers above the convolutions (at least one layer in all)
    p : the p-norm of the pooling layers (``p >= 1``; 1 = sum pooling, large p ~ max pooling)
    top_p : the p-norm of the top pooling (1: GlobalSumPool)
    init : a weight initialiser of :mod:`deeptaylor.init` (``"he_normal"``, ``"glorot_uniform"``...)
    seed : seeds the initial weights (rounded to float32 values, as :func:`~deeptaylor.train.train_network`
        keeps them); biases start at 0 (``b <= 0``, deep Taylor decomposition's premise)

    Returns
    -------
    Sequential
        Train it with :func:`deeptaylor.train.train_network` (``bias_max=0`` keeps ``b <= 0``) after
        :func:`rescale_output`; explain it with :func:`deeptaylor.composites.training_free` on either
        backend.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ShapeError(f"input_shape must be (C, H, W) with positive sizes, got {tuple(input_shape)!r}")
    channels = [int(c) for c in channels]
    pools = list(pool)
    if len(pools) != len(channels):
        raise ShapeError(f"pool has {len(pools)} entries for {len(channels)} convolution stages")
    ks = [kernel_size] * len(channels) if isinstance(kernel_size, (int, np.integer)) else list(kernel_size)
    if len(ks) != len(channels):
        raise ShapeError(f"kernel_size has {len(ks)} entries for {len(channels)} convolution stages")
    hidden = [int(h) for h in hidden]
    if not hidden or min(hidden) < 1 or (channels and min(channels) < 1):
        raise ShapeError(f"hidden needs at least one positive size and channels positive sizes, got "
                         f"channels={channels}, hidden={hidden}")
    init_fn = getattr(_init, init, None)
    if init not in _init.__all__ or init in ("fans", "zeros", "constant") or init_fn is None:
        raise InputError(f"init must be a weight initialiser of deeptaylor.init (e.g. 'he_normal'), got {init!r}")
    rng = np.random.default_rng(seed)
    layers: list[Any] = []
    c, h, w = shape
    for s, (co, k, pl) in enumerate(zip(channels, ks, pools, strict=True)):
        kk = _pair_or_none(k, f"kernel_size of stage {s}")
        assert kk is not None
        if kk[0] > h or kk[1] > w:
            raise ShapeError(f"stage {s}: kernel {kk} does not fit the {h}x{w} maps")
        layers += [Conv2d(_f32(init_fn((co, c, *kk), rng)), np.zeros(co)), ReLU()]
        c, h, w = co, h - kk[0] + 1, w - kk[1] + 1
        win = _pair_or_none(pl, f"pool of stage {s}") or (h, w)
        if win[0] > h or win[1] > w:
            raise ShapeError(f"stage {s}: pooling window {win} does not fit the {h}x{w} maps")
        layers.append(LpPool(p, kernel_size=win))
        h, w = (h - win[0]) // win[0] + 1, (w - win[1]) // win[1] + 1
    layers.append(Flatten())
    fan = c * h * w
    for size in hidden:
        layers += [Dense(_f32(init_fn((size, fan), rng)), np.zeros(size)), ReLU()]
        fan = size
    layers.append(GlobalSumPool() if float(top_p) == 1.0 else LpPool(top_p))
    return Sequential(layers)


def rescale_output(net: Sequential, x: Any, mean: float = 0.5) -> Sequential:
    """``net`` with every linear layer scaled by the same factor so that the mean output on ``x`` is ``mean``.

    A freshly initialised deep network's output can be orders of magnitude off the targets (He
    initialisation keeps the activations' scale through the layers, and the top sums all units).
    With zero biases and positively homogeneous layers (ReLU, p-norm, sum and max pooling) the output
    of L linear layers each scaled by ``s`` is ``s^L f``: the factor is spread evenly, so that no layer's
    gradient dwarfs its weights (scaling the last layer alone makes the first SGD steps blow the
    output up, and the next ones switch every ReLU off for good).

    Parameters
    ----------
    net : Sequential of Dense / Conv2d layers with zero biases and positively homogeneous other layers
    x : inputs (N, ...) to measure the mean output on
    mean : the wanted mean output (> 0)

    Returns
    -------
    Sequential, the rescaled copy (the scaled weights rounded to float32 values)
    """
    idx = [i for i, layer in enumerate(net.layers) if isinstance(layer, (Dense, Conv2d))]
    if not idx:
        raise InputError("rescale_output: the network has no Dense or Conv2d layer")
    if any(np.any(net.layers[i].bias != 0) for i in idx):
        raise InputError("rescale_output: a linear layer has a non-zero bias (the output would not scale)")
    if not (isinstance(mean, (int, float)) and math.isfinite(mean) and mean > 0):
        raise InputError(f"mean must be a positive number, got {mean!r}")
    f = float(np.mean(net.forward(np.asarray(x, dtype=np.float64))[:, 0]))
    if not f > 0:
        raise InputError(f"rescale_output: the network's mean output on x is {f:g}; nothing to scale")
    s = (mean / f) ** (1.0 / len(idx))
    layers = list(net.layers)
    for i in idx:
        layer = layers[i]
        if isinstance(layer, Dense):
            layers[i] = Dense(_f32(layer.weight * s), layer.bias)
        else:
            layers[i] = Conv2d(_f32(layer.weight * s), layer.bias, stride=layer.stride, padding=layer.padding,
                               dilation=layer.dilation, groups=layer.groups)
    return Sequential(layers)


# ------------------------------------------------------------------------------------------------
# The min-max relevance model


@dataclass
class UpperRelevance:
    """What the engine computes above the modelled layer range, for a batch.

    Attributes
    ----------
    output : (N, K_out) the network's output
    explained : (N,) the explained output ``f(x)`` (the target's logit)
    target : (N,) int, the explained output index
    relevance : (N, K) float64, the relevance ``R_k`` at the modelled value (flattened): the targets
    context : (N, L) float64, the relevance ``R_l`` at the context value (flattened)
    backend : the backend that ran the upper layers
    """

    output: np.ndarray
    explained: np.ndarray
    target: np.ndarray
    relevance: np.ndarray
    context: np.ndarray
    backend: str


@dataclass
class FitLog:
    """The fit of a min-max model: one row per logged step; ``loss`` is the mean of ``(R^_k - R_k)^2``
    over the minibatches since the previous row, ``val_loss`` the same on the validation set (NaN
    without one). ``seconds``: the fit's wall time, the engine's targets included."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def rows(self) -> list[tuple[int, float, float]]:
        """``(step, loss, val_loss)`` per logged step."""
        return list(zip(self.step, self.loss, self.val_loss, strict=True))

    def __str__(self) -> str:
        lines = [f"{'step':>8} {'loss':>11} {'val_loss':>11}"]
        lines += [f"{s:>8d} {lo:>11.4e} {vl:>11.4e}" for s, lo, vl in self.rows()]
        return "\n".join(lines)


@dataclass
class MinMaxExplanation:
    """Result of :meth:`MinMax.explain`.

    Attributes
    ----------
    relevance : (N, ...) float64, the input's relevance (shape of x): sums to ``r_hat.sum(1)``
    r_hat : (N, K) float64, the model's ``R^_k``
    r_engine : (N, K) float64, the engine's ``R_k`` (what the model approximates)
    y : (N, K, J) float64, the model's detection units (pooling relevance ``R_j = y_j``)
    context : (N, L) float64, the context ``R_l``
    output, explained, target : as :class:`~deeptaylor.Explanation`
    backend : the backend of the upper layers
    """

    relevance: np.ndarray
    r_hat: np.ndarray
    r_engine: np.ndarray
    y: np.ndarray
    context: np.ndarray
    output: np.ndarray
    explained: np.ndarray
    target: np.ndarray
    backend: str


def _resolve_composite(c: Any) -> Composite:
    if c is None:
        return Composite(default=ZPlus(), name="zplus")
    if isinstance(c, str):
        c = _get_composite(c)
    if isinstance(c, Rule):
        return Composite(default=c, name=c.name)
    if not isinstance(c, Composite):
        raise RuleError(f"upper must be a composite, a rule or a composite name, got {c!r}")
    return c


class MinMax:
    """The min-max relevance model of a bottom layer range ``[0, layer)`` of a Sequential (module docstring).

    Parameters
    ----------
    net : Sequential
        The deep network (e.g. from :func:`training_free_network`, or any chain the backends run).
    input_shape : per-sample input shape, ``(C, H, W)`` or ``(F,)``
    layer : int
        ``k``: the model predicts the relevance at the input of layer ``k`` (value ``k``,
        ``1 <= k < len(net)``, ``K`` neurons) from the network's input ``x``.
    hidden : int
        ``J``, detection units per modelled neuron (``K * J`` in all).
    context : int, optional
        The value whose relevance ``R_l`` is the context, ``k < l <= len(net)``. Default: the output of
        the first linear layer at or above ``k`` (the next detection layer), or the network's output.
    upper : Composite, rule or composite name, optional
        Rules for the layers from ``k`` up, which give the targets and the context (default: z+ on
        every linear layer, the deep Taylor rule above the first layer).
    rule : WSquare, ZPlus, ZBox or Flat rule, optional
        How the model's detection layer is explained (default ``WSquare()``; ``ZBox(0, 1)`` for pixels
        in [0, 1]; ``ZPlus()`` for non-negative inputs).
    tile, tile_stride : int or pair, optional
        Local receptive fields for the detection units (input ``(C, H, W)``): windows of ``tile``
        pixels at ``tile_stride`` (default: the tile; they must cover the input exactly), ``hidden``
        units per window and modelled neuron, each seeing only its window (all channels); then
        ``J = hidden * windows``. Without ``tile`` every unit sees the whole input.
    seed : seeds the initial parameters and the minibatch order of :meth:`fit`.

    Attributes
    ----------
    v : (D, K, J) input weights ``v_ij``; vc : (L, K, J) context weights ``v_lj``; d : (K, J) biases
    ``d_j`` (float64). ``D``: input features, ``L``: context size. mask : (D, 1, J) 0/1 or None, the
    inputs each unit sees (``tile``); ``v`` is 0 outside it, before and after :meth:`fit`.

    Examples
    --------
    >>> mm = dt.relevance_models.MinMax(net, (1, 28, 56), layer=6, hidden=4, rule=dt.rules.ZBox(0, 1),
    ...                                 tile=28, tile_stride=14)
    >>> log = mm.fit(x_train, steps=2000, progress=True)
    >>> res = dt.Explainer(net, mm.composite(), backend="cpu").explain(x_test)   # "cpu+numpy"
    """

    def __init__(self, net: Sequential, input_shape: Sequence[int], layer: int, *, hidden: int = 8,
                 context: int | None = None, upper: Any = None, rule: Rule | None = None,
                 tile: Any = None, tile_stride: Any = None, seed: int | None = 0) -> None:
        from .passes import canonicalize

        if not isinstance(net, Sequential):
            raise UnsupportedError(f"MinMax models a layer range of a deeptaylor.Sequential, got {type(net).__name__}")
        if canonicalize(net) is not net:
            raise UnsupportedError("MinMax: the network has layers the backends rewrite (BatchNorm, Identity, "
                                   "Dropout, adaptive pools): pass deeptaylor.passes.canonicalize(net) instead")
        n_layers = len(net)
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 1 <= layer < n_layers:
            raise InputError(f"layer must be an int in [1, {n_layers - 1}] (the value whose relevance is modelled), "
                             f"got {layer!r}")
        k = int(layer)
        self.net = net
        self.input_shape = tuple(int(s) for s in input_shape)
        shapes = net.shapes((1, *self.input_shape))
        if context is None:
            lin = [i for i in range(k, n_layers) if net[i].linear]
            context = lin[0] + 1 if lin else n_layers
        if isinstance(context, bool) or not isinstance(context, (int, np.integer)) or not k < context <= n_layers:
            raise InputError(f"context must be an int in [{k + 1}, {n_layers}] (a value above the modelled one), "
                             f"got {context!r}")
        if isinstance(hidden, bool) or not isinstance(hidden, (int, np.integer)) or hidden < 1:
            raise InputError(f"hidden must be a positive int, got {hidden!r}")
        rule = WSquare() if rule is None else rule
        if type(rule) not in MODEL_RULES:
            raise RuleError(f"MinMax: rule must be one of {', '.join(t.__name__ for t in MODEL_RULES)} (the "
                            f"detection layer's rules, slides 003), got {rule!r}")
        self.layer, self.context, self.hidden, self.rule = k, int(context), int(hidden), rule
        self.upper = _resolve_composite(upper)
        self.value_shape = shapes[k][1:]
        self.context_shape = shapes[self.context][1:]
        self.n_in = int(np.prod(self.input_shape))
        self.n_out = int(np.prod(self.value_shape))
        self.n_context = int(np.prod(self.context_shape))
        if isinstance(rule, ZBox):
            lo, hi = rule.bounds_for(self.input_shape)
            self._low, self._high = lo.reshape(-1), hi.reshape(-1)
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.mask = self._tile_mask(tile, tile_stride)
        kj = (self.n_out, self.hidden if self.mask is None else self.mask.shape[2])
        self.v = rng.standard_normal((self.n_in, *kj)) / math.sqrt(self.n_in)
        if self.mask is not None:
            self.v *= self.mask
        self.vc = np.zeros((self.n_context, *kj))
        self.d = np.full(kj, -1e-3)
        self._rng = rng
        # the two halves of the network the engine runs: below k (forward only) and from k up
        rules = self.upper.resolve(net)
        self._upper_net = Sequential(net.layers[k:])
        self._upper_composite = Composite(by_index={i: r for i, r in enumerate(rules[k:]) if r is not None},
                                          name=self.upper.name)
        lower = list(net.layers[:k]) + ([Flatten()] if len(self.value_shape) != 1 else [])
        self._lower_net = Sequential(lower)
        self._lower_composite = Composite(default=ZPlus(), name="forward")
        self.fitted = False

    def _tile_mask(self, tile: Any, stride: Any) -> np.ndarray | None:
        """(D, 1, T * hidden) 0/1: the inputs each detection unit sees; the T tiles are windows of
        ``tile`` pixels at ``stride`` (default: the tile, no overlap) over every input channel, each
        with ``hidden`` units. None: every unit sees every input."""
        if tile is None:
            if stride is not None:
                raise InputError("MinMax: tile_stride given without tile")
            return None
        if len(self.input_shape) != 3:
            raise ShapeError(f"MinMax: tile needs a (C, H, W) input, got {self.input_shape}")
        th, tw = _pair_or_none(tile, "tile") or (0, 0)
        sh, sw = _pair_or_none(stride, "tile_stride") or (th, tw)
        c, h, w = self.input_shape
        if th > h or tw > w or (h - th) % sh or (w - tw) % sw:
            raise ShapeError(f"MinMax: tiles of {th}x{tw} at stride {sh}x{sw} do not cover the {h}x{w} input "
                             "exactly")
        masks = []
        for r in range(0, h - th + 1, sh):
            for q in range(0, w - tw + 1, sw):
                m = np.zeros((c, h, w))
                m[:, r:r + th, q:q + tw] = 1.0
                masks.append(m.reshape(-1))
        return np.stack(masks, axis=1)[:, None, :].repeat(self.hidden, axis=2)

    # -- the model -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """``"min_max"`` (used in :attr:`Explanation.method <deeptaylor.Explanation>`)."""
        return "min_max"

    def _flat(self, x: Any) -> np.ndarray:
        xa = np.asarray(x, dtype=np.float64)
        if xa.shape[1:] != self.input_shape:
            raise ShapeError(f"MinMax: x must be (N, {', '.join(map(str, self.input_shape))}), got {xa.shape}")
        return xa.reshape(xa.shape[0], -1)

    def _context(self, context: Any, n: int) -> np.ndarray:
        c = np.asarray(context, dtype=np.float64).reshape(n, -1)
        if c.shape[1] != self.n_context:
            raise ShapeError(f"MinMax: the context must have {self.n_context} values per sample, got {c.shape[1]}")
        return c

    def _pre(self, xf: np.ndarray, ctx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pre-activations u (N, K, J) and the context's c (N, K, J) (a = min(0, c))."""
        kj = self.v.shape[1:]
        c = (ctx @ self.vc.reshape(self.n_context, -1)).reshape(-1, *kj) + self.d
        u = (xf @ self.v.reshape(self.n_in, -1)).reshape(-1, *kj) + np.minimum(c, 0.0)
        return u, c

    def predict(self, x: Any, context: Any) -> tuple[np.ndarray, np.ndarray]:
        """The model on inputs ``x`` (N, *input_shape) and context ``R_l`` (N, L) (any shape with N rows).

        Returns ``(r_hat (N, K), y (N, K, J))``: ``R^_k = sum_j y_j``,
        ``y_j = max(0, sum_i x_i v_ij + min(0, sum_l R_l v_lj + d_j))``.
        """
        xf = self._flat(x)
        u, _ = self._pre(xf, self._context(context, xf.shape[0]))
        y = np.maximum(u, 0.0)
        return y.sum(axis=2), y

    def redistribute(self, x: Any, y: np.ndarray) -> np.ndarray:
        """The relevance of the inputs (N, *input_shape) from the detection units' ``y`` (N, K, J):
        pooling ``R_j = y_j``, then ``R_i = sum_j q_ij / sum_i' q_i'j R_j`` with the model's rule on ``v``
        (w²: ``v_ij^2``; z+: ``x_i v+_ij``; zB: ``x_i v_ij - l_i v+_ij - h_i v-_ij``; flat: 1). A unit
        whose denominator is 0 has ``y_j = 0`` on the rule's domain (the bias ``a_j <= 0``), so nothing
        is dropped: ``sum_i R_i = sum_j y_j`` (docs/theory.md, "Relevance models")."""
        from .reference.relevance import safe_divide

        xf = self._flat(x)
        n = xf.shape[0]
        v = self.v.reshape(self.n_in, -1)
        r = np.asarray(y, dtype=np.float64).reshape(n, -1)
        if isinstance(self.rule, (WSquare, Flat)):
            q = v * v if isinstance(self.rule, WSquare) else np.ones_like(v)
            out = safe_divide(r, q.sum(axis=0)[None, :]) @ q.T
        elif isinstance(self.rule, ZPlus):
            vp = np.maximum(v, 0.0)
            out = xf * (safe_divide(r, xf @ vp) @ vp.T)
        else:
            tol = 1e-6 * max(1.0, float(np.abs(self._low).max()), float(np.abs(self._high).max()))
            if np.any(xf < self._low - tol) or np.any(xf > self._high + tol):
                raise InputError(f"MinMax with {self.rule!r} needs inputs within [low, high]; got values in "
                                 f"[{xf.min():.4g}, {xf.max():.4g}]")
            vp, vn = np.maximum(v, 0.0), np.minimum(v, 0.0)
            z = xf @ v - self._low @ vp - self._high @ vn
            s = safe_divide(r, z)
            out = xf * (s @ v.T) - self._low * (s @ vp.T) - self._high * (s @ vn.T)
        return out.reshape(n, *self.input_shape)

    # -- the engine's side -----------------------------------------------------------------------

    def _explainers(self, backend: Any) -> tuple[Any, Any]:
        from .explain import Explainer

        return (Explainer(self._lower_net, self._lower_composite, backend=backend),
                Explainer(self._upper_net, self._upper_composite, backend=backend))

    def upper_relevance(self, x: Any, target: Any = None, backend: Any = "auto", batch_size: int | None = None,
                        progress: bool = False) -> UpperRelevance:
        """The engine's relevance at the modelled value (the targets ``R_k``) and at the context value
        (``R_l``) for inputs ``x`` (N, *input_shape): the forward pass below the modelled value and the
        relevance pass from the output down to it run on ``backend`` (``"auto"``, ``"cpu"``,
        ``"numpy"``) with the ``upper`` composite; ``target`` as in :meth:`Explainer.explain`."""
        lower, upper = self._explainers(backend)
        return self._upper_run(lower, upper, x, target, batch_size, progress)

    def _upper_run(self, lower: Any, upper: Any, x: Any, target: Any, batch_size: int | None,
                   progress: bool) -> UpperRelevance:
        xa = np.asarray(x)
        if xa.dtype not in (np.float32, np.float64):
            raise InputError(f"MinMax: x must be float32 or float64, got {xa.dtype}")
        if xa.shape[1:] != self.input_shape:
            raise ShapeError(f"MinMax: x must be (N, {', '.join(map(str, self.input_shape))}), got {xa.shape}")
        a = lower.forward(xa, batch_size=batch_size).reshape(xa.shape[0], *self.value_shape)
        res = upper.explain(a, target=target, return_layers=True, batch_size=batch_size, progress=progress)
        n = xa.shape[0]
        rel = np.asarray(res.layers[0], dtype=np.float64).reshape(n, -1)
        ctx = np.asarray(res.layers[self.context - self.layer], dtype=np.float64).reshape(n, -1)
        return UpperRelevance(output=res.output, explained=res.explained, target=res.target, relevance=rel,
                              context=ctx, backend=res.backend)

    # -- training --------------------------------------------------------------------------------

    def loss(self, x: Any, targets: UpperRelevance) -> float:
        """``<(R^_k - R_k)^2>``, the mean over samples and modelled neurons."""
        r_hat, _ = self.predict(x, targets.context)
        return float(np.mean((r_hat - targets.relevance) ** 2))

    def fit(self, x: Any, *, steps: int = 2000, batch_size: int = 50, lr: float = 1e-3,
            targets: UpperRelevance | None = None, val: tuple[Any, UpperRelevance] | Any | None = None,
            backend: Any = "auto", log_every: int = 100, progress: bool = False,
            weight_decay: float = 0.0) -> FitLog:
        """Fit ``{v_ij, v_lj, d_j}`` to the engine's ``R_k`` on ``x`` by minimising ``<(R^_k - R_k)^2>``.

        Adam (beta 0.9 / 0.999) on minibatches drawn by cycling over seeded permutations of ``x``
        (the model's ``seed``); the gradient of ``min(0, c)`` is taken as 1 where ``c < 0``.

        Parameters
        ----------
        x : training inputs (N, *input_shape)
        steps, batch_size, lr : Adam steps, minibatch size, step size
        targets : the engine's relevances for x (:meth:`upper_relevance`); computed if None
        val : validation inputs, or ``(x_val, targets_val)``; the validation loss is logged
        backend : the backend of the engine's passes (targets, validation)
        log_every : log the mean training loss every this many steps
        progress : a tqdm progress bar (if installed)
        weight_decay : decoupled weight decay (AdamW) of ``v`` and ``v_l``: after every step they are
            multiplied by ``1 - lr * weight_decay`` (in the fit's normalised units; 0: none)

        Returns
        -------
        FitLog
        """
        t0 = time.perf_counter()
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise InputError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
        for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if name == "steps" else 1):
                raise InputError(f"{name} must be a {'non-negative' if name == 'steps' else 'positive'} int, got {value!r}")
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise InputError(f"lr must be a positive number, got {lr!r}")
        xf = self._flat(x)
        if targets is None:
            targets = self.upper_relevance(x, backend=backend)
        if targets.relevance.shape != (xf.shape[0], self.n_out):
            raise ShapeError(f"targets hold {targets.relevance.shape} relevances for {xf.shape[0]} inputs of "
                             f"{self.n_out} modelled neurons")
        ctx = self._context(targets.context, xf.shape[0])
        rt = targets.relevance
        if not self.fitted:
            # data-dependent start: each input's weights in proportion to its RMS over x, so that an
            # input that is always 0 (MNIST's border pixels) starts, and stays, with weight 0 (w² and zB
            # would otherwise credit it with its random initial weight); then v scaled so that the mean
            # R^ matches the mean target (a far too large start switches every unit off for good)
            rms = np.sqrt(np.mean(xf * xf, axis=0))
            if rms.max() > 0:
                self.v *= (rms / rms.max())[:, None, None]
            r_hat, _ = self.predict(x, ctx)
            if r_hat.mean() > 0 and rt.mean() > 0:
                self.v *= rt.mean() / r_hat.mean()
        if val is not None:
            xv, tv = val if isinstance(val, tuple) else (val, self.upper_relevance(val, backend=backend))
        # Adam's steps have a fixed size per parameter: fit in units where the targets and the context
        # are O(1) (the model is positively homogeneous: scaling v, v_l, d by s scales R^ by s)
        sr = float(np.mean(np.abs(rt))) or 1.0
        sc = float(np.mean(np.abs(ctx))) or 1.0

        def to_fit_units() -> None:
            self.v /= sr
            self.vc *= sc / sr
            self.d /= sr

        def to_caller_units() -> None:
            self.v *= sr
            self.vc *= sr / sc
            self.d *= sr

        def val_loss() -> float:
            to_caller_units()
            try:
                return self.loss(xv, tv)
            finally:
                to_fit_units()

        log = FitLog()
        to_fit_units()
        try:
            self._adam(xf, ctx / sc, rt / sr, steps, batch_size, lr, log_every, progress, log, sr * sr,
                       val_loss if val is not None else None, float(weight_decay))
        finally:
            to_caller_units()
        self.fitted = True
        log.seconds = time.perf_counter() - t0
        return log

    def _adam(self, xf: np.ndarray, ctx: np.ndarray, rt: np.ndarray, steps: int, batch_size: int, lr: float,
              log_every: int, progress: bool, log: FitLog, loss_scale: float, val_loss: Any,
              weight_decay: float = 0.0) -> None:
        """Adam on ``<(R^_k - R_k)^2>`` over minibatches of (xf, ctx, rt); logs into ``log``."""
        params = [self.v, self.vc, self.d]
        m = [np.zeros_like(p) for p in params]
        s2 = [np.zeros_like(p) for p in params]
        b1, b2, eps = 0.9, 0.999, 1e-8
        bar = progress_bar(steps, progress and steps > 0, desc="fitting min-max model", unit="step")
        n = xf.shape[0]
        order = self._rng.permutation(n)
        pos = 0
        losses: list[float] = []
        for step in range(1, steps + 1):
            if pos + batch_size > n:
                order = self._rng.permutation(n)
                pos = 0
            idx = order[pos:pos + batch_size]
            pos += batch_size
            xb, cb, rb = xf[idx], ctx[idx], rt[idx]
            u, c = self._pre(xb, cb)
            y = np.maximum(u, 0.0)
            diff = y.sum(axis=2) - rb
            losses.append(float(np.mean(diff * diff)))
            gu = (2.0 / diff.size) * diff[:, :, None] * (u > 0)           # (B, K, J)
            gc = gu * (c < 0)
            grads = [xb.T @ gu.reshape(len(idx), -1), cb.T @ gc.reshape(len(idx), -1), gc.sum(axis=0)]
            for i, (p, g) in enumerate(zip(params, grads, strict=True)):
                g = g.reshape(p.shape)
                m[i] = b1 * m[i] + (1 - b1) * g
                s2[i] = b2 * s2[i] + (1 - b2) * g * g
                mh = m[i] / (1 - b1 ** step)
                vh = s2[i] / (1 - b2 ** step)
                p -= lr * mh / (np.sqrt(vh) + eps)
                if i == 0 and self.mask is not None:
                    p *= self.mask
                if weight_decay and i < 2:   # decoupled (AdamW): the weights, not the biases
                    p *= 1.0 - lr * weight_decay
            if step % log_every == 0 or step == steps:
                log.step.append(step)
                log.loss.append(float(np.mean(losses)) * loss_scale)
                log.val_loss.append(val_loss() if val_loss is not None else float("nan"))
                losses = []
                bar.set_postfix(loss=f"{log.loss[-1]:.3e}")
            bar.update(1)
        bar.close()

    # -- explaining ------------------------------------------------------------------------------

    def explain(self, x: Any, target: Any = None, backend: Any = "auto", batch_size: int | None = None) -> MinMaxExplanation:
        """Explain ``x`` (N, *input_shape): the engine's context ``R_l`` (and its ``R_k``, for
        comparison), the model's ``R^_k`` and its redistribution onto x (module docstring)."""
        up = self.upper_relevance(x, target=target, backend=backend, batch_size=batch_size)
        r_hat, y = self.predict(x, up.context)
        rel = self.redistribute(x, y)
        return MinMaxExplanation(relevance=rel, r_hat=r_hat, r_engine=up.relevance, y=y, context=up.context,
                                 output=up.output, explained=up.explained, target=up.target, backend=up.backend)

    def composite(self) -> ModelComposite:
        """The composite that makes this model the rule of the layers ``[0, layer)`` in an
        :class:`~deeptaylor.Explainer` (the ``upper`` composite's rules above)."""
        return ModelComposite(self)

    def __repr__(self) -> str:
        return (f"MinMax(layer={self.layer}, context={self.context}, K={self.n_out}, J={self.v.shape[2]}, "
                f"D={self.n_in}, L={self.n_context}, rule={self.rule!r}, upper={self.upper.name!r}, "
                f"fitted={self.fitted})")


class ModelComposite(Composite):
    """A composite whose bottom layer range ``[0, k)`` is explained by a relevance model (:class:`MinMax`)
    and whose layers from ``k`` up take the model's ``upper`` composite.

    :meth:`resolve` gives every linear node a rule as a plain composite does, so that the Explainer's
    checks (backend support, the ZBox input box) apply: the layers from ``k`` up take the upper rules, the
    first linear layer the model's rule (it is the rule the model applies to the input), the other
    linear layers below ``k`` z+ (unused). The :class:`~deeptaylor.Explainer` sees
    :meth:`wrap_backend` and runs the model in place of the layers below ``k``; it never promises
    conservation (``conservative_expected`` is False: the model approximates ``R_k``).
    """

    __slots__ = ("relevance_model",)

    def __init__(self, model: MinMax) -> None:
        if not isinstance(model, MinMax):
            raise RuleError(f"ModelComposite takes a relevance model (MinMax), got {model!r}")
        super().__init__(default=ZPlus(), name=f"{model.name}+{model.upper.name}")
        object.__setattr__(self, "relevance_model", model)

    def resolve(self, net: Any) -> list[Rule | None]:
        """One rule per node (class docstring); UnsupportedError for a network other than the model's."""
        model = self.relevance_model
        if not (net is model.net or (isinstance(net, Sequential) and net.layers == model.net.layers)):
            raise UnsupportedError(f"composite '{self.name}': the relevance model was built for another network")
        rules = list(model.upper.resolve(net))
        first = set(net.first_linear())
        for i in range(model.layer):
            if net[i].linear:
                rules[i] = model.rule if i in first else ZPlus()
        return rules

    def wrap_backend(self, graph: Any, backend: Any) -> _ModelBackend:
        """The backend an Explainer runs with this composite: ``backend`` for the network's layers from
        ``k`` up and its forward pass below ``k``, the model (NumPy, float64) for the rest."""
        b = _ModelBackend(self.relevance_model, backend)
        b.check(graph, None)
        return b

    def __repr__(self) -> str:
        return f"ModelComposite[{self.name}]({self.relevance_model!r})"


class _ModelBackend:
    """Runs an Explainer whose composite is a :class:`ModelComposite` (see there)."""

    def __init__(self, model: MinMax, inner: Any) -> None:
        self.model = model
        self.inner = inner
        self.name = f"{inner.name}+numpy"
        self.dtype = getattr(inner, "dtype", None)
        up = model.upper.resolve(model.net)
        self._upper_assignment = list(up[model.layer:])
        self._lower_assignment = [ZPlus() if layer.linear else None for layer in model._lower_net]

    def check(self, net: Any, assignment: Any) -> None:
        self.inner.check(self.model._upper_net, self._upper_assignment)
        self.inner.check(self.model._lower_net, self._lower_assignment)

    def forward(self, net: Any, assignment: Any, x: np.ndarray, incremental: bool = False) -> np.ndarray:
        return self.inner.forward(net, assignment, x, incremental=incremental)

    def run(self, net: Any, assignment: Any, x: np.ndarray, targets: np.ndarray | None,
            return_layers: bool) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
        m = self.model
        n = x.shape[0]
        a = self.inner.forward(m._lower_net, self._lower_assignment, x).reshape(n, *m.value_shape)
        output, _, layers = self.inner.run(m._upper_net, self._upper_assignment, a, targets, True)
        ctx = np.asarray(layers[m.context - m.layer], dtype=np.float64).reshape(n, -1)
        r_hat, y = m.predict(x, ctx)
        rel = m.redistribute(x, y)
        if not return_layers:
            return output, rel, None
        shapes = net.shapes(x.shape)
        inside = [np.full(shapes[v], np.nan) for v in range(1, m.layer)]
        return output, rel, [rel, *inside, r_hat.reshape(n, *m.value_shape), *layers[1:]]
