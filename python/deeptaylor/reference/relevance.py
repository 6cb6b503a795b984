"""Relevance rules for linear layers and the fixed relevance of the other layers, in NumPy.

One readable function per rule, each written as in its paper with the layer's forward operator
``L(a; W, b)`` and its transpose ``L^T(s; W)`` (see :mod:`deeptaylor.reference.ops`), so every
function serves Dense, (grouped) Conv2d and ConvTranspose2d alike (the trick Zennit's tests use). ``a`` is the layer's input,
``R`` the relevance of its outputs; every function returns the relevance of its inputs (shape of a).
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedError
from ..layers import BatchNorm1d, BatchNorm2d, Conv2d, ConvTranspose2d, Dense
from ..rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, Z, ZBox, ZPlus
from .ops import linear_forward as L
from .ops import linear_transpose as LT

__all__ = ["safe_divide", "linear_relevance", "RULE_FUNCTIONS", "batchnorm_relevance", "norm_split"]

Linear = Dense | Conv2d | ConvTranspose2d


def safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """``num / den`` where ``den != 0``, else 0: a neuron with a zero denominator passes no relevance."""
    out = np.zeros(np.broadcast_shapes(num.shape, den.shape), dtype=np.result_type(num, den))
    np.divide(num, den, out=out, where=den != 0)
    return out


def _w64(layer: Linear) -> np.ndarray:
    """The layer's weights in float64 (float32 layers are upcast exactly: the reference computes every
    rule-derived matrix, e.g. W², W + γW⁺, in float64)."""
    return np.asarray(layer.weight, dtype=np.float64)


def _pos(v: np.ndarray) -> np.ndarray:
    return np.maximum(v, 0.0)


def _neg(v: np.ndarray) -> np.ndarray:
    return np.minimum(v, 0.0)


def z_rule(layer: Linear, rule: Z, a: np.ndarray, R: np.ndarray) -> np.ndarray:
    """LRP-0 (Bach et al. 2015): R_i = a_i sum_j w_ij R_j / z_j,  z_j = sum_i a_i w_ij + b_j.

    Shapes:
        a : (N, in_features) for Dense, (N, C, H, W) for Conv2d -- the layer's input
        R : (N, out_features) or (N, O, OH, OW) -- the relevance of the layer's outputs
        returns : the shape of a -- the relevance of the layer's inputs, in the units of R
    """
    W = _w64(layer)
    z = L(layer, a, W, layer.bias)
    s = safe_divide(R, z)
    return a * LT(layer, s, W, a.shape)


def epsilon_rule(layer: Linear, rule: Epsilon, a: np.ndarray, R: np.ndarray) -> np.ndarray:
    """LRP-epsilon (Bach et al. 2015): R_i = a_i sum_j w_ij R_j / (z_j + eps sign(z_j)), sign(0)=+1.

    Shapes:
        a : (N, in_features) for Dense, (N, C, H, W) for Conv2d -- the layer's input
        R : (N, out_features) or (N, O, OH, OW) -- the relevance of the layer's outputs
        returns : the shape of a -- the relevance of the layer's inputs, in the units of R
    """
    W = _w64(layer)
    z = L(layer, a, W, layer.bias)
    # safe_divide: with eps = 0 an output with z = 0 passes nothing (as Z), instead of NaN
    s = safe_divide(R, z + rule.eps * np.where(z >= 0, 1.0, -1.0))
    return a * LT(layer, s, W, a.shape)


def zplus_rule(layer: Linear, rule: ZPlus, a: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Deep Taylor z+ (Montavon et al. 2017): R_i = sum_j a_i w+_ij / (sum_i' a_i' w+_i'j) R_j.

    Written on positive contributions (a w)+ = a+ w+ + a- w-, which is the rule itself for a >= 0.

    Shapes:
        a : (N, in_features) for Dense, (N, C, H, W) for Conv2d -- the layer's input
        R : (N, out_features) or (N, O, OH, OW) -- the relevance of the layer's outputs
        returns : the shape of a -- the relevance of the layer's inputs, in the units of R
    """
    W = _w64(layer)
    Wp, Wn = _pos(W), _neg(W)
    ap, an = _pos(a), _neg(a)
    z = L(layer, ap, Wp, _pos(layer.bias) if rule.use_bias else None) + L(layer, an, Wn, None)
    s = safe_divide(R, z)
    return ap * LT(layer, s, Wp, a.shape) + an * LT(layer, s, Wn, a.shape)


