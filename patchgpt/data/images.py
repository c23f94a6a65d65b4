"""`folder:PATH`: the user's own images, decoded lazily with Pillow.

One subfolder per class gives a labelled set (class names = subfolder names, sorted); a flat folder gives
an unlabeled set (for pretraining). Every image is converted to the requested channels (grayscale, RGB,
RGBA; palette and transparent images are composited on white) and resized to a square by a documented
policy: ``crop`` (shorter side to S, then centre crop), ``stretch`` (to S x S, aspect ignored) or ``pad``
(longer side to S, then letterboxed on the edge colour of the padding, black).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .base import DataError, DataInfo, ImageSet, Item, skip_or_raise

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow image to 1 (L), 3 (RGB) or 4 (RGBA) channels; transparency goes onto white.

    16- and 32-bit integer grayscale is scaled to 8 bits (by 257 when it goes past 255); 32-bit float
    grayscale (mode F) is read as [0, 1] when it lies there (else as 0..255, clipped). A mode Pillow cannot
    convert, or non-finite float pixels, raise `DataError` (callers name the file: `load_converted`)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit (or 32-bit int) grayscale: Pillow's convert("L") clips at 255, so scale to 8 bits first.
        a = np.asarray(im, dtype=np.float64)
        if im.mode != "I" or a.max() > 255:
            a = a / 257.0
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    elif im.mode == "F":
        # Float grayscale: Pillow's convert("L") truncates, which turns a [0, 1] image black.
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise DataError("a float image with NaN or infinite pixels")
        if a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255.0
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    if channels == 4:
        return im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    if channels == 1:
        return im.convert("L")
    if channels == 3:
        return im.convert("RGB")
    raise DataError(f"data.channels={channels}: choose 1, 3 or 4")


def resize(im: Image.Image, size: int, policy: str) -> Image.Image:
    """Make `im` size x size by the policy crop | stretch | pad (bicubic resampling)."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    if policy == "stretch":
        return im.resize((size, size), Image.BICUBIC)
    if policy == "crop":
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        return im.crop((left, top, left + size, top + size))
    if policy in ("pad", "pad_white"):
        s = size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        white = {"L": 255, "RGB": (255, 255, 255), "RGBA": (255, 255, 255, 255)}.get(im.mode, 0)
        canvas = Image.new(im.mode, (size, size), white if policy == "pad_white" else 0)
        canvas.paste(im.resize((nw, nh), Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    raise DataError(f"data.resize={policy!r}: choose crop, stretch or pad")


def to_tensor(im: Image.Image) -> torch.Tensor:
    """A Pillow image -> (C, H, W) float in [-1, 1]."""
    a = np.asarray(im, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0   # (H, W, C) -> (C, H, W)


@contextmanager
def bomb_is_error() -> Iterator[None]:
    """Within the block Pillow's `DecompressionBombWarning` (an image over ``Image.MAX_IMAGE_PIXELS``, 89M
    pixels by default) is raised like its `DecompressionBombError` (over twice that): the limit is Pillow's."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def load_pil(path: str | Path) -> Image.Image:
    """Open and decode one image file with Pillow; a `DataError` names the file if it cannot.

    An image over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is refused before its
    pixels are decoded."""
    try:
        with bomb_is_error(), Image.open(path) as im:
            im.load()
            return im.copy() if im.mode not in ("P", "PA") else im.convert("RGBA")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: refused as a possible decompression bomb ({type(e).__name__}: {e}); Pillow's "
                        "limit is PIL.Image.MAX_IMAGE_PIXELS") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files (OSError, SyntaxError, ...)
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def load_converted(path: str | Path, channels: int) -> Image.Image:
    """`load_pil` then `to_mode`; a mode that cannot be converted is a `DataError` naming the file."""
    im = load_pil(path)
    try:
        return to_mode(im, channels)
    except DataError as e:
        if "data.channels" in str(e):
            raise
        raise DataError(f"{path}: cannot convert the {im.mode} image ({e})") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot convert the {im.mode} image ({type(e).__name__}: {e})") from None


def load_image(path: str | Path, channels: int, size: int, policy: str = "crop") -> torch.Tensor:
    """Read one image file as (C, size, size) in [-1, 1]; a `DataError` names the file if it cannot."""
    return to_tensor(resize(load_converted(path, channels), size, policy))


def list_images(root: Path, exts: set[str] = IMAGE_EXTS) -> list[Path]:
    """Files under `root` (recursively) whose extension is in `exts`, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def scan_class_folder(root: Path, exts: set[str], spec: str, what: str) -> tuple[list[str] | None, list]:
    """One subfolder per class (labelled), or a flat folder (unlabeled) -> (classes or None, [(path, label)]).

    Labels are indices into the sorted subfolder names (-1 when unlabeled); a missing folder or one with no
    file of `exts` is a one-line `DataError` naming ``spec:root``.
    """
    if not root.is_dir():
        raise DataError(f"{spec}:{root}: no such directory")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    top = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in exts]
    labelled = bool(subdirs) and not top
    if labelled:
        per_class = [list_images(d, exts) for d in subdirs]
        files = [(p, ci) for ci, found in enumerate(per_class) for p in found]
        empty = [d.name for d, found in zip(subdirs, per_class, strict=True) if not found]
        if files and empty:
            print(f"patchgpt: warning: {spec}:{root}: class folder(s) {', '.join(empty)} hold no {what}; they "
                  "stay classes with no examples", file=sys.stderr)
    else:
        files = [(p, -1) for p in list_images(root, exts)]
        if top and any(list_images(d, exts) for d in subdirs):
            print(f"patchgpt: warning: {spec}:{root}: {len(top)} {what} at the top level beside subfolders, so "
                  f"the subfolders are not classes: all {len(files)} {what} are read as unlabeled", file=sys.stderr)
    if not files:
        raise DataError(f"{spec}:{root}: no {what} found (extensions: {', '.join(sorted(exts))})")
    return ([d.name for d in subdirs] if labelled else None), files


class ImageFolder(ImageSet):
    """Images under `root`, decoded on access: items {"image": (C, S, S) in [-1, 1], "label"}.

    Unreadable files found while scanning (Pillow cannot identify or verify them) stop the run with one
    line naming the file (``on_error="stop"``) or are skipped and counted in ``info.skipped``
    (``on_error="skip"``). A file that fails later, at decode time, follows the same rule.
    """

    def __init__(self, root: str | Path, channels: int = 3, size: int = 32, resize: str = "crop",
                 on_error: str = "stop") -> None:
        root = Path(root).expanduser()
        classes, files = scan_class_folder(root, IMAGE_EXTS, "folder", "images")
        self.channels, self.size, self.policy, self.on_error = channels, size, resize, on_error
        skipped: list[str] = []
        self.files: list[tuple[Path, int]] = []
        for p, c in files:
            why = self._check(p)
            if why is None:
                self.files.append((p, c))
            elif on_error == "stop":
                raise DataError(f"{p}: cannot read image ({why}); set data.on_error=skip to skip such files")
            else:
                skipped.append(f"{p}: {why}")
        if skipped:
            print(f"patchgpt: skipped {len(skipped)} unreadable image(s) in {root}, e.g. {skipped[0]}",
                  file=sys.stderr)
        if not self.files:
            raise DataError(f"folder:{root}: every image was unreadable ({len(skipped)} skipped)")
        self.info = DataInfo(channels=channels, image_size=(size, size), classes=classes, skipped=skipped)

    @staticmethod
    def _check(path: Path) -> str | None:
        """None if Pillow can identify and verify `path`, else the reason (the pixels are not kept)."""
        try:
            with bomb_is_error(), Image.open(path) as im:
                im.verify()
            return None
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files (and bombs)
            return f"{type(e).__name__}: {e}"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Item | None:
        path, label = self.files[i]
        try:
            return {"image": load_image(path, self.channels, self.size, self.policy), "label": label}
        except DataError as e:
            skip_or_raise(self.info, self.on_error, e)
            return None

    def labels(self) -> torch.Tensor:
        return torch.tensor([c for _, c in self.files])
