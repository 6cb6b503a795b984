"""Explain a :mod:`dask.array` on a Dask cluster (or Dask's local schedulers): one extra line.

::

    import dask.array as da, deeptaylor as dt
    from distributed import Client, LocalCluster

    ex = dt.Explainer(net, "deep-taylor", backend="cpu")
    with LocalCluster(n_workers=2, threads_per_worker=1) as cluster, Client(cluster):
        x = da.from_npy_stack("images/")                    # (N, C, H, W), chunked along N
        res = dt.dask.explain(ex, x)                        # lazy: nothing runs yet
        res.relevance.to_zarr("heatmaps.zarr")              # or da.to_npy_stack, .compute(), ...

Needs the ``dask`` extra (``pip install "deeptaylor[dask]"``: ``dask[array]`` and ``distributed``);
importing this module does not import Dask, calling :func:`explain` does.

How it runs: every chunk of x along the batch axis is one task, which calls
:meth:`Explainer.explain <deeptaylor.Explainer.explain>` on that block. The Explainer is one key of
the task graph: it travels to each worker once, as the bytes of deeptaylor's own format
(:mod:`deeptaylor.io.payload`, never a pickle of its internals), and each worker process rebuilds it
once (cached by the payload's SHA-256), so its compiled plan is built once per worker, not once per
chunk. Nothing deeptaylor-specific runs on the cluster beyond that: the same call works on a
``LocalCluster``, dask-jobqueue (SLURM, PBS, ...) or Kubernetes clusters (docs/scaling.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .errors import InputError, InputTypeError, ShapeError, UnsupportedError

__all__ = ["DaskExplanation", "explain"]

_INSTALL = 'pip install "deeptaylor[dask]"'


def _dask() -> tuple[Any, Any]:
    try:
        import dask
        import dask.array as da
    except ImportError as exc:
        raise UnsupportedError(f"deeptaylor.dask needs Dask, which is not installed ({exc}): {_INSTALL} "
                               "(dask[array] and distributed)") from None
    return dask, da


class DaskExplanation(NamedTuple):
    """What :func:`explain` returns: lazy dask arrays (nothing is computed until you ask).

    Attributes
    ----------
    relevance : dask.array (N, *sample) (or (N, K, *sample) for K targets per sample)
        The heatmaps, chunked as x along the batch axis (one chunk per sample shape elsewhere);
        float32 for the cpu backend, float64 for numpy; units of the explained output.
    output : dask.array (N, K_out)
        The network's outputs (logits), same chunks along the batch axis.
    """

    relevance: Any
    output: Any


class _Shipped:
    """The Explainer as it sits in the task graph: its payload bytes. Pickled as those bytes (a
    worker receives it once per key); :meth:`explainer` rebuilds the Explainer once per object (and
    :func:`~deeptaylor.io.payload.loads_explainer` once per process and payload)."""

    __slots__ = ("_ex", "key", "payload")

    def __init__(self, payload: bytes) -> None:
        from .io.payload import payload_key

        self.payload: bytes | None = payload
        self.key = payload_key(payload)
        self._ex: Any = None

    def __dask_tokenize__(self) -> tuple[str, str]:
        return ("deeptaylor-explainer", self.key)

    def __reduce__(self) -> tuple[Any, tuple[bytes]]:
        if self.payload is None:   # dropped once rebuilt: the same bytes again (payloads are deterministic)
            from .io.payload import dumps_explainer

            return (_Shipped, (dumps_explainer(self._ex),))
        return (_Shipped, (self.payload,))

    def explainer(self) -> Any:
        if self._ex is None:
            from .io.payload import loads_explainer

            self._ex = loads_explainer(self.payload)
            self.payload = None   # the worker keeps the Explainer, not also its bytes (VGG-16: 528 MiB)
        return self._ex


def _explain_block(shipped: _Shipped, xb: np.ndarray, tb: Any, batch_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One task: the Explainer's relevance and output for block ``xb``."""
    res = shipped.explainer().explain(xb, target=tb, batch_size=batch_size)
    return res.relevance, res.output


def _getitem(pair: tuple[np.ndarray, np.ndarray], i: int) -> np.ndarray:
    return pair[i]


