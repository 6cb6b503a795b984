"""Heatmap images: colour maps, overlays, grids and PNG files, in pure NumPy.

* :func:`to_rgb` maps relevance to RGB through a 256-entry colour table (``bwr``, ``seismic``,
  ``coldnhot``, ``gray``);
* :func:`overlay` blends a heatmap over the grey-scale input;
* :func:`grid` tiles images into one, optionally with column labels (:func:`text_mask`, a built-in
  5x7 pixel font); :func:`upscale` enlarges images by pixel repetition;
* :func:`save_png` writes 8-bit grey or RGB PNGs, with Pillow when installed (the ``image`` extra)
  and otherwise with a small built-in writer (zlib + CRC-checked chunks); :func:`read_png` reads
  the 8-bit, non-interlaced grey/RGB(A) PNGs this module and most tools write.

Colour tables (256 x 3 uint8), piecewise linear between anchors given as (position in 0..255, RGB):

============  ============================================================================
``bwr``       0 blue (0,0,255), 128 white, 255 red (255,0,0) - as Zennit's ``bwr``
``seismic``   0 (0,0,77), 64 blue, 128 white, 191 red, 255 (128,0,0) - as matplotlib's ``seismic``
``coldnhot``  0 cyan, 64 blue, 128 black, 170 red, 212 yellow, 255 white - as Zennit's ``coldnhot``
``gray``      0 black, 255 white
============  ============================================================================

With ``symmetric=True`` the value range ``[-m, m]``, ``m = max |R|``, maps onto the table, so zero
relevance is always the middle colour (white for ``bwr``, black for ``coldnhot``).
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import InputError, InputTypeError, ShapeError

__all__ = ["CMAPS", "colormap", "grid", "overlay", "read_png", "save_png", "text_mask", "to_rgb", "upscale"]

_ANCHORS: dict[str, list[tuple[int, tuple[int, int, int]]]] = {
    "bwr": [(0, (0, 0, 255)), (128, (255, 255, 255)), (255, (255, 0, 0))],
    "seismic": [(0, (0, 0, 77)), (64, (0, 0, 255)), (128, (255, 255, 255)), (191, (255, 0, 0)),
                (255, (128, 0, 0))],
    "coldnhot": [(0, (0, 255, 255)), (64, (0, 0, 255)), (128, (0, 0, 0)), (170, (255, 0, 0)),
                 (212, (255, 255, 0)), (255, (255, 255, 255))],
    "gray": [(0, (0, 0, 0)), (255, (255, 255, 255))],
}
CMAPS = tuple(_ANCHORS)


def colormap(name: str) -> np.ndarray:
    """The colour table ``name`` as a (256, 3) uint8 array (see the module docstring)."""
    if name not in _ANCHORS:
        raise InputError(f"unknown colour map {name!r}; known: {', '.join(CMAPS)}")
    pos = np.array([p for p, _ in _ANCHORS[name]], dtype=np.float64)
    col = np.array([c for _, c in _ANCHORS[name]], dtype=np.float64)
    idx = np.arange(256, dtype=np.float64)
    lut = np.stack([np.interp(idx, pos, col[:, c]) for c in range(3)], axis=1)
    return np.round(lut).astype(np.uint8)


def _as_maps(r: Any, what: str) -> tuple[np.ndarray, bool]:
    """(N, H, W) float64 and whether the input was a single (H, W) map."""
    a = np.asarray(r)
    if a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise InputTypeError(f"{what} must be a real numeric array, got dtype {a.dtype}")
    a = a.astype(np.float64)
    if a.ndim == 2:
        return a[None], True
    if a.ndim == 3:
        return a, False
    if a.ndim == 4:
        return a.sum(axis=1), False  # (N, C, H, W): a pixel's relevance is the sum over its channels
    raise ShapeError(f"{what} must be (H, W), (N, H, W) or (N, C, H, W), got shape {a.shape}")


def to_rgb(R: Any, cmap: str = "bwr", symmetric: bool = True, vmax: float | None = None,
           per_image: bool = True) -> np.ndarray:
    """Colour heatmaps.

    Parameters
    ----------
    R : (H, W), (N, H, W) or (N, C, H, W) relevance (channels are summed)
    cmap : ``"bwr"``, ``"seismic"``, ``"coldnhot"`` or ``"gray"``
    symmetric : map ``[-m, m]`` onto the colour table (zero = middle colour); otherwise map
        ``[min, max]`` onto it
    vmax : ``m`` for ``symmetric`` (default ``max |R|``); a common scale for several heatmaps
    per_image : scale each heatmap of a batch by its own range (True) or all by the batch's (False)

    Returns
    -------
    uint8 (H, W, 3) or (N, H, W, 3)
        All-zero (or constant) maps get the middle colour (symmetric) or the first colour.
    """
    maps, single = _as_maps(R, "R")
    if not np.all(np.isfinite(maps)):
        raise InputError("R contains NaN or Inf")
    lut = colormap(cmap)
    axes = (1, 2) if per_image else (0, 1, 2)
    if symmetric:
        m = np.max(np.abs(maps), axis=axes, keepdims=True) if vmax is None else np.full((1, 1, 1), float(vmax))
        if np.any(m < 0) or not np.all(np.isfinite(m)):
            raise InputError(f"vmax must be a finite number >= 0, got {vmax!r}")
        safe = np.where(m > 0, m, 1.0)
        u = np.clip((maps / safe + 1.0) / 2.0, 0.0, 1.0)
    else:
        lo = maps.min(axis=axes, keepdims=True)
        hi = maps.max(axis=axes, keepdims=True)
        span = np.where(hi > lo, hi - lo, 1.0)
        u = np.clip((maps - lo) / span, 0.0, 1.0)
    out = lut[np.round(u * 255).astype(np.intp)]
    return out[0] if single else out


def _as_gray_unit(x: Any) -> np.ndarray:
    """Input images -> (N, H, W) grey in [0, 1] (uint8 / 255, floats rescaled to their range if outside)."""
    a = np.asarray(x)
    if a.dtype == np.uint8:
        maps, _ = _as_maps(a.astype(np.float64) / 255.0, "x")
        if np.asarray(x).ndim == 4:
            maps = maps / np.asarray(x).shape[1]
        return maps
    maps, _ = _as_maps(a, "x")
    if a.ndim == 4:
        maps = maps / a.shape[1]  # mean over channels
    if maps.size and (maps.min() < 0 or maps.max() > 1):
        lo = maps.min(axis=(1, 2), keepdims=True)
        hi = maps.max(axis=(1, 2), keepdims=True)
        maps = (maps - lo) / np.where(hi > lo, hi - lo, 1.0)
    return maps


def overlay(x: Any, R: Any, cmap: str = "bwr", alpha: float = 0.6, symmetric: bool = True) -> np.ndarray:
    """Blend heatmaps over their inputs: ``(1 - a) * grey(x) + a * colour(R)`` with ``a = alpha * |R|/max|R|``.

    Parameters
    ----------
    x : input images (H, W), (N, H, W) or (N, C, H, W); uint8 or float (shown as grey)
    R : relevance of the same spatial shape
    alpha : opacity of the strongest relevance, in [0, 1]

    Returns
    -------
    uint8 (H, W, 3) or (N, H, W, 3)
    """
    single = np.asarray(R).ndim == 2
    gray = _as_gray_unit(x)
    maps, _ = _as_maps(R, "R")
    if gray.shape != maps.shape:
        raise ShapeError(f"overlay: x {gray.shape[1:]} and R {maps.shape[1:]} differ in spatial shape "
                         f"(or batch: {gray.shape[0]} vs {maps.shape[0]})")
    if not 0.0 <= float(alpha) <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha!r}")
    colour = to_rgb(maps, cmap=cmap, symmetric=symmetric).astype(np.float64)
    m = np.max(np.abs(maps), axis=(1, 2), keepdims=True)
    a = float(alpha) * np.abs(maps) / np.where(m > 0, m, 1.0)
    out = (1.0 - a[..., None]) * (gray[..., None] * 255.0) + a[..., None] * colour
    out = np.clip(np.round(out), 0, 255).astype(np.uint8)
    return out[0] if single else out


def _as_image(img: Any, what: str = "image") -> np.ndarray:
    """An (H, W) or (H, W, 3) uint8 image; floats in [0, 1] are scaled by 255."""
    a = np.asarray(img)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ShapeError(f"{what} must be (H, W) grey or (H, W, 3) RGB, got shape {a.shape}")
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if min(a.shape[:2]) < 1:
        raise ShapeError(f"{what} is empty (shape {a.shape})")
    if a.dtype == np.uint8:
        return np.ascontiguousarray(a)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or a.min() < 0 or a.max() > 1:
            raise InputError(f"float {what} must have values in [0, 1]")
        return np.round(a * 255).astype(np.uint8)
    raise InputTypeError(f"{what} must be uint8 or float in [0, 1], got dtype {a.dtype}")


def grid(images: Any, ncols: int | None = None, pad: int = 2, pad_value: int | Sequence[int] = 255,
         labels: Sequence[str] | None = None, label_scale: int | None = None) -> np.ndarray:
    """Tile images row by row into one image.

    Parameters
    ----------
    images : sequence (or array) of (H, W) / (H, W, 3) uint8 images, all the same size; grey
        images are converted to RGB when any image is RGB
    ncols : images per row (default: all in one row)
    pad : pixels between and around the tiles
    pad_value : grey level or RGB colour of the padding
    labels : column titles, drawn above the columns (black on white, built-in 5x7 pixel font,
        see :func:`text_mask`); labels wider than a column are cut
    label_scale : the font's pixel size (default: the largest of 1-3 at which every label fits)

    Returns
    -------
    uint8 (rows*(H+pad)+pad, ncols*(W+pad)+pad[, 3]), with ``labels`` a header strip on top
    """
    items = [_as_image(im, f"image {i}") for i, im in enumerate(images)]
    if not items:
        raise ShapeError("grid needs at least one image")
    rgb = any(im.ndim == 3 for im in items)
    if rgb:
        items = [np.repeat(im[:, :, None], 3, axis=2) if im.ndim == 2 else im for im in items]
    h, w = items[0].shape[:2]
    for i, im in enumerate(items):
        if im.shape[:2] != (h, w):
            raise ShapeError(f"grid: image {i} is {im.shape[0]}x{im.shape[1]}, image 0 is {h}x{w}")
    ncols = len(items) if ncols is None else int(ncols)
    if ncols < 1:
        raise ShapeError(f"ncols must be >= 1, got {ncols}")
    if pad < 0:
        raise ShapeError(f"pad must be >= 0, got {pad}")
    nrows = -(-len(items) // ncols)
    shape = (nrows * (h + pad) + pad, ncols * (w + pad) + pad) + ((3,) if rgb else ())
    out = np.empty(shape, dtype=np.uint8)
    out[...] = np.asarray(pad_value, dtype=np.uint8) if rgb or np.ndim(pad_value) == 0 else pad_value[0]
    for k, im in enumerate(items):
        r, c = divmod(k, ncols)
        y0, x0 = pad + r * (h + pad), pad + c * (w + pad)
        out[y0:y0 + h, x0:x0 + w] = im
    if labels is not None:
        out = np.concatenate([_label_row(labels, ncols, w, pad, shape[1], rgb, pad_value, label_scale), out],
                             axis=0)
    return out


# ----------------------------------------------------------------------------------- text labels

# A 5x7 bitmap font (no font files needed): 7 rows of 5 pixels per character, '#' = ink.
_FONT: dict[str, str] = {
    " ": "..... ..... ..... ..... ..... ..... .....",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.", "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####", "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.", "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.", "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.", "9": ".###. #...# #...# .#### ....# ...#. .##..",
    "A": ".###. #...# #...# ##### #...# #...# #...#", "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.", "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####", "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####", "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.", "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#", "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#", "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.", "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#", "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.", "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.", "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.", "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# #...# .#.#. ..#.. ..#.. ..#..", "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "a": "..... ..... .###. ....# .#### #...# .####", "b": "#.... #.... #.##. ##..# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.", "d": "....# ....# .##.# #..## #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.", "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... .#### #...# #...# .#### ....# .###.", "h": "#.... #.... #.##. ##..# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.", "j": "...#. ..... ..##. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.", "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #...# #...#", "n": "..... ..... #.##. ##..# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.", "p": "..... ..... ####. #...# ####. #.... #....",
    "q": "..... ..... .##.# #..## .#### ....# ....#", "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .###. #.... .###. ....# ####.", "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#", "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.", "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# .#### ....# .###.", "z": "..... ..... ##### ...#. ..#.. .#... #####",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....", "-": "..... ..... ..... ##### ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..", ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    "_": "..... ..... ..... ..... ..... ..... #####", "=": "..... ..... ##### ..... ##### ..... .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.", ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "/": "..... ....# ...#. ..#.. .#... #.... .....", "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..", "²": ".##.. ...#. ..#.. .###. ..... ..... .....",
}
_GLYPH_W, _GLYPH_H = 5, 7


def _glyph(ch: str) -> np.ndarray:
    rows = _FONT.get(ch, _FONT["?"]).split()
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """``text`` rendered with a built-in 5x7 pixel font: a boolean (7*scale, (6*len - 1)*scale) mask,
    True = ink. Covers A-Z, a-z, 0-9, space and ``+-.:_=()/%?²``; other characters are drawn as ``?``."""
    scale = int(scale)
    if scale < 1:
        raise InputError(f"scale must be >= 1, got {scale}")
    if not text:
        return np.zeros((_GLYPH_H * scale, 0), dtype=bool)
    gap = np.zeros((_GLYPH_H, 1), dtype=bool)
    parts: list[np.ndarray] = []
    for i, ch in enumerate(text):
        if i:
            parts.append(gap)
        parts.append(_glyph(ch))
    return upscale(np.concatenate(parts, axis=1), scale)


def upscale(image: Any, k: int) -> np.ndarray:
    """``image`` (H, W, ...) enlarged ``k`` times in each direction by pixel repetition (nearest)."""
    k = int(k)
    if k < 1:
        raise InputError(f"scale must be an integer >= 1, got {k}")
    a = np.asarray(image)
    if a.ndim < 2:
        raise ShapeError(f"image must be (H, W[, C]), got shape {a.shape}")
    return np.repeat(np.repeat(a, k, axis=0), k, axis=1) if k > 1 else a


def _label_row(labels: Sequence[str], ncols: int, w: int, pad: int, width: int, rgb: bool,
               pad_value: Any, scale: int | None) -> np.ndarray:
    """The header strip of :func:`grid`: a white cell above each column with its label in black."""
    texts = [str(t) for t in labels][:ncols]
    longest = max((len(t) for t in texts), default=1) or 1
    fit = max(1, (w - 2) // max(1, 6 * longest - 1))  # the largest font scale at which every label fits
    s = max(1, min(fit, 3) if scale is None else int(scale))
    cell_h = _GLYPH_H * s + 2 * s + 2
    shape = (pad + cell_h, width) + ((3,) if rgb else ())
    out = np.empty(shape, dtype=np.uint8)
    out[...] = np.asarray(pad_value, dtype=np.uint8) if rgb or np.ndim(pad_value) == 0 else pad_value[0]
    chars = max(1, (w + s) // (6 * s))  # labels wider than a column are cut
    for c, t in enumerate(texts):
        x0 = pad + c * (w + pad)
        out[pad:pad + cell_h, x0:x0 + w] = 255
        m = text_mask(t[:chars], s)
        if m.shape[1] == 0:
            continue
        tw = min(m.shape[1], w)
        dx = x0 + (w - tw) // 2
        dy = pad + (cell_h - m.shape[0]) // 2
        region = out[dy:dy + m.shape[0], dx:dx + tw]
        region[m[:, :tw]] = 0
    return out


# ---------------------------------------------------------------------------------------- PNG


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _encode_png(img: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) grey or (H, W, 3) RGB uint8 image: 8 bits, no interlace, filter 0."""
    h, w = img.shape[:2]
    colour_type = 2 if img.ndim == 3 else 0
    rows = img.reshape(h, -1)
    raw = np.concatenate([np.zeros((h, 1), dtype=np.uint8), rows], axis=1).tobytes()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 6))
            + _chunk(b"IEND", b""))


