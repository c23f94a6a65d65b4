"""Data sources. Every source yields (image (C, H, W) in [-1, 1], label) pairs; see `build_datasets`."""

from .base import DataError, DataInfo, ImageSet, augment, eval_batches, train_batches
from .digits import Digits
from .idx import IdxImages, read_idx
from .images import ImageFolder, load_image
from .specs import SPECS, build_datasets

DATASETS = SPECS

__all__ = ["DATASETS", "DataError", "DataInfo", "Digits", "ImageFolder", "IdxImages", "ImageSet", "SPECS",
           "augment", "build_datasets", "eval_batches", "load_image", "read_idx", "train_batches"]
