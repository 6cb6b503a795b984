"""The compiled C++ backend (float32): fused forward + relevance passes over batch tiles.

The network and its rules are described once per input sample-shape as a list of plain op specs and
compiled by the C++ core into a ``Plan`` (rule matrices derived, weights packed for the GEMM, tile
and arena sizes fixed). ``run`` hands the whole batch to the plan with the GIL released: the loop
over layers and tiles is in C++. See docs/engine.md.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

from ..errors import InputError, UnsupportedError
from ..layers import (
    ELU,
    GELU,
    Activation,
    AdaptiveAvgPool2d,
    Add,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    ChannelShuffle,
    Concat,
    Conv2d,
    ConvTranspose2d,
    Dense,
    Flatten,
    GlobalAvgPool,
    GlobalSumPool,
    Hardsigmoid,
    Hardswish,
    LeakyReLU,
    LpPool,
    MaxPool2d,
    Mul,
    ReLU,
    ReLU6,
    Sigmoid,
    SiLU,
    Slice,
    SumPool2d,
    Tanh,
    Upsample,
)
from ..methods import Gradient, GradientXInput, Method, Sensitivity
from ..network import Graph
from ..rules import AlphaBeta, Epsilon, Flat, Gamma, Rule, WSquare, Z, ZBox, ZPlus
from ._support import refuse_unsupported

_LAYERS = (Dense, Conv2d, ConvTranspose2d, ReLU, MaxPool2d, AvgPool2d, SumPool2d, GlobalSumPool, LpPool, Flatten,
           BatchNorm2d, BatchNorm1d, LeakyReLU, ReLU6, ELU, GELU, SiLU, Hardswish, Hardsigmoid, Tanh, Sigmoid,
           AdaptiveAvgPool2d, GlobalAvgPool, Upsample, ChannelShuffle, Add, Concat, Slice, Mul)
_RULES = (Z, Epsilon, ZPlus, Gamma, AlphaBeta, WSquare, Flat, ZBox)
_METHODS = (Sensitivity, GradientXInput, Gradient)


def _core() -> Any:
    try:
        from .. import _core
    except ImportError as exc:  # pragma: no cover - only without a build
        raise UnsupportedError("the compiled core (deeptaylor._core) is not built; reinstall with "
                               "`pip install .` or use backend='numpy'") from exc
    return _core


def _rule_spec(rule: Rule, in_shape: tuple[int, ...]) -> dict[str, Any]:
    spec: dict[str, Any] = {"rule": rule.name}
    if isinstance(rule, Epsilon):
        spec["eps"] = rule.eps
    elif isinstance(rule, ZPlus):
        spec["use_bias"] = rule.use_bias
    elif isinstance(rule, Gamma):
        spec["gamma"] = rule.gamma
    elif isinstance(rule, AlphaBeta):
        spec["alpha"], spec["beta"] = rule.alpha, rule.beta
    elif isinstance(rule, ZBox):
        lo, hi = rule.bounds_for(in_shape)
        # float64 as given: the core converts them, refusing values beyond float32's range by name
        spec["low"], spec["high"] = np.ascontiguousarray(lo, np.float64), np.ascontiguousarray(hi, np.float64)
    return spec


def op_specs(net: Graph, assignment: list[Rule | None] | Method,
             sample_shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """Describe every node of a canonical graph as a plain dict for the C++ ``Plan`` (contract: one
    dict per node, in node order): ``kind``, ``name``, ``inputs`` (value ids: 0 the network input,
    ``i + 1`` the output of node ``i``), per-sample ``in_shapes`` / ``in_shape`` (= ``in_shapes[0]``)
    / ``out_shape``, int window parameters (pools: the resolved padding of ``ceil_mode``), float
    ``weight``/``bias`` and the rule's kind and parameters (ZBox bounds broadcast to the layer's input
    shape), and the node kind's own keys (docs/engine.md)."""
    shapes = [tuple(s[1:]) for s in net.shapes((1,) + tuple(sample_shape))]
    rules = [None] * len(net) if isinstance(assignment, Method) else assignment
    ops = []
    for i, (node, rule) in enumerate(zip(net.nodes, rules, strict=True)):
        layer = node.layer
        ins = [shapes[v] for v in node.inputs]
        kind = layer.kind
        spec: dict[str, Any] = {"kind": kind, "name": node.name, "inputs": list(node.inputs), "in_shapes": ins,
                                "in_shape": ins[0], "out_shape": shapes[i + 1]}
        if isinstance(layer, (Dense, Conv2d, ConvTranspose2d)):
            # the layer's own arrays: the core converts them to float32 one layer at a time (no
            # float32 copy of the whole network alongside the plan while it is built)
            spec["weight"], spec["bias"] = layer.weight, layer.bias
            if isinstance(layer, Conv2d):
                spec.update(kernel=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                            dilation=layer.dilation)
                if layer.groups != 1:
                    spec["groups"] = layer.groups
            elif isinstance(layer, ConvTranspose2d):
                spec.update(kernel=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                            dilation=layer.dilation, output_padding=layer.output_padding, groups=layer.groups)
            if rule is not None:
                spec.update(_rule_spec(rule, ins[0]))
        elif isinstance(layer, (MaxPool2d, AvgPool2d, SumPool2d)):
            h, w = ins[0][1], ins[0][2]
            spec.update(kernel=layer.kernel_size, stride=layer.stride, padding=layer.resolved_padding(h, w))
            if isinstance(layer, AvgPool2d) and (layer.ceil_mode or not layer.count_include_pad):
                spec["inv_count"] = np.ascontiguousarray(layer.inv_count(h, w), dtype=np.float64).ravel()
        elif isinstance(layer, LpPool):
            spec["p"] = layer.p
            spec["global"] = layer.kernel_size is None
            if layer.kernel_size is not None:
                spec.update(kernel=layer.kernel_size, stride=layer.stride, padding=layer.padding)
        elif isinstance(layer, (BatchNorm2d, BatchNorm1d)):
            spec.update(kind="BatchNorm", scale=np.asarray(layer.scale, dtype=np.float64),
                        shift=np.asarray(layer.shift, dtype=np.float64))
            if rule is not None:
                spec.update(_rule_spec(rule, ins[0]))
        elif isinstance(layer, Activation):
            spec.update(kind="Activation", fn=layer.fn, param=float(layer.param))
        elif isinstance(layer, AdaptiveAvgPool2d):
            rows, cols = layer.windows(ins[0][1], ins[0][2])
            spec.update(rows=[list(r) for r in rows], cols=[list(c) for c in cols])
        elif isinstance(layer, Upsample):
            spec["scale"] = list(layer.scale_factor)
        elif isinstance(layer, ChannelShuffle):
            spec["groups"] = layer.groups
        elif isinstance(layer, Slice):
            spec.update(start=layer.start, stop=layer.stop)
        ops.append(spec)
    return ops


