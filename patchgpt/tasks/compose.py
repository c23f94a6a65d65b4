"""The compositional text-to-image check on ``digit-scenes`` (`compose_check`).

A text-conditional generator trained on ``digit-scenes:holdout=N`` never saw 10 (digit pair, relation)
combinations (`patchgpt.data.scenes.held_out`); it draws their captions ("a 3 left of a 7", "a small 3 left
of a large 7", ...) and a detector trained on ``digit-scenes`` reads the samples. Reported:

- ``compose_digits_found``: the share of requested digits among the detections (matched by class, each
  detection used once, the highest-scoring first; detections scoring under `MIN_SCORE` are ignored);
- ``compose_relations_hold``: the share of samples whose requested relation holds between the matched boxes,
  by their centres (`describe`'s rule); a sample missing a requested digit counts as a relation that fails;
- ``compose_captions_exact``: the share whose matched boxes, described by `describe`, give the caption itself
  (size words included);
- ``compose_layout_*``: for a layout-first generator (``generate.layout``), the same scores of the objects it
  planned before drawing (its box tokens, read as detections): whether a miss comes from the plan or the
  drawing;
- ``compose_real_*``: the same scores on real validation scenes of two digits, at the generator's resolution,
  through the same detector: what the check gives a generator whose samples are as good as the data.

`patchgpt eval GEN --judge DETECT` runs it when GEN reads captions and DETECT is a detector, and draws
``eval_compose.png``: samples for several held-out captions with the detected boxes, a strip under each
(green: the digits found and the relation holds; orange: the digits found, the relation wrong; red: a digit
missing).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError
from ..data.base import ImageSet
from ..data.scenes import Layout, describe, held_out, held_out_captions, parse_caption, scene_options
from ..report import draw_boxes, save_panel_rows, tensor_to_pil
from .base import Task

if TYPE_CHECKING:
    from .generate_image import Generate

MIN_SCORE = 0.5           # detections scoring under this are not counted
MARKS = {"ok": "#2ca02c", "relation": "#ff7f0e", "missing": "#d62728"}


@dataclass
class Score:
    """One sample scored against the layout it was asked for."""

    found: int                    # requested digits matched by a detection
    requested: int
    holds: bool | None            # the relation holds between the matched boxes (None: none requested)
    exact: bool                   # `describe` of the matched boxes gives the caption itself
    assigned: list[int | None]    # the detection matched to each requested digit

    @property
    def mark(self) -> str:
        """"ok", "relation" (every digit found, the relation wrong) or "missing" (a digit not found)."""
        if self.found < self.requested:
            return "missing"
        return "relation" if self.holds is False else "ok"


def score_sample(layout: Layout, boxes: Tensor, digits: list[int], scores: Tensor,
                 min_score: float = MIN_SCORE) -> Score:
    """Score one image's detections against the `layout` its caption asks for.

    Args:
        layout: `parse_caption` of the caption.
        boxes: (N, 4) detected boxes, normalized xyxy.
        digits: the digit each detection names (-1 for a class that is not a digit).
        scores: (N,) detection scores; those under `min_score` are ignored.
    Each requested digit takes the highest-scoring unused detection of that digit. The relation is judged on
    the matched boxes by `describe` (sizes relative to the image), compared without size words.
    """
    order = sorted((j for j in range(len(digits)) if float(scores[j]) >= min_score), key=lambda j: -float(scores[j]))
    used: set[int] = set()
    assigned: list[int | None] = []
    for d in layout.digits:
        j = next((j for j in order if j not in used and digits[j] == d), None)
        if j is not None:
            used.add(j)
        assigned.append(j)
    found = sum(j is not None for j in assigned)
    if found < len(layout.digits):
        return Score(found, len(layout.digits), False if layout.relation else None, False, assigned)
    text = describe([boxes[j].tolist() for j in assigned if j is not None], list(layout.digits), 1)
    holds = parse_caption(text).plain() == layout.plain() if layout.relation else None
    return Score(found, len(layout.digits), holds, text == layout.caption(), assigned)


def tally(scores: list[Score]) -> dict[str, float | int]:
    """``digits_found`` (over requested digits), ``relations_hold`` (over samples asked for one),
    ``captions_exact`` and ``n`` (samples)."""
    requested = sum(s.requested for s in scores)
    with_rel = [s.holds for s in scores if s.holds is not None]
    return {"digits_found": sum(s.found for s in scores) / max(requested, 1),
            "relations_hold": sum(with_rel) / max(len(with_rel), 1),
            "captions_exact": sum(s.exact for s in scores) / max(len(scores), 1), "n": len(scores)}


def held_out_of(spec: str) -> tuple[tuple[tuple[int, str, int], ...], bool]:
    """The combinations a generator trained on `spec` never saw, and whether it held any out: those of
    ``digit-scenes:holdout=N``, else (anything else) ``held_out(0)`` and False."""
    name, _, arg = spec.strip().partition(":")
    if name == "digit-scenes":
        seed = scene_options(arg)["holdout"]
        if seed is not None:
            return held_out(seed), True
    return held_out(0), False


def _digits_of(detector: Task) -> list[int]:
    """The digit each of the detector's classes names (-1 for one that is not a digit)."""
    names = detector.info.classes or []
    digits = [int(c) if c.isdigit() else -1 for c in names]
    missing = sorted(set(range(10)) - set(digits))
    if missing:
        raise ConfigError(f"the judge detects {', '.join(names[:12])}: a compositional check needs a detector of "
                          f"the digits 0-9 (patchgpt train detect --data digit-scenes); missing {missing}")
    return digits


