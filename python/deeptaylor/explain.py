"""The user-facing entry point: :class:`Explainer` and its result, :class:`Explanation`."""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .composites import Composite
from .composites import get as _get_composite
from .errors import (
    BackendFallbackWarning,
    InputError,
    InputTypeError,
    RuleError,
    ShapeError,
    UnsupportedError,
)
from .layers import (
    AdaptiveAvgPool2d,
    Add,
    AvgPool2d,
    ChannelShuffle,
    Concat,
    Conv2d,
    ConvTranspose2d,
    Dense,
    Flatten,
    GlobalAvgPool,
    GlobalSumPool,
    LpPool,
    MaxPool2d,
    ReLU,
    Slice,
    SumPool2d,
    Upsample,
)
from .methods import CompoundMethod, Gradient, Method, Passes
from .network import Graph, Sequential
from .passes import canonicalize
from .rules import Flat, Rule, WSquare, ZBox, ZPlus
from .stream import all_finite as _windowed_all_finite
from .stream import first_nonfinite, min_max, progress_bar, release

__all__ = ["Explainer", "Explanation", "parse_target", "validate_input", "validate_seed", "validate_targets"]


@dataclass
class Explanation:
    """Result of :meth:`Explainer.explain`.

    Attributes
    ----------
    relevance : ndarray, shape of x, or (N, K, *x.shape[1:]) for K targets or seeds per sample
        The heatmaps, in units of the explained output (squared gradient for Sensitivity).
    output : ndarray (N, *out)
        The network's output (logits) for x: (N, K) for a classifier; any rank (e.g. (N, C, H, W) for
        a segmentation map) where the network ends that way.
    target : ndarray (N,) or (N, K) int, or None
        The explained output index per sample (per sample and pass for many targets); a flat index
        into the per-sample output (C-order) when the output has more than one axis. None when
        explained from a ``seed``.
    explained : ndarray (N,) or (N, K)
        ``output[n, target[n]]``: the value a conservative method redistributes; with a seed ``S``,
        ``sum S`` (rules) or the objective ``sum S * y`` whose gradient the seed is (gradient
        methods; :mod:`deeptaylor.seeds`).
    layers : list of ndarray, dict of str -> ndarray, or None
        With ``return_layers=True``. For a :class:`~deeptaylor.Sequential`: a list, the relevance at
        the input of every layer (``layers[0]`` is ``relevance``, ``layers[i]`` the input of layer
        ``i``) and, last, at the output (``layers[len(net)]``), so ``len(layers) == len(net) + 1``.
        For a :class:`~deeptaylor.Graph`: a dict keyed by node name, the relevance at every node's
        output, plus ``"input"`` (= ``relevance``). The nodes are those of the canonical graph
        (:func:`deeptaylor.passes.canonicalize`: a BatchNorm folded into its convolution, Identity and
        Dropout have no entry of their own).
    method : str
        The composite or method that produced it.
    backend : str
        The backend that ran: ``"cpu"`` (compiled, float32) or ``"numpy"`` (float64 reference); with
        ``backend="auto"`` the one it chose.
    conservative_expected : bool
        True when theory (docs/theory.md §3; Montavon et al. 2017) promises conservation,
        ``sum_p R_p = f(x)`` at every layer, for this network, composite and batch. That is exactly when
        all the theorem's premises hold: a rule composite (not a gradient method); every linear layer
        has ``b <= 0``; the first linear layer sees the input (only Flatten layers before it) and takes
        z+, w², flat or zB(l, h) with ``l <= 0 <= h`` (the explainer checks the input lies in the box),
        every other linear layer takes z+ (``ZPlus(use_bias=True)`` counts: with ``b <= 0`` the added
        ``b+`` is 0); each linear layer's output goes through a ReLU (Flatten or MaxPool2d in between
        allowed) unless it is the network's output; and the explained outputs are ``>= 0``. False does
        not mean relevance is lost (e.g. Z on a bias-free ReLU network conserves), only that the
        theorem does not promise it. ``checks.conservation`` measures it.
    """

    relevance: np.ndarray
    output: np.ndarray
    target: np.ndarray
    explained: np.ndarray
    layers: list[np.ndarray] | dict[str, np.ndarray] | None = None
    method: str = ""
    backend: str = ""
    conservative_expected: bool = field(default=False, repr=False)
    #: the canonical graph that was explained (:attr:`Explainer.graph`); :func:`deeptaylor.checks.conservation`
    #: uses it to compare per-node relevance totals with f(x)
    graph: Graph | None = field(default=None, repr=False)
    #: what a compound method (:class:`~deeptaylor.methods.CompoundMethod`: Taylor, integrated
    #: gradients...) reports besides the relevance, per sample (first axis N), by name; empty otherwise
    extras: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return (f"Explanation(relevance={self.relevance.shape} {self.relevance.dtype}, output={self.output.shape}, "
                f"method={self.method}, backend={self.backend}, layers={'yes' if self.layers else 'no'})")