def gamma_rule(layer: Linear, rule: Gamma, a: np.ndarray, R: np.ndarray) -> np.ndarray:
    """LRP-gamma (Montavon et al. 2019) in Zennit's generalised form.

    Outputs with z_j > 0: q_ij = a+_i (w_ij + g w+_ij) + a-_i (w_ij + g w-_ij), bias b + g b+.
    Outputs with z_j < 0: q_ij = a+_i (w_ij + g w-_ij) + a-_i (w_ij + g w+_ij), bias b + g b-.
    On a >= 0 and z > 0 this is q_ij = a_i (w_ij + g w+_ij).

    Shapes:
        a : (N, in_features) for Dense, (N, C, H, W) for Conv2d -- the layer's input
        R : (N, out_features) or (N, O, OH, OW) -- the relevance of the layer's outputs
        returns : the shape of a -- the relevance of the layer's inputs, in the units of R
    """
    g = rule.gamma
    W, b = _w64(layer), layer.bias
    Wup, Wdn = W + g * _pos(W), W + g * _neg(W)
    ap, an = _pos(a), _neg(a)
    z = L(layer, a, W, b)
    den_up = L(layer, ap, Wup, b + g * _pos(b)) + L(layer, an, Wdn, None)
    den_dn = L(layer, ap, Wdn, b + g * _neg(b)) + L(layer, an, Wup, None)
    s_up = safe_divide(R * (z > 0), den_up)
    s_dn = safe_divide(R * (z < 0), den_dn)
    return (ap * LT(layer, s_up, Wup, a.shape) + an * LT(layer, s_up, Wdn, a.shape)
            + ap * LT(layer, s_dn, Wdn, a.shape) + an * LT(layer, s_dn, Wup, a.shape))


def alphabeta_rule(layer: Linear, rule: AlphaBeta, a: np.ndarray, R: np.ndarray) -> np.ndarray:
    """LRP-alpha-beta (Bach et al. 2015): alpha * (share of positive contributions) - beta * (share of
    negative contributions); q+ = a+ w+ + a- w- (+ b+), q- = a+ w- + a- w+ (+ b-).

    Shapes:
        a : (N, in_features) for Dense, (N, C, H, W) for Conv2d -- the layer's input
        R : (N, out_features) or (N, O, OH, OW) -- the relevance of the layer's outputs
        returns : the shape of a -- the relevance of the layer's inputs, in the units of R
    """
    W, b = _w64(layer), layer.bias
    Wp, Wn = _pos(W), _neg(W)
    ap, an = _pos(a), _neg(a)
    zp = L(layer, ap, Wp, _pos(b)) + L(layer, an, Wn, None)
    zn = L(layer, ap, Wn, _neg(b)) + L(layer, an, Wp, None)
    sp = safe_divide(R, zp)
    sn = safe_divide(R, zn)
    pos = ap * LT(layer, sp, Wp, a.shape) + an * LT(layer, sp, Wn, a.shape)
    neg = ap * LT(layer, sn, Wn, a.shape) + an * LT(layer, sn, Wp, a.shape)
    return rule.alpha * pos - rule.beta * neg


