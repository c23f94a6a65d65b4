"""`idx:PATH`: MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST), gzipped or not.

Format (LeCun et al.): two zero bytes, a type byte, a dimension count, big-endian int32 sizes, then the
data. A folder holds ``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]``, and optionally
``t10k-*`` (or ``test-*``) files used as the validation split.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import MAX_CLASSES, DataError, DataInfo, ImageSet, Item

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_RATIO = 1100   # DEFLATE inflates at most ~1032x: a gzip's header may not claim more than this


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file into a numpy array; a `DataError` says what is wrong and where.

    The header's sizes are checked against the file before the data is read or allocated: exactly the
    bytes it describes must follow (a gzipped file is inflated only that far, so a header claiming
    terabytes, a product of sizes overflowing int64, or a gzip bomb is one line, not an allocation)."""
    path = Path(path)
    gz = path.suffix == ".gz"
    try:
        size = path.stat().st_size
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _DTYPES:
                raise DataError(f"{path}: not an IDX file (bad magic number)")
            ndim = head[3]
            dims = f.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DataError(f"{path}: truncated IDX header")
            shape = tuple(int.from_bytes(dims[4 * i:4 * i + 4], "big") for i in range(ndim))
            dtype = np.dtype(_DTYPES[head[2]])
            need = math.prod(shape) * dtype.itemsize
            bound = size * _GZIP_RATIO if gz else size - 4 - 4 * ndim
            if need > bound:
                what = f"more than a {size:,}-byte gzip can hold" if gz else f"the file holds {bound:,}"
                kind = "truncated IDX data" if not gz else "IDX header out of bounds"
                raise DataError(f"{path}: {kind}: the header's shape {shape} needs {need:,} bytes, {what}")
            chunks, got = [], 0
            while got < need:   # in pieces: memory follows the data found, not what the header claims
                chunks.append(f.read(min(1 << 24, need - got)))
                if not chunks[-1]:
                    break
                got += len(chunks[-1])
            raw = b"".join(chunks)
            if len(raw) < need:
                raise DataError(f"{path}: truncated IDX data ({len(raw):,} of {need:,} bytes for shape {shape})")
            extra = len(f.read(1 << 16))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error, MemoryError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if extra:
        raise DataError(f"{path}: {'over ' if extra == 1 << 16 else ''}{extra:,} bytes follow the data its header "
                        f"describes (shape {shape}): a wrong header?")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _find(root: Path, stems: tuple[str, ...], kind: str) -> Path | None:
    for stem in stems:
        for p in sorted(root.iterdir()):
            name = p.name.lower()
            if p.is_file() and (name.startswith(stem) or f"-{stem}-" in name) and kind in name:
                return p
    return None