_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def validate_input(net: Graph, x: Any) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """Check ``x`` against ``net``: a float32/float64 array ``(N, F)`` or ``(N, C, H, W)`` with N >= 1,
    finite values, and a shape every layer accepts. Returns ``(x, shapes)``; raises a
    :class:`~deeptaylor.errors.DeepTaylorError` subclass naming the problem otherwise.

    A CPU torch tensor is converted to an array; a non-native byte order (big-endian float32/float64)
    is converted to native. Masked arrays (``numpy.ma``) and ``numpy.matrix`` raise
    :class:`~deeptaylor.errors.InputTypeError` (a mask cannot be honoured)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        from .io.torch import as_array

        x = as_array(x)
    if isinstance(x, np.ma.MaskedArray):
        # the checks below would see the filled view, the backends the raw data under the mask
        raise InputTypeError(
            "masked arrays (numpy.ma) are not accepted: the mask would be ignored. Fill the masked entries "
            "(x.filled(value)) or drop those samples, and pass a plain ndarray")
    if isinstance(x, np.matrix):
        raise InputTypeError("numpy.matrix is not accepted: pass a plain ndarray (np.asarray(x)) of shape "
                             "(N, F) or (N, C, H, W)")
    if not isinstance(x, np.ndarray):
        given = type(x)
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise InputTypeError(f"input is not array-like ({given.__name__}): explain takes a float NumPy "
                                 "array (N, F) or (N, C, H, W) or a CPU torch.Tensor") from exc
        if x.dtype == object:
            raise InputTypeError(f"input of type {given.__module__}.{given.__qualname__} is not an array: explain "
                                 "takes a float NumPy array (N, F) or (N, C, H, W) or a CPU torch.Tensor")
    if x.dtype.kind == "f" and not x.dtype.isnative and x.dtype.newbyteorder("=") in _FLOAT_DTYPES:
        x = x.astype(x.dtype.newbyteorder("="))   # big-endian float32/float64: same values, native order
    if x.dtype not in _FLOAT_DTYPES:
        raise InputTypeError(
            f"input dtype {x.dtype} is not supported: use float32 or float64 "
            "(convert integer images with x.astype(np.float32) / 255)"
        )
    if x.ndim not in (2, 4):
        raise ShapeError(f"input must be (N, features) or (N, C, H, W), got rank {x.ndim} shape {x.shape}")
    if x.shape[0] == 0:
        raise InputError(f"empty batch: input has shape {x.shape}")
    shapes = net.shapes(x.shape)
    if not _all_finite(x):
        count, first = first_nonfinite(x)
        raise InputError(f"input contains {count} NaN/Inf value(s), first at index {first}")
    return x, shapes


def _relevance_shape(x_shape: tuple[int, ...], targets: np.ndarray | None) -> tuple[int, ...]:
    """The relevance's shape for input ``x_shape`` (N, *sample) and validated targets: the input's
    shape, or (N, K, *sample) for a 2-D target array (N, K) (K targets per sample)."""
    if targets is None or np.ndim(targets) <= 1:
        return tuple(x_shape)
    return (x_shape[0], *np.shape(targets)[1:], *x_shape[1:])


def _all_finite(x: np.ndarray) -> bool:
    """True if every element of the float array ``x`` is finite. One pass and no temporary array on
    the common path: NaN and Inf propagate through a sum, so a finite sum proves every element finite;
    only a sum that overflowed (or a real NaN/Inf) takes the element-wise check. Windows of 32 MiB
    along the batch axis; a memory map's pages are released after each (:mod:`deeptaylor.stream`)."""
    return _windowed_all_finite(x)


def validate_targets(target: Any, n: int, k: int) -> np.ndarray | None:
    """``None`` (argmax), an int, an integer array (N,), or (N, K') (K' targets per sample); each in
    ``[0, K)`` (K outputs per sample; a flat index for an output of rank > 1). Returns (N,) or (N, K')
    int64, or None."""
    if target is None:
        return None
    if isinstance(target, int) and not isinstance(target, bool) and not 0 <= target < k:
        raise InputError(f"target out of range: the network has {k} output(s) (0..{k - 1}), got {target}")
    if isinstance(target, (np.ma.MaskedArray, np.matrix)):
        raise InputTypeError(f"target must be an int or a plain integer array, got {type(target).__name__}")
    t = np.asarray(target)
    if t.dtype.kind not in "iu" or t.dtype == np.bool_:
        raise InputTypeError(f"target must be an int or an integer array, got dtype {t.dtype}")
    if t.dtype.kind == "u" and t.size and int(t.max()) >= k:
        # before the int64 conversion: a uint64 beyond int64 would wrap to a negative number
        raise InputError(f"target out of range: the network has {k} output(s) (0..{k - 1}), "
                         f"got values in [{int(t.min())}, {int(t.max())}]")
    if t.ndim == 0:
        t = np.full(n, int(t), dtype=np.int64)
    elif t.shape != (n,) and not (t.ndim == 2 and t.shape[0] == n and t.shape[1] >= 1):
        raise ShapeError(f"target must be an int or have shape ({n},), got shape {t.shape} (or ({n}, K) for K "
                         "targets per sample)")
    t = t.astype(np.int64)
    if np.any(t < 0) or np.any(t >= k):
        raise InputError(f"target out of range: the network has {k} output(s) (0..{k - 1}), "
                         f"got values in [{t.min()}, {t.max()}]")
    return t


def parse_target(target: Any, n: int, k: int) -> tuple[np.ndarray | None, int | None]:
    """The ``target`` argument of :meth:`Explainer.explain`: None (argmax), an int, an (N,) or (N, K')
    integer array (:func:`validate_targets`), ``"all"`` (every one of the K outputs, in order: an (N, K)
    array) or ``("top", k')`` (the k' largest outputs per sample, largest first, ties to the lower
    index; chosen in the same pass as the forward). Returns ``(targets, top)``: validated targets (or
    None) and the k' of ``("top", k')`` (or None)."""
    if isinstance(target, str):
        if target != "all":
            raise InputTypeError(f"target must be an int, an int array (N,) or (N, K), 'all' or ('top', k), "
                                 f"got {target!r}")
        return np.broadcast_to(np.arange(k, dtype=np.int64), (n, k)).copy(), None
    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], str):
        kind, kk = target
        if kind != "top":
            raise InputError(f"target {target!r} is not understood: the tuple form is ('top', k)")
        if not isinstance(kk, (int, np.integer)) or isinstance(kk, (bool, np.bool_)) or not 1 <= kk <= k:
            raise InputError(f"target ('top', k) needs an int k in [1, {k}] (the network has {k} output(s)), "
                             f"got {kk!r}")
        return None, int(kk)
    return validate_targets(target, n, k), None


