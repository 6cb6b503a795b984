"""Colour maps, overlays, grids and PNG files (built-in writer/reader and Pillow)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

import deeptaylor as dt
from deeptaylor import heatmap as hm


@pytest.mark.parametrize(("cmap", "neg", "mid", "pos"), [
    ("bwr", (0, 0, 255), (255, 255, 255), (255, 0, 0)),
    ("seismic", (0, 0, 77), (255, 255, 255), (128, 0, 0)),
    ("coldnhot", (0, 255, 255), (0, 0, 0), (255, 255, 255)),
    ("gray", (0, 0, 0), (128, 128, 128), (255, 255, 255)),
])
def test_known_values_map_to_known_colours(cmap, neg, mid, pos):
    rgb = hm.to_rgb(np.array([[-2.0, 0.0, 2.0]]), cmap=cmap)
    assert rgb.shape == (1, 3, 3)
    assert rgb.dtype == np.uint8
    assert [tuple(int(v) for v in c) for c in rgb[0]] == [neg, mid, pos]


def test_colour_tables_are_monotone_ramps():
    bwr = hm.colormap("bwr")
    assert bwr.shape == (256, 3)
    assert np.all(np.diff(bwr[:129, 0].astype(int)) >= 0)
    assert np.all(np.diff(bwr[128:, 1].astype(int)) <= 0)
    gray = hm.colormap("gray")
    np.testing.assert_array_equal(gray[:, 0], np.arange(256))
    hot = hm.colormap("coldnhot")  # the zennit anchors: blue at 64, red at 170, yellow at 212
    assert tuple(hot[64]) == (0, 0, 255)
    assert tuple(hot[170]) == (255, 0, 0)
    assert tuple(hot[212]) == (255, 255, 0)


def test_scaling_options():
    r = np.array([[[0.0, 1.0]], [[0.0, 4.0]]])  # (N=2, H=1, W=2)
    per_image = hm.to_rgb(r, cmap="gray")
    assert per_image[0, 0, 1, 0] == per_image[1, 0, 1, 0] == 255
    shared = hm.to_rgb(r, cmap="gray", per_image=False)
    assert shared[0, 0, 1, 0] == round((1 / 4 + 1) / 2 * 255)
    assert shared[1, 0, 1, 0] == 255
    fixed = hm.to_rgb(r, cmap="gray", vmax=8.0)
    assert fixed[1, 0, 1, 0] == round((0.5 + 1) / 2 * 255)
    lin = hm.to_rgb(np.array([[2.0, 3.0, 4.0]]), cmap="gray", symmetric=False)
    assert lin[0, :, 0].tolist() == [0, 128, 255]
    assert np.all(hm.to_rgb(np.zeros((3, 3))) == 255)  # zero relevance: the middle colour (white)
    chan = hm.to_rgb(np.ones((2, 3, 4, 5)))  # (N, C, H, W): channels summed
    assert chan.shape == (2, 4, 5, 3)


def test_bad_inputs():
    with pytest.raises(dt.InputError, match="unknown colour map"):
        hm.to_rgb(np.zeros((2, 2)), cmap="jet")
    with pytest.raises(dt.InputError, match="NaN"):
        hm.to_rgb(np.array([[np.nan]]))
    with pytest.raises(dt.ShapeError):
        hm.to_rgb(np.zeros(5))
    with pytest.raises(dt.ShapeError, match="spatial"):
        hm.overlay(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(dt.ShapeError, match="image 1"):
        hm.grid([np.zeros((2, 2), np.uint8), np.zeros((3, 2), np.uint8)])


def test_overlay_and_grid(rng):
    x = rng.uniform(0, 1, (2, 5, 6))
    r = np.zeros((2, 5, 6))
    out = hm.overlay(x, r)
    assert out.shape == (2, 5, 6, 3)
    # zero relevance leaves the grey input untouched
    np.testing.assert_array_equal(out[..., 0], np.round(x * 255).astype(np.uint8))
    r[0, 1, 1] = 3.0
    out = hm.overlay(x, r, alpha=1.0)
    assert tuple(out[0, 1, 1]) == (255, 0, 0)
    g = hm.grid([out[0], out[1], np.zeros((5, 6), np.uint8)], ncols=2, pad=1, pad_value=7)
    assert g.shape == (2 * 6 + 1, 2 * 7 + 1, 3)
    np.testing.assert_array_equal(g[1:6, 1:7], out[0])
    np.testing.assert_array_equal(g[1:6, 8:14], out[1])
    np.testing.assert_array_equal(g[7:12, 1:7], 0)
    assert np.all(g[0] == 7)
    assert np.all(g[7:12, 8:14] == 7)


def test_upscale_repeats_pixels():
    img = np.arange(6, dtype=np.uint8).reshape(2, 3)
    big = hm.upscale(img, 3)
    assert big.shape == (6, 9)
    np.testing.assert_array_equal(big[::3, ::3], img)
    np.testing.assert_array_equal(big[2, 3:6], [1, 1, 1])
    rgb = hm.upscale(np.zeros((2, 3, 3), np.uint8), 2)
    assert rgb.shape == (4, 6, 3)
    assert hm.upscale(img, 1) is img
    with pytest.raises(dt.InputError, match="scale"):
        hm.upscale(img, 0)


def test_text_mask_font():
    one = hm.text_mask("1")
    assert one.shape == (7, 5)
    assert one.dtype == np.bool_
    assert ["".join("#" if v else "." for v in row) for row in one] == [
        "..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."]
    two = hm.text_mask("z+", scale=2)
    assert two.shape == (14, 22)  # (6 * 2 - 1) columns of 2x2 pixels
    np.testing.assert_array_equal(two[::2, ::2], hm.text_mask("z+"))
    assert not two[:, 10:12].any()  # the gap between the glyphs
    np.testing.assert_array_equal(hm.text_mask("\u263a"), hm.text_mask("?"))  # unknown characters
    assert hm.text_mask("").shape == (7, 0)
    # every glyph is 7 rows of 5 and distinct
    masks = {ch: hm.text_mask(ch).tobytes() for ch in hm._FONT}
    assert len(set(masks.values())) == len(masks)


def test_grid_column_labels():
    tiles = [np.full((20, 40, 3), 200, np.uint8) for _ in range(4)]
    plain = hm.grid(tiles, ncols=2, pad=2, pad_value=128)
    g = hm.grid(tiles, ncols=2, pad=2, pad_value=128, labels=["input", "zB"])
    assert g.shape[1] == plain.shape[1]
    head = g.shape[0] - plain.shape[0]
    assert head > 7
    np.testing.assert_array_equal(g[head:], plain)
    # a white cell above each column, black text inside, padding colour between the cells
    cell0 = g[2:head, 2:42]
    cell1 = g[2:head, 44:84]
    for cell, text in ((cell0, "input"), (cell1, "zB")):
        ink = np.all(cell == 0, axis=2)
        assert ink.any()
        assert np.all((cell == 0) | (cell == 255))
        ys, xs = np.nonzero(ink)
        s = (ys.max() - ys.min() + 1) // 7
        crop = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        ref = hm.text_mask(text, s)
        ref = ref[:, np.any(ref, axis=0).nonzero()[0].min():np.any(ref, axis=0).nonzero()[0].max() + 1]
        np.testing.assert_array_equal(crop, ref[np.any(ref, axis=1)])
    assert np.all(g[2:head, 42:44] == 128)
    # labels wider than a column are cut; grey grids get grey labels
    narrow = hm.grid([np.zeros((5, 12), np.uint8)] * 2, labels=["sensitivity", "w2"], pad=1)
    assert narrow.ndim == 2
    assert narrow.shape[1] == 2 * 13 + 1


def _images(rng):
    return [rng.integers(0, 256, (9, 13, 3), dtype=np.uint8), rng.integers(0, 256, (7, 5), dtype=np.uint8)]


def test_builtin_png_roundtrip(tmp_path, rng):
    for i, img in enumerate(_images(rng)):
        path = hm.save_png(tmp_path / f"a{i}.png", img, writer="builtin")
        np.testing.assert_array_equal(hm.read_png(path), img)
    f = np.linspace(0, 1, 12).reshape(3, 4)
    hm.save_png(tmp_path / "f.png", f, writer="builtin")
    np.testing.assert_array_equal(hm.read_png(tmp_path / "f.png"), np.round(f * 255).astype(np.uint8))


def test_builtin_png_decodes_in_pillow(tmp_path, rng):
    Image = pytest.importorskip("PIL.Image")
    for i, img in enumerate(_images(rng)):
        hm.save_png(tmp_path / f"b{i}.png", img, writer="builtin")
        with Image.open(tmp_path / f"b{i}.png") as im:
            im.load()  # verifies CRCs and zlib stream
            np.testing.assert_array_equal(np.asarray(im), img)
        hm.save_png(tmp_path / f"c{i}.png", img, writer="pillow")
        np.testing.assert_array_equal(hm.read_png(tmp_path / f"c{i}.png"), img)


def _filtered_png(img: np.ndarray, ftype: int) -> bytes:
    """An RGB PNG whose rows all use PNG filter ``ftype`` (encoder written from the PNG spec)."""
    h, w, c = img.shape
    rows = img.reshape(h, w * c).astype(np.int32)
    out = bytearray()
    for y in range(h):
        prev = rows[y - 1] if y else np.zeros(w * c, np.int32)
        cur = rows[y]
        left = np.concatenate([np.zeros(c, np.int32), cur[:-c]])
        ul = np.concatenate([np.zeros(c, np.int32), prev[:-c]])
        if ftype == 0:
            pred = np.zeros_like(cur)
        elif ftype == 1:
            pred = left
        elif ftype == 2:
            pred = prev
        elif ftype == 3:
            pred = (left + prev) // 2
        else:
            p = left + prev - ul
            pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - ul)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, ul))
        out.append(ftype)
        out += ((cur - pred) % 256).astype(np.uint8).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(out))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("ftype", [0, 1, 2, 3, 4])
def test_reader_handles_every_filter(tmp_path, rng, ftype):
    img = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    (tmp_path / "f.png").write_bytes(_filtered_png(img, ftype))
    np.testing.assert_array_equal(hm.read_png(tmp_path / "f.png"), img)


def test_reader_rejects_corruption(tmp_path, rng):
    data = bytearray(hm._encode_png(rng.integers(0, 256, (4, 4), dtype=np.uint8)))
    (tmp_path / "x.png").write_bytes(b"GIF89a")
    with pytest.raises(dt.InputError, match="not a PNG"):
        hm.read_png(tmp_path / "x.png")
    data[40] ^= 0xFF  # inside IDAT
    (tmp_path / "y.png").write_bytes(bytes(data))
    with pytest.raises(dt.InputError, match="CRC"):
        hm.read_png(tmp_path / "y.png")
