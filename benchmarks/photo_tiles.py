"""Write colour photo tiles from scikit-learn's two bundled sample photographs, for offline colour experiments.

``sklearn.datasets.load_sample_images`` ships two 427x640 photographs (a temple, a flower). This script cuts
48x48 tiles every 24 pixels from each and writes those of the first to ``OUT/train`` and those of the second
to ``OUT/val``, so no tile of the validation photograph is seen in training:

    python benchmarks/photo_tiles.py data/photo-tiles
    patchgpt train restore --data folder:data/photo-tiles/train --set data.val_spec=folder:data/photo-tiles/val \\
        --set data.image_size=32 --set tokenizer.patch_size=4 --set restore.kind=colorize --time 5m
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image
from sklearn.datasets import load_sample_images


def write_tiles(out: Path, size: int = 48, stride: int = 24) -> dict[str, int]:
    """The tiles of each photograph into ``out/train`` and ``out/val``; returns how many each got."""
    counts = {}
    for part, photo in zip(("train", "val"), load_sample_images().images, strict=True):
        d = out / part
        d.mkdir(parents=True, exist_ok=True)
        H, W, _ = photo.shape
        n = 0
        for y in range(0, H - 2 * stride, stride):
            for x in range(0, W - 2 * stride, stride):
                Image.fromarray(photo[y:y + size, x:x + size]).save(d / f"{y:03d}_{x:03d}.png")
                n += 1
        counts[part] = n
    return counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to write train/ and val/ into")
    print(write_tiles(p.parse_args().out))


if __name__ == "__main__":
    main()