#: compiled plans a CpuBackend keeps (least recently used ones are dropped beyond it)
PLAN_CACHE_SIZE = 8


def max_threads() -> int:
    """The most OpenMP threads a CpuBackend accepts: ``min(256, max(8, 4 * os.cpu_count()))``. More
    threads than cores only costs memory (one arena per thread, up to hundreds of MiB each for a large
    network) and an oversubscribed OpenMP runtime can end the process without a Python exception."""
    return min(256, max(8, 4 * (os.cpu_count() or 1)))


def check_threads(threads: Any) -> int | None:
    """Validate a ``threads`` argument: None (OpenMP's default) or an int in [1, :func:`max_threads`].
    Raises :class:`~deeptaylor.errors.InputError` otherwise."""
    if threads is None:
        return None
    if not isinstance(threads, (int, np.integer)) or isinstance(threads, (bool, np.bool_)) or threads < 1:
        raise InputError(f"threads must be a positive int, got {threads!r}")
    if threads > max_threads():
        raise InputError(f"threads={int(threads)} is beyond the limit of {max_threads()} for this machine "
                         f"({os.cpu_count()} cores; the limit is min(256, max(8, 4 x cores)), docs/engine.md)")
    return int(threads)


def _mode(assignment: list[Rule | None] | Method) -> str:
    if isinstance(assignment, Sensitivity):
        return "sensitivity"
    if isinstance(assignment, GradientXInput):
        return "gradient_x_input"
    if isinstance(assignment, Gradient):
        return "gradient"
    return "rules"


