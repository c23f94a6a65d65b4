"""Data sources. Every source yields items, dicts keyed by field ({"image": (C, H, W) in [-1, 1], "label": int,
...}), that `collate` batches by key; `DATASETS` names the sources of `build_datasets`."""

from .base import DataError, DataInfo, ImageSet, Item, augment, collate, eval_batches, train_batches
from .digits import Digits
from .idx import IdxImages, read_idx
from .images import ImageFolder, load_image
from .specs import DATASETS, Source, build_datasets

__all__ = ["DATASETS", "DataError", "DataInfo", "Digits", "ImageFolder", "IdxImages", "ImageSet", "Item", "Source",
           "augment", "build_datasets", "collate", "eval_batches", "load_image", "read_idx", "train_batches"]
