"""The ``deeptaylor`` command line.

::

    deeptaylor --version
    deeptaylor demo [--out DIR] [--cmap NAME]         # bundled model + digits -> heatmap PNGs, checks
    deeptaylor explain --model M --input X.npy|DIR --composite NAME --out DIR
                       [--target INT|pred|all|top:K|FILE.npy] [--backend auto|cpu|numpy] [--batch-size B]
                       [--png all|N|none]
                       [--scale K] [--cmap NAME] [--no-progress]
    deeptaylor info --model M [--input-shape C,H,W]   # the network: nodes, inputs, output shapes
    deeptaylor experiment mnist-detection [--steps 0,100,1000,10000 | --paper] [--mnist DIR] [--out DIR]
                          [--positive-fraction P|natural]
    deeptaylor experiment deep-mnist-detection [--steps 3000 | --paper] [--mnist DIR] [--out DIR]
                          [--n-taylor N]    # deep network: sensitivity, Taylor, min-max, training-free
    deeptaylor evaluate --model M --input X.npy|DIR --methods deep-taylor,sensitivity,random --out DIR
                        [--measure pixel-flipping|region-perturbation] [--steps L] [--features-per-step F]
                        [--region-size K] [--order morf|lerf] [--baseline 0|mean|uniform] [--target INT|pred]

Errors (missing files, unreadable or oversized images, corrupt models, shape mismatches, unknown
composites...) print one line ``deeptaylor: error: ...`` on stderr and exit with status 2; ``--debug``
shows the traceback instead. ``--backend auto`` (the default) runs the compiled engine and says on
stderr (``deeptaylor: note: ...``) when it falls back to the NumPy reference; ``--backend cpu`` never
falls back. Output cut short by a closed pipe (``| head``) ends quietly with status 141.

``explain`` streams: a ``.npy`` input is memory-mapped, an image directory read window by window,
``relevance.npy`` and ``output.npy`` are written through memory maps as the windows finish, and the
pages of those maps are released from memory behind the stream (:mod:`deeptaylor.stream`), so the
process's memory does not grow with the archive. PNGs are written for the first 64 inputs unless
``--png all|N|none`` says otherwise.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DeepTaylorError, DeepTaylorWarning, InputError, InputTypeError, ShapeError
from .heatmap import CMAPS

__all__ = ["build_parser", "describe", "main"]

_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff")
#: --scale's upper bound, and the largest heatmap PNG written (pixels)
MAX_SCALE = 64
MAX_PNG_PIXELS = 1 << 26


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return vals


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _fraction(text: str) -> float | None:
    if text.strip().lower() == "natural":
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'natural', got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1] or 'natural', got {text!r}")
    return v


def _scale(text: str) -> int:
    v = _positive(text)
    if v > MAX_SCALE:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {MAX_SCALE}], got {text!r}")
    return v


def _png_count(text: str) -> int | None:
    """``--png``: ``all`` (None: every input), ``none`` (0) or a count."""
    t = text.strip().lower()
    if t == "all":
        return None
    if t == "none":
        return 0
    try:
        v = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected all, none or a number of PNGs, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected all, none or a number >= 0, got {text!r}")
    return v


def _version() -> str:
    from . import __version__

    try:
        from importlib.metadata import version

        return version("deeptaylor")
    except Exception:  # noqa: BLE001 - not installed as a distribution (a source checkout)
        return __version__


_BACKEND_HELP = ("auto (default: the compiled engine, or the float64 NumPy reference with a note on stderr "
                 "where the engine cannot run the model), cpu (the compiled engine only) or numpy (the reference)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``deeptaylor`` command."""
    from .composites import names as composite_names

    p = argparse.ArgumentParser(prog="deeptaylor", description="Deep Taylor Decomposition / LRP heatmaps.")
    p.add_argument("--version", action="version", version=f"deeptaylor {_version()}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    d = sub.add_parser("demo", help="heatmaps of bundled MNIST digits from the bundled detection model")
    d.add_argument("--out", default="deeptaylor-demo", help="output directory (default: ./deeptaylor-demo)")
    d.add_argument("--backend", default="auto", choices=["auto", "cpu", "numpy"], help=_BACKEND_HELP)
    d.add_argument("-n", type=_positive, default=200, help="detection images for the checks (default 200)")
    d.add_argument("--show", type=_positive, default=6, help="images in the PNG grid (default 6)")
    d.add_argument("--cmap", default="bwr", choices=CMAPS, help="colour map of the heatmaps (default bwr)")

    e = sub.add_parser("explain", help="explain inputs with a saved model; write heatmaps as .npy and PNG")
    e.add_argument("--model", required=True, help="model file (deeptaylor .npz, or .onnx with the onnx extra)")
    e.add_argument("--input", required=True,
                   help=".npy array (N,F) / (N,H,W) / (N,C,H,W), float or uint8 (scaled by 1/255), "
                        "or a directory of images")
    e.add_argument("--composite", default="deep-taylor", metavar="NAME",
                   help="one of: " + ", ".join(composite_names()) + ", taylor (Taylor decomposition at the "
                        "nearest root point in the box) (default deep-taylor; --low/--high give the box of "
                        "deep-taylor, training-free, epsilon-gamma-box and taylor)")
    e.add_argument("--target", default="pred",
                   help="output index to explain, 'pred' (the largest output; default), 'all' (every output), "
                        "'top:K' (the K largest), or a .npy file of integer targets (N,) or (N, K); with several "
                        "targets per input relevance.npy gets a target axis after the batch axis and a PNG per target")
    e.add_argument("--out", required=True, help="output directory")
    e.add_argument("--backend", default="auto", choices=["auto", "cpu", "numpy"], help=_BACKEND_HELP)
    e.add_argument("--batch-size", type=_positive, default=None,
                   help="inputs per window of the stream (default: about 16 MiB of input per window)")
    e.add_argument("--low", type=float, default=0.0, help="lower input bound of the zB rule (default 0)")
    e.add_argument("--high", type=float, default=1.0, help="upper input bound of the zB rule (default 1)")
    e.add_argument("--image-shape", default=None, help="H,W to draw flat (N,F) inputs as images")
    e.add_argument("--cmap", default="bwr", choices=CMAPS, help="colour map of the heatmaps (default bwr)")
    e.add_argument("--scale", type=_scale, default=4, metavar="K",
                   help=f"enlarge the heatmap PNGs K times (nearest neighbour; default 4, 1 = native size, at most "
                        f"{MAX_SCALE})")
    e.add_argument("--png", type=_png_count, default=64, metavar="all|N|none",
                   help="heatmap PNGs for all inputs, the first N, or none (default: the first 64)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="describe a saved model: its nodes, their inputs and output shapes")
    i.add_argument("--model", required=True, help="model file (deeptaylor .npz, or .onnx with the onnx extra)")
    i.add_argument("--input-shape", default=None, metavar="C,H,W|F",
                   help="per-sample input shape for the output shapes (default: the one stored in the model)")

    x = sub.add_parser("experiment", help="run a paper experiment")
    x.add_argument("name", choices=["mnist-detection", "deep-mnist-detection"],
                   help="the experiment: the one-layer detection network (mnist-detection) or the deep "
                        "network with the relevance models (deep-mnist-detection)")
    x.add_argument("--steps", type=_int_list, default=None,
                   help="step counts, e.g. 0,100,1000,10000 (default); deep-mnist-detection: one count "
                        "(default 3000)")
    x.add_argument("--paper", action="store_true", help="the paper's schedule up to 300,000 steps (slow)")
    x.add_argument("--mnist", default=None, help="directory with the MNIST IDX files (default: search)")
    x.add_argument("--out", default=None, help="output directory (default: deeptaylor-<experiment>)")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--backend", default="auto", choices=["auto", "cpu", "numpy"], help=_BACKEND_HELP)
    x.add_argument("--n-train", type=_positive, default=None,
                   help="generated training images (default 60000; deep-mnist-detection 20000, --paper 60000)")
    x.add_argument("--n-test", type=_positive, default=1000, help="generated test images (default 1000)")
    x.add_argument("--n-taylor", type=_positive, default=None,
                   help="deep-mnist-detection: test images explained with Taylor's nearest root (default 200)")
    x.add_argument("--lr", type=float, default=None,
                   help="SGD learning rate (default 0.005; deep-mnist-detection: of the deep network, default "
                        "see docs/experiments.md)")
    x.add_argument("--positive-fraction", type=_fraction, default=0.5, metavar="P|natural",
                   help="share of images with a target digit 0-3 (default 0.5, exact), or 'natural': every "
                        "image is a digit of any class next to a distractor 4-9 (about 41%% positive)")
    x.add_argument("--no-progress", action="store_true", help="no progress bar")

    v = sub.add_parser("evaluate", help="faithfulness of heatmaps: pixel flipping / region perturbation curves "
                                        "and AOPC per method (evaluation.json, curves.npz, curves.png)")
    v.add_argument("--model", required=True, help="model file (deeptaylor .npz, or .onnx with the onnx extra)")
    v.add_argument("--input", required=True, help=".npy array or a directory of images (as for explain)")
    v.add_argument("--methods", default="deep-taylor,sensitivity,random",
                   help="comma-separated composites/methods (as --composite of explain), integrated-gradients, "
                        "smoothgrad, occlusion, and random (the random order); default deep-taylor,sensitivity,random")
    v.add_argument("--out", required=True, help="output directory")
    v.add_argument("--measure", default="pixel-flipping", choices=["pixel-flipping", "region-perturbation"])
    v.add_argument("--steps", type=_positive, default=None,
                   help="perturbation steps (default: until everything is replaced)")
    v.add_argument("--features-per-step", type=_positive, default=None,
                   help="pixels replaced per step (default: enough for 100 steps over the image)")
    v.add_argument("--region-size", type=_positive, default=9, help="region side for region-perturbation (default 9)")
    v.add_argument("--order", default="morf", choices=["morf", "lerf"], help="most (default) or least relevant first")
    v.add_argument("--baseline", default="0", help="replacement value: a number, mean or uniform (default 0)")
    v.add_argument("--target", default="pred", help="output index to explain, or 'pred' (the largest output)")
    v.add_argument("--seed", type=int, default=0, help="seed of the random order and the uniform baseline")
    v.add_argument("--backend", default="auto", choices=["auto", "cpu", "numpy"], help=_BACKEND_HELP)
    v.add_argument("--batch-size", type=_positive, default=None, help="perturbed inputs per forward pass")
    v.add_argument("--low", type=float, default=0.0, help="lower input bound of the zB rule (default 0)")
    v.add_argument("--high", type=float, default=1.0, help="upper input bound of the zB rule (default 1)")
    v.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ------------------------------------------------------------------------------------------ input


def _check_npy_header(path: Path) -> None:
    """Read only the ``.npy`` header and check that the array it declares is what the file holds, so
    that a header declaring (10**12, 784) fails at once instead of allocating."""
    try:
        with open(path, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":
                return  # not a .npy (np.load says what it is)
            fh.seek(0)
            major, _ = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            shape, _fortran, dtype = read(fh)
            offset = fh.tell()
            size = os.fstat(fh.fileno()).st_size
    except (OSError, ValueError, EOFError, SyntaxError, TypeError) as exc:
        raise InputError(f"cannot read {str(path)!r} as a .npy array: {exc}") from None
    if dtype.hasobject:
        raise InputTypeError(f"{str(path)!r}: dtype {dtype} holds Python objects (pickles); not loaded")
    count = math.prod(int(d) for d in shape)
    if count * dtype.itemsize != size - offset:
        raise InputError(f"{str(path)!r}: the .npy header declares shape {tuple(shape)} of {dtype} "
                         f"({count * dtype.itemsize} bytes) but the file holds {size - offset} bytes of data "
                         "(truncated or corrupt)")


def _open_npy(path: Path) -> np.ndarray:
    """The ``.npy`` array at ``path`` as a read-only memory map (nothing read yet): float16/32/64 or
    uint8 (converted window by window, :func:`_as_float`)."""
    _check_npy_header(path)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise InputError(f"cannot read {str(path)!r} as a .npy array: {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{str(path)!r} is an .npz archive; save a single array with np.save")
    if arr.dtype == np.uint8 or arr.dtype.kind == "f":
        return arr
    raise InputTypeError(f"{str(path)!r}: dtype {arr.dtype} is not supported; use float32/float64, or uint8 "
                         "images (scaled by 1/255)")


def _as_float(w: np.ndarray) -> np.ndarray:
    """A window of raw input as the float array the Explainer takes: uint8 scaled by 1/255, float16
    widened to float32, float32/float64 as they are (a view of the memory map)."""
    if w.dtype == np.uint8:
        return w.astype(np.float32) / np.float32(255)
    if w.dtype.kind == "f" and w.dtype.itemsize < 4:
        return w.astype(np.float32)
    return w


def _stand_in(shape: tuple[int, ...]) -> np.ndarray:
    """A read-only array of ``shape`` that costs no memory (zero strides): for shape logic only."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=shape, strides=(0,) * len(shape),
                                           writeable=False)


class _ImageDir:
    """A directory of images read lazily, window by window: ``files`` (sorted), ``shape`` (N, H, W) or
    (N, 3, H, W) as the network takes them, ``read(s, e)`` -> float32 in [0, 1]."""

    def __init__(self, directory: Path, rgb: bool) -> None:
        self.files = sorted(f for f in directory.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_EXTS)
        if not self.files:
            raise InputError(f"no images ({', '.join(_IMAGE_EXTS)}) in directory {str(directory)!r}")
        self.rgb = rgb
        first = _read_image(self.files[0], rgb)
        self.image_shape = first.shape
        n = len(self.files)
        self.shape = (n, 3, *first.shape[:2]) if rgb else (n, *first.shape)

    def read(self, s: int, e: int) -> np.ndarray:
        imgs = []
        for f in self.files[s:e]:
            im = _read_image(f, self.rgb)
            if im.shape != self.image_shape:
                raise ShapeError(f"image {f.name!r} is {im.shape[1]}x{im.shape[0]}, but {self.files[0].name!r} is "
                                 f"{self.image_shape[1]}x{self.image_shape[0]}: all images must have the same size")
            imgs.append(im)
        arr = np.stack(imgs).astype(np.float32) / np.float32(255)
        if self.rgb:
            arr = arr.transpose(0, 3, 1, 2)
        return np.ascontiguousarray(arr)


def _read_image(path: Path, rgb: bool) -> np.ndarray:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        if path.suffix.lower() != ".png":
            raise InputError(f"reading {path.suffix} images needs Pillow: pip install 'deeptaylor[image]'") from None
        from .heatmap import read_png

        try:
            img = read_png(path)
        except InputError as exc:
            raise InputError(f"cannot read image {str(path)!r} without Pillow ({exc}); "
                             "pip install 'deeptaylor[image]'") from None
        if rgb and img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        elif not rgb and img.ndim == 3:
            img = np.round(img @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
        return img
    try:
        with warnings.catch_warnings():
            # Pillow warns beyond Image.MAX_IMAGE_PIXELS and raises beyond twice that: refuse both
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return np.asarray(im.convert("RGB" if rgb else "L"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"image {str(path)!r} is too large (a decompression bomb?): {exc}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        raise InputError(f"cannot read image {str(path)!r} (corrupt or unsupported: {exc})") from None


def _input_channels(net: Any) -> int | None:
    """Channels the network's input has: a Graph's declared (C, H, W), or a Sequential's first layer's."""
    from .layers import Conv2d, ConvTranspose2d

    shape = getattr(net, "input_shape", ())
    if len(shape) == 3:
        return int(shape[0])
    first = net[0]
    if isinstance(first, (Conv2d, ConvTranspose2d)):
        return first.in_channels
    return None


def _fit_input(net: Any, x: np.ndarray, image_shape: tuple[int, int] | None,
               stored: tuple[int, ...] | None = None) -> tuple[np.ndarray, tuple | None]:
    """Reshape ``x`` to what the network takes (a Graph's declared input shape, the shape stored in
    the model file, else the first layer's); return it and the (H, W) to draw heatmaps."""
    from .layers import Dense

    if x.ndim < 2 or x.shape[0] == 0:
        raise ShapeError(f"input must hold a batch (N, ...) with N >= 1, got shape {x.shape}")
    declared = tuple(getattr(net, "input_shape", ())) or tuple(stored or ())
    first = net[0]
    draw = None
    if x.ndim == 3:
        draw = x.shape[1:]
    elif x.ndim == 4:
        draw = x.shape[2:]
    feats = int(np.prod(x.shape[1:]))
    if len(declared) == 1 or (not declared and isinstance(first, Dense)):
        want = declared[0] if declared else first.in_features
        if feats != want:
            what = "model's input" if declared else "model's first layer (Dense)"
            raise ShapeError(f"input has {feats} values per sample (shape {x.shape[1:]}), but the {what} expects "
                             f"{want}")
        x = x.reshape(x.shape[0], feats)
    elif x.ndim == 3:
        x = x[:, None]
    channels = _input_channels(net)
    if channels is not None and x.ndim == 4 and x.shape[1] != channels:
        what = f"model's input {declared}" if declared else f"model's first layer ({first.kind})"
        raise ShapeError(f"input has {x.shape[1]} channel(s), but the {what} expects {channels}")
    if len(declared) == 3 and x.ndim == 2 and feats == int(np.prod(declared)):
        x = x.reshape((x.shape[0], *declared))  # flat samples of the declared (C, H, W)
        draw = declared[1:] if draw is None else draw
    if image_shape is not None:
        draw = image_shape
    elif draw is None and x.ndim == 2:
        side = math.isqrt(int(x.shape[1]))
        draw = (side, side) if side * side == x.shape[1] else None
    return x, draw


def _parse_target(text: str) -> int | None:
    if text == "pred":
        return None
    try:
        t = int(text)
    except ValueError:
        raise InputError(f"--target must be an integer or 'pred', got {text!r}") from None
    if t < 0:
        raise InputError(f"--target must be >= 0, got {t}")
    return t


def _parse_targets(text: str, n: int, k: int) -> Any:
    """``explain --target``: INT, ``pred``, ``all``, ``top:K`` or a ``.npy`` file of integer targets
    (N,) or (N, K'). Returns what :meth:`Explainer.explain` takes for one window (``None``, an int,
    ``"all"``, ``("top", K)``) or the whole (N,) / (N, K') array (sliced per window)."""
    if text == "all":
        return "all"
    if text.startswith("top:"):
        try:
            kk = int(text[4:])
        except ValueError:
            raise InputError(f"--target top:K needs an integer K, got {text!r}") from None
        if not 1 <= kk <= k:
            raise InputError(f"--target top:K needs K in [1, {k}] (the network has {k} output(s)), got {kk}")
        return ("top", kk)
    if text.endswith(".npy"):
        path = Path(text)
        if not path.is_file():
            raise InputError(f"--target file {text!r} not found")
        _check_npy_header(path)
        try:
            t = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"cannot read --target file {text!r} as a .npy array: {exc}") from None
        if not isinstance(t, np.ndarray):
            raise InputError(f"--target file {text!r} is an .npz archive; save a single array with np.save")
        from .explain import validate_targets

        if t.ndim == 0:
            raise ShapeError(f"--target file {text!r} holds a scalar: pass the integer itself, or an array ({n},) "
                             f"or ({n}, K)")
        try:
            return validate_targets(t, n, k)
        except DeepTaylorError as exc:
            raise type(exc)(f"--target file {text!r}: {exc}") from None
    t = _parse_target(text)
    if t is not None and t >= k:
        raise InputError(f"target out of range: the network has {k} output(s) (0..{k - 1}), got {t}")
    return t


def _composite(name: str, low: float, high: float) -> Any:
    from . import composites

    key = name.replace("_", "-")
    if key in ("deep-taylor", "epsilon-gamma-box", "training-free"):
        return composites.get(key, low=low, high=high)
    if key == "taylor":   # a compound method, not in the registry (it explains one target per sample)
        from .taylor import Taylor

        return Taylor(box=(low, high))
    return composites.get(key)


def _explainer(net: Any, method: Any, backend: str) -> Any:
    """The Explainer on ``backend``; with "auto" a fallback to the reference is said on stderr (the
    :class:`~deeptaylor.errors.BackendFallbackWarning`, as a note: see :func:`main`)."""
    from .explain import Explainer

    return Explainer(net, method, backend=backend)


# --------------------------------------------------------------------------------------- commands


def _model_and_input(args: argparse.Namespace) -> tuple[Path, Path]:
    """``--model`` (an existing file) and ``--input`` (an existing file or directory) as paths."""
    model = Path(args.model)
    if not model.is_file():
        raise InputError(f"model file {str(model)!r} not found")
    src = Path(args.input)
    if not src.exists():
        raise InputError(f"input {str(src)!r} not found")
    return model, src


def _read_model(model: Path) -> tuple[Any, Any]:
    """The network in ``model`` (deeptaylor's .npz or ONNX) and the per-sample input shape a native
    file stores (None for ONNX)."""
    from .io import load

    with open(model, "rb") as fh:
        native = fh.read(2) == b"PK"
    if native:
        from .io.npz import read_npz

        net, meta = read_npz(model)
        return net, meta["input_shape"]
    return load(model), None


def _cmd_explain(args: argparse.Namespace) -> int:
    from . import heatmap as hm
    from . import stream

    model, src = _model_and_input(args)
    image_shape = None
    if args.image_shape:
        try:
            h, w = (int(v) for v in args.image_shape.split(","))
        except ValueError:
            raise InputError(f"--image-shape must be H,W, got {args.image_shape!r}") from None
        if h < 1 or w < 1:
            raise InputError(f"--image-shape must be H,W of positive integers, got {args.image_shape!r}")
        image_shape = (h, w)
    method = _composite(args.composite, args.low, args.high)
    net, stored = _read_model(model)
    images: _ImageDir | None = None
    raw: np.ndarray | None = None
    if src.is_dir():
        images = _ImageDir(src, _input_channels(net) == 3)
        in_shape = images.shape
    elif src.suffix.lower() == ".npy":
        raw = _open_npy(src)
        in_shape = raw.shape
    else:
        raise InputError(f"input {str(src)!r} must be a .npy file or a directory of images")
    fitted, draw = _fit_input(net, _stand_in(tuple(in_shape)), image_shape, stored)
    fit_shape = fitted.shape
    if draw is not None and int(np.prod(fit_shape[1:])) % int(np.prod(draw)) != 0:  # (C, H, W) in C order
        raise ShapeError(f"--image-shape {draw} does not match {int(np.prod(fit_shape[1:]))} values per sample")
    if draw is not None and draw[0] * draw[1] * args.scale ** 2 > MAX_PNG_PIXELS:
        raise InputError(f"heatmaps of {draw[0]}x{draw[1]} enlarged {args.scale} times would be "
                         f"{draw[0] * args.scale}x{draw[1] * args.scale} pixels, beyond the limit of {MAX_PNG_PIXELS} "
                         "pixels per PNG: pass a smaller --scale")
    x = None if raw is None else raw.reshape(fit_shape)  # a view of the memory map (C order)
    ex = _explainer(net, method, args.backend)
    n = int(fit_shape[0])
    k = int(ex.graph.shapes((1, *fit_shape[1:]))[-1][1])
    target = _parse_targets(args.target, n, k)
    # K explained outputs per input (None: one, no K axis)
    many = 2 if isinstance(target, np.ndarray) and target.ndim == 2 else 0
    kt = (k if isinstance(target, str) else target[1] if isinstance(target, tuple)
          else target.shape[1] if many else None)
    dtype = np.dtype(getattr(ex.backend, "dtype", np.float32))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # written through memory maps as the stream goes, in the input's own shape (one value per input value),
    # with a target axis after the batch axis when several outputs are explained per input
    kshape = () if kt is None else (kt,)
    rel_file = np.lib.format.open_memmap(out / "relevance.npy", mode="w+", dtype=dtype,
                                         shape=(n, *kshape, *in_shape[1:]))
    out_file = np.lib.format.open_memmap(out / "output.npy", mode="w+", dtype=dtype, shape=(n, k))
    tgt_file = np.lib.format.open_memmap(out / "target.npy", mode="w+", dtype=np.int64, shape=(n, *kshape))
    rel_fit = rel_file.reshape((n, *kshape, *fit_shape[1:]))
    n_png = n if args.png is None else min(args.png, n) if draw is not None else 0
    sample_bytes = 4 * int(np.prod(fit_shape[1:]))
    step = args.batch_size or max(1, stream.WINDOW_BYTES // 2 // sample_bytes)
    written = [out / "relevance.npy", out / "output.npy", out / "target.npy"]
    totals = np.empty((n, *kshape), np.float64)
    explained = np.empty((n, *kshape), np.float64)
    neg_mass = abs_mass = 0.0
    method_name, backend_name = ex.method_name, ex.backend.name
    bar = stream.progress_bar(n, not args.no_progress)
    start = time.perf_counter()
    try:
        for s in range(0, n, step):
            e = min(n, s + step)
            xw = images.read(s, e).reshape((e - s, *fit_shape[1:])) if images is not None else _as_float(x[s:e])
            res = ex.explain(xw, target=target[s:e] if isinstance(target, np.ndarray) else target)
            rel = res.relevance
            flat = rel.reshape(e - s, *kshape, -1)
            totals[s:e] = flat.sum(axis=-1, dtype=np.float64)
            explained[s:e] = res.explained
            neg_mass += float(-flat[flat < 0].sum(dtype=np.float64))
            abs_mass += float(np.abs(flat).sum(dtype=np.float64))
            rel_fit[s:e] = rel
            out_file[s:e] = res.output
            tgt_file[s:e] = res.target
            method_name, backend_name = res.method, res.backend
            for a in (rel_fit[s:e], out_file[s:e], tgt_file[s:e], None if x is None else x[s:e]):
                stream.release(a)   # the memory maps' pages of this window: in the files, not in this process
            if s < n_png:
                m = min(e, n_png) - s
                per = 1 if kt is None else kt
                maps = rel[:m].reshape((m * per, -1) + tuple(draw)).sum(axis=1)  # channels summed
                rgb = hm.to_rgb(maps, cmap=args.cmap)
                for i in range(m):
                    stem = images.files[s + i].stem if images is not None else f"{s + i:04d}"
                    for j in range(per):
                        name = f"heatmap_{stem}.png" if kt is None else \
                            f"heatmap_{stem}_t{int(res.target[i, j])}.png"
                        written.append(Path(hm.save_png(out / name, hm.upscale(rgb[i * per + j], args.scale))))
            bar.update(e - s)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    rel_file.flush()
    out_file.flush()
    tgt_file.flush()
    del rel_file, out_file, rel_fit, tgt_file
    err = np.abs(totals - explained)
    what = f"{n} input(s)" if kt is None else f"{n} input(s) x {kt} target(s)"
    print(f"explained {what} with {method_name} on backend {backend_name} in {elapsed:.2f} s "
          f"({n / max(elapsed, 1e-9):.0f} images/s)")
    print(f"  f(x) mean {float(explained.mean()):.6g}   sum R mean {float(totals.mean()):.6g}   "
          f"max |sum R - f(x)| {float(err.max()):.3e}   negative relevance mass "
          f"{100 * (neg_mass / abs_mass if abs_mass > 0 else 0.0):.2f} %")
    pngs = sum(1 for w in written if w.suffix == ".png")
    size = f" ({draw[1] * args.scale}x{draw[0] * args.scale} pixels)" if draw is not None else ""
    if pngs:
        more = f" for the first {pngs} of {n} inputs (--png all for every one)" if pngs < n else ""
        tail = f" and {pngs} heatmap PNG(s) heatmap_*.png{size}{more}"
    elif draw is None:
        tail = " (no PNGs: pass --image-shape H,W to draw flat inputs)"
    else:
        tail = " (no PNGs: --png none)"
    print(f"wrote {out / 'relevance.npy'} {(n, *kshape, *in_shape[1:])}, {out / 'output.npy'}, "
          f"{out / 'target.npy'}" + tail)
    return 0


def _shape_arg(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        raise InputError(f"--input-shape must be C,H,W or F (integers), got {text!r}") from None
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise InputError(f"--input-shape must be C,H,W or F (positive integers), got {text!r}")
    return shape


def describe(net: Any, input_shape: tuple[int, ...] | None = None) -> str:
    """A listing of ``net``: one line per node with its name, layer, the values it reads and its
    per-sample output shape (when the input shape is known), then the parameter count."""
    names = ["input"] + list(net.names)
    shapes = None
    if input_shape:
        shapes = net.shapes((1, *input_shape))  # ShapeError naming the node when they do not compose
    kind = "Sequential" if type(net).__name__ == "Sequential" else "Graph"
    head = f"{kind}: {len(net)} node(s), input {tuple(input_shape) if input_shape else '(any)'}"
    if shapes is not None:
        head += f", output {shapes[-1][1:]}"
    w = max(len(n) for n in names)
    lines = [head]
    if shapes is not None:
        lines.append(f"  {'input':<{w}}  -> {shapes[0][1:]}")
    for i, node in enumerate(net.nodes):
        ins = ", ".join(names[v] for v in node.inputs)
        shp = f" -> {shapes[i + 1][1:]}" if shapes is not None else ""
        lines.append(f"  {node.name:<{w}}  {node.layer!r}  <- {ins}{shp}")
    seen: set[int] = set()
    count = 0
    for layer in net:
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        for attr in ("weight", "bias", "running_mean", "running_var"):
            a = getattr(layer, attr, None)
            if isinstance(a, np.ndarray):
                count += a.size
    lines.append(f"{count} parameters")
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    from .io import load
    from .io.npz import read_npz

    model = Path(args.model)
    if not model.is_file():
        raise InputError(f"model file {str(model)!r} not found")
    with open(model, "rb") as fh:
        native = fh.read(2) == b"PK"
    stored = None
    if native:
        net, meta = read_npz(model)
        stored = meta["input_shape"]
        print(f"{model}: deeptaylor model, format version {meta['version']}")
    else:
        net = load(model)
        print(f"{model}")
    shape = _shape_arg(args.input_shape) if args.input_shape else (tuple(net.input_shape) or stored)
    print(describe(net, shape))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import datasets as ds
    from . import heatmap as hm
    from .experiment import explain_methods, heatmap_panel, method_stats, pick_rows
    from .train import detection_accuracy

    net = ds.load_detection_model()
    images, labels = ds.load_sample()
    data = ds.mnist_detection(images, labels, args.n, seed=0)
    x = data.flat().astype(np.float64)
    results = explain_methods(net, x, args.backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    show = pick_rows(data.side, min(args.show, len(data)))
    files = [hm.save_png(out / "heatmaps.png", heatmap_panel(data.images, results, cmap=args.cmap, rows=show))]
    zb = results["zB"].relevance.reshape(data.images.shape)
    over = hm.overlay(data.images[show], zb[show], cmap="coldnhot", alpha=1.0)  # hot colours read well on black
    tiles = [np.repeat(np.repeat(t, 3, axis=0), 3, axis=1) for t in over]
    files.append(hm.save_png(out / "overlay_zB.png", hm.grid(tiles, ncols=1, pad_value=128)))
    for name, res in results.items():
        safe = name.replace("+", "plus")
        np.save(out / f"relevance_{safe}.npy", res.relevance.reshape(data.images.shape).astype(np.float32))
        files.append(str(out / f"relevance_{safe}.npy"))
    np.save(out / "inputs.npy", data.images)
    files.append(str(out / "inputs.npy"))
    acc = detection_accuracy(net, x, data.labels)
    mask = data.target_mask()
    print(f"deeptaylor demo: bundled detection net (1568-400-1, b <= 0) on {len(data)} 28x56 images built from "
          f"the bundled MNIST test digits (target digit 0-3 present in {int(data.labels.sum())}); accuracy {acc:.1%}")
    print(f"{'method':<12} {'backend':<7} {'sum R - f(x)':>13} {'neg. mass':>9} {'on target':>9}  conservative  positive")
    for name, res in results.items():
        st = method_stats(res, mask)
        conservative = st.conservation_error < 1e-4
        positive = st.min_relevance >= -1e-6 * max(1.0, float(np.abs(res.relevance).max()))
        print(f"{name:<12} {res.backend:<7} {st.conservation_error:>13.2e} {st.negative_mass:>9.2%} "
              f"{st.target_share:>9.1%}  {'yes' if conservative else 'NO':<12}  {'yes' if positive else 'NO'}")
    print("(sum R - f(x): sum_n |sum_p R_p - f(x_n)| / sum_n f(x_n); on target: share of positive relevance on "
          "the target digit's half)")
    print(f"heatmaps.png: one row per image ({len(show)}: those with a target digit first, alternately left and "
          f"right, then those without); columns: {' | '.join(['input', *results])}; overlay_zB.png: zB over the input")
    print("wrote:")
    for f in files:
        print(f"  {f}")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import DEFAULT_STEPS, PAPER_STEPS, run_mnist_detection

    if args.mnist is not None and not Path(args.mnist).is_dir():
        raise InputError(f"MNIST directory {args.mnist!r} not found")
    out = args.out or f"deeptaylor-{args.name}"
    if args.name == "deep-mnist-detection":
        from . import deep_experiment as de

        if args.steps is not None and len(args.steps) != 1:
            raise InputError(f"deep-mnist-detection takes one step count (--steps 3000), got {args.steps}")
        steps = de.PAPER_STEPS if args.paper else (args.steps[0] if args.steps else de.DEFAULTS["steps"])
        kwargs = {k: v for k, v in (("lr", args.lr), ("n_taylor", args.n_taylor)) if v is not None}
        n_train = args.n_train or (60000 if args.paper else de.DEFAULTS["n_train"])
        summary = de.run_deep_mnist_detection(out, steps=steps, mnist=args.mnist, seed=args.seed,
                                              backend=args.backend, n_train=n_train, n_test=args.n_test,
                                              positive_fraction=args.positive_fraction,
                                              progress=not args.no_progress, **kwargs)
    else:
        steps = PAPER_STEPS if args.paper else (args.steps or DEFAULT_STEPS)
        summary = run_mnist_detection(out, steps=steps, mnist=args.mnist, seed=args.seed, backend=args.backend,
                                      n_train=args.n_train or 60000, n_test=args.n_test,
                                      lr=0.005 if args.lr is None else args.lr,
                                      positive_fraction=args.positive_fraction, progress=not args.no_progress)
    print("wrote:")
    for f in summary["files"]:
        print(f"  {f}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from . import evaluate as ev

    model, src = _model_and_input(args)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise InputError("--methods is empty")
    methods = {m: ev.resolve_method(m, args.low, args.high) for m in names}   # unknown names fail before work
    try:
        baseline: Any = float(args.baseline)
    except ValueError:
        baseline = args.baseline.strip().lower()
        if baseline not in ("mean", "uniform"):
            raise InputError(f"--baseline must be a number, mean or uniform, got {args.baseline!r}") from None
    target = _parse_target(args.target)
    net, stored = _read_model(model)
    if src.is_dir():
        images = _ImageDir(src, _input_channels(net) == 3)
        raw = images.read(0, images.shape[0])
    elif src.suffix.lower() == ".npy":
        raw = _as_float(np.asarray(_open_npy(src)))
    else:
        raise InputError(f"input {str(src)!r} must be a .npy file or a directory of images")
    x, _ = _fit_input(net, np.ascontiguousarray(raw), None, stored)
    positions = x.shape[2] * x.shape[3] if x.ndim == 4 else x.shape[1]
    kwargs: dict[str, Any] = {"steps": args.steps, "order": args.order, "baseline": baseline, "seed": args.seed,
                              "batch_size": args.batch_size}
    if args.measure == "pixel-flipping":
        kwargs["features_per_step"] = args.features_per_step or max(1, -(-positions // 100))
    else:
        kwargs["region_size"] = args.region_size
        if args.features_per_step is not None:
            raise InputError("--features-per-step is for pixel-flipping (region-perturbation replaces one region "
                             "per step)")
    results = ev.compare(net, x, methods, target, measure=args.measure, backend=args.backend,
                         progress=not args.no_progress, **kwargs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = ev.summary(results)
    report.update({"measure": args.measure, "model": str(model), "input": str(src), "samples": int(x.shape[0]),
                   "baseline": baseline, "seed": args.seed, "backend": args.backend,
                   **{k: v for k, v in kwargs.items() if k in ("features_per_step", "region_size")}})
    (out / "evaluation.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    first = next(iter(results.values()))
    np.savez(out / "curves.npz", removed=first.removed, target=first.target,
             **{name: r.curves for name, r in results.items()})
    written = [out / "evaluation.json", out / "curves.npz"]
    try:
        written.append(Path(ev.plot_curves(results, out / "curves.png")))
    except NotImplementedError:
        pass  # no matplotlib: no plot
    steps = first.curves.shape[1] - 1
    unit = "positions" if first.kind == "pixel_flipping" else f"{args.region_size}x{args.region_size} regions"
    print(f"{args.measure} on {x.shape[0]} input(s): {steps} steps, {first.removed[-1]} of {first.units} {unit} "
          f"replaced by {baseline}, order {args.order}")
    print(f"{'method':<24} {'AOPC':>10} {'+-sem':>9} {'f(x)':>10} {'f(last)':>10}")
    for name, r in results.items():
        sem = report["methods"][name]["aopc_sem"]
        print(f"{name:<24} {r.mean_aopc:>10.4g} {sem if sem is not None else float('nan'):>9.2g} "
              f"{r.mean_curve[0]:>10.4g} {r.mean_curve[-1]:>10.4g}")
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


def _note(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
          line: str | None = None) -> None:
    """``warnings.showwarning`` of the command line: ``deeptaylor: note: <message>`` on stderr."""
    what = "note" if issubclass(category, DeepTaylorWarning) else f"warning ({category.__name__})"
    try:
        print(f"deeptaylor: {what}: {message}", file=sys.stderr)
    except (OSError, ValueError):  # pragma: no cover - stderr closed
        pass


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return int(exc.code or 0)
    commands = {"demo": _cmd_demo, "explain": _cmd_explain, "info": _cmd_info, "experiment": _cmd_experiment,
                "evaluate": _cmd_evaluate}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _note   # a backend fallback (and any other warning): one line on stderr
            warnings.simplefilter("default", DeepTaylorWarning)
            return commands[args.command](args)
    except BrokenPipeError:
        # the reader went away (`deeptaylor ... | head`): stop quietly, as a SIGPIPE-killed tool does; point
        # stdout at /dev/null so that the interpreter's final flush does not complain either
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # pragma: no cover - stdout without a descriptor
            pass
        return 141
    except (DeepTaylorError, OSError, ValueError, TypeError, NotImplementedError, MemoryError) as exc:
        if args.debug:
            raise
        if isinstance(exc, MemoryError):
            exc = MemoryError(f"out of memory ({exc or 'allocation failed'}); try a smaller --batch-size or input")
        msg = str(exc) if not isinstance(exc, OSError) or not exc.filename else \
            f"{exc.strerror or exc}: {exc.filename!r}"
        print(f"deeptaylor: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deeptaylor: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: still one line (the traceback with --debug)
        if args.debug:
            raise
        print(f"deeptaylor: error: internal error ({type(exc).__name__}: {exc}); rerun with --debug for the "
              "traceback", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
