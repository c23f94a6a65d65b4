"""Parse data specs (``digits``, ``folder:PATH``, ``idx:PATH``, ``videos:PATH``, ...) into train and validation
sets."""

from __future__ import annotations

from ..config import DataConfig
from .base import DataError, DataInfo, ImageSet, split
from .digits import Digits
from .idx import IdxImages, find_idx
from .images import ImageFolder

SPECS = {
    "digits": "scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)",
    "folder:PATH": "your images: one subfolder per class, or a flat folder of unlabeled images",
    "idx:PATH": "a folder of MNIST-format IDX files (train-images-idx3-ubyte[.gz], ...)",
    "emoji": "colour emoji rendered from the Noto Color Emoji font, captioned with their Unicode names",
    "videos:PATH": "your video clips (mp4, avi, webm, mkv, gif): one subfolder per class, or a flat folder",
    "moving-digits": "bundled digits moving and bouncing on a canvas, labelled by direction (8 classes)",
}


def build_datasets(cfg: DataConfig) -> tuple[ImageSet, ImageSet, DataInfo]:
    """The (train, val, info) sets for `cfg.spec`; a `DataError` explains a bad spec in one line."""
    spec = cfg.spec.strip()
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        if cfg.image_size not in (0, 8) or cfg.channels not in (0, 1):
            raise DataError("digits are 8x8 grayscale; data.image_size/data.channels apply to other sources")
        ds = Digits()
        train, val = split(ds, cfg.val_fraction, cfg.split_seed)
        return train, val, ds.info
    if kind == "emoji" and not arg:
        from .emoji import Emoji

        ds = Emoji(size=cfg.image_size or 16)
        train, val = split(ds, cfg.val_fraction, cfg.split_seed)
        return train, val, ds.info
    if kind == "videos" and arg:
        from .video import VideoFolder

        ds = VideoFolder(arg, frames=cfg.frames or 8, size=cfg.image_size or 32, channels=cfg.channels or 3,
                         resize=cfg.resize, stride=cfg.frame_stride, on_error=cfg.on_error)
        train, val = split(ds, cfg.val_fraction, cfg.split_seed)
        return train, val, ds.info
    if kind == "moving-digits" and not arg:
        from .moving import MovingDigits

        if cfg.channels not in (0, 1):
            raise DataError("moving-digits are grayscale; data.channels applies to other sources")
        ds = MovingDigits(frames=cfg.frames or 4, size=cfg.image_size or 16)
        train, val = split(ds, cfg.val_fraction, cfg.split_seed)
        return train, val, ds.info
    if kind == "folder" and arg:
        ds = ImageFolder(arg, channels=cfg.channels or 3, size=cfg.image_size or 32, resize=cfg.resize,
                         on_error=cfg.on_error)
        train, val = split(ds, cfg.val_fraction, cfg.split_seed)
        return train, val, ds.info
    if kind == "idx" and arg:
        found = find_idx(arg)
        kw = dict(channels=cfg.channels, size=cfg.image_size, resize=cfg.resize)
        train_ds = IdxImages(*found["train"], **kw)
        if "test" in found:
            val_ds = IdxImages(*found["test"], classes=train_ds.info.classes, **kw)
            return train_ds, val_ds, train_ds.info
        train, val = split(train_ds, cfg.val_fraction, cfg.split_seed)
        return train, val, train_ds.info
    known = "; ".join(f"{k} ({v})" for k, v in SPECS.items())
    raise DataError(f"unknown data spec {spec!r}; use one of: {known}")