def validate_seed(seed: Any, n: int, out_shape: tuple[int, ...]) -> np.ndarray:
    """An output seed array (:mod:`deeptaylor.seeds`): float32/float64 of shape (N, *out) or
    (N, K, *out) with K >= 1, finite. Returns it as a plain ndarray (a CPU torch tensor is converted);
    raises :class:`~deeptaylor.errors.InputTypeError`, :class:`~deeptaylor.errors.ShapeError` or
    :class:`~deeptaylor.errors.InputError` naming the problem."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(seed, torch.Tensor):
        from .io.torch import as_array

        seed = as_array(seed)
    if isinstance(seed, (np.ma.MaskedArray, np.matrix)) or not isinstance(seed, np.ndarray):
        raise InputTypeError(f"seed must be a float array (N, *out), a dt.seeds.Seed or a callable, got "
                             f"{type(seed).__module__}.{type(seed).__qualname__}")
    if seed.dtype.kind == "f" and not seed.dtype.isnative:
        seed = seed.astype(seed.dtype.newbyteorder("="))
    if seed.dtype not in _FLOAT_DTYPES:
        raise InputTypeError(f"seed dtype {seed.dtype} is not supported: use float32 or float64")
    want = (n, *out_shape)
    if tuple(seed.shape) != want and not (seed.ndim == len(want) + 1 and seed.shape[0] == n and seed.shape[1] >= 1
                                          and tuple(seed.shape[2:]) == tuple(out_shape)):
        raise ShapeError(f"seed must have the network output's shape {want} (or (N, K, *out) = "
                         f"{(n, 'K', *out_shape)} for K seeds per sample), got {tuple(seed.shape)}")
    if not _all_finite(seed):
        bad = ~np.isfinite(seed)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise InputError(f"seed contains {int(bad.sum())} NaN/Inf value(s), first at index {first}")
    return seed


_FIRST_RULES = (ZPlus, WSquare, Flat)
# nodes through which "the input is non-negative" carries over, and nodes that conserve relevance
# exactly (by position) or in proportion to non-negative inputs; any other non-linear node (BatchNorm,
# activations other than ReLU, Mul gates) breaks the theorem's premises
_NONNEG_KEEP = (Flatten, MaxPool2d, AvgPool2d, SumPool2d, GlobalSumPool, GlobalAvgPool, AdaptiveAvgPool2d,
                Upsample, ChannelShuffle, Slice, Concat, Add)
_SHAPE_ONLY = (Flatten,)


def pixel_values(net: Graph) -> set[int]:
    """Value ids that hold the input itself, up to reshaping: 0 and Flatten outputs of those. A ZBox
    on a node that reads one of these sees pixels (its box is checked on the input)."""
    vals = {0}
    for i, node in enumerate(net.nodes):
        if isinstance(node.layer, _SHAPE_ONLY) and node.inputs[0] in vals:
            vals.add(i + 1)
    return vals


def _conservation_premises(net: Graph, assignment: list[Rule | None] | Method) -> tuple[bool, bool, bool]:
    """The data-independent premises of the conservation theorem (docs/theory.md §3), checked once
    per Explainer: returns ``(holds, needs_nonnegative_output, needs_nonnegative_input)``. The second
    is True when the network ends in a linear layer, whose explained output must be >= 0; the third
    when an Add reads the input (values), which must then be >= 0 (both checked per batch)."""
    if isinstance(assignment, Method):
        return False, False, False
    linear = net.linear_layers()
    if not linear:
        return False, False, False
    pixels = pixel_values(net)
    first = set(net.first_linear())
    consumers = net.consumers()
    L = len(net)
    needs_nonnegative = needs_input = False
    nonneg = [False] * (L + 1)   # value >= 0 by construction
    for i, node in enumerate(net.nodes):
        layer, rule = node.layer, assignment[i]
        if layer.linear:
            if type(layer) not in (Dense, Conv2d, ConvTranspose2d):  # a custom backend's own linear layer
                return False, False, False
            if not np.all(layer.bias <= 0):
                return False, False, False       # b > 0: x_j = b_j with a zero denominator drops R_j
            if i in first:
                if node.inputs[0] not in pixels:
                    return False, False, False   # a first layer that sees processed inputs
                box = type(rule) is ZBox and bool(np.all(rule.low <= 0) and np.all(rule.high >= 0))
                if not (type(rule) in _FIRST_RULES or box):
                    return False, False, False
            elif type(rule) is not ZPlus:        # w², flat, zB above: R_j no longer ~ x_j below them
                return False, False, False
            # every path from the output must reach a ReLU through Flatten / MaxPool2d only
            stack = [i + 1]
            while stack:
                v = stack.pop()
                if v == L:
                    needs_nonnegative = True
                for c in consumers[v]:
                    if isinstance(net[c], (Flatten, MaxPool2d)):
                        stack.append(c + 1)
                    elif not isinstance(net[c], ReLU):
                        return False, False, False   # a unit that is off must output 0
        elif isinstance(layer, (ReLU, LpPool)):
            nonneg[i + 1] = True
        elif isinstance(layer, _NONNEG_KEEP):
            if isinstance(layer, Add):
                for v in node.inputs:
                    if v == 0:
                        needs_input = True
                    elif not nonneg[v]:
                        return False, False, False  # a proportional split of mixed signs
            nonneg[i + 1] = all(nonneg[v] or v == 0 for v in node.inputs)
        else:
            return False, False, False
    return True, needs_nonnegative, needs_input


def _resolve(composite: Any) -> Composite | Method:
    if isinstance(composite, str):
        composite = _get_composite(composite)
    if isinstance(composite, (Composite, Method)):
        return composite
    if isinstance(composite, Mapping):
        return Composite.from_mapping(composite)
    if isinstance(composite, Rule):
        return Composite(default=composite, name=composite.name)
    raise RuleError(f"expected a composite, a method, a rule, a mapping or a name, got {composite!r}")


class Explainer:
    """Explain a network's decisions with a composite of rules (or a gradient method).

    Parameters
    ----------
    net : Graph (or Sequential), or a ``torch.nn.Module``
        A torch module is converted once with :func:`deeptaylor.from_torch` (``input_shape`` needed).
    composite : Composite, Method, Rule, mapping or str
        e.g. ``dt.composites.deep_taylor(0, 1)``, ``dt.methods.Sensitivity()``, ``"epsilon-plus-flat"``,
        a single rule (used for every linear layer) or a mapping accepted by
        :meth:`Composite.from_mapping`.
    backend : {"auto", "cpu", "numpy"} or a backend object
        ``"auto"`` (default): the compiled C++ core when it is built and runs this network with these
        rules, else the reference, with a :class:`~deeptaylor.errors.BackendFallbackWarning` that says
        why (once per reason); :attr:`Explanation.backend` tells which ran. ``"cpu"``: the compiled
        C++ core (float32; :class:`~deeptaylor.errors.UnsupportedError` if it cannot run the network);
        ``"numpy"``: the float64 reference.
    threads : int, optional
        Threads for the compiled backends (default: OpenMP's default).
    input_shape : tuple, optional
        Per-sample input shape ``(C, H, W)`` or ``(F,)``, for a torch module.

    The network is canonicalised once (:func:`deeptaylor.passes.canonicalize`: BatchNorm folded into
    the convolution before it, Identity/Dropout removed); rules are assigned to the canonical graph's
    nodes (:attr:`graph`).

    Before any work, :meth:`explain` validates the input (dtype, shape, finiteness; for a float32
    backend, values within float32's range) and, for a :class:`~deeptaylor.rules.ZBox` that sees the
    input -- on layer 0 or on the first layer after leading Flatten layers -- that the input lies in
    its box. The box is not traced through pooling or other layers: a ZBox deeper in the network sees
    activations, and its bounds are taken as given. After the pass, NaN/Inf in the output or the
    relevance (an overflow of the backend's precision) raises :class:`~deeptaylor.errors.InputError`.

    Examples
    --------
    >>> ex = dt.Explainer(net, dt.composites.deep_taylor(0.0, 1.0), backend="cpu")
    >>> res = ex.explain(x)              # x: (N, C, H, W) float32 in [0, 1]
    >>> res.relevance.shape == x.shape
    True
    """

    def __init__(self, net: Any, composite: Any, backend: Any = "auto", threads: int | None = None,
                 input_shape: Any = None) -> None:
        torch = sys.modules.get("torch")
        if not isinstance(net, Graph) and torch is not None and isinstance(net, torch.nn.Module):
            from .io.torch import as_network

            try:
                net = as_network(net, input_shape)
            except ShapeError as exc:
                if input_shape is not None:
                    raise
                raise ShapeError(
                    f"{exc}. Explainer converts a torch.nn.Module with dt.from_torch(module, input_shape): pass "
                    "the per-sample input shape, dt.Explainer(module, composite, input_shape=(C, H, W)), or "
                    "convert once yourself with net = dt.from_torch(module, input_shape=(C, H, W))") from None
        elif input_shape is not None and isinstance(net, Graph):
            from .io.torch import as_network

            as_network(net, input_shape)   # checks it against the network
        if not isinstance(net, Graph):
            cls = type(net)
            hint = ""
            if cls.__module__.split(".")[0] in ("torch", "torchvision") or any(
                    c.__module__.startswith("torch.nn") for c in cls.__mro__):
                hint = " (convert a PyTorch module with dt.from_torch(module, input_shape=...))"
            raise InputTypeError(f"net must be a deeptaylor.Graph or Sequential (or a torch.nn.Module with "
                                 f"input_shape=...), got {cls.__module__}.{cls.__qualname__}{hint}")
        if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
            raise InputError(f"threads must be a positive int, got {threads!r}")
        self.net = net
        self.graph = canonicalize(net)
        self.composite = _resolve(composite)
        self.assignment: list[Rule | None] | Method = (
            self.composite if isinstance(self.composite, Method) else self.composite.resolve(self.graph)
        )
        # what the backend runs: a compound method's passes are gradient passes
        self._engine_assignment: list[Rule | None] | Method = (
            Gradient() if isinstance(self.assignment, CompoundMethod) else self.assignment)
        #: why ``backend="auto"`` chose the NumPy reference (None when it did not fall back)
        self.fallback_reason: str | None = None
        self.backend = self._choose_backend(backend, threads)
        self._premises = _conservation_premises(self.graph, self.assignment)
        wrap = getattr(self.composite, "wrap_backend", None)
        if wrap is not None:   # a relevance model explains a bottom layer range (deeptaylor.relevance_models)
            self.backend = wrap(self.graph, self.backend)
            self._premises = (False, False, False)   # the model approximates the relevance it stands for

    def _choose_backend(self, backend: Any, threads: int | None) -> Any:
        """The backend object for ``backend``; ``"auto"``: the compiled engine when it is built and its
        ``check`` accepts the graph and rules, else the reference with a :class:`BackendFallbackWarning`."""
        from .backends import get_backend

        if not (isinstance(backend, str) and backend == "auto"):
            b = get_backend(backend, threads=threads)
            b.check(self.graph, self._engine_assignment)
            return b
        try:
            importlib.import_module(f"{__package__}._core")
        except ImportError as exc:
            reason = f"the compiled engine (deeptaylor._core) is not built ({exc})"
        else:
            try:
                b = get_backend("cpu", threads=threads)
                b.check(self.graph, self._engine_assignment)
                return b
            except UnsupportedError as exc:
                reason = str(exc)
        b = get_backend("numpy")
        b.check(self.graph, self._engine_assignment)   # neither can run it: the reference's UnsupportedError, no warning
        self.fallback_reason = reason
        warnings.warn(f"backend='auto' uses the NumPy reference (float64, slower): {reason}. Pass "
                      "backend='numpy' to choose it explicitly (and silence this warning)",
                      BackendFallbackWarning, stacklevel=3)
        return b

    @property
    def method_name(self) -> str:
        """What :attr:`Explanation.method` records: the method's name (``"Sensitivity"``) or
        ``"composite:<name>"`` (``"composite:deep_taylor"``; a single rule gives ``"composite:ZPlus"``)."""
        c = self.composite
        return c.name if isinstance(c, Method) else f"composite:{c.name}"

    def _check_range(self, x: np.ndarray) -> None:
        """A float64 input to a float32 backend (cpu) must fit in float32: beyond ``finfo(float32).max``
        it would turn into +-inf and NaN heatmaps. Two reductions (min, max), only for float64 input
        to a float32 backend."""
        dtype = getattr(self.backend, "dtype", None)
        if x.dtype != np.float64 or dtype is None or np.dtype(dtype) != np.float32:
            return
        big = float(np.finfo(np.float32).max)
        lo, hi = (float(v) for v in min_max(x))
        if hi > big or lo < -big:
            raise InputError(
                f"input has values in [{lo:.4g}, {hi:.4g}], beyond float32's range (+-{big:.4g}): backend "
                f"'{self.backend.name}' computes in float32 (rescale the input or use backend='numpy')")

    def _check_finite(self, a: np.ndarray, stage: str, what: str, offset: int = 0) -> None:
        """NaN/Inf after the pass means it overflowed the backend's precision: an error, never a NaN
        heatmap. One reduction on the common path (:func:`_all_finite`). ``offset``: the index of
        ``a``'s first sample in the batch (for a chunk)."""
        if _all_finite(a):
            return
        bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
        samples = np.flatnonzero(bad)
        raise InputError(
            f"the {stage} pass overflowed {a.dtype} (backend '{self.backend.name}'): {what} has NaN/Inf "
            f"values for {samples.size} sample(s), first sample {int(samples[0]) + offset}; scale the input or "
            "the weights down" + (" or use backend='numpy' (float64)" if a.dtype == np.float32 else ""))

    def _check_domains(self, x: np.ndarray, shapes: list[tuple[int, ...]]) -> None:
        """Every ZBox's bounds must broadcast to its node's input shape (RuleError otherwise). A ZBox
        on a node that reads the input (directly or through Flatten nodes, which only reshape) needs
        the input within its box (InputError otherwise). Both are checked before any work. ZBox
        deeper in the network sees activations: there the bounds are the user's statement about
        them."""
        if isinstance(self.assignment, Method):
            return
        pixels = pixel_values(self.graph)
        for i, (node, rule) in enumerate(zip(self.graph.nodes, self.assignment)):
            if not isinstance(rule, ZBox):
                continue
            shape = shapes[node.inputs[0]]
            lo, hi = rule.bounds_for(shape[1:])
            if node.inputs[0] not in pixels:
                continue
            a = x.reshape(shape)
            tol = 1e-6 * max(1.0, float(np.max(np.abs(hi))), float(np.max(np.abs(lo))))
            # reductions over the batch in windows (sample-sized results, no batch-sized temporaries)
            if rule.low.size == 1 and rule.high.size == 1:
                amin, amax = min_max(a)
                outside = amin < lo.flat[0] - tol or amax > hi.flat[0] + tol
            else:
                smin, smax = min_max(a, axis0=True)
                outside = bool(np.any(smin < lo - tol) or np.any(smax > hi + tol))
                amin, amax = smin.min(), smax.max()
            if outside:
                raise InputError(
                    f"ZBox on {self.graph._where(i)} needs inputs within [low, high]; got values in "
                    f"[{amin:.4g}, {amax:.4g}] (rescale the input or pass the right low/high)"
                )

    def _resolve_seed(self, seed: Any, x: np.ndarray, n: int, out_shape: tuple[int, ...],
                      batch_size: int) -> tuple[np.ndarray | None, bool]:
        """``seed`` of :meth:`explain` as ``(array (N, [K,] *out) in the backend's dtype, times_output)``:
        a :class:`~deeptaylor.seeds.Seed` gives its weights (times the output for a rule composite, as
        they are for a gradient method, whose seed is the output gradient); a callable is called on
        the output of a forward pass; an array is checked (:func:`validate_seed`) and used as given."""
        from .seeds import Seed

        if seed is None:
            return None, False
        times_output = False
        if isinstance(seed, Seed):
            arr = seed.weights((n, *out_shape))
            times_output = not isinstance(self.assignment, Method)
        elif callable(seed):
            arr = seed(self.forward(x, batch_size=batch_size))
        else:
            arr = seed
        arr = validate_seed(arr, n, out_shape)
        dtype = np.dtype(getattr(self.backend, "dtype", np.float64))
        if dtype == np.float32 and arr.dtype == np.float64:
            big = float(np.finfo(np.float32).max)
            if arr.size and float(np.abs(arr).max()) > big:
                raise InputError(f"seed has values beyond float32's range (+-{big:.4g}): backend "
                                 f"'{self.backend.name}' computes in float32")
        return np.ascontiguousarray(arr, dtype=dtype), times_output

    def _check_out(self, out: Any, x: np.ndarray, shape: tuple[int, ...]) -> None:
        """``out`` of :meth:`explain`: a writable float32/float64 array of the relevance's ``shape``
        that does not overlap ``x``; checked before any work."""
        if not isinstance(out, np.ndarray) or isinstance(out, (np.ma.MaskedArray, np.matrix)):
            raise InputTypeError(f"out must be a NumPy array or np.memmap, got {type(out).__module__}."
                                 f"{type(out).__qualname__}")
        if out.dtype not in _FLOAT_DTYPES or not out.dtype.isnative:
            raise InputTypeError(f"out has dtype {out.dtype}: use float32 or float64 (native byte order)")
        if not out.flags.writeable:
            raise InputError("out is read-only (a memory map opened with mode 'r'?): pass a writable array, "
                             "e.g. np.lib.format.open_memmap(path, mode='w+', dtype=np.float32, shape=...)")
        if tuple(out.shape) != tuple(shape):
            raise ShapeError(f"out has shape {tuple(out.shape)}, but the relevance has shape {tuple(shape)}")
        if np.may_share_memory(out, x):
            raise InputError("out overlaps the input x: pass a separate array")

    def explain(self, x: Any, target: Any = None, return_layers: bool = False,
                batch_size: int | None = None, progress: bool = False, out: Any = None,
                seed: Any = None) -> Explanation:
        """Heatmaps for a batch.

        Parameters
        ----------
        x : float32/float64 array (N, F) or (N, C, H, W), or a CPU torch tensor
        target : None, int, int array (N,) or (N, K), ``"all"`` or ``("top", k)``
            The output to explain: None = the largest output per sample (a single-output network
            explains its output); an int or (N,) array: one output per sample. Many targets: an
            (N, K) array (K outputs per sample), ``"all"`` (every output, in order) or ``("top", k)``
            (the k largest per sample, largest first, ties to the lower index); the relevance is then
            (N, K, *x.shape[1:]) and ``explained``/``target`` (N, K). The K relevance passes share one
            forward pass (the compiled engine runs them together, docs/engine.md "Many targets and
            seeds"). For an output with more than one axis, targets are flat indices (C-order).
        return_layers : bool
            Also return the relevance at every layer (see :class:`Explanation`); with K targets or
            seeds every layer's array has the K axis too, (N, K, ...).
        batch_size : int, optional
            Process the batch in chunks of this size (bounds the memory of the numpy backend).
        progress : bool
            Show a progress bar in images/s when there is more than one chunk (needs ``tqdm``;
            silently off without it).
        out : writable float32/float64 array, optional
            Write the heatmaps here (an ``np.memmap``, e.g. ``np.lib.format.open_memmap(path, "w+",
            ...)``, or any writable array) of the relevance's shape (that of x; values cast to
            ``out``'s dtype), chunk by chunk (``batch_size``); the result's ``relevance`` is ``out``
            itself. With x and ``out`` both memory-mapped files the process holds only a chunk: the
            pages of a shared ``np.memmap`` (x's and ``out``'s) are released from memory as each
            chunk is done (:func:`deeptaylor.stream.release`). ``out`` must not overlap x.
        seed : array (N, *out) or (N, K, *out), :class:`deeptaylor.seeds.Seed`, or callable, optional
            Start the backward pass from this instead of the one-hot target (not with ``target``): an
            array is the relevance at the output (rules) or the output gradient (gradient methods); a
            ``Seed`` (``dt.seeds.contrast(c, d)``, ``dt.seeds.mask(m)``) is a linear objective of the
            output; a callable gets the output (one extra forward pass) and returns the array. See
            :mod:`deeptaylor.seeds`; ``explained`` is then the seed's total, ``target`` None.

        Returns
        -------
        Explanation
            ``relevance`` has the shape of x (with K targets or seeds: (N, K, *x.shape[1:])); float64
            for the numpy backend, float32 for cpu.
        """
        x, shapes = validate_input(self.graph, x)
        n = shapes[-1][0]
        out_shape = tuple(shapes[-1][1:])
        k = int(np.prod(out_shape, dtype=np.int64))
        if seed is not None and target is not None:
            raise InputError("pass either target or seed, not both (a seed replaces the one-hot target)")
        targets, top = parse_target(target, n, k)
        self._check_range(x)
        self._check_domains(x, shapes)
        if batch_size is None:
            batch_size = n
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        compound = isinstance(self.assignment, CompoundMethod)
        seed_arr, times_output = self._resolve_seed(seed, x, n, out_shape, batch_size)
        k_axis = top is not None or (targets is not None and targets.ndim == 2) or (
            seed_arr is not None and seed_arr.ndim == len(out_shape) + 2)
        if k_axis or seed_arr is not None:
            what = "a seed" if seed_arr is not None else "several targets per sample"
            if compound:
                raise UnsupportedError(f"{what} is not available for {self.assignment!r}: a compound method "
                                       "explains one target per sample")
            if not getattr(self.backend, "many_targets", False):
                raise UnsupportedError(f"{what} is not available on backend '{self.backend.name}' (its run "
                                       "takes one target per sample); use backend='cpu' or 'numpy'")
        passes = (top if top is not None else targets.shape[1] if targets is not None and targets.ndim == 2
                  else seed_arr.shape[1] if k_axis else 1)
        if out is not None:
            self._check_out(out, x, (n, passes, *x.shape[1:]) if k_axis else tuple(x.shape))
        starts = range(0, n, batch_size)
        bar = progress_bar(n, progress and len(starts) > 1)
        if compound and return_layers:
            raise UnsupportedError(f"return_layers is not available for {self.assignment!r}: a compound method "
                                   "combines several passes and has no per-layer relevance")
        kw: dict[str, Any] = {} if top is None else {"top": top}
        if seed_arr is not None:
            kw["seed_times_output"] = times_output
        parts = []
        extras: list[dict[str, np.ndarray]] = []
        for s in starts:
            t = None if targets is None else targets[s:s + batch_size]
            xs = x[s:s + batch_size]
            if compound:
                xs = xs.astype(self.backend.dtype, copy=False)
                out_s, rel_s, ext_s = self.assignment.compute(self._passes(), xs, t)
                parts.append((out_s, rel_s, None))
                extras.append(ext_s)
            else:
                if seed_arr is not None:
                    kw["seed"] = seed_arr[s:s + batch_size]
                parts.append(self.backend.run(self.graph, self.assignment, xs, t, return_layers, **kw))
            self._check_finite(parts[-1][0], "forward", "the network output", offset=s)
            self._check_finite(parts[-1][1], "relevance", "the relevance", offset=s)
            if out is not None:   # into the caller's array; drop the chunk's pages of memory maps
                rel_s = parts[-1][1]
                if rel_s.shape[1:] != out.shape[1:]:
                    raise ShapeError(f"out has shape {out.shape}, but the relevance has shape "
                                     f"{(n, *rel_s.shape[1:])}")
                out[s:s + len(rel_s)] = rel_s
                release(out[s:s + len(rel_s)])
                release(x[s:s + len(rel_s)])
                parts[-1] = (parts[-1][0], None, parts[-1][2])
            bar.update(len(xs))
        bar.close()
        def cat(arrays: list[np.ndarray]) -> np.ndarray:
            return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)

        output = cat([p[0] for p in parts])
        relevance = out if out is not None else cat([p[1] for p in parts])
        layers = [cat([p[2][i] for p in parts]) for i in range(len(parts[0][2]))] \
            if return_layers and parts[0][2] is not None else None
        extra = {key: np.concatenate([e[key] for e in extras]) for key in extras[0]} if extras else {}
        flat = output.reshape(n, -1).astype(np.float64)
        if seed_arr is not None:
            tgt = None
            y = output.astype(np.float64)[:, None] if k_axis else output.astype(np.float64)
            start = seed_arr.astype(np.float64) * (y if times_output else 1.0)
            gradient = isinstance(self.assignment, Method)
            total = start * y if gradient else start   # a gradient seed: the objective sum S * y
            explained = total.reshape(total.shape[:2 if k_axis else 1] + (-1,)).sum(axis=-1)
            nonneg_start = bool(np.all(start >= 0))
        else:
            if targets is not None:
                tgt = targets
            elif top is not None:
                tgt = np.argsort(-flat, axis=1, kind="stable")[:, :top]
            else:
                tgt = np.argmax(flat, axis=1)
            explained = np.take_along_axis(flat, tgt.reshape(n, -1), axis=1).reshape(tgt.shape)
            nonneg_start = bool(np.all(explained >= 0))
        holds, needs_nonnegative, needs_input = self._premises
        conservative = holds and (not needs_nonnegative or nonneg_start) and (
            not needs_input or float(min_max(x)[0]) >= 0)
        if return_layers and layers is not None and not isinstance(self.graph, Sequential):
            named = {"input": layers[0]}
            for i, node in enumerate(self.graph.nodes):
                named[node.name] = layers[i + 1]
            layers = named
        return Explanation(relevance=relevance, output=output, target=tgt, explained=explained,
                           layers=layers if return_layers else None, method=self.method_name,
                           backend=self.backend.name, conservative_expected=conservative, graph=self.graph,
                           extras=extra)

    def explain_batches(self, batches: Any, batch_size: int = 256, target: Any = None,
                        return_layers: bool = False, progress: bool = False,
                        total: int | None = None, seed: Any = None) -> Iterator[tuple[int, Explanation]]:
        """Explain a stream of inputs (a data loader, a directory walk) in batches, with bounded memory.

        Parameters
        ----------
        batches : iterable
            Items are samples ``(F,)`` / ``(C, H, W)`` or batches ``(B, F)`` / ``(B, C, H, W)`` (float32/
            float64 arrays or CPU torch tensors), in any mix; they are regrouped into batches of
            ``batch_size`` samples (the last one shorter). At most ``batch_size`` samples plus one item
            are held at a time.
        batch_size : int
            Samples per explained batch (default 256).
        target : None, int, ``"all"``, ``("top", k)``, or an array indexable by stream position
            None: the largest output; an int, ``"all"`` or ``("top", k)``: the same for every batch
            (as in :meth:`explain`); an array whose rows
            ``target[i:i + B]`` are the targets of the samples ``i .. i + B - 1`` of the stream
            (e.g. the labels as an (N,) array), passed to :meth:`explain` batch by batch.
        return_layers : bool
            As in :meth:`explain`.
        progress : bool
            A progress bar in images/s (needs ``tqdm``; silently off without it).
        total : int, optional
            The number of samples in the stream, for the progress bar (else it counts up).
        seed : :class:`deeptaylor.seeds.Seed`, callable, or an array indexable by stream position, optional
            As in :meth:`explain` (not with ``target``): a ``Seed`` or a callable applies to every batch;
            an array's rows ``seed[i:i + B]`` (shape (N, *out) or (N, K, *out)) are the seeds of the
            samples ``i .. i + B - 1`` of the stream (e.g. an ``np.load(..., mmap_mode="r")`` array).

        Yields
        ------
        (index, Explanation)
            ``index``: the stream position of the batch's first sample (0, B, 2B, ...); the
            Explanation of samples ``index .. index + len(batch) - 1``, as :meth:`explain` gives it.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        per_sample = target is not None and not (isinstance(target, (int, np.integer))
                                                 and not isinstance(target, (bool, np.bool_))) and not (
            isinstance(target, (str, tuple)))   # "all", ("top", k): the same for every batch
        tgt = np.asarray(target) if per_sample else target
        if seed is not None and target is not None:
            raise InputError("pass either target or seed, not both (a seed replaces the one-hot target)")
        from .seeds import Seed

        seed_rows = seed is not None and not isinstance(seed, Seed) and not callable(seed)
        if seed_rows and (not hasattr(seed, "shape") or not hasattr(seed, "__getitem__")):
            seed = np.asarray(seed)
        pending: list[np.ndarray] = []
        held = 0
        index = 0
        sample_shape: tuple[int, ...] | None = None
        bar = progress_bar(total, progress)

        def batch_of(rows: int) -> np.ndarray:
            nonlocal pending, held
            parts, got = [], 0
            while got < rows:
                a = pending[0]
                take = min(rows - got, len(a))
                parts.append(a[:take])
                got += take
                if take == len(a):
                    pending.pop(0)
                else:
                    pending[0] = a[take:]
            held -= rows
            return parts[0] if len(parts) == 1 else np.concatenate(parts)

        def rows(a: Any, what: str, xb: np.ndarray) -> Any:
            r = a[index:index + len(xb)]
            if len(r) != len(xb):
                raise ShapeError(f"{what} has {len(a)} entries, but the stream has more samples "
                                 f"(batch {index}..{index + len(xb) - 1})")
            return r

        def run(xb: np.ndarray) -> Explanation:
            t = rows(tgt, "target", xb) if per_sample else tgt
            sd = np.asarray(rows(seed, "seed", xb)) if seed_rows else seed
            return self.explain(xb, target=t, return_layers=return_layers, seed=sd)

        try:
            for item in batches:
                torch = sys.modules.get("torch")
                if torch is not None and isinstance(item, torch.Tensor):
                    from .io.torch import as_array

                    item = as_array(item)
                a = item if isinstance(item, np.ndarray) else np.asarray(item)
                if a.ndim in (1, 3):
                    a = a[None]
                elif a.ndim not in (2, 4):
                    raise ShapeError(f"explain_batches: an item must be a sample (F,) / (C, H, W) or a batch "
                                     f"(B, F) / (B, C, H, W), got shape {a.shape} (item at stream position "
                                     f"{index + held})")
                if sample_shape is None:
                    sample_shape = a.shape[1:]
                elif a.shape[1:] != sample_shape:
                    raise ShapeError(f"explain_batches: item at stream position {index + held} has samples of "
                                     f"shape {a.shape[1:]}, earlier ones {sample_shape}")
                if len(a) == 0:
                    continue
                pending.append(a)
                held += len(a)
                while held >= batch_size:
                    xb = batch_of(batch_size)
                    res = run(xb)
                    yield index, res
                    index += len(xb)
                    bar.update(len(xb))
            if held:
                xb = batch_of(held)
                res = run(xb)
                yield index, res
                bar.update(len(xb))
        finally:
            bar.close()

    def _passes(self) -> Passes:
        return Passes(self.graph, self.backend, self._engine_assignment)

    def forward(self, x: Any, batch_size: int | None = None, incremental: bool = False) -> np.ndarray:
        """The network's output for a batch, without a relevance pass.

        Parameters
        ----------
        x : float32/float64 array (N, F) or (N, C, H, W), or a CPU torch tensor
            Validated as in :meth:`explain`.
        batch_size : int, optional
            Chunks of this many samples (bounds the numpy backend's memory; the compiled engine tiles
            any batch in bounded memory).
        incremental : bool
            For batches whose consecutive samples differ in a few positions (the steps of a
            perturbation curve, :mod:`deeptaylor.evaluate`): the compiled engine copies a convolution's
            (or Dense layer's) output pixel from the previous sample in the same tile when its receptive
            field holds bitwise the same input, instead of computing it. The outputs are bitwise the
            same as without; only the time changes (docs/engine.md "Row reuse"). The numpy backend
            ignores it.

        Returns
        -------
        ndarray (N, K)
            The outputs (logits), float32 for the cpu backend, float64 for numpy.
        """
        x, shapes = validate_input(self.graph, x)
        n = shapes[-1][0]
        self._check_range(x)
        if batch_size is None:
            batch_size = n
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        kw = {"incremental": True} if incremental else {}
        outs = [self.backend.forward(self.graph, self._engine_assignment, x[s:s + batch_size], **kw)
                for s in range(0, n, batch_size)]
        output = outs[0] if len(outs) == 1 else np.concatenate(outs)
        self._check_finite(output, "forward", "the network output")
        return output

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        """Pickle support: an Explainer travels (to a Dask worker, a process pool) as the bytes of
        deeptaylor's own format -- its network as a native model file, its composite or method, its
        backend's name and threads (:func:`deeptaylor.io.payload.dumps_explainer`) -- never as a pickle
        of its internals; unpickling rebuilds it (:func:`deeptaylor.io.payload.loads_explainer`,
        which refuses a tampered payload with :class:`~deeptaylor.errors.ModelFormatError` and keeps
        the last few Explainers it built per process, so their plans are built once)."""
        from .io.payload import dumps_explainer, loads_explainer

        return (loads_explainer, (dumps_explainer(self),))

    def __repr__(self) -> str:
        what = "layers" if isinstance(self.graph, Sequential) else "nodes"
        return f"Explainer({len(self.graph)} {what}, {self.composite!r}, backend={self.backend.name!r})"
