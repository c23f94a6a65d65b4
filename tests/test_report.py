"""Tests for patchgpt.report: every helper writes a readable PNG, grid sizes follow the formula."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from patchgpt.files import atomic_open, atomic_write_bytes, atomic_write_text
from patchgpt.report import (
    image_grid,
    save_confusion,
    save_curves,
    save_grid,
    save_rows,
)


def _png(path, mode=None):
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 0 and img.height > 0
        if mode:
            assert img.mode == mode
        img.load()
        return img.size


def _no_tmp(tmp_path):
    assert not list(tmp_path.glob("*.tmp"))


def test_curves(tmp_path):
    series = {"train": [(i, 2.0 / (i + 1)) for i in range(50)], "val": [(i * 10, 1.5 - i * 0.1) for i in range(5)]}
    out = save_curves(tmp_path / "loss.png", series, title="loss", log_y=True)
    assert _png(out, "RGB") == (640, 400)
    _no_tmp(tmp_path)


def test_curves_nan_single_point_and_empty(tmp_path):
    nan = [(0, float("nan")), (1, 1.0), (2, math.inf), (3, 0.5)]
    _png(save_curves(tmp_path / "nan.png", {"a": nan, "b": [(5, 3.0)]}), "RGB")
    _png(save_curves(tmp_path / "one.png", {"only": [(0, 0.0)]}, log_y=True), "RGB")
    _png(save_curves(tmp_path / "empty.png", {}), "RGB")
    _png(save_curves(tmp_path / "empty2.png", {"x": []}), "RGB")
    _no_tmp(tmp_path)


@pytest.mark.parametrize("n", [2, 3, 60, 100])
def test_confusion(tmp_path, n):
    rng = np.random.default_rng(0)
    m = rng.integers(0, 50, size=(n, n)) + np.eye(n, dtype=np.int64) * 500
    classes = [f"class_{i}" for i in range(n)]
    matrix = m.tolist() if n == 3 else m
    _png(save_confusion(tmp_path / f"cm{n}.png", matrix, classes, title="cm"), "RGB")
    _no_tmp(tmp_path)


def test_confusion_all_zero(tmp_path):
    _png(save_confusion(tmp_path / "zero.png", [[0, 0], [0, 0]], ["a", "a very long class name indeed"]))


def test_grid_size_formula():
    images = torch.rand(6, 3, 8, 8) * 2 - 1
    img = image_grid(images, nrow=3, pad=1, scale=2)
    # width = cols*W*scale + (cols+1)*pad = 3*16 + 4; height = rows*H*scale + (rows+1)*pad = 2*16 + 3
    assert img.size == (52, 35) and img.mode == "RGB"
    assert image_grid(np.zeros((5, 1, 4, 6)), nrow=2, pad=0).size == (12, 12)
    assert image_grid(np.zeros((2, 1, 4, 4)), nrow=8, pad=2).size == (2 * 4 + 3 * 2, 4 + 2 * 2)


def test_grid_values_clamp_and_channels():
    x = np.full((1, 1, 2, 2), 5.0)
    x[0, 0, 0, 0] = -3.0
    a = np.asarray(image_grid(x, nrow=1, pad=1, scale=3))
    assert a.shape == (8, 8, 3)
    assert (a[0] == 128).all()  # grey padding
    assert (a[1:4, 1:4] == 0).all() and (a[4:7, 4:7] == 255).all()  # clamped, nearest-neighbour scale
    assert image_grid(torch.zeros(3, 4, 5, 5), nrow=3).mode == "RGBA"
    with pytest.raises(ValueError):
        image_grid(np.zeros((1, 2, 4, 4)), nrow=1)


def test_save_grid(tmp_path):
    out = save_grid(tmp_path / "sub" / "grid.png", torch.rand(6, 3, 8, 8) * 2 - 1, nrow=3, scale=2)
    assert _png(out, "RGB") == (52, 35)
    _no_tmp(tmp_path / "sub")


def test_save_rows(tmp_path):
    rows = [("original", torch.zeros(4, 3, 8, 8)), ("prediction", np.ones((3, 1, 8, 8)))]
    out = save_rows(tmp_path / "rows.png", rows, scale=2)
    w, h = _png(out, "RGB")
    assert w > 4 * 16 + 5 and h >= 2 * (16 + 2)
    _no_tmp(tmp_path)


def test_atomic_writes(tmp_path):
    p = atomic_write_text(tmp_path / "a.txt", "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_text(p, "again")
    assert p.read_text() == "again"
    q = atomic_write_bytes(str(tmp_path / "b.bin"), b"\x00\x01")
    assert q.read_bytes() == b"\x00\x01"
    _no_tmp(tmp_path)
    with pytest.raises(RuntimeError):   # a writer that fails half-way leaves the old file and no temp file
        with atomic_open(p) as f:
            f.write(b"half")
            raise RuntimeError("killed")
    assert p.read_text() == "again"
    _no_tmp(tmp_path)