def explain(ex: Any, x: Any, target: Any = None, *, threads: Any = "keep", batch_size: int | None = None,
            name: str | None = None) -> DaskExplanation:
    """Explain a dask array, lazily: one task per chunk along the batch axis.

    Parameters
    ----------
    ex : Explainer
        Any Explainer on the built-in ``"cpu"`` or ``"numpy"`` backend, with a built-in composite or
        method (what :mod:`deeptaylor.io.payload` can write).
    x : dask.array (N, F) or (N, C, H, W), float32 or float64
        Chunked along the batch axis N; chunks along the other axes are merged (x is rechunked to
        whole samples per chunk: one task explains ``x.chunks[0][i]`` whole samples). Choose the
        batch chunks for the task size you want (e.g. 1,000-10,000 MNIST-size images, 16-64 images of
        224²): each task holds its block, its relevance and the backend's working memory. Values are
        validated when a block is computed (NaN, range, a ZBox's box): errors surface at compute time
        as deeptaylor's exceptions.
    target : None, int, an (N,) or (N, K) integer array (NumPy or dask), ``"all"`` or ``("top", k)``
        As :meth:`Explainer.explain`'s ``target``; an array is rechunked to x's batch chunks. With K
        targets per sample (an (N, K) array, ``"all"``, ``("top", k)``) the relevance is
        (N, K, *sample).
    threads : "keep", None or int
        OpenMP threads each task's explain uses (cpu backend). ``"keep"`` (default): the Explainer's
        own setting; None: OpenMP's default -- which is 1 on a ``distributed`` worker, whose nanny
        sets ``OMP_NUM_THREADS=1``. With ``LocalCluster(n_workers=W, threads_per_worker=1)`` and
        ``threads=T`` each worker process runs one chunk at a time on T cores.
    batch_size : int, optional
        Passed to :meth:`Explainer.explain` within each block (bounds the numpy backend's memory).
    name : str, optional
        Prefix of the task keys (default ``"deeptaylor-explain"``).

    Returns
    -------
    DaskExplanation
        ``relevance`` (x's shape, x's batch chunks) and ``output`` (N, K), both lazy dask arrays.

    Raises
    ------
    UnsupportedError
        Dask is not installed (:data:`pip install "deeptaylor[dask]"`), or the Explainer cannot be
        written as a payload (a custom backend, rule or method).
    InputTypeError, ShapeError, InputError
        x is not a float dask array of rank 2 or 4 whose sample shape the network accepts; target or
        threads are invalid.
    """
    dask, da = _dask()
    from dask.base import tokenize

    from .explain import Explainer, _relevance_shape, validate_targets
    from .io.payload import dumps_explainer, payload_key, remember

    if not isinstance(ex, Explainer):
        raise InputTypeError(f"ex must be a deeptaylor.Explainer, got {type(ex).__module__}.{type(ex).__qualname__}")
    if not isinstance(x, da.Array):
        raise InputTypeError(f"x must be a dask array, got {type(x).__module__}.{type(x).__qualname__} (wrap a "
                             "NumPy array or memory map with dask.array.from_array(x, chunks=(B, ...)))")
    if x.ndim not in (2, 4):
        raise ShapeError(f"x must be (N, features) or (N, C, H, W), got rank {x.ndim} shape {x.shape}")
    if np.dtype(x.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise InputTypeError(f"x has dtype {x.dtype}: use float32 or float64 (convert images lazily, e.g. "
                             "x.astype(np.float32) / 255)")
    if any(np.isnan(s) for s in x.shape):
        raise ShapeError(f"x has unknown chunk sizes {x.shape}: call x.compute_chunk_sizes() first")
    if x.shape[0] == 0:
        raise InputError(f"empty batch: x has shape {x.shape}")
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    n = int(x.shape[0])
    shapes = ex.graph.shapes((1, *x.shape[1:]))   # ShapeError naming the node if the sample shape does not fit
    if len(shapes[-1]) != 2:
        raise ShapeError(f"the network's output must be (N, K) to be explained, got {shapes[-1]}")
    k = int(shapes[-1][1])
    x = x.rechunk({i: -1 for i in range(1, x.ndim)})
    chunks = x.chunks[0]
    # targets: None / int / "all" / ("top", k) for every block, or blocks aligned with x's
    if isinstance(target, str) and target == "all" or (
            isinstance(target, tuple) and len(target) == 2 and target[0] == "top"):
        many = k if isinstance(target, str) else target[1]
        if isinstance(many, bool) or not isinstance(many, (int, np.integer)) or not 1 <= many <= k:
            raise InputError(f"target ('top', k) needs 1 <= k <= {k}, got {target!r}")
        t_blocks = [target] * len(chunks)
        t_probe = np.zeros((1, int(many)), dtype=np.int64)
    elif target is None or (isinstance(target, (int, np.integer)) and not isinstance(target, (bool, np.bool_))):
        if target is not None:
            validate_targets(int(target), 1, k)
        t_blocks: list[Any] = [None if target is None else int(target)] * len(chunks)
        t_probe = None
    else:
        t = target if isinstance(target, da.Array) else da.from_array(np.asarray(target), chunks=-1)
        if t.dtype.kind not in "iu":
            raise InputTypeError(f"target must be an int or an integer array, got dtype {t.dtype}")
        if t.ndim not in (1, 2) or t.shape[0] != n:
            raise ShapeError(f"target must be an int or have shape ({n},) or ({n}, K), got shape {t.shape}")
        t = t.rechunk((chunks,) + tuple((s,) for s in t.shape[1:]))
        t_blocks = list(t.to_delayed().ravel())
        t_probe = np.zeros((1, *t.shape[1:]), dtype=np.int64)
    payload = dumps_explainer(ex, threads=threads)
    key = payload_key(payload)
    if (isinstance(threads, str) and threads == "keep") or threads == getattr(ex.backend, "threads", None):
        remember(ex, key)   # in this process (threaded scheduler, processes=False workers): ex itself
    shipped = dask.delayed(_Shipped(payload), name=f"deeptaylor-explainer-{key[:32]}", pure=True)
    prefix = name or "deeptaylor-explain"
    dtype = np.dtype(getattr(ex.backend, "dtype", np.float32))
    sample_rel = _relevance_shape((1, *x.shape[1:]), t_probe)[1:]
    x_blocks = x.to_delayed().reshape(len(chunks))
    rel_parts, out_parts = [], []
    for i, (xb, tb, nb) in enumerate(zip(x_blocks, t_blocks, chunks, strict=True)):
        pair = dask.delayed(_explain_block, pure=True, name=f"{prefix}-{tokenize(key, xb, tb, batch_size)}")(
            shipped, xb, tb, batch_size)
        rel = dask.delayed(_getitem, pure=True)(pair, 0)
        out = dask.delayed(_getitem, pure=True)(pair, 1)
        rel_parts.append(da.from_delayed(rel, shape=(nb, *sample_rel), dtype=dtype))
        out_parts.append(da.from_delayed(out, shape=(nb, k), dtype=dtype))
    relevance = da.concatenate(rel_parts, axis=0) if len(rel_parts) > 1 else rel_parts[0]
    output = da.concatenate(out_parts, axis=0) if len(out_parts) > 1 else out_parts[0]
    return DaskExplanation(relevance, output)