def find_idx(root: str | Path) -> dict[str, tuple[Path, Path | None]]:
    """Locate train (and test) image/label files in folder `root`: {"train": (images, labels), ...}."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"idx:{root}: no such directory")
    out = {}
    for split, stems in (("train", ("train",)), ("test", ("t10k", "test"))):
        img = _find(root, stems, "images")
        if img is not None:
            out[split] = (img, _find(root, stems, "labels"))
    if "train" not in out:
        raise DataError(f"idx:{root}: no train-images-idx3-ubyte[.gz] file")
    return out


class IdxImages(ImageSet):
    """IDX images (N, H, W) or (N, H, W, C), with optional IDX labels (N,): items {"image", "label"}.

    uint8 pixels map 0..255 to [-1, 1]; other types are divided by their largest magnitude (signed data
    then spans [-1, 1], non-negative data is mapped from [0, 1]). Labels must be whole numbers from 0 to
    `MAX_CLASSES` - 1. `like` (the training set, for the ``t10k-*`` validation files) must match these
    images' channels and size after conversion, whether they have labels, and hold every label among its
    classes. Each fault is a one-line `DataError` naming the file."""

    def __init__(self, images: str | Path, labels: str | Path | None = None, classes: list[str] | None = None,
                 channels: int = 0, size: int = 0, resize: str = "crop", like: IdxImages | None = None) -> None:
        x = read_idx(images)
        if x.ndim == 3:
            x = x[:, None]                                     # (N, H, W) -> (N, 1, H, W)
        elif x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)                        # (N, H, W, C) -> (N, C, H, W)
        else:
            raise DataError(f"{images}: expected 3 or 4 dimensions, found shape {x.shape}")
        if len(x) == 0:
            raise DataError(f"{images}: holds no images (shape {x.shape})")
        if 0 in x.shape:
            raise DataError(f"{images}: images of zero size (shape {x.shape})")
        y = None
        if labels is not None:
            y = read_idx(labels)
            if y.ndim != 1 or len(y) != len(x):
                raise DataError(f"{labels}: {len(y)} labels for {len(x)} images in {images}")
            y = _labels(y, labels)
        if x.dtype == np.uint8:
            self.x = torch.from_numpy(x.astype(np.float32)) / 255.0 * 2 - 1   # (N, C, H, W) in [-1, 1]
        else:
            a = x.astype(np.float32)
            if not np.isfinite(a).all():
                raise DataError(f"{images}: holds NaN or infinite pixel values")
            a /= max(1.0, float(np.abs(a).max()))
            self.x = torch.from_numpy(a if a.min() < 0 else a * 2 - 1)
        native_c = self.x.shape[1]
        if channels and channels != native_c:
            if native_c == 1 and channels == 3:
                self.x = self.x.expand(-1, 3, -1, -1).contiguous()
            elif native_c == 3 and channels == 1:
                luma = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
                self.x = (self.x * luma).sum(1, keepdim=True)
            else:
                raise DataError(f"{images}: cannot convert {native_c} channels to {channels}")
        if size and size != self.x.shape[-1] or size and size != self.x.shape[-2]:
            if resize == "pad":
                raise DataError("data.resize=pad is not supported for idx data; use crop or stretch")
            self.x = torch.nn.functional.interpolate(self.x, size=(size, size), mode="bilinear",
                                                     antialias=True, align_corners=False).clamp(-1, 1)
        if y is None:
            self.y = torch.full((len(self.x),), -1, dtype=torch.long)
            classes = None
        else:
            self.y = torch.from_numpy(y)
            top = int(self.y.max())
            if classes is not None and top >= len(classes):
                raise DataError(f"{labels}: label {top}, but the training labels have {len(classes)} classes "
                                f"(0..{len(classes) - 1})")
            classes = classes or [str(i) for i in range(top + 1)]
        self.info = DataInfo(channels=self.x.shape[1], image_size=tuple(self.x.shape[-2:]), classes=classes)
        if like is not None:
            a, b = self.info, like.info
            if (a.channels, a.image_size) != (b.channels, b.image_size):
                raise DataError(f"{images}: images are {a.channels}x{a.image_size[0]}x{a.image_size[1]}, the "
                                f"training images {b.channels}x{b.image_size[0]}x{b.image_size[1]} (set "
                                "data.image_size and data.channels to convert both)")
            if (a.classes is None) != (b.classes is None):
                has, lacks = (images, "the training images") if a.classes else ("the training images", images)
                raise DataError(f"{images}: {has} have a labels file and {lacks} do not")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Item:
        return {"image": self.x[i], "label": int(self.y[i])}

    def images(self, n: int | None = None) -> torch.Tensor:
        return self.x[:n]

    def labels(self) -> torch.Tensor:
        return self.y


def _labels(y: np.ndarray, path: str | Path) -> np.ndarray:
    """IDX labels as int64 class indices: whole numbers from 0 to `MAX_CLASSES` - 1, else one line."""
    if y.dtype.kind == "f":
        bad = y[~(np.isfinite(y) & (y == np.round(y)) & (np.abs(y) < MAX_CLASSES + 1))]
        if len(bad):
            raise DataError(f"{path}: label {bad[0]} is not a class index (whole numbers 0..{MAX_CLASSES - 1:,})")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise DataError(f"{path}: negative label {int(y.min())} (labels are class indices 0, 1, ...)")
    if y.max() >= MAX_CLASSES:
        raise DataError(f"{path}: label {int(y.max())}: at most {MAX_CLASSES:,} classes are supported (each "
                        "label up to the largest becomes a class and an output; is this a labels file?)")
    return y