class CpuBackend:
    """The C++/OpenMP engine, float32. Supports every layer, rule and method of the NumPy reference.

    Parameters
    ----------
    threads : int, optional
        OpenMP threads (default: OpenMP's default, ``OMP_NUM_THREADS`` or the core count).

    Compiled plans are cached per (network, assignment, input sample-shape), at most
    :data:`PLAN_CACHE_SIZE` (8) of them, least recently used dropped first (``plans`` counts them,
    :meth:`clear` drops them all). A backend may be shared by several Explainers and threads: the cache
    is locked and keyed by the network's and the assignment's identity (the cache holds references to
    both, so an identity is not reused while its plans live), and a plan runs concurrent calls on
    separate working memory.
    """

    name = "cpu"
    #: the precision it computes in (float64 inputs are converted)
    dtype = np.dtype(np.float32)
    #: ``run`` takes (N, K) targets, ``top`` and ``seed`` (many targets and seeds, docs/engine.md)
    many_targets = True

    def __init__(self, threads: int | None = None) -> None:
        self.threads = check_threads(threads)
        self._core = _core()
        # key -> (net, assignment, plan): net and assignment are held so that their ids stay unique
        self._plans: OrderedDict[tuple[Any, ...], tuple[Any, Any, Any]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def plans(self) -> int:
        """Number of compiled plans held (one per network, assignment and input sample-shape seen,
        at most :data:`PLAN_CACHE_SIZE`)."""
        with self._lock:
            return len(self._plans)

    def clear(self) -> None:
        """Drop every cached plan (their packed weights and working memory are freed once no running
        call uses them)."""
        with self._lock:
            self._plans.clear()

    def check(self, net: Graph, assignment: list[Rule | None] | Method) -> None:
        """Raise :class:`UnsupportedError` naming the node (index, name, type) and rule for a layer,
        rule or method this backend cannot run. Types are matched exactly: the plan dispatches on the
        type's name, so a subclass (of ZPlus, of ReLU...) is refused here rather than in the compiled
        plan. A BatchNorm node takes no rule, Epsilon or Z; Concat and Slice only the channel axis."""
        refuse_unsupported(self.name, net, assignment, _LAYERS, _RULES, _METHODS)
        rules = [None] * len(net) if isinstance(assignment, Method) else assignment
        for i, (layer, rule) in enumerate(zip(net, rules, strict=True)):
            if isinstance(layer, (BatchNorm2d, BatchNorm1d)) and rule is not None and type(rule) not in (Epsilon, Z):
                raise UnsupportedError(f"backend '{self.name}' does not support rule {rule!r} on {net._where(i)}: "
                                       "a BatchNorm node takes no rule, Epsilon or Z")
            if isinstance(layer, (Concat, Slice)) and getattr(layer, "axis", 1) != 1:
                raise UnsupportedError(f"backend '{self.name}' does not support {net._where(i)}: "
                                       "only the channel axis (1)")
            if isinstance(layer, Upsample) and getattr(layer, "mode", "nearest") != "nearest":
                raise UnsupportedError(f"backend '{self.name}' does not support {net._where(i)}: "
                                       "only nearest upsampling")

    def plan(self, net: Graph, assignment: list[Rule | None] | Method, sample_shape: tuple[int, ...]) -> Any:
        """The compiled plan of ``net`` under ``assignment`` for ``sample_shape`` (the input shape
        without the batch), cached (LRU, :data:`PLAN_CACHE_SIZE` plans). Thread-safe: two threads may
        build the same plan at once (the GIL is released while building); the first one stored wins.

        Raises :class:`~deeptaylor.errors.InputError` for a plan beyond the engine's limits (weights
        beyond float32's range, working memory beyond ``DEEPTAYLOR_MAX_PLAN_BYTES``) and MemoryError
        when building it runs out of memory; both name the node."""
        shape = tuple(int(s) for s in sample_shape)
        key = (id(net), id(assignment), shape)
        with self._lock:
            hit = self._plans.get(key)
            if hit is not None and hit[0] is net and hit[1] is assignment:
                self._plans.move_to_end(key)
                return hit[2]
        plan = self._core.Plan(op_specs(net, assignment, shape), shape, _mode(assignment))
        with self._lock:
            hit = self._plans.get(key)
            if hit is not None and hit[0] is net and hit[1] is assignment:
                self._plans.move_to_end(key)
                return hit[2]
            self._plans[key] = (net, assignment, plan)
            while len(self._plans) > PLAN_CACHE_SIZE:
                self._plans.popitem(last=False)
        return plan

    def run(self, net: Graph, assignment: list[Rule | None] | Method, x: np.ndarray,
            targets: np.ndarray | None, return_layers: bool, *, top: int | None = None,
            seed: np.ndarray | None = None,
            seed_times_output: bool = False) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
        """Forward + relevance for x (N, ...) float32/float64 (copied to C-contiguous float32 if it is
        not already). Returns ``(output (N, *out), relevance (shape of x), layers | None)``, float32;
        ``layers`` holds L + 1 arrays indexed by value id (the input, then every node's output).

        Many targets and seeds: ``targets`` (N, K), ``top`` K (the K largest outputs, largest first,
        ties to the lower index) or ``seed`` (N, *out) / (N, K, *out) (times the output with
        ``seed_times_output``): K relevance passes from one forward pass per tile, in rounds of
        ``plan.passes(K)`` (docs/engine.md "Many targets and seeds"); with a K axis the relevance is
        (N, K, *x.shape[1:]) and every layer (N, K, ...)."""
        plan = self.plan(net, assignment, x.shape[1:])
        xc = np.ascontiguousarray(x, dtype=np.float32)
        t = None if targets is None else np.ascontiguousarray(targets, dtype=np.int64)
        sd = None if seed is None else np.ascontiguousarray(seed, dtype=np.float32)
        output, relevance, layers = plan.run(xc, t, bool(return_layers), int(self.threads or 0), False, sd,
                                             bool(seed_times_output), int(top or 0))
        return output, relevance, layers

    def forward(self, net: Graph, assignment: list[Rule | None] | Method, x: np.ndarray,
                incremental: bool = False) -> np.ndarray:
        """The network's output ``(N, *out)`` float32 for x (N, ...): the forward pass of the plan of
        ``(net, assignment)`` only (tiles, bounded memory; no relevance pass). ``assignment`` only picks
        the cached plan: the forward pass is the same under every rule and method. ``incremental``:
        convolution / Dense output rows whose receptive field holds bitwise the previous sample's input
        are copied from it (bitwise the same outputs; fast when consecutive samples differ in a few
        positions, as the steps of a perturbation curve)."""
        plan = self.plan(net, assignment, x.shape[1:])
        xc = np.ascontiguousarray(x, dtype=np.float32)
        output, _, _ = plan.run(xc, None, False, int(self.threads or 0), True, None, False, 0, bool(incremental))
        return output

