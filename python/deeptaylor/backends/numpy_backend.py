"""The NumPy reference backend (float64)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from .. import reference
from ..errors import InputError
from ..layers import BUILTIN_LAYERS
from ..methods import Gradient, GradientXInput, Method, Sensitivity
from ..network import Graph
from ..reference.relevance import RULE_FUNCTIONS
from ..rules import Rule
from ._support import refuse_unsupported

_LAYERS = BUILTIN_LAYERS
_METHODS = (Sensitivity, GradientXInput, Gradient)

#: per-sample working floats of the reference beyond the kept activations, in units of its largest
#: value (a layer's rule temporaries: z, s, the sign-split inputs and their transposes, padded copies)
WORK_FACTOR = 8


def available_memory() -> int | None:
    """Bytes this process can still allocate, as far as the OS tells: ``MemAvailable`` of
    /proc/meminfo (else ``os.sysconf`` available pages), capped by a cgroup v2 ``memory.max`` (minus
    ``memory.current``). None when unknown (then nothing is refused)."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, AttributeError):
            avail = None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            lim = f.read().strip()
        if lim != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                used = int(f.read().strip())
            room = int(lim) - used
            avail = room if avail is None else min(avail, room)
    except (OSError, ValueError):
        pass
    return avail


def estimate_bytes(net: Graph, sample_shape: tuple[int, ...], n: int, return_layers: bool, passes: int = 1) -> int:
    """Peak bytes :func:`deeptaylor.reference.run` needs for ``n`` samples of ``sample_shape`` (an
    estimate from the graph's shapes): every value's activation (float64, all kept for the relevance
    pass), the relevances of one backward pass, the per-layer relevances of all ``passes`` passes when
    returned (else their input relevances), and :data:`WORK_FACTOR` times the largest value for a
    layer's temporaries."""
    sizes = [int(np.prod(s[1:], dtype=np.float64)) for s in net.shapes((1,) + tuple(sample_shape))]
    if passes == 1:
        per_sample = sum(sizes) * (2 if return_layers else 1) + WORK_FACTOR * max(sizes)
    else:  # + each pass's kept relevances, twice (the per-pass lists and the stacked arrays)
        per_sample = 2 * sum(sizes) + 2 * passes * (sum(sizes) if return_layers else sizes[0]) + WORK_FACTOR * max(sizes)
    return int(8 * n * per_sample)


class NumpyBackend:
    """Runs :func:`deeptaylor.reference.run` in float64. Supports every built-in layer, rule and method
    (matched by exact type: subclasses and custom rules or layers are refused by :meth:`check`)."""

    name = "numpy"
    #: the precision it computes in
    dtype = np.dtype(np.float64)
    #: ``run`` takes (N, K) targets, ``top`` and ``seed`` (many targets and seeds, docs/engine.md)
    many_targets = True

    def check(self, net: Graph, assignment: list[Rule | None] | Method) -> None:
        """Raise :class:`~deeptaylor.errors.UnsupportedError` naming the layer index, type and rule for
        a layer, rule or method that is not one of the built-in types."""
        refuse_unsupported(self.name, net, assignment, _LAYERS, tuple(RULE_FUNCTIONS), _METHODS)

    def run(self, net: Graph, assignment: Any, x: np.ndarray, targets: np.ndarray | None,
            return_layers: bool, *, top: int | None = None, seed: np.ndarray | None = None,
            seed_times_output: bool = False) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
        """Forward + relevance in float64: ``(output (N, *out), relevance (shape of x), layers | None)``.

        Many targets and seeds (:func:`deeptaylor.reference.run`): ``targets`` (N, K), ``top`` K or a
        ``seed`` (N, *out) / (N, K, *out); the K backward passes share one forward pass, and with a K
        axis the relevance is (N, K, *x.shape[1:]) (the layers likewise).

        Refuses up front, with :class:`~deeptaylor.errors.InputError`, a batch whose estimated
        memory (:func:`estimate_bytes`) exceeds what the machine has available
        (:func:`available_memory`): the reference keeps every activation of the whole batch.
        """
        passes = (targets.shape[1] if targets is not None and targets.ndim == 2 else
                  top if top is not None else
                  seed.shape[1] if seed is not None and seed.ndim == len(net.shapes(x.shape)[-1]) + 1 else 1)
        need = estimate_bytes(net, x.shape[1:], x.shape[0], return_layers, passes)
        avail = available_memory()
        if avail is not None and need > avail:
            per = max(1, need // max(1, x.shape[0]))
            fit = max(1, int(avail // 2 // per))
            raise InputError(
                f"backend 'numpy' would need about {need / 2**30:.1f} GiB for {x.shape[0]} samples (float64, "
                f"every activation of the batch kept), more than the {avail / 2**30:.1f} GiB available: pass "
                f"batch_size={fit} (or smaller) to explain, or use backend='cpu' (float32, its memory does "
                "not grow with the batch beyond the outputs)")
        # overflow (inf) and inf - inf (NaN) are not warned about here: the Explainer checks the
        # output and the relevance once after the pass and raises a clear error instead
        with np.errstate(over="ignore", invalid="ignore"):
            p = reference.run(net, assignment, x.astype(np.float64, copy=False), targets, top=top,
                              seed=None if seed is None else np.asarray(seed, dtype=np.float64),
                              seed_times_output=seed_times_output, keep_layers=return_layers)
        return p.output, p.relevance, (p.layers if return_layers else None)

    def forward(self, net: Graph, assignment: Any, x: np.ndarray, incremental: bool = False) -> np.ndarray:
        """The network's output ``(N, K)`` float64 for x (N, ...), every activation freed after its last
        reader (:func:`deeptaylor.reference.forward`). ``assignment`` is ignored (the forward pass is the
        same under every rule); so is ``incremental`` (the compiled engine's row reuse, an optimisation
        that does not change the outputs)."""
        with np.errstate(over="ignore", invalid="ignore"):
            return reference.forward(net, x.astype(np.float64, copy=False))
