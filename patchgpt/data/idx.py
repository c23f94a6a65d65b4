"""`idx:PATH`: MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST, EMNIST), gzipped or not.

Format (LeCun et al.): two zero bytes, a type byte, a dimension count, big-endian int32 sizes, then the
data. A folder holds ``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]``, and optionally
``t10k-*`` (or ``test-*``) files used as the validation split.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from .base import DataError, DataInfo, ImageSet, Item

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file into a numpy array; a `DataError` says what is wrong and where."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    need = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header < need:
        raise DataError(f"{path}: truncated IDX data ({len(raw) - header} of {need} bytes for shape {shape})")
    return np.frombuffer(raw, dtype=dtype, count=int(np.prod(shape)), offset=header).reshape(shape)


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
    """IDX images (N, H, W) or (N, H, W, C) of uint8, with optional IDX labels (N,): items {"image", "label"}."""

    def __init__(self, images: str | Path, labels: str | Path | None = None, classes: list[str] | None = None,
                 channels: int = 0, size: int = 0, resize: str = "crop") -> None:
        x = read_idx(images)
        if x.ndim == 3:
            x = x[:, None]                                     # (N, H, W) -> (N, 1, H, W)
        elif x.ndim == 4:
            x = x.transpose(0, 3, 1, 2)                        # (N, H, W, C) -> (N, C, H, W)
        else:
            raise DataError(f"{images}: expected 3 or 4 dimensions, found shape {x.shape}")
        y = None
        if labels is not None:
            y = read_idx(labels)
            if y.ndim != 1 or len(y) != len(x):
                raise DataError(f"{labels}: {len(y)} labels for {len(x)} images in {images}")
        scale = 255.0 if x.dtype == np.uint8 else float(max(1.0, np.abs(x).max()))
        self.x = torch.from_numpy(x.astype(np.float32)) / scale * 2 - 1   # (N, C, H, W) in [-1, 1]
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
            self.y = torch.from_numpy(y.astype(np.int64))
            classes = classes or [str(i) for i in range(int(self.y.max()) + 1)]
        self.info = DataInfo(channels=self.x.shape[1], image_size=tuple(self.x.shape[-2:]), classes=classes)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Item:
        return {"image": self.x[i], "label": int(self.y[i])}

    def images(self, n: int | None = None) -> torch.Tensor:
        return self.x[:n]

    def labels(self) -> torch.Tensor:
        return self.y