def save_png(path: str | os.PathLike[str], image: Any, writer: str = "auto") -> str:
    """Write an image as PNG.

    Parameters
    ----------
    path : file to write (parent directory must exist)
    image : (H, W) grey or (H, W, 3) RGB, uint8 or float in [0, 1] (e.g. from :func:`to_rgb`, :func:`grid`)
    writer : ``"auto"`` (Pillow if installed, else built-in), ``"pillow"`` or ``"builtin"``

    Returns
    -------
    str, the path written
    """
    img = _as_image(image)
    p = os.fspath(path)
    if writer not in ("auto", "pillow", "builtin"):
        raise InputError(f"writer must be 'auto', 'pillow' or 'builtin', got {writer!r}")
    if writer in ("auto", "pillow"):
        try:
            from PIL import Image
        except ImportError:
            if writer == "pillow":
                raise InputError("writer='pillow' needs Pillow: pip install 'deeptaylor[image]'") from None
        else:
            Image.fromarray(img).save(p, format="PNG")
            return p
    with open(p, "wb") as fh:
        fh.write(_encode_png(img))
    return p


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


#: Largest image :func:`read_png` decodes (pixels): 4096 x 4096. Pillow refuses decompression bombs
#: beyond ``Image.MAX_IMAGE_PIXELS`` (about 89 million); this pure-Python reader is slower, so its limit
#: is lower. Pass ``max_pixels`` to raise it.
MAX_PNG_PIXELS = 4096 * 4096


