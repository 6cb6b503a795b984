"""Model input/output: the native ``.npz`` format, and importers (PyTorch, ONNX) where installed.

:func:`save` writes the native format; :func:`load` reads a model file, dispatching on content
(zip archive -> native ``.npz``; an ONNX protobuf -> the ONNX importer) and then on the extension.
:func:`from_torch` / :func:`to_torch` (extra ``torch``) convert to and from ``torch.nn.Sequential``;
they are imported lazily so that ``import deeptaylor`` never imports torch. See docs/importing.md.
"""

from __future__ import annotations

import os
import zipfile
from typing import Any

from ..errors import InputTypeError, ModelFormatError
from .npz import load_npz, save_npz

__all__ = ["from_torch", "load", "load_npz", "load_onnx", "save", "save_npz", "to_torch"]


def save(net: Any, path: str | os.PathLike[str], input_shape: Any = None) -> None:
    """Save ``net`` (a :class:`~deeptaylor.Graph` or :class:`~deeptaylor.Sequential`) in the native
    ``.npz`` format (version 2: nodes with names and inputs, every layer's parameters; see
    :func:`deeptaylor.io.npz.save_npz`). :func:`load` gives back a Sequential for a Sequential, a
    Graph with its declared input shape for a Graph.

    ``input_shape`` (per sample, e.g. ``(1, 28, 28)``), if given, is stored and checked on load; a
    Graph stores its declared input shape (``input_shape`` must then agree).
    """
    save_npz(net, path, input_shape=input_shape)


def _looks_like_onnx(head: bytes) -> bool:
    # A serialised onnx.ModelProto starts with field 1 (ir_version, varint: tag 0x08) when written by
    # onnx/torch; other field orders are legal protobuf, hence the extension fallback below.
    return len(head) >= 2 and head[0] == 0x08 and 1 <= head[1] <= 0x7F


_PICKLE_EXTS = (".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def _is_torch_pickle(p: str, head: bytes, ext: str) -> bool:
    """True for a ``torch.save`` file: a zip archive holding ``<name>/data.pkl`` (torch >= 1.6), a raw
    pickle (legacy format: protocol opcode 0x80 then 2..5), or a pickle/checkpoint extension on a file
    that is not a native model."""
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return True
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except (OSError, zipfile.BadZipFile, ValueError):
            return ext in _PICKLE_EXTS
        if "__deeptaylor__.npy" in names:
            return False
        return ext in _PICKLE_EXTS or any(n == "data.pkl" or n.endswith("/data.pkl") for n in names)
    return ext in _PICKLE_EXTS


def _is_path_bytes(data: bytes | bytearray | memoryview) -> bool:
    """True when ``data`` reads as a file name (short, no NUL, an existing file), not a file's bytes."""
    b = bytes(data[:4097])
    return len(b) <= 4096 and b"\0" not in b and not b.startswith((b"PK", b"\x80")) and os.path.isfile(b)


def _load_bytes(data: bytes, **kwargs: Any) -> Any:
    """:func:`load` for a model file's bytes: chosen by content only."""
    head = data[:4]
    if head.startswith(b"PK"):
        import io as _io

        try:
            with zipfile.ZipFile(_io.BytesIO(data)) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, ValueError, OSError) as exc:
            raise ModelFormatError(f"<bytes>: not a valid zip archive ({exc})") from None
        if "__deeptaylor__.npy" not in names and any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise ModelFormatError("<bytes>: a PyTorch torch.save archive (a pickle): deeptaylor never opens one; "
                                   "load it in PyTorch and convert with deeptaylor.from_torch, or export to ONNX")
        if kwargs:
            raise InputTypeError(f"load: a native deeptaylor model takes no keyword arguments (got {sorted(kwargs)})")
        return load_npz(data)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        raise ModelFormatError("<bytes>: a Python pickle (e.g. torch.save): deeptaylor never opens one; load it "
                               "in PyTorch and convert with deeptaylor.from_torch, or export to ONNX")
    if _looks_like_onnx(head):
        return load_onnx(data, **kwargs)
    raise ModelFormatError("<bytes>: unknown model format: expected the bytes of a deeptaylor .npz (zip archive) or "
                           "of an .onnx file")