def wsquare_rule(layer: Linear, rule: WSquare, a: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Deep Taylor w² (Montavon et al. 2017): R_i = sum_j w_ij² / (sum_i' w_i'j²) R_j.

    The denominator is L(1; W²): for a convolution it sums the taps that fall on the image.

    Shapes:
        a : (N, in_features) for Dense, (N, C, H, W) for Conv2d -- the layer's input
        R : (N, out_features) or (N, O, OH, OW) -- the relevance of the layer's outputs
        returns : the shape of a -- the relevance of the layer's inputs, in the units of R

    The values of a are not used, only its shape.
    """
    V = _w64(layer) ** 2
    ones = np.ones_like(a)
    z = L(layer, ones, V, None)
    return LT(layer, safe_divide(R, z), V, a.shape)


def flat_rule(layer: Linear, rule: Flat, a: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Flat (Lapuschkin et al. 2019): w² with unit weights, R_i = sum_j R_j / fan_in_j.

    Shapes:
        a : (N, in_features) for Dense, (N, C, H, W) for Conv2d -- the layer's input
        R : (N, out_features) or (N, O, OH, OW) -- the relevance of the layer's outputs
        returns : the shape of a -- the relevance of the layer's inputs, in the units of R

    The values of a are not used, only its shape.
    """
    U = np.ones_like(_w64(layer))
    ones = np.ones_like(a)
    z = L(layer, ones, U, None)
    return LT(layer, safe_divide(R, z), U, a.shape)


def zbox_rule(layer: Linear, rule: ZBox, a: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Deep Taylor zB (Montavon et al. 2017) for l <= a <= h:
    R_i = sum_j (a_i w_ij - l_i w+_ij - h_i w-_ij) / (sum_i' ...) R_j.

    Shapes:
        a : (N, in_features) for Dense, (N, C, H, W) for Conv2d -- the layer's input
        R : (N, out_features) or (N, O, OH, OW) -- the relevance of the layer's outputs
        returns : the shape of a -- the relevance of the layer's inputs, in the units of R

    ``rule.low`` / ``rule.high`` broadcast to a.shape[1:] (one sample), then to a.shape.
    """
    W = _w64(layer)
    Wp, Wn = _pos(W), _neg(W)
    lo, hi = rule.bounds_for(a.shape[1:])
    lo = np.broadcast_to(lo, a.shape)
    hi = np.broadcast_to(hi, a.shape)
    z = L(layer, a, W, None) - L(layer, lo, Wp, None) - L(layer, hi, Wn, None)
    s = safe_divide(R, z)
    return a * LT(layer, s, W, a.shape) - lo * LT(layer, s, Wp, a.shape) - hi * LT(layer, s, Wn, a.shape)


RULE_FUNCTIONS = {
    Z: z_rule,
    Epsilon: epsilon_rule,
    ZPlus: zplus_rule,
    Gamma: gamma_rule,
    AlphaBeta: alphabeta_rule,
    WSquare: wsquare_rule,
    Flat: flat_rule,
    ZBox: zbox_rule,
}


def linear_relevance(layer: Linear, rule: Rule, a: np.ndarray, R: np.ndarray) -> np.ndarray:
    """Apply ``rule`` to the linear ``layer`` with input ``a`` and output relevance ``R``.

    Rules are dispatched by their exact type (a subclass is not its base rule: it may change the
    formula); an unknown one raises :class:`~deeptaylor.errors.UnsupportedError` naming it."""
    fn = RULE_FUNCTIONS.get(type(rule))
    if fn is None:
        raise UnsupportedError(f"the numpy reference has no relevance function for rule {rule!r} on "
                               f"{layer.kind} (built-in rules only, matched by exact type)")
    return fn(layer, rule, a, R)


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """(C,) -> broadcastable against (N, C) or (N, C, H, W)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def batchnorm_relevance(layer: BatchNorm1d | BatchNorm2d, rule: Rule | None, a: np.ndarray, R: np.ndarray) -> np.ndarray:
    """A standalone BatchNorm ``y = a * scale + shift`` (per channel) as a diagonal linear layer.

    ``rule`` None: relevance passes unchanged (Zennit's ``Pass``), R_in = R. ``Epsilon(eps)``:
    R_in = a scale R / (y + eps sgn(y)), sgn(0) = +1 (eps = 0: 0 where y = 0). ``Z``: R_in = a scale R / y,
    0 where y = 0. Any other rule raises :class:`~deeptaylor.errors.UnsupportedError`.

    Shapes: a, R (N, C) for BatchNorm1d or (N, C, H, W) for BatchNorm2d; returns the shape of a.
    """
    if rule is None:
        return R
    scale = _channel(np.asarray(layer.scale, dtype=np.float64), a.ndim)
    shift = _channel(np.asarray(layer.shift, dtype=np.float64), a.ndim)
    contrib = a * scale
    y = contrib + shift
    if type(rule) is Epsilon:
        return contrib * safe_divide(R, y + rule.eps * np.where(y >= 0, 1.0, -1.0))
    if type(rule) is Z:
        return contrib * safe_divide(R, y)
    raise UnsupportedError(f"the numpy reference has no relevance function for rule {rule!r} on "
                           f"{layer.kind} (None = pass, Epsilon or Z)")


def norm_split(inputs: list[np.ndarray], out: np.ndarray, R: np.ndarray, eps: float) -> list[np.ndarray]:
    """The relevance of an element-wise sum ``out = sum_k inputs[k]`` split in proportion to the
    summands (Zennit's ``Norm`` rule, as its ResNet canonizer applies it to residual additions):
    ``R_k = a_k R / (out + eps sgn(out))``, sgn(0) = +1.

    Shapes: every input, out and R have one shape; returns one array of it per input. Conservation
    holds up to the factor out / (out + eps sgn(out)) where out != 0; where out == 0 the relevance
    is lost (the split gives sum_k R_k = 0); see docs/theory.md section 4.
    """
    s = safe_divide(R, out + eps * np.where(out >= 0, 1.0, -1.0))  # safe only for eps = 0
    return [a * s for a in inputs]