def _for_detector(images: Tensor, detector: Task) -> Tensor:
    """(n, C, h, w) images in [-1, 1] -> the detector's size (bilinear), on its device."""
    C, size = detector.info.channels, tuple(detector.info.image_size)
    if images.shape[1] != C:
        raise ConfigError(f"the generator draws {images.shape[1]}-channel images, the detector reads {C}")
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False).clamp(-1, 1)
    return images.to(detector.device)


@torch.no_grad()
def _detect(detector: Task, images: Tensor, batch: int) -> list[dict]:
    out: list[dict] = []
    for i in range(0, len(images), batch):
        out += detector.predict({"image": images[i:i + batch]})["detections"]
    return [{k: v.cpu() for k, v in d.items()} for d in out]


@torch.no_grad()
def compose_check(generator: Generate, detector: Task, captions: list[str] | None = None, per_caption: int = 20,
                  seed: int = 0, min_score: float = MIN_SCORE, val_set: ImageSet | None = None, real: int = 200,
                  batch: int = 128, **sampling: Any) -> dict:
    """Sample `per_caption` images for each held-out caption (or `captions`), detect and score them.

    Args:
        generator: a text-conditional `Generate` (ideally trained on ``digit-scenes:holdout=N``).
        detector: a `Detect` model of the digits 0-9 (trained on ``digit-scenes``); samples are resized to its
            input size.
        captions: `describe`-style captions to ask for; default `held_out_captions` of the generator's
            held-out combinations (three per combination).
        val_set: real scenes (the generator's validation set): up to `real` of two digits are scored the same
            way for reference (``compose_real_*``); None skips them.
        sampling: temperature, top_k, top_p, cfg_scale (defaults: the generator's ``generate`` section).
    Returns:
        The metrics (``compose_*``, `tally`'s, per combination in ``compose_per_combination``) and, for the
        picture, ``images`` (n, C, H, W) at the detector's size, ``texts``, ``layouts``, ``detections``,
        ``scores`` (one `Score` each).
    """
    if generator.condition != "text":
        raise ConfigError(f"the compositional check samples from captions; this generator is "
                          f"{generator.condition}-conditional (judge it with a classifier)")
    if not detector.info.boxes:
        raise ConfigError("the compositional check needs a detector as the judge (patchgpt train detect)")
    digits_of = _digits_of(detector)
    combos, unseen = held_out_of(generator.cfg.data.spec)
    if not unseen and captions is None:
        print(f"patchgpt: warning: the generator's data ({generator.cfg.data.spec}) held nothing out, so it may "
              "have seen the captions the compositional check asks for; train it on digit-scenes:holdout=N",
              file=sys.stderr)
    captions = list(captions) if captions is not None else held_out_captions(combos)
    try:
        layouts = [parse_caption(c) for c in captions]
    except ValueError as e:
        raise ConfigError(f"the compositional check reads digit-scenes captions: {e}") from None
    generator.warn_long(captions, "held-out captions")
    texts = [c for c in captions for _ in range(per_caption)]
    asked = [lay for lay in layouts for _ in range(per_caption)]
    chunks, plans = [], []
    for i in range(0, len(texts), batch):
        chunks.append(generator.sample_images(len(texts[i:i + batch]), texts=texts[i:i + batch],
                                              seed=seed + i // batch, **sampling).cpu())
        plans += generator.last_objects if generator.layout is not None else []
    images = _for_detector(torch.cat(chunks), detector)
    dets = _detect(detector, images, batch)
    scores = [score_sample(lay, d["boxes"], [digits_of[c] for c in d["classes"].tolist()], d["scores"], min_score)
              for lay, d in zip(asked, dets, strict=True)]
    res: dict = {f"compose_{k}": v for k, v in tally(scores).items()}
    res["compose_captions"] = len(captions)
    res["compose_unseen"] = unseen
    groups: dict[str, list[Score]] = {}
    for lay, s in zip(asked, scores, strict=True):
        groups.setdefault(lay.plain(), []).append(s)
    res["compose_per_combination"] = {k: {m: v for m, v in tally(g).items() if m != "n"} for k, g in groups.items()}
    if plans:   # a layout-first generator: its own plan scored the same way, before any pixel is drawn
        planned = [score_sample(lay, torch.tensor([o["box"] for o in objs]).reshape(-1, 4),
                                [int(o["label"]) if o["label"].isdigit() else -1 for o in objs],
                                torch.ones(len(objs)), min_score)
                   for lay, objs in zip(asked, plans, strict=True)]
        res.update({f"compose_layout_{k}": v for k, v in tally(planned).items() if k != "n"})
    if val_set is not None and real > 0:
        res.update({f"compose_real_{k}": v for k, v in
                    _real_reference(detector, val_set, real, digits_of, min_score, batch).items()})
    res.update(images=images.cpu(), texts=texts, layouts=asked, detections=dets, scores=scores)
    return res


def _real_reference(detector: Task, val_set: ImageSet, n: int, digits_of: list[int], min_score: float,
                    batch: int) -> dict:
    """`tally` of up to `n` real two-digit scenes of `val_set` (the first ones), through the same detector."""
    images, layouts = [], []
    for i in range(len(val_set)):
        item = val_set[i]
        if item is None or not isinstance(item.get("text"), str):
            continue
        try:
            lay = parse_caption(item["text"])
        except ValueError:
            continue
        if len(lay.digits) == 2:
            images.append(item["image"])
            layouts.append(lay)
            if len(images) == n:
                break
    if not images:
        return {}
    dets = _detect(detector, _for_detector(torch.stack(images), detector), batch)
    return tally([score_sample(lay, d["boxes"], [digits_of[c] for c in d["classes"].tolist()], d["scores"],
                               min_score) for lay, d in zip(layouts, dets, strict=True)])


def compose_png(path: str | Path, result: dict, detector: Task, rows: int = 10, per_row: int = 6,
                min_score: float = MIN_SCORE) -> Path:
    """Samples of up to `rows` captions (one per combination, the size words varying between rows), `per_row`
    each, with the detections scoring at least `min_score` drawn and a strip for each sample's score."""
    by_plain: dict[str, list[str]] = {}
    for lay in result["layouts"]:
        by_plain.setdefault(lay.plain(), [])
        if lay.caption() not in by_plain[lay.plain()]:
            by_plain[lay.plain()].append(lay.caption())
    chosen = [caps[k % len(caps)] for k, caps in enumerate(by_plain.values())][:rows]
    S = detector.info.image_size[0]
    scale = max(1, 128 // S)
    names = detector.info.classes or []
    panel_rows, marks = [], []
    for caption in chosen:
        idx = [i for i, t in enumerate(result["texts"]) if t == caption][:per_row]
        panels = []
        for i in idx:
            d = result["detections"][i]
            keep = d["scores"] >= min_score
            pil = tensor_to_pil(result["images"][i], scale)
            labels = [f"{names[c]} {s:.2f}" for c, s in zip(d["classes"][keep].tolist(), d["scores"][keep].tolist(),
                                                             strict=True)]
            panels.append(draw_boxes(pil, (d["boxes"][keep] * S * scale).tolist(), labels, d["classes"][keep].tolist()))
        panel_rows.append((caption, panels))
        marks.append([MARKS[result["scores"][i].mark] for i in idx])
    return save_panel_rows(path, panel_rows, marks=marks)


def compose_report(generator: Generate, detector: Task, path: str | Path, val_set: ImageSet | None = None,
                   per_caption: int = 20, **kw: Any) -> dict:
    """`compose_check` and `compose_png`: the metrics (``compose_*``) with ``compose_png``, the picture's path."""
    res = compose_check(generator, detector, per_caption=per_caption, val_set=val_set, **kw)
    png = compose_png(path, res, detector, min_score=kw.get("min_score", MIN_SCORE))
    return {**{k: v for k, v in res.items() if k.startswith("compose_")}, "compose_png": str(png)}