def load(path: str | os.PathLike[str] | bytes, **kwargs: Any) -> Any:
    """Load a network from ``path``: a deeptaylor ``.npz`` or (with the ``onnx`` extra) an ONNX model.
    ``path`` may also be the file's contents (``bytes``; then chosen by content alone).

    The format is chosen by content (a zip archive is a native ``.npz``; a protobuf starting with
    ``ir_version`` is ONNX), whatever the extension, and only then by extension (``.npz``, ``.onnx``).
    The keyword argument ``input_shape`` goes to the ONNX importer (:func:`deeptaylor.io.onnx.load_onnx`);
    a native model stores its own.

    Returns
    -------
    Sequential

    Raises
    ------
    ModelFormatError
        For missing, unreadable, corrupt or unknown files (an ONNX graph deeptaylor cannot represent
        raises :class:`~deeptaylor.errors.UnsupportedError`), and for PyTorch ``.pt``/``.pth`` files
        (pickles, never opened: the message says to load the module in PyTorch and use
        :func:`from_torch`, or export to ONNX).
    InputTypeError
        For keyword arguments other than ``input_shape``, or any keyword argument for a native model.
    """
    unknown = sorted(set(kwargs) - {"input_shape"})
    if unknown:
        raise InputTypeError(f"load: unexpected keyword arguments {unknown}; the only one is input_shape (for "
                             "ONNX models)")
    if isinstance(path, (bytes, bytearray, memoryview)) and not _is_path_bytes(path):
        return _load_bytes(bytes(path), **kwargs)
    try:
        p = os.fspath(path)
    except TypeError:
        raise InputTypeError(f"load: expected a file path or the model file's bytes, got "
                             f"{type(path).__module__}.{type(path).__qualname__}") from None
    if isinstance(p, bytes):
        p = os.fsdecode(p)
    try:
        with open(p, "rb") as fh:
            head = fh.read(4)
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"cannot read model file {p!r}: {getattr(exc, 'strerror', None) or exc}") from None
    ext = os.path.splitext(p)[1].lower()
    if _is_torch_pickle(p, head, ext):
        raise ModelFormatError(
            f"{p!r} is a PyTorch file written by torch.save (a .pt/.pth checkpoint): a Python pickle, which can run "
            "arbitrary code when it is loaded, so deeptaylor never opens one. Load it in PyTorch yourself if you "
            "trust it (model.load_state_dict(torch.load(path, weights_only=True))), then convert the module with "
            "deeptaylor.from_torch(model, input_shape) (or pass it to dt.Explainer(model, composite, "
            "input_shape=...)); or export it to ONNX (torch.onnx.export) and dt.load the .onnx file")
    if head.startswith(b"PK"):
        if kwargs:
            raise InputTypeError(f"load: {p!r} is a native deeptaylor .npz model, which takes no keyword arguments "
                                 f"(got {sorted(kwargs)}): its input shape is stored in the file "
                                 "(dt.save(net, path, input_shape=...)); input_shape applies to ONNX models only")
        return load_npz(p)
    if _looks_like_onnx(head) or ext == ".onnx":  # content wins over the extension, as for zip archives
        return load_onnx(p, **kwargs)
    if ext == ".npz":
        raise ModelFormatError(f"{p!r} is not a valid .npz archive (corrupt or truncated)")
    raise ModelFormatError(f"unknown model format for {p!r}: expected a deeptaylor .npz (zip archive) or an "
                           ".onnx file; convert PyTorch modules with deeptaylor.from_torch")


def load_onnx(source: Any, **kwargs: Any) -> Any:
    """Import an ONNX model (path or bytes); see :func:`deeptaylor.io.onnx.load_onnx`."""
    try:
        from .onnx import load_onnx as _load_onnx
    except ImportError as exc:  # pragma: no cover - only without the onnx package
        raise ModelFormatError(f"ONNX support is not available ({exc}); install the 'onnx' extra "
                               "(pip install 'deeptaylor[onnx]')") from None
    return _load_onnx(source, **kwargs)


def from_torch(module: Any, input_shape: Any = None) -> Any:
    """Convert a ``torch.nn.Sequential`` to a :class:`~deeptaylor.Sequential`; see
    :func:`deeptaylor.io.torch.from_torch`."""
    from .torch import from_torch as _from_torch

    return _from_torch(module, input_shape)


def to_torch(net: Any, dtype: Any = None) -> Any:
    """Convert a :class:`~deeptaylor.Sequential` to a ``torch.nn.Sequential``; see
    :func:`deeptaylor.io.torch.to_torch`."""
    from .torch import to_torch as _to_torch

    return _to_torch(net, dtype)
