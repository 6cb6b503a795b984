"""Model input/output: the native ``.npz`` format, and importers (PyTorch, ONNX) where installed.

:func:`save` writes the native format; :func:`load` reads a model file, dispatching on content
(zip archive -> native ``.npz``; ONNX protobuf -> the ONNX importer) and then on the extension.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import ModelFormatError
from .npz import load_npz, save_npz

__all__ = ["save", "load", "save_npz", "load_npz"]


def save(net: Any, path: str | os.PathLike[str]) -> None:
    """Save ``net`` (a :class:`~deeptaylor.Sequential`) in the native ``.npz`` format."""
    save_npz(net, path)


def load(path: str | os.PathLike[str], **kwargs: Any) -> Any:
    """Load a network from ``path``: a deeptaylor ``.npz`` or (with the ``onnx`` extra) an ``.onnx`` file.

    Raises :class:`~deeptaylor.errors.ModelFormatError` for missing, unreadable, corrupt or unknown files.
    """
    p = os.fspath(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ModelFormatError(f"cannot read model file {p!r}: {exc.strerror}") from None
    ext = os.path.splitext(p)[1].lower()
    if head.startswith(b"PK"):
        return load_npz(p)
    if ext == ".onnx":
        try:
            from .onnx import load_onnx
        except ImportError as exc:
            raise ModelFormatError(f"{p!r} looks like an ONNX model, but ONNX support is not available "
                                   f"({exc}); install the 'onnx' extra") from None
        return load_onnx(p, **kwargs)
    if ext == ".npz":
        raise ModelFormatError(f"{p!r} is not a valid .npz archive (corrupt or truncated)")
    raise ModelFormatError(f"unknown model format for {p!r}: expected a deeptaylor .npz or an .onnx file")
