"""COCO box mAP with the reference evaluator (pycocotools), from in-memory ground truth and detections.

Reference: Lin et al. 2014 and ``pycocotools.cocoeval.COCOeval`` (iouType ``bbox``): AP averaged over IoU
thresholds .50:.05:.95, AP50, AP75, and per-category AP (area "all", up to 100 detections per image).
pycocotools is an optional extra (``pip install "patchgpt[detect]"``); it is imported only here.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np


def _import_coco():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError('COCO evaluation needs pycocotools: pip install "patchgpt[detect]" '
                          '(or pip install pycocotools)') from None
    return COCO, COCOeval


def coco_map(gt: dict, detections: list[dict], class_names: list[str] | None = None) -> dict:
    """Evaluate `detections` against `gt` with COCOeval; returns AP, AP50, AP75 and per-class AP.

    Args:
        gt: a COCO instances dict (``images``, ``annotations`` with bbox/category_id/iscrowd/area, ``categories``).
        detections: COCO results, ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}`` each.
        class_names: names for the per-class keys, in the order of ``gt["categories"]``.
    """
    COCO, COCOeval = _import_coco()
    cats = gt["categories"]
    names = class_names or [c["name"] for c in cats]
    empty = {"AP": 0.0, "AP50": 0.0, "AP75": 0.0, "per_class_AP": {n: 0.0 for n in names}}
    if not gt["annotations"]:
        return {**empty, "AP": float("nan"), "AP50": float("nan"), "AP75": float("nan")}
    if not detections:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints progress and the summary table
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"]                   # (iou thresholds, recall, categories, areas, max dets)
    per_class = {}
    for k, c in enumerate(ev.params.catIds):
        p = precision[:, :, k, 0, -1]
        per_class[names[[x["id"] for x in cats].index(c)]] = float(np.mean(p[p > -1])) if (p > -1).any() else 0.0
    return {"AP": float(ev.stats[0]), "AP50": float(ev.stats[1]), "AP75": float(ev.stats[2]),
            "per_class_AP": per_class}


def ground_truth(metas: list[dict], category_ids: list[int], class_names: list[str]) -> dict:
    """A COCO instances dict from items' ``meta`` (image size and ``gt`` annotations in original pixels)."""
    images, anns = [], []
    for m in metas:
        images.append({"id": m["image_id"], "width": m["width"], "height": m["height"]})
        for a in m["gt"]:
            x, y, w, h = a["bbox"]
            anns.append({"id": len(anns) + 1, "image_id": m["image_id"], "category_id": a["category_id"],
                         "bbox": [float(x), float(y), float(w), float(h)], "iscrowd": int(a.get("iscrowd", 0)),
                         "area": float(a.get("area", w * h))})
    cats = [{"id": c, "name": n} for c, n in zip(category_ids, class_names, strict=True)]
    return {"images": images, "annotations": anns, "categories": cats}
