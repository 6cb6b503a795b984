"""The network container."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .errors import InputTypeError, ShapeError
from .layers import Layer

__all__ = ["Sequential"]


class Sequential:
    """An immutable chain of layers.

    Parameters
    ----------
    layers : iterable of :class:`~deeptaylor.layers.Layer`

    Examples
    --------
    >>> import numpy as np, deeptaylor as dt
    >>> net = dt.Sequential([dt.Dense(np.ones((3, 4))), dt.ReLU(), dt.GlobalSumPool()])
    >>> net.output_shape((10, 4))
    (10, 1)
    """

    __slots__ = ("_layers",)

    def __init__(self, layers: Iterable[Layer]) -> None:
        items = tuple(layers)
        if not items:
            raise ShapeError("Sequential needs at least one layer")
        for i, layer in enumerate(items):
            if not isinstance(layer, Layer):
                raise InputTypeError(f"Sequential: item {i} is {type(layer).__name__}, not a deeptaylor layer")
        object.__setattr__(self, "_layers", items)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Sequential is immutable")

    @property
    def layers(self) -> tuple[Layer, ...]:
        """The layers, in forward order."""
        return self._layers

    def __len__(self) -> int:
        return len(self._layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self._layers)

    def __getitem__(self, index: int) -> Layer:
        return self._layers[index]

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self._layers)
        return f"Sequential([\n  {inner}\n])"

    def shapes(self, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """All intermediate shapes: ``[input_shape, out_0, out_1, ..., out_last]``.

        Raises :class:`~deeptaylor.errors.ShapeError` naming the failing layer's index, type and shapes.
        """
        shape = tuple(int(s) for s in input_shape)
        if len(shape) not in (2, 4):
            raise ShapeError(f"network input must be (N, features) or (N, C, H, W), got shape {shape}")
        out = [shape]
        for i, layer in enumerate(self._layers):
            try:
                shape = layer.output_shape(shape)
            except ShapeError as exc:
                raise ShapeError(f"layer {i} ({layer.kind}) cannot take input of shape {shape}: {exc}") from None
            out.append(shape)
        return out

    def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the network's output for ``input_shape`` (batch dimension included)."""
        return self.shapes(input_shape)[-1]

    def linear_layers(self) -> list[int]:
        """Indices of the layers that take a relevance rule (Dense, Conv2d)."""
        return [i for i, layer in enumerate(self._layers) if layer.linear]

    def forward(self, x: Any) -> np.ndarray:
        """Network output in float64 (NumPy reference), ``x`` of shape ``(N, ...)``.

        Raises :class:`~deeptaylor.errors.ShapeError` (naming the layer) if a layer cannot take the
        shape of its input."""
        from .reference import forward as _forward

        x = np.asarray(x, dtype=np.float64)
        self.shapes(x.shape)
        return _forward(self, x)
