"""Parse data specs (``digits``, ``folder:PATH``, ``idx:PATH``, ``emoji``, ``coco:ANN.json[:DIR]``,
``digit-scenes``, ``videos:PATH``, ``moving-digits``, ``shards:PATTERN``) into train and validation sets."""

from __future__ import annotations

import dataclasses

from ..config import DataConfig
from .base import ConcatSet, DataError, DataInfo, ImageSet, split
from .digits import Digits
from .idx import IdxImages, find_idx
from .images import ImageFolder

SPECS = {
    "digits": "scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)",
    "folder:PATH": "your images: one subfolder per class, or a flat folder of unlabeled images",
    "idx:PATH": "a folder of MNIST-format IDX files (train-images-idx3-ubyte[.gz], ...)",
    "emoji": "colour emoji rendered from the Noto Color Emoji font, captioned with their Unicode names",
    "coco:ANN.json[:IMAGES_DIR]": "COCO instance annotations (detection); images next to the JSON by default",
    "digit-scenes": "detection scenes: 1-4 real handwritten digits pasted on 64x64 canvases, exact boxes",
    "videos:PATH": "your video clips (mp4, avi, webm, mkv, gif): one subfolder per class, or a flat folder",
    "moving-digits": "bundled digits moving and bouncing on a canvas, labelled by direction (8 classes)",
    "shards:PATTERN": "streamed tar shards written by `patchgpt shard` (a dir, glob, or train-{000000..000009}.tar)",
}


def _coco_args(arg: str) -> tuple[str, str | None]:
    """``ANN.json[:IMAGES_DIR]`` -> (annotation file, images dir or None)."""
    i = arg.lower().find(".json:")
    return (arg[:i + 5], arg[i + 6:]) if i >= 0 else (arg, None)


def build_datasets(cfg: DataConfig, classes: list[str] | None = None) -> tuple[ImageSet, ImageSet, DataInfo]:
    """The (train, val, info) sets for `cfg.spec`; a `DataError` explains a bad spec in one line.

    With ``cfg.val_spec`` set, the whole of `cfg.spec` trains and the whole of `cfg.val_spec` validates.
    `classes` (a checkpoint's) fixes the class order of sources that can follow it (COCO files).
    """
    if cfg.val_spec:
        train, _, info = _build(cfg, cfg.spec, classes, val_fraction=0.0)
        val_full = whole_dataset(cfg, cfg.val_spec, info.classes)
        if val_full.info.classes != info.classes:
            raise DataError(f"data.val_spec={cfg.val_spec}: classes {val_full.info.classes} differ from "
                            f"{cfg.spec}'s {info.classes}")
        return train, val_full, info
    return _build(cfg, cfg.spec, classes)


def whole_dataset(cfg: DataConfig, spec: str, classes: list[str] | None = None) -> ImageSet:
    """Every item of `spec` (no train/validation split): for evaluating on a separate file or folder."""
    if spec.strip().startswith("shards:"):
        from .shards import all_items, expand, read_meta

        paths = expand(spec.strip()[len("shards:"):])
        return all_items(paths, read_meta(paths)[0])
    train, val, _ = _build(cfg, spec, classes, val_fraction=0.0)
    if spec.strip() == "digit-scenes":
        return val
    return ConcatSet(train, val) if len(val) else train


def _build(cfg: DataConfig, spec: str, classes: list[str] | None = None,
           val_fraction: float | None = None) -> tuple[ImageSet, ImageSet, DataInfo]:
    spec = spec.strip()
    if val_fraction is not None:
        cfg = dataclasses.replace(cfg, val_fraction=val_fraction)
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
    if kind == "digit-scenes" and not arg:
        from .scenes import digit_scenes

        if cfg.channels not in (0, 1):
            raise DataError("digit-scenes are grayscale; data.channels does not apply")
        train, val = digit_scenes(size=cfg.image_size or 64, split_seed=cfg.split_seed)
        return train, val, train.info
    if kind == "coco" and arg:
        from .coco import CocoDetection

        ann, images_dir = _coco_args(arg)
        ds = CocoDetection(ann, images_dir, channels=cfg.channels or 3, size=cfg.image_size or 64,
                           resize=cfg.resize, on_error=cfg.on_error, classes=classes)
        train, val = split(ds, cfg.val_fraction, cfg.split_seed)
        return train, val, ds.info
    if kind == "shards" and arg:
        from .shards import shard_sets

        return shard_sets(arg, cfg.val_fraction)
    known = "; ".join(f"{k} ({v})" for k, v in SPECS.items())
    raise DataError(f"unknown data spec {spec!r}; use one of: {known}")
