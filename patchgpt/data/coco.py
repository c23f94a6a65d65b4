"""`coco:ANNOTATIONS.json[:IMAGES_DIR]`: COCO instance annotations and their images, for detection (and, with
``data.masks``, semantic segmentation from their ``segmentation`` polygons and RLEs).

Reference: the COCO data format (cocodataset.org/#format-data): ``images`` (id, file_name, width, height),
``annotations`` (image_id, category_id, bbox = [x, y, width, height] in pixels, iscrowd), ``categories``
(id, name). Images of any size are letterboxed (``data.resize=pad``, the default for detection) or
stretched to S x S, and their boxes go through the same transform; each item remembers the transform so
predictions map back to the original pixels. Crowd annotations are not training targets; they stay in the
ground truth for evaluation, where COCO's evaluator treats them as regions to ignore.

Every malformed entry (missing keys, a value of the wrong JSON type, an id that is not an integer, a bbox
that is not 4 finite numbers, zero area, a box outside its image, an unknown image or category id, a
duplicate image id) gets one line naming the file, the annotation and the fault; with ``data.on_error=stop``
(the default) the first one stops the run, with ``skip`` they are dropped and counted. Categories (they fix
the class order) must be well formed and unique in id and name. Where an image file's size differs from the
``width``/``height`` its entry gives, the file wins: one warning per file, and its boxes are checked
against, and clipped to, the file's size (a box outside the file is an error as above).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..tokenizers.masks import IGNORE_LABEL
from .base import DataError, DataInfo, ImageSet, Item, skip_or_raise
from .images import load_converted, resize, to_tensor

_TOLERANCE = 1.0  # pixels a box may stick out of its image (rounding in exporters) before it is an error


def _is_num(v) -> bool:
    """A finite JSON number (not a boolean, NaN or infinity)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_id(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _clip(bbox: list, W: float, H: float) -> tuple[float, float, float, float] | str:
    """A COCO [x, y, width, height] as xyxy clipped to a W x H image, or why it cannot be: it sticks out by
    more than `_TOLERANCE` pixels, or nothing of it is left inside."""
    x, y, w, h = bbox
    if x < -_TOLERANCE or y < -_TOLERANCE or x + w > W + _TOLERANCE or y + h > H + _TOLERANCE:
        return f"bbox {bbox} lies outside its {W}x{H} image"
    x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(W), x + w), min(float(H), y + h)
    if x1 <= x0 or y1 <= y0:
        return f"bbox {bbox} has no area inside its {W}x{H} image"
    return x0, y0, x1, y1


def _check_image(im) -> str | None:
    """Why image entry `im` is malformed, or None."""
    if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
        return "needs 'id' and 'file_name'"
    if not _is_id(im["id"]):
        return f"id {im['id']!r} is not an integer"
    if not isinstance(im["file_name"], str) or not im["file_name"]:
        return f"file_name {im['file_name']!r} is not a file name"
    for k in ("width", "height"):
        if k in im and im[k] is not None and not (_is_num(im[k]) and im[k] > 0):
            return f"{k} {im[k]!r} is not a positive number"
    return None


