"""`masks:PATH`: the user's segmentation data — ``images/`` and ``masks/`` with the same file stems.

A mask is a PNG label map (8-bit grayscale, or a palette PNG whose indices are the labels, as VOC and ADE20K
ship them) the size of its image: 0 is background, 1..K-1 the classes, 255 "ignore" (no loss, not scored).
Class names come from a ``classes.txt`` beside the two folders (one name per line, the first for label 0),
else they are the label values found in the masks ("0", "1", ...). The image and its mask are resized
together (``data.resize``; the mask by nearest neighbour, padding marked ignore).

Errors are one line naming the file: an image with no mask, a mask of another size than its image, a mask
that is not a single-channel label map, a label outside ``classes.txt``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..tokenizers.masks import IGNORE_LABEL
from .base import DataError, DataInfo, ImageSet, Item, skip_or_raise
from .images import IMAGE_EXTS, bomb_is_error, list_images, load_pil, resize, to_mode, to_tensor


def read_mask(path: Path) -> np.ndarray:
    """A label-map PNG -> (H, W) uint8 labels (palette indices, or 8-bit values); a `DataError` names the file
    if it is missing, unreadable, or not a single-channel label map."""
    try:
        with bomb_is_error(), Image.open(path) as im:
            im.load()
            mode, a = im.mode, np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"{path}: no such mask") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files
        raise DataError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from None
    if mode in ("L", "P"):
        return a
    if mode in ("I", "I;16") and a.size and 0 <= a.min() and a.max() <= 255:
        return a.astype(np.uint8)
    if mode in ("I", "I;16"):
        raise DataError(f"{path}: labels up to {int(a.max())}; masks hold labels 0-254 (255 = ignore)")
    raise DataError(f"{path}: a {mode} image is not a label map (save masks as 8-bit grayscale or palette PNGs "
                    "whose values are the class labels)")


class MaskFolder(ImageSet):
    """Images and their label maps: ``{"image": (C, S, S), "label": -1, "mask": (S, S) uint8, "meta": {...}}``.

    Args:
        root: the folder holding ``images/`` and ``masks/`` (and optionally ``classes.txt``).
        channels, size, resize: how images are read (`patchgpt.data.images.resize`).
        on_error: ``stop`` raises on an unreadable pair, ``skip`` drops it with one line.
    """

    def __init__(self, root: str | Path, channels: int = 3, size: int = 64, resize: str = "crop",
                 on_error: str = "stop") -> None:
        root = Path(root)
        spec = f"masks:{root}"
        images, masks = root / "images", root / "masks"
        for d in (images, masks):
            if not d.is_dir():
                raise DataError(f"{spec}: no {d.name}/ folder (the layout is {root}/images/ and {root}/masks/, "
                                "with the same file stems)")
        self.images = list_images(images, IMAGE_EXTS)
        if not self.images:
            raise DataError(f"{spec}: no images found in {images}")
        by_stem = {p.relative_to(masks).with_suffix("").as_posix(): p for p in list_images(masks, {".png"})}
        self.masks = []
        for p in self.images:
            m = by_stem.get(p.relative_to(images).with_suffix("").as_posix())
            if m is None:
                raise DataError(f"{p}: no mask for it (expected {masks / p.relative_to(images).with_suffix('.png')})")
            self.masks.append(m)
        self.channels, self.size, self.resize, self.on_error = channels, size, resize, on_error
        names = root / "classes.txt"
        if names.is_file():
            classes = [line.strip() for line in names.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not 2 <= len(classes) <= IGNORE_LABEL:
                raise DataError(f"{names}: {len(classes)} class names; give 2 to 255, one per line, the first "
                                "for label 0 (background)")
        else:
            top = 0
            for m in self.masks:   # the labels in use, from every mask (write classes.txt to skip this scan)
                a = read_mask(m)
                top = max(top, int(a[a != IGNORE_LABEL].max(initial=0)))
            classes = [str(i) for i in range(max(top, 1) + 1)]
        self.info = DataInfo(channels=channels, image_size=(size, size), masks=classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Item | None:
        path, mpath = self.images[i], self.masks[i]
        try:
            im = to_mode(load_pil(path), self.channels)
            labels = read_mask(mpath)
            mask = Image.fromarray(labels, "L")
            if mask.size != im.size:
                raise DataError(f"{mpath}: mask is {mask.size[0]}x{mask.size[1]}, its image {path.name} is "
                                f"{im.size[0]}x{im.size[1]}")
            bad = labels[(labels >= len(self.info.masks)) & (labels != IGNORE_LABEL)]
            if bad.size:
                raise DataError(f"{mpath}: label {int(bad.max())} but only {len(self.info.masks)} classes "
                                "(classes.txt); 255 marks ignored pixels")
        except DataError as e:
            skip_or_raise(self.info, self.on_error, e)
            return None
        image = to_tensor(resize(im, self.size, self.resize))
        m = np.asarray(resize(mask, self.size, self.resize, Image.NEAREST, fill=IGNORE_LABEL))
        return {"image": image, "label": -1, "mask": torch.from_numpy(m.copy()),           # (S, S) uint8
                "meta": {"file": str(path), "mask_file": str(mpath), "width": im.size[0], "height": im.size[1]}}
