"""Pictures for run reports, drawn with Pillow only: loss curves, confusion matrices, image grids.

Every file is written atomically (`patchgpt.files`), so a reader never sees a half-written picture.
These are drawing primitives; each task composes its own pictures from them (``Task.report``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .files import atomic_open

if TYPE_CHECKING:
    import torch

    Images = torch.Tensor | np.ndarray

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
GREY = 128


def _save_png(path: str | Path, img: Image.Image) -> Path:
    with atomic_open(path) as f:
        img.save(f, format="PNG")
    return Path(path)


def _font(size: int = 11) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return int(right - left), int(bottom - top)


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _span(values: list[float]) -> tuple[float, float]:
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    return lo, hi


def save_curves(path: str | Path, series: dict[str, list[tuple[float, float]]], title: str = "",
                xlabel: str = "step", ylabel: str = "loss", log_y: bool = False) -> Path:
    """Draw named (x, y) series as a 640x400 line chart with ticks and a legend; returns the path.

    Non-finite y values are skipped (with ``log_y`` so are y <= 0, and y is plotted as log10).
    A series with one point is drawn as a dot; empty input still gives a picture with axes.
    """
    width, height, left, right, top, bottom = 640, 400, 70, 20, 36, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = _font(11)
    clean: dict[str, list[tuple[float, float]]] = {}
    for name, pts in series.items():
        keep = [(float(x), float(y)) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        clean[name] = [(x, math.log10(y)) for x, y in keep if y > 0] if log_y else keep
    xlo, xhi = _span([x for pts in clean.values() for x, _ in pts])
    ylo, yhi = _span([y for pts in clean.values() for _, y in pts])
    x0, x1, y0, y1 = left, width - right, height - bottom, top

    def to_px(x: float, y: float) -> tuple[float, float]:
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y0 - (y - ylo) / (yhi - ylo) * (y0 - y1)

    for t in _nice_ticks(xlo, xhi):
        px = to_px(t, ylo)[0]
        draw.line((px, y0, px, y0 + 4), fill="black")
        draw.text((px, y0 + 6), f"{t:.4g}", fill="black", font=font, anchor="mt")
    for t in _nice_ticks(ylo, yhi):
        py = to_px(xlo, t)[1]
        draw.line((x0 - 4, py, x1, py), fill="#e0e0e0")
        draw.line((x0 - 4, py, x0, py), fill="black")
        draw.text((x0 - 6, py), f"{10 ** t if log_y else t:.4g}", fill="black", font=font, anchor="rm")
    draw.rectangle((x0, y1, x1, y0), outline="black")
    for i, (name, pts) in enumerate(clean.items()):
        colour = PALETTE[i % len(PALETTE)]
        xy = [to_px(x, y) for x, y in sorted(pts)]
        if len(xy) == 1:
            px, py = xy[0]
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        elif xy:
            draw.line(xy, fill=colour, width=2)
        ly = y1 + 8 + 14 * i  # legend, top-right inside the plot
        draw.line((x1 - 110, ly, x1 - 90, ly), fill=colour, width=3)
        draw.text((x1 - 85, ly), name, fill="black", font=font, anchor="lm")
    draw.text((width / 2, 10), title, fill="black", font=_font(14), anchor="mt")
    draw.text(((x0 + x1) / 2, height - 8), xlabel, fill="black", font=font, anchor="ms")
    ylab = Image.new("RGBA", (_text_size(draw, ylabel, font)[0] + 4, 16), (255, 255, 255, 0))
    ImageDraw.Draw(ylab).text((2, 2), ylabel, fill="black", font=font)
    ylab = ylab.rotate(90, expand=True)
    img.paste(ylab, (4, (y0 + y1 - ylab.height) // 2), ylab)
    return _save_png(path, img)


def _paste_rotated(img: Image.Image, text: str, font: Any, xy: tuple[int, int], fill: str = "black") -> None:
    """Paste ``text`` rotated 90 degrees (reading upwards) with its bottom-centre at ``xy``."""
    w, h = _text_size(ImageDraw.Draw(img), text, font)
    label = Image.new("RGBA", (w + 4, h + 6), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2, 0), text, fill=fill, font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (xy[0] - label.width // 2, xy[1] - label.height), label)


def save_confusion(path: str | Path, matrix: list[list[int]] | np.ndarray, classes: list[str],
                   title: str = "") -> Path:
    """Draw a confusion matrix heat-map (rows = true class, columns = predicted); returns the path.

    Cell shade is the count divided by its row total (so rare classes show as clearly as common ones);
    counts are printed when they fit the cell, and class labels are thinned out when cells are small.
    """
    m = np.asarray(matrix, dtype=np.int64)
    n = m.shape[0]
    cell = max(4, min(48, 640 // max(n, 1)))
    font, small = _font(11), _font(max(8, min(12, cell // 3)))
    names = [c if len(c) <= 14 else c[:13] + "~" for c in classes]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([_text_size(probe, c, font)[0] for c in names] + [10]) + 8
    every = max(1, math.ceil(14 / cell))  # draw every k-th label so that 11-px text does not overlap
    left, top = label_w + 20, 40
    width, height = left + n * cell + 20, top + n * cell + label_w + 28
    img = Image.new("RGB", (max(width, 200), height), "white")
    draw = ImageDraw.Draw(img)
    rows = m.sum(axis=1, keepdims=True).clip(min=1)
    shade = m / rows
    fits = max(_text_size(draw, str(v), small)[0] for v in m.flat) + 4 <= cell if n else False
    for i in range(n):
        for j in range(n):
            s = float(shade[i, j])
            colour = tuple(int(255 - s * (255 - c)) for c in (8, 48, 107))
            box = (left + j * cell, top + i * cell, left + (j + 1) * cell - 1, top + (i + 1) * cell - 1)
            draw.rectangle(box, fill=colour)
            if fits:
                centre = ((box[0] + box[2] + 1) / 2, (box[1] + box[3] + 1) / 2)
                draw.text(centre, str(m[i, j]), fill="white" if s > 0.5 else "black", font=small, anchor="mm")
    draw.rectangle((left - 1, top - 1, left + n * cell, top + n * cell), outline="black")
    for k in range(0, n, every):
        mid = left + k * cell + cell // 2
        draw.text((left - 4, top + k * cell + cell // 2), names[k], fill="black", font=font, anchor="rm")
        _paste_rotated(img, names[k], font, (mid, top + n * cell + 4 + _text_size(draw, names[k], font)[0]))
    draw.text((left + n * cell / 2, height - 6), "predicted", fill="black", font=font, anchor="ms")
    _paste_rotated(img, "true", font, (8, top + n * cell // 2 + 10))
    draw.text((img.width / 2, 10), title, fill="black", font=_font(14), anchor="mt")
    return _save_png(path, img)


def _to_uint8(images: Images) -> np.ndarray:
    """(N, C, H, W) floats in [-1, 1] (tensor or array) -> (N, H, W, 3 or 4) uint8."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().float().numpy()
    a = np.asarray(images, dtype=np.float32)
    if a.ndim == 3:  # (N, H, W): single channel
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] not in (1, 3, 4):
        raise ValueError(f"expected images of shape (N, C, H, W) with C in 1, 3, 4; got {a.shape}")
    a = np.round((np.clip(a, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    return np.repeat(a, 3, axis=3) if a.shape[3] == 1 else a


def image_grid(images: Images, nrow: int, pad: int = 1, scale: int = 1) -> Image.Image:
    """Tile images (N, C, H, W) in [-1, 1] into one picture, ``nrow`` per row, grey ``pad`` around each.

    With ``cols = min(nrow, N)`` and ``rows = ceil(N / cols)`` the result is exactly
    ``cols * W * scale + (cols + 1) * pad`` wide and ``rows * H * scale + (rows + 1) * pad`` high
    (padding between images and around the border). Mode is RGB, or RGBA when C = 4.
    """
    a = _to_uint8(images)
    n, h, w, c = a.shape
    if scale > 1:
        a = a.repeat(scale, axis=1).repeat(scale, axis=2)
    h, w = h * scale, w * scale
    cols = max(1, min(nrow, n))
    rows = max(1, math.ceil(n / cols))
    canvas = np.full((rows * h + (rows + 1) * pad, cols * w + (cols + 1) * pad, c), GREY, dtype=np.uint8)
    if c == 4:
        canvas[..., 3] = 255
    for k in range(n):
        y, x = pad + (k // cols) * (h + pad), pad + (k % cols) * (w + pad)
        canvas[y:y + h, x:x + w] = a[k]
    return Image.fromarray(canvas, "RGBA" if c == 4 else "RGB")


def save_grid(path: str | Path, images: Images, nrow: int, scale: int = 1, pad: int = 1) -> Path:
    """Save ``image_grid(images, nrow, pad, scale)`` as a PNG atomically; returns the path."""
    return _save_png(path, image_grid(images, nrow, pad=pad, scale=scale))


def save_rows(path: str | Path, rows: list[tuple[str, Images]], scale: int = 1) -> Path:
    """Save labelled rows of images (e.g. "original" / "prediction") as one RGB PNG; returns the path.

    Each row is ``(label, images (N, C, H, W))``: the label is drawn at the left, the images after it
    in a single line (``image_grid`` with ``nrow = N``).
    """
    font = _font(12)
    grids = [(label, image_grid(imgs, nrow=max(1, len(imgs)), scale=scale).convert("RGB"))
             for label, imgs in rows]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([_text_size(probe, label, font)[0] for label, _ in grids] + [0]) + 12
    heights = [max(g.height, 16) for _, g in grids]
    img = Image.new("RGB", (label_w + max([g.width for _, g in grids] + [1]), max(sum(heights), 1)), "white")
    draw = ImageDraw.Draw(img)
    y = 0
    for (label, grid), h in zip(grids, heights, strict=True):
        draw.text((6, y + h / 2), label, fill="black", font=font, anchor="lm")
        img.paste(grid, (label_w, y))
        y += h
    return _save_png(path, img)


_BOX_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]


def draw_boxes(image: Image.Image, boxes: list[list[float]], labels: list[str], classes: list[int] | None = None,
               dashed: bool = False, colour: str | None = None) -> Image.Image:
    """Draw xyxy pixel `boxes` with their `labels` on a copy of `image` (RGB), one colour per class
    (or all in `colour`); `dashed` for ground truth."""
    img = image.convert("RGB")
    draw = ImageDraw.Draw(img)
    font = _font(max(9, min(14, img.size[1] // 20)))
    for i, (box, text) in enumerate(zip(boxes, labels, strict=True)):
        col = colour or _BOX_COLOURS[(classes[i] if classes is not None else i) % len(_BOX_COLOURS)]
        x0, y0, x1, y1 = (float(v) for v in box)
        if dashed:
            for a, b in (((x0, y0), (x1, y0)), ((x1, y0), (x1, y1)), ((x1, y1), (x0, y1)), ((x0, y1), (x0, y0))):
                n = max(1, int(max(abs(b[0] - a[0]), abs(b[1] - a[1])) // 4))
                for k in range(0, n, 2):
                    p = (a[0] + (b[0] - a[0]) * k / n, a[1] + (b[1] - a[1]) * k / n)
                    q = (a[0] + (b[0] - a[0]) * (k + 1) / n, a[1] + (b[1] - a[1]) * (k + 1) / n)
                    draw.line([p, q], fill=col, width=1)
        else:
            draw.rectangle([x0, y0, x1, y1], outline=col, width=2)
        if text:
            tw, th = _text_size(draw, text, font)
            ty = y0 - th - 2 if y0 - th - 2 >= 0 else y0 + 1
            draw.rectangle([x0, ty, x0 + tw + 3, ty + th + 1], fill=col)
            draw.text((x0 + 2, ty), text, fill="white", font=font)
    return img


def save_boxes(path: str | Path, image: Image.Image, boxes: list[list[float]], labels: list[str],
               classes: list[int] | None = None) -> Path:
    """`draw_boxes` saved as a PNG atomically; returns the path."""
    return _save_png(path, draw_boxes(image, boxes, labels, classes))


def tensor_to_pil(image: Images, scale: int = 1) -> Image.Image:
    """One (C, H, W) image in [-1, 1] -> a Pillow image, upscaled `scale` times (nearest)."""
    img = image_grid(image[None], nrow=1, pad=0)
    return img.resize((img.size[0] * scale, img.size[1] * scale), Image.NEAREST) if scale > 1 else img


def save_detection_grid(path: str | Path, panels: list[Image.Image], ncol: int = 4, pad: int = 4) -> Path:
    """Tile equally sized RGB panels into one PNG (white gaps); returns the path."""
    w, h = panels[0].size
    cols = min(ncol, len(panels))
    rows = math.ceil(len(panels) / cols)
    sheet = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), "white")
    for i, p in enumerate(panels):
        r, c = divmod(i, cols)
        sheet.paste(p, (pad + c * (w + pad), pad + r * (h + pad)))
    return _save_png(path, sheet)


def save_panel_rows(path: str | Path, rows: list[tuple[str, list[Image.Image]]], pad: int = 4,
                    marks: list[list[str]] | None = None) -> Path:
    """Labelled rows of equally sized RGB panels (e.g. images with boxes drawn) as one PNG; returns the path.

    Each row is ``(label, panels)``: the label on a line of its own above the panels. `marks` (optional, one
    colour per panel, "" for none) draws a 4-pixel strip of that colour under each panel.
    """
    font = _font(12)
    w, h = next((p.size for _, panels in rows for p in panels), (1, 1))
    strip = 6 if marks else 0
    line = 16
    cols = max([len(panels) for _, panels in rows] + [1])
    row_h = line + h + strip + pad
    sheet = Image.new("RGB", (cols * w + (cols + 1) * pad, max(1, len(rows) * row_h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, panels) in enumerate(rows):
        y = pad + r * row_h
        draw.text((pad, y + line / 2), label, fill="black", font=font, anchor="lm")
        for c, p in enumerate(panels):
            x = pad + c * (w + pad)
            sheet.paste(p.convert("RGB"), (x, y + line))
            colour = marks[r][c] if marks and c < len(marks[r]) else ""
            if colour:
                draw.rectangle([x, y + line + h + 1, x + w - 1, y + line + h + strip - 2], fill=colour)
    return _save_png(path, sheet)


def save_text_grid(path: str | Path, images: Any, lines: list[list[tuple[str, str]]], scale: int = 1,
                   ncol: int = 4) -> Path:
    """A grid of images (each (C, H, W) in [-1, 1]), each above its own lines of text (``(text, colour)``,
    cut to fit the cell): captions, questions and answers under validation images. Written atomically."""
    pics = [tensor_to_pil(im.cpu(), scale).convert("RGB") for im in images]
    font = ImageFont.load_default()
    w, h = pics[0].size
    rows = max((len(t) for t in lines), default=0)
    cell_w, cell_h = max(w, 200), h + 4 + 15 * rows
    sheet = Image.new("RGB", (ncol * cell_w, math.ceil(len(pics) / ncol) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, pic in enumerate(pics):
        x, y = (k % ncol) * cell_w, (k // ncol) * cell_h
        sheet.paste(pic, (x + (cell_w - w) // 2, y))
        for i, (text, colour) in enumerate(lines[k]):
            draw.text((x + 2, y + h + 2 + 15 * i), text[:40], fill=colour, font=font)
    with atomic_open(path) as f:
        sheet.save(f, format="PNG")
    return Path(path)