def _check_annotation(a: dict, images: dict, cats: dict) -> str | None:
    """Why annotation `a` is malformed, or None if it is fine."""
    for key in ("image_id", "category_id", "bbox"):
        if key not in a:
            return f"missing key {key!r}"
    for key in ("image_id", "category_id"):
        if not _is_id(a[key]):
            return f"{key} {a[key]!r} is not an integer"
    bbox = a["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_num(v) for v in bbox):
        return f"bbox {bbox!r} is not [x, y, width, height] of 4 finite numbers"
    if a.get("iscrowd", 0) not in (0, 1) or isinstance(a.get("iscrowd", 0), float):
        return f"iscrowd {a['iscrowd']!r} is not 0 or 1"
    if "area" in a and not (_is_num(a["area"]) and a["area"] >= 0):
        return f"area {a['area']!r} is not a non-negative number"
    if a["image_id"] not in images:
        return f"unknown image_id {a['image_id']!r}"
    if a["category_id"] not in cats:
        return f"unknown category_id {a['category_id']!r}"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"zero or negative area (bbox {bbox})"
    im = images[a["image_id"]]
    W, H = im.get("width"), im.get("height")
    if W and H:
        clipped = _clip(bbox, W, H)
        if isinstance(clipped, str):
            return clipped
    return None


def _name(n: int, a) -> str:
    return f"annotation #{n} (id {a.get('id', '?') if isinstance(a, dict) else '?'})"


class AnnotationFile:
    """What COCO-style sources share: a malformed entry stops or is dropped and counted (``data.on_error``),
    and image files are found in IMAGES_DIR, next to the JSON, or in its ``images/`` folder. Subclasses set
    ``ann_file``, ``images_dir``, ``on_error`` and ``skipped``."""

    ann_file: Path
    images_dir: Path | None
    on_error: str
    skipped: list[str]

    def _bad(self, msg: str, file: Path | None = None) -> None:
        """A malformed entry of `file` (default: ``ann_file``): stop with one line, or drop and count it."""
        line = f"{file or self.ann_file}: {msg}"
        if self.on_error == "stop":
            raise DataError(line + " (set data.on_error=skip to drop such entries)")
        self.skipped.append(line)

    def _roots(self) -> list[Path]:
        """Where image files are looked for, in order: IMAGES_DIR, or the JSON's folder then its ``images/``."""
        return [self.images_dir] if self.images_dir else [self.ann_file.parent, self.ann_file.parent / "images"]

    def _path(self, file_name: str) -> Path:
        roots = self._roots()
        for r in roots:
            if (r / file_name).is_file():
                return r / file_name
        return roots[0] / file_name


    def _index_images(self, entries: list) -> dict[int, dict]:
        """The valid ``images`` entries by id; a malformed or duplicate entry stops or is dropped (`_bad`)."""
        images: dict[int, dict] = {}
        for im in entries:
            why = _check_image(im)
            if why is None and im["id"] in images:
                why = f"a second image with id {im['id']}"
            if why is not None:
                self._bad(f"image entry {str(im)[:80]}: {why}")
                continue
            images[im["id"]] = im
        return images


class CocoDetection(AnnotationFile, ImageSet):
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
                 classes: list[str] | None = None, masks: bool = False) -> None:
        self.ann_file = Path(ann_file)
        if not self.ann_file.is_file():
            raise DataError(f"{ann_file}: no such annotation file")
        if resize not in ("pad", "stretch"):
            raise DataError(f"data.resize={resize!r}: detection needs pad (letterbox) or stretch, which keep "
                            "every box inside the image")
        try:
            d = json.loads(self.ann_file.read_text())
        except (ValueError, RecursionError) as e:   # bad JSON or UTF-8, or nesting too deep
            raise DataError(f"{ann_file}: not valid JSON ({type(e).__name__}: {e})") from None
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
                raise DataError(f"{ann_file}: category {str(c)[:80]} needs 'id' and 'name'")
            if not _is_id(c["id"]) or not isinstance(c["name"], str):
                raise DataError(f"{ann_file}: category {str(c)[:80]}: 'id' must be an integer and 'name' a string")
            if c["id"] in cats or c["name"] in cats.values():
                raise DataError(f"{ann_file}: category {str(c)[:80]}: a second category with this id or name")
            cats[c["id"]] = c["name"]
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

        images = self._index_images(d["images"])
        self.anns: dict = {i: [] for i in images}   # image id -> [(annotation index, annotation)]
        other = 0
        for n, a in enumerate(d["annotations"]):
            why = _check_annotation(a, images, cats) if isinstance(a, dict) else "not an object"
            if why is not None:
                self._bad(f"{_name(n, a)}: {why}")
                continue
            if a["category_id"] in self.cat_to_class:
                self.anns[a["image_id"]].append((n, a))
            else:
                other += 1
        self.records = [images[i] for i in sorted(images)]
        if not self.records:
            raise DataError(f"{ann_file}: no images")
        most = max([sum(1 for _, a in anns if not a.get("iscrowd", 0)) for anns in self.anns.values()] + [0])
        self.info = DataInfo(channels=channels, image_size=(size, size),
                             classes=[cats[c] for c in cat_order], boxes=True, category_ids=cat_order,
                             skipped=self.skipped, max_objects=most,
                             masks=["background"] + [cats[c] for c in cat_order] if masks else None)
        if masks:
            _mask_api()   # a clear error now, not at the first item
        self._warned: set[str] = set()   # image files whose size differs from their entry's (warned once)
        if self.skipped:
            print(f"patchgpt: skipped {len(self.skipped)} malformed entries of {ann_file} "
                  f"(first: {self.skipped[0]})", file=sys.stderr)
        if other:
            print(f"patchgpt: warning: {ann_file}: ignoring {other} annotation(s) of categories outside the "
                  f"checkpoint's {len(classes or [])} classes", file=sys.stderr)


    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Item | None:
        rec = self.records[i]
        path = self._path(rec["file_name"])
        try:
            im = load_converted(path, self.channels)
        except DataError as e:
            skip_or_raise(self.info, self.on_error, e)
            return None
        W, H = im.size
        jw, jh = rec.get("width"), rec.get("height")
        if jw and jh and (jw, jh) != (W, H) and str(path) not in self._warned:
            self._warned.add(str(path))
            print(f"patchgpt: warning: {path} is {W}x{H}, but image id {rec['id']} of {self.ann_file} says "
                  f"{jw}x{jh}; its boxes are checked against and clipped to the file's size", file=sys.stderr)
        S = self.size
        out, tf = letterbox(im, S, self.resize)
        (sx, sy), (ox, oy) = tf["scale"], tf["offset"]
        image = to_tensor(out)                              # (C, S, S)
        boxes, classes, gt = [], [], []
        for n, a in self.anns[rec["id"]]:
            clipped = _clip(a["bbox"], W, H)
            if isinstance(clipped, str):
                e = DataError(f"{self.ann_file}: {_name(n, a)}: {clipped} (the file {path})"
                              + (" (set data.on_error=skip to drop such entries)" if self.on_error == "stop" else ""))
                skip_or_raise(self.info, self.on_error, e)
                continue
            x0, y0, x1, y1 = clipped
            crowd = int(a.get("iscrowd", 0))
            gt.append({"bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": a["category_id"], "iscrowd": crowd,
                       "area": float(a.get("area", (x1 - x0) * (y1 - y0)))})
            if crowd:
                continue
            boxes.append([(x0 * sx + ox) / S, (y0 * sy + oy) / S, (x1 * sx + ox) / S, (y1 * sy + oy) / S])
            classes.append(self.cat_to_class[a["category_id"]])
        meta = {**tf, "image_id": rec["id"], "gt": gt, "file": str(path)}   # tf: width, height, scale, offset
        extra = {}
        if self.info.masks:
            try:
                labels = self.label_map(self.anns[rec["id"]], W, H)
            except DataError as e:
                skip_or_raise(self.info, self.on_error, DataError(f"{self.ann_file}: {e} (the file {path})"))
                return None
            extra["mask"] = torch.from_numpy(np.asarray(resize(Image.fromarray(labels, "L"), S, self.resize,
                                                               Image.NEAREST, fill=IGNORE_LABEL)).copy())
        return {**extra, "image": image, "label": -1,
                "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4).clamp(0, 1),   # (N, 4)
                "classes": torch.tensor(classes, dtype=torch.long), "meta": meta}


    def label_map(self, anns: list, W: int, H: int) -> np.ndarray:
        """(H, W) uint8 labels of one image from its annotations' ``segmentation`` (polygons, RLE or
        uncompressed RLE, rasterized by pycocotools): 1 + the class, larger objects first so smaller ones
        stay on top; crowd regions 255 (ignore), as are objects without a segmentation."""
        mask_api = _mask_api()
        out = np.zeros((H, W), dtype=np.uint8)
        for n, a in sorted(anns, key=lambda na: -float(na[1].get("area", 0) or 0)):
            seg = a.get("segmentation")
            value = IGNORE_LABEL if a.get("iscrowd", 0) or not seg else self.cat_to_class[a["category_id"]] + 1
            if not seg:
                x, y, w, h = (round(v) for v in a["bbox"])
                out[max(0, y):y + h, max(0, x):x + w] = value
                continue
            try:
                if isinstance(seg, list):
                    if not all(isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(_is_num, p))
                               for p in seg):
                        raise ValueError("polygons must be lists of at least 3 x, y pairs")
                    rle = mask_api.merge(mask_api.frPyObjects(seg, H, W))
                elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
                    if list(seg["size"]) != [H, W]:
                        raise ValueError(f"RLE size {seg['size']} is not the image's [{H}, {W}]")
                    rle = mask_api.frPyObjects(seg, H, W) if isinstance(seg["counts"], list) else seg
                else:
                    raise ValueError("segmentation must be polygons or an RLE with 'counts' and 'size'")
                m = mask_api.decode(rle).astype(bool)
            except (ValueError, TypeError, KeyError, IndexError) as e:
                raise DataError(f"{_name(n, a)}: bad segmentation ({e})") from None
            out[m] = value
        return out


def _mask_api():
    """pycocotools.mask, or a one-line error saying how to install it."""
    try:
        from pycocotools import mask
    except ImportError:
        raise DataError("reading COCO segmentations needs pycocotools: pip install 'patchgpt[detect]'") from None
    return mask


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
