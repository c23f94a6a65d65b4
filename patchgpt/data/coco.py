"""`coco:ANNOTATIONS.json[:IMAGES_DIR]`: COCO instance annotations and their images, for detection.

Reference: the COCO data format (cocodataset.org/#format-data): ``images`` (id, file_name, width, height),
``annotations`` (image_id, category_id, bbox = [x, y, width, height] in pixels, iscrowd), ``categories``
(id, name). Images of any size are letterboxed (``data.resize=pad``, the default for detection) or
stretched to S x S, and their boxes go through the same transform; each item remembers the transform so
predictions map back to the original pixels. Crowd annotations are not training targets; they stay in the
ground truth for evaluation, where COCO's evaluator treats them as regions to ignore.

Every malformed entry (missing keys, a bbox that is not 4 numbers, zero area, a box outside its image, an
unknown image or category id) gets one line naming the file, the annotation and the fault; with
``data.on_error=stop`` (the default) the first one stops the run, with ``skip`` they are dropped and counted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image

from .base import DataError, DataInfo, ImageSet, Item, skip_or_raise
from .images import load_pil, to_mode, to_tensor

_TOLERANCE = 1.0  # pixels a box may stick out of its image (rounding in exporters) before it is an error


def _check_annotation(a: dict, images: dict, cats: dict) -> str | None:
    """Why annotation `a` is malformed, or None if it is fine."""
    for key in ("image_id", "category_id", "bbox"):
        if key not in a:
            return f"missing key {key!r}"
    bbox = a["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
        return f"bbox {bbox!r} is not [x, y, width, height]"
    if a["image_id"] not in images:
        return f"unknown image_id {a['image_id']!r}"
    if a["category_id"] not in cats:
        return f"unknown category_id {a['category_id']!r}"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"zero or negative area (bbox {bbox})"
    im = images[a["image_id"]]
    W, H = im.get("width"), im.get("height")
    if W and H and (x < -_TOLERANCE or y < -_TOLERANCE or x + w > W + _TOLERANCE or y + h > H + _TOLERANCE):
        return f"bbox {bbox} lies outside its {W}x{H} image"
    return None


class CocoDetection(ImageSet):
    """Images of a COCO annotation file with their boxes; items are {"image", "label": -1, "boxes", "classes",
    "meta"} like `DigitScenes`.

    Args:
        ann_file: the instances JSON.
        images_dir: where ``file_name``s resolve (default: the JSON's folder, then its ``images/`` folder).
        channels, size: output channels and square side.
        resize: ``pad`` (letterbox, aspect kept) or ``stretch``.
        on_error: ``stop`` or ``skip`` for malformed annotations and unreadable images.
        classes: use this class order (a checkpoint's) instead of the file's; names must match.
    """

    def __init__(self, ann_file: str | Path, images_dir: str | Path | None = None, channels: int = 3,
                 size: int = 64, resize: str = "pad", on_error: str = "stop",
                 classes: list[str] | None = None) -> None:
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise DataError(f"{ann_file}: no such annotation file")
        if resize not in ("pad", "stretch"):
            raise DataError(f"data.resize={resize!r}: detection needs pad (letterbox) or stretch, which keep "
                            "every box inside the image")
        try:
            d = json.loads(self.ann_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{ann_file}: not valid JSON ({e})") from None
        if not isinstance(d, dict) or not all(isinstance(d.get(k), list) for k in
                                              ("images", "annotations", "categories")):
            raise DataError(f"{ann_file}: not a COCO instances file (needs lists 'images', 'annotations' and "
                            "'categories')")
        self.channels, self.size, self.resize, self.on_error = channels, size, resize, on_error
        self.skipped: list[str] = []
        self.images_dir = Path(images_dir) if images_dir else None

        cats = {}
        for c in d["categories"]:
            if not isinstance(c, dict) or "id" not in c or "name" not in c:
                raise DataError(f"{ann_file}: category {c!r} needs 'id' and 'name'")
            cats[c["id"]] = str(c["name"])
        if not cats:
            raise DataError(f"{ann_file}: no categories")
        cat_order = sorted(cats)
        if classes is not None:
            by_name = {n: i for i, n in cats.items()}
            missing = [n for n in classes if n not in by_name]
            if missing:
                raise DataError(f"{ann_file}: categories {missing} of the checkpoint are not in this file")
            cat_order = [by_name[n] for n in classes]
        self.cat_to_class = {cid: k for k, cid in enumerate(cat_order)}

        images = {}
        for im in d["images"]:
            if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
                self._bad(f"image entry {str(im)[:80]}: needs 'id' and 'file_name'")
                continue
            images[im["id"]] = im
        self.anns: dict = {i: [] for i in images}
        for n, a in enumerate(d["annotations"]):
            why = _check_annotation(a, images, cats) if isinstance(a, dict) else "not an object"
            if why is not None:
                self._bad(f"annotation #{n} (id {a.get('id', '?') if isinstance(a, dict) else '?'}): {why}")
                continue
            if a["category_id"] in self.cat_to_class:
                self.anns[a["image_id"]].append(a)
        self.records = [images[i] for i in sorted(images)]
        if not self.records:
            raise DataError(f"{ann_file}: no images")
        most = max([sum(1 for a in anns if not a.get("iscrowd", 0)) for anns in self.anns.values()] + [0])
        self.info = DataInfo(channels=channels, image_size=(size, size),
                             classes=[cats[c] for c in cat_order], boxes=True, category_ids=cat_order,
                             skipped=self.skipped, max_objects=most)
        if self.skipped:
            print(f"patchgpt: skipped {len(self.skipped)} malformed entries of {ann_file} "
                  f"(first: {self.skipped[0]})", file=sys.stderr)

    def _bad(self, msg: str) -> None:
        line = f"{self.ann_file}: {msg}"
        if self.on_error == "stop":
            raise DataError(line + " (set data.on_error=skip to drop such entries)")
        self.skipped.append(line)

    def _path(self, file_name: str) -> Path:
        roots = [self.images_dir] if self.images_dir else [self.ann_file.parent, self.ann_file.parent / "images"]
        for r in roots:
            if (r / file_name).is_file():
                return r / file_name
        return roots[0] / file_name

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Item | None:
        rec = self.records[i]
        path = self._path(rec["file_name"])
        try:
            im = to_mode(load_pil(path), self.channels)
        except DataError as e:
            skip_or_raise(self.info, self.on_error, e)
            return None
        W, H = im.size
        S = self.size
        out, tf = letterbox(im, S, self.resize)
        (sx, sy), (ox, oy) = tf["scale"], tf["offset"]
        image = to_tensor(out)                              # (C, S, S)
        boxes, classes, gt = [], [], []
        for a in self.anns[rec["id"]]:
            x, y, w, h = a["bbox"]
            x0, y0 = max(0.0, x), max(0.0, y)
            x1, y1 = min(float(W), x + w), min(float(H), y + h)
            crowd = int(a.get("iscrowd", 0))
            gt.append({"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": a["category_id"], "iscrowd": crowd,
                       "area": float(a.get("area", (x1 - x0) * (y1 - y0)))})
            if crowd:
                continue
            boxes.append([(x0 * sx + ox) / S, (y0 * sy + oy) / S, (x1 * sx + ox) / S, (y1 * sy + oy) / S])
            classes.append(self.cat_to_class[a["category_id"]])
        meta = {**tf, "image_id": rec["id"], "gt": gt, "file": str(path)}   # tf: width, height, scale, offset
        return {"image": image, "label": -1,
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4).clamp(0, 1),   # (N, 4)
                "classes": torch.tensor(classes, dtype=torch.long), "meta": meta}


def letterbox(im: Image.Image, size: int, resize: str = "pad") -> tuple[Image.Image, dict]:
    """One image to size x size as `CocoDetection` does it; returns it and the transform (for predict)."""
    W, H = im.size
    if resize == "stretch":
        return im.resize((size, size), Image.BICUBIC), {"width": W, "height": H, "scale": (size / W, size / H),
                                                        "offset": (0.0, 0.0)}
    s = size / max(W, H)
    nw, nh = max(1, round(W * s)), max(1, round(H * s))
    ox, oy = (size - nw) // 2, (size - nh) // 2
    out = Image.new(im.mode, (size, size), 0)
    out.paste(im.resize((nw, nh), Image.BICUBIC), (ox, oy))
    return out, {"width": W, "height": H, "scale": (nw / W, nh / H), "offset": (float(ox), float(oy))}


def to_pixels(boxes: torch.Tensor, meta: dict, size: int) -> torch.Tensor:
    """(N, 4) normalized xyxy in the S x S model input -> (N, 4) xyxy pixels of the original image."""
    sx, sy = meta["scale"]
    ox, oy = meta["offset"]
    b = boxes * size
    x = ((b[:, [0, 2]] - ox) / sx).clamp(0, meta["width"])
    y = ((b[:, [1, 3]] - oy) / sy).clamp(0, meta["height"])
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)