def read_png(path: str | os.PathLike[str], max_pixels: int | None = MAX_PNG_PIXELS) -> np.ndarray:
    """Decode an 8-bit, non-interlaced grey / grey+alpha / RGB / RGBA PNG (alpha dropped), checking CRCs.

    A dependency-free reader for what :func:`save_png` and most tools write; other PNG variants
    (palette, 16-bit, interlaced) raise :class:`~deeptaylor.errors.InputError` - use Pillow for those.
    An image of more than ``max_pixels`` pixels (default :data:`MAX_PNG_PIXELS`; None: no limit) is
    refused from its header, before anything is decompressed, and the image data is never
    decompressed beyond the size the header declares (decompression bombs).

    Returns
    -------
    uint8 (H, W) grey or (H, W, 3) RGB
    """
    p = os.fspath(path)
    with open(p, "rb") as fh:
        data = fh.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise InputError(f"{p!r} is not a PNG file")
    pos, idat, ihdr = 8, [], None
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if len(body) != length or pos + 12 + length > len(data):
            raise InputError(f"{p!r}: truncated PNG chunk {kind!r}")
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        if zlib.crc32(kind + body) & 0xFFFFFFFF != crc:
            raise InputError(f"{p!r}: bad CRC in PNG chunk {kind!r}")
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if ihdr is None or not idat:
        raise InputError(f"{p!r}: PNG without IHDR or IDAT")
    w, h, depth, ctype, _, _, interlace = ihdr
    channels = {0: 1, 2: 3, 4: 2, 6: 4}.get(ctype)
    if depth != 8 or channels is None or interlace != 0:
        raise InputError(f"{p!r}: only 8-bit non-interlaced grey/RGB(A) PNGs are supported without Pillow "
                         f"(bit depth {depth}, colour type {ctype}, interlace {interlace})")
    if w < 1 or h < 1:
        raise InputError(f"{p!r}: PNG of size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        raise InputError(f"{p!r}: PNG of {w}x{h} = {w * h} pixels is beyond the reader's limit of {max_pixels} "
                         "pixels (a decompression bomb?); pass max_pixels to read it anyway, or use Pillow")
    stride = w * channels
    expected = h * (stride + 1)
    try:
        d = zlib.decompressobj()
        raw = np.frombuffer(d.decompress(b"".join(idat), expected + 1), dtype=np.uint8)
    except zlib.error as exc:
        raise InputError(f"{p!r}: corrupt PNG image data ({exc})") from None
    if raw.size != h * (stride + 1):
        raise InputError(f"{p!r}: PNG image data has {raw.size} bytes, expected {h * (stride + 1)}")
    rows = raw.reshape(h, stride + 1)
    out = np.zeros((h, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(h):
        ftype, line = rows[y, 0], rows[y, 1:].copy()
        if ftype == 1:  # Sub: a running sum per channel, modulo 256
            line = (np.cumsum(line.reshape(w, channels).astype(np.int64), axis=0) & 0xFF).astype(np.uint8).reshape(-1)
        elif ftype == 3 or ftype == 4:  # depend on the reconstructed left neighbour: per pixel
            for x in range(stride):
                left = line[x - channels] if x >= channels else 0
                if ftype == 3:
                    line[x] = (int(line[x]) + (int(left) + int(prev[x])) // 2) & 0xFF
                else:
                    ul = prev[x - channels] if x >= channels else 0
                    line[x] = (int(line[x]) + _paeth(int(left), int(prev[x]), int(ul))) & 0xFF
        elif ftype == 2:
            line = (line.astype(np.uint16) + prev).astype(np.uint8)
        elif ftype != 0:
            raise InputError(f"{p!r}: bad PNG filter type {ftype} in row {y}")
        out[y] = line
        prev = line
    img = out.reshape(h, w, channels)
    if channels in (1, 2):
        return img[:, :, 0].copy()
    return img[:, :, :3].copy()
