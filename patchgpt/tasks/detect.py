"""Object detection as a token sequence with the one decoder-only GPT (Pix2Seq, without the encoder).

The image patches and a task token form a bidirectional prefix; the objects follow, 5 tokens each
(``x_min y_min x_max y_max class``), then an end token. Training is next-token cross-entropy over the
object tokens with Pix2Seq's sequence augmentation: the real objects (in random order) are followed by noise
objects — jittered copies of real boxes and random boxes — labelled with a "noise" class whose coordinates
carry no loss, up to ``detect.max_objects``. The model so learns to say "noise" rather than to stop early,
and decoding keeps proposing boxes, which COCO's AP rewards when they are scored.

Inference decodes all rows in one batch with the KV cache (`patchgpt.sampling.sample`), constrained so that
coordinates come only where coordinates belong, then a real class, or the end token. A box's score is its
class token's probability under the full distribution (noise included), so noise-like proposals score low;
class-wise non-maximum suppression removes duplicates.

References: Pix2Seq (Chen et al. 2022; google-research/pix2seq ``tasks/object_detection.py``), prefix-causal
attention over image patches (AIM, El-Nouby et al. 2024).
"""

from __future__ import annotations

import json
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..coco_eval import coco_map, ground_truth
from ..config import ConfigError, RunConfig, check_choices, check_ranges
from ..data.base import DataError, DataInfo, ImageSet, to_device
from ..data.coco import letterbox, to_pixels
from ..data.images import load_converted, to_tensor
from ..files import atomic_write_text
from ..report import draw_boxes, save_boxes, save_detection_grid, tensor_to_pil
from ..rng import RowRNG
from ..sampling import DecodeHook, SamplingParams, sample
from ..sequence import IGNORE, Sequence, Vocab, concat
from ..tokenizers.boxes import TOKENS_PER_OBJECT, Boxes
from ..tokenizers.inputs import PixelInput
from .base import Task, build_backbone


@dataclass
class DetectConfig:
    bins: int = 64               # coordinate bins over [0, 1] (about one per input pixel is plenty)
    max_objects: int = 0         # objects per image, real plus noise (0: the data's most + 2); more are dropped
    noise: bool = True           # Pix2Seq sequence augmentation: pad with noise objects up to max_objects
    jitter: float = 0.2          # noise boxes: real boxes shifted/resized by up to this fraction of their size
    scale_jitter: float = 0.0    # training zoom by a factor in [1 - s, 1 + s] about a random point (0 = off)
    noise_weight: float = 1.0    # loss weight of the noise class token
    class_weight: float = 1.0    # loss weight of real class tokens (coordinates weigh 1)
    order: str = "random"        # object order in training: random | area | raster | x (left to right)
    coord_pos: bool = True       # coordinate tokens carry the patch-grid row/column they point at
    glimpse: bool = True         # an input-only token with the box's pixels (one patch) precedes each class
    temperature: float = 0.0     # decoding: 0 = greedy; > 0 samples (with top_p for nucleus sampling)
    top_p: float = 1.0
    nms_iou: float = 0.7         # class-wise NMS threshold on decoded boxes (1 = off)
    draw_score: float = 0.3      # pictures: draw boxes scoring at least this


def glimpse(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """The region of each image inside its box, resampled to size x size and flattened like a patch.

    Args:
        images: (n, C, H, W); boxes: (n, 4) normalized xyxy, one per image.
    Returns:
        (n, size * size * C) in the `Patches` layout (row, col, channel), averaged from a 2x finer bilinear
        sample so that large boxes are not aliased.
    """
    n, C = images.shape[:2]
    x0, y0, x1, y1 = boxes.to(images.dtype).unbind(-1)
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = (x1 - x0), x0 + x1 - 1              # output [-1, 1] -> [2 x0 - 1, 2 x1 - 1]
    theta[:, 1, 1], theta[:, 1, 2] = (y1 - y0), y0 + y1 - 1
    grid = F.affine_grid(theta, [n, C, 2 * size, 2 * size], align_corners=False)
    crop = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    crop = F.avg_pool2d(crop, 2)                                            # (n, C, size, size)
    return crop.permute(0, 2, 3, 1).reshape(n, size * size * C)            # (n, P, P, C) -> (n, D)


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """(N, 4) x (M, 4) xyxy -> (N, M) IoU."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])                  # (N, M, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)                               # (N, M)
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter).clamp(min=1e-9)


def left_to_right(boxes: Tensor) -> Tensor:
    """(N, 4) xyxy boxes -> the (N,) order that reads them left to right (by x_min, ties by y_min)."""
    by_y = boxes[:, 1].argsort()
    return by_y[boxes[by_y, 0].argsort(stable=True)]


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) areas (0 for empty or inverted boxes)."""
    return (boxes[..., 2:] - boxes[..., :2]).clamp(min=0).prod(-1)


def nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou: float) -> Tensor:
    """Indices kept by class-wise non-maximum suppression, by descending score (``iou >= 1`` keeps all)."""
    order = scores.argsort(descending=True)
    if iou >= 1.0 or len(order) < 2:
        return order
    ious = box_iou(boxes[order], boxes[order])
    same = classes[order][:, None] == classes[order][None, :]
    keep: list[int] = []
    for i in range(len(order)):
        if all(not (same[i, j] and ious[i, j] > iou) for j in keep):
            keep.append(i)
    return order[torch.tensor(keep, dtype=torch.long)]


def unique_stems(paths: SequenceOf[str | Path]) -> list[str]:
    """Each path's file stem, made unique in order: a stem seen before becomes ``STEM-1``, ``STEM-2`` ... (never
    one another path already uses), so per-file outputs of ``a/x.png`` and ``b/x.png`` do not overwrite. Names
    are compared without case, as macOS and Windows file systems compare them."""
    stems = [Path(p).stem for p in paths]
    given = {s.lower() for s in stems}
    taken: set[str] = set()
    out = []
    for stem in stems:
        name, k = stem, 0
        while name.lower() in taken or (k and name.lower() in given):
            k += 1
            name = f"{stem}-{k}"
        taken.add(name.lower())
        out.append(name)
    return out


class Detect(Task):
    """Predict boxes and classes as tokens after the image (``patchgpt train detect``)."""

    name = "detect"
    shares_backbone = True
    prompt_words = ("detect", "find objects", "boxes", "detection")
    section = "detect"
    Config = DetectConfig
    output_keys = ("detections",)
    metric_keys = ("AP", "AP50")
    best_metric = ("AP", "max")
    demo_data = "digit-scenes"
    examples = [
        'patchgpt train detect --data digit-scenes --out runs/det',
        'patchgpt predict runs/det scene.png --out detections/',
    ]

    @classmethod
    def defaults(cls, cfg: RunConfig) -> None:
        cfg.tokenizer.patch_size = 8
        cfg.data.resize = "pad"   # letterbox: every box stays inside the image
        cfg.train.lr, cfg.train.steps, cfg.train.warmup, cfg.train.batch_size = 1e-3, 2500, 200, 32
        cfg.train.eval_every = 500

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        d = cfg.detect
        check_choices({"detect.order": (d.order, ("random", "area", "raster", "x"))})
        if not 0 <= d.scale_jitter < 1:
            raise ConfigError(f"detect.scale_jitter={d.scale_jitter}: must be in [0, 1) (0.3 zooms by 0.7-1.3)")
        if d.bins < 2:
            raise ConfigError(f"detect.bins={d.bins}: must be >= 2 (coordinate bins over [0, 1]; about one per "
                              "input pixel is plenty)")
        check_ranges({"detect.max_objects": (d.max_objects, "[0, inf)"), "detect.jitter": (d.jitter, "[0, inf)"),
                      "detect.noise_weight": (d.noise_weight, "[0, inf)"),
                      "detect.class_weight": (d.class_weight, "[0, inf)"),
                      "detect.temperature": (d.temperature, "[0, inf)"), "detect.top_p": (d.top_p, "(0, 1]"),
                      "detect.nms_iou": (d.nms_iou, "[0, 1]"), "detect.draw_score": (d.draw_score, "[0, 1]")})

    def __init__(self, cfg: RunConfig, info: DataInfo, vocab: Vocab | None = None,
                 shared_input: PixelInput | None = None) -> None:
        """`shared_input`: another task's input tokenizer, whose backbone this one decodes with (`Grounding`):
        then neither an input nor a backbone of its own is built (the caller attaches them)."""
        super().__init__(cfg, info, vocab)
        if not info.boxes:
            raise DataError(f"detection needs boxes; {cfg.data.spec} has none (use coco:ANN.json[:IMAGES_DIR] "
                            "or digit-scenes)")
        d = cfg.detect
        if d.max_objects <= 0:   # auto: room for the busiest image of the data plus two noise objects
            d.max_objects = max(info.max_objects, 1) + 2
        self.input = self.make_input() if shared_input is None else shared_input
        self.task_id = self.vocab.add("task_detect", 1).start
        self.boxes = Boxes(d.bins, len(info.classes), self.vocab)
        self.max_objects = d.max_objects
        self.glimpse = d.glimpse and self.input.kind == "patches"
        self.glimpse_id = self.vocab.add("glimpse", 1).start
        self.period = TOKENS_PER_OBJECT + int(self.glimpse)     # input tokens per object
        if shared_input is None:
            length = self.input.length + 1 + self.period * d.max_objects + 1
            self.backbone = build_backbone(cfg, self.vocab, self.input.patch_dim, length, self.input.grid)

    def state(self) -> dict:
        return {**super().state(), "boxes": True, "category_ids": self.info.category_ids}

    # ---- training sequences -------------------------------------------------------------------------

    def _noise_boxes(self, real: Tensor, n: int, gen: torch.Generator | None) -> Tensor:
        """`n` noise boxes (n, 4): half jittered copies of `real` boxes (if any), the rest random."""
        if n <= 0:
            return torch.zeros(0, 4)
        rand = lambda *s: torch.rand(*s, generator=gen)                   # noqa: E731
        centre, size = rand(n, 2), rand(n, 2) * 0.5 + 0.05
        out = torch.cat([centre - size / 2, centre + size / 2], dim=1)    # (n, 4) random boxes
        if len(real):
            k = n // 2
            src = real[torch.randint(0, len(real), (k,), generator=gen)]  # (k, 4)
            wh = (src[:, 2:] - src[:, :2]).repeat(1, 2)                   # (k, 4)
            out[:k] = src + (rand(k, 4) - 0.5) * wh * self.cfg.detect.jitter * 2
        return out.clamp(0, 1)

    def _targets(self, boxes: Tensor, classes: Tensor, gen: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """One image's padded objects -> (ids (L,), labels (L,)) of the object part (labels = next token)."""
        d = self.cfg.detect
        keep = classes >= 0
        boxes, classes = boxes[keep].cpu(), classes[keep].cpu()
        n = len(classes)
        if d.order == "random":
            perm = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
        elif d.order == "area":
            perm = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).argsort(descending=True)
        elif d.order == "x":
            perm = left_to_right(boxes)
        else:  # raster: top to bottom, then left to right (by y_min, ties by x_min)
            by_x = boxes[:, 0].argsort()
            perm = by_x[boxes[by_x, 1].argsort(stable=True)]
        perm = perm[:self.max_objects]
        boxes, classes = boxes[perm], classes[perm]
        n_noise = self.max_objects - len(classes) if d.noise and gen is not None else 0
        noise = self._noise_boxes(boxes, n_noise, gen)
        all_boxes = torch.cat([boxes, noise])
        all_cls = torch.cat([classes, torch.full((n_noise,), -1, dtype=torch.long)])
        objs = self.boxes.encode(all_boxes, all_cls)[:-1].reshape(-1, TOKENS_PER_OBJECT)  # (N, 5)
        if self.glimpse:   # x0 y0 x1 y1 G class: the class is predicted from the glimpse of the box
            g = torch.full((len(objs), 1), self.glimpse_id, dtype=torch.long)
            objs = torch.cat([objs[:, :4], g, objs[:, 4:]], dim=1)                          # (N, 6)
        ids = torch.cat([torch.tensor([self.task_id]), objs.reshape(-1), torch.tensor([self.boxes.end])])
        labels = ids[1:].clone()                                           # what each input position predicts
        P = self.period
        for j in range(len(all_cls)):
            if self.glimpse:
                labels[j * P + 4] = IGNORE                                 # y_max is followed by the glimpse
            if j >= len(classes):
                labels[j * P:j * P + 4] = IGNORE                           # noise boxes' coordinates: no loss
        return ids[:-1], labels

    def sequence(self, batch: dict, rng: RowRNG | None = None) -> Sequence:
        """Image prefix + task token + objects; labels on the object tokens (noise coordinates excluded).
        With `rng`: objects in random order (``detect.order``) and noise objects (Pix2Seq)."""
        images = batch["image"]
        dev = images.device
        img = self.input.encode(images)
        gens: list[torch.Generator | None] = [None] * images.shape[0]
        if rng is not None:   # one generator per row, drawn for the global batch: the same under DDP as alone
            gens = rng.generators(images.shape[0])
        parts = [self._targets(b, c, g) for b, c, g in zip(batch["boxes"], batch["classes"], gens, strict=True)]
        L = max(len(ids) for ids, _ in parts)
        ids = torch.full((len(parts), L), self.boxes.end, dtype=torch.long)
        labels = torch.full((len(parts), L), IGNORE, dtype=torch.long)
        for b, (i, lab) in enumerate(parts):
            ids[b, :len(i)], labels[b, :len(lab)] = i, lab
        weights = torch.ones(len(parts), L)
        weights[(labels >= self.boxes.classes.start) & (labels < self.boxes.noise)] = self.cfg.detect.class_weight
        weights[labels == self.boxes.noise] = self.cfg.detect.noise_weight
        pos = torch.cat([torch.zeros(len(parts), 1, 3, dtype=torch.long), self._positions(ids[:, 1:])], dim=1)
        objs = Sequence(ids=ids.to(dev), labels=labels.to(dev), pos=pos.to(dev), weights=weights.to(dev))
        if self.glimpse:
            objs = self._with_glimpses(objs, images)
        return concat(img, objs, prefix_len=img.ids.shape[1] + 1)

    def _with_glimpses(self, objs: Sequence, images: Tensor) -> Sequence:
        """Fill the glimpse slots of (B, L) object tokens with the patch of the box each follows."""
        B, L = objs.ids.shape
        D = self.input.patch_dim
        is_g = objs.ids == self.glimpse_id                                 # (B, L)
        patches = torch.zeros(B, L, D, device=images.device, dtype=images.dtype)
        b, j = is_g.nonzero(as_tuple=True)
        if len(b):
            coords = torch.stack([objs.ids[b, j - 4 + k] for k in range(4)], dim=1)   # (n, 4) ids
            patches[b, j] = glimpse(images[b], self.boxes.dequantize(coords), self.cfg.tokenizer.patch_size)
        return Sequence(ids=objs.ids, labels=objs.labels, pos=objs.pos, patches=patches, is_patch=is_g,
                        weights=objs.weights)

    def _positions(self, ids: Tensor, period: int | None = None) -> Tensor:
        """(B, L) object tokens from slot 0 -> (B, L, 3) grid positions (``detect.coord_pos``), else none."""
        if not self.cfg.detect.coord_pos:
            return torch.zeros(*ids.shape, 3, dtype=torch.long, device=ids.device)
        return self.boxes.grid_pos(ids, self.input.grid, period or self.period)

    def augment(self, batch: dict, rng: RowRNG) -> dict:
        """Flips (``data.flip``) and scale jitter (``detect.scale_jitter``) that move the boxes with the pixels;
        the generic pixel shift is not used (it would not move the boxes)."""
        if self.cfg.data.augment and self.cfg.data.flip:
            batch = self._flip(batch, rng)
        if self.cfg.data.augment and self.cfg.detect.scale_jitter > 0:
            batch = self._zoom(batch, rng)
        return batch

    def _flip(self, batch: dict, rng: RowRNG) -> dict:
        """Horizontal flips of half the images, with their boxes (``data.flip``)."""
        flip = (rng.rand(batch["image"].shape[0]) < 0.5).to(batch["image"].device)
        images = torch.where(flip[:, None, None, None], batch["image"].flip(-1), batch["image"])
        b = batch["boxes"]
        flipped = torch.stack([1 - b[..., 2], b[..., 1], 1 - b[..., 0], b[..., 3]], dim=-1)   # (B, N, 4)
        return {**batch, "image": images, "boxes": torch.where(flip[:, None, None], flipped, b)}

    def _zoom(self, batch: dict, rng: RowRNG) -> dict:
        """Scale jitter (``detect.scale_jitter`` = s), Pix2Seq's main image augmentation, at a fixed size.

        Each image is scaled by z in [1 - s, 1 + s] and shifted by a random t that keeps the view inside the
        scaled image (z > 1: a crop) or the scaled image inside the view (z < 1: black borders), so pixel u
        shows what was at (u - t) / z and a box b becomes b z + t, clipped to the image. Objects left less
        than 30% visible are dropped (class -1).
        """
        s = self.cfg.detect.scale_jitter
        images, b = batch["image"], batch["boxes"]
        n, dev, dt = images.shape[0], images.device, images.dtype
        r = rng.rand(n, 3).to(dev, dt)                                                # (n, 3) this rank's rows
        z = 1 - s + 2 * s * r[:, 0]                                                   # (n,)
        lo, hi = (1 - z).clamp(max=0), (1 - z).clamp(min=0)                          # (n,) the shift range
        tx, ty = lo + (hi - lo) * r[:, 1], lo + (hi - lo) * r[:, 2]                   # (n,) each
        theta = torch.zeros(n, 2, 3, dtype=dt, device=dev)   # output [-1, 1] coords -> input [-1, 1] coords
        theta[:, 0, 0], theta[:, 0, 2] = 1 / z, (1 - 2 * tx) / z - 1
        theta[:, 1, 1], theta[:, 1, 2] = 1 / z, (1 - 2 * ty) / z - 1
        grid = F.affine_grid(theta, list(images.shape), align_corners=False)
        zoomed = F.grid_sample(images + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1
        shift = torch.stack([tx, ty, tx, ty], dim=-1)[:, None]                       # (n, 1, 4)
        moved = b.to(dt) * z[:, None, None] + shift                                   # (n, N, 4)
        clipped = moved.clamp(0, 1)
        left = box_area(clipped)                                                      # (n, N)
        visible = (left > 0) & (left >= 0.3 * box_area(moved))
        classes = torch.where(visible, batch["classes"], -1)
        return {**batch, "image": zoomed, "boxes": clipped.to(b.dtype), "classes": classes}

    def forward(self, batch: dict, rng: RowRNG | None = None) -> tuple[Tensor, dict]:
        loss, logits, lab = self.prefix_loss(self.sequence(batch, rng))    # from the task token on
        with torch.no_grad():   # the two halves of the loss, for the log: where boxes go, and what they are
            nll = F.cross_entropy(logits.float().transpose(1, 2), lab, ignore_index=IGNORE,
                                  reduction="none")                        # (B, L)
            is_cls = (lab >= self.boxes.classes.start) & (lab < self.boxes.noise)
            is_coord = (lab >= self.boxes.coords.start) & (lab < self.boxes.coords.stop)
            logs = {"loss": loss.detach(), "loss_class": nll[is_cls].mean() if is_cls.any() else nll.sum() * 0,
                    "loss_coord": nll[is_coord].mean() if is_coord.any() else nll.sum() * 0}
        return loss, logs

    # ---- inference ----------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, batch: dict, temperature: float | None = None, top_p: float | None = None,
                max_objects: int | None = None, seed: int = 0) -> dict:
        """Detect objects in ``batch["image"]`` (B, C, H, W).

        Returns ``{"detections": [{"boxes": (N, 4) normalized xyxy, "classes": (N,), "scores": (N,)}, ...]}``,
        one entry per image, sorted by score. Greedy by default (``detect.temperature=0``); a temperature
        > 0 with ``top_p`` < 1 gives nucleus sampling.
        """
        d = self.cfg.detect
        images = batch["image"]
        B, dev = images.shape[0], images.device
        prompt = self.task_prompt(images, self.task_id)
        n_obj = min(max_objects or self.max_objects, self.max_objects)
        gen = torch.Generator(device=dev).manual_seed(seed)
        params = SamplingParams(temperature=d.temperature if temperature is None else temperature,
                                top_p=d.top_p if top_p is None else top_p)
        ids, raw = sample(self.backbone, prompt, TOKENS_PER_OBJECT * n_obj + 1, params, generator=gen,
                          allowed=partial(self.boxes.allowed, max_objects=n_obj),
                          hook=DetectHook(self, images, n_obj), return_logits=True)
        out = []
        cls_range = self.boxes.classes
        for b in range(B):
            boxes, classes = self.boxes.decode(ids[b].cpu())
            n = len(classes)
            probs = raw[b, TOKENS_PER_OBJECT - 1:TOKENS_PER_OBJECT * n:TOKENS_PER_OBJECT,
                        cls_range.start:cls_range.stop].softmax(-1).cpu()       # (n, K + 1)
            scores = probs.gather(1, classes.clamp(min=0)[:, None])[:, 0] if n else torch.zeros(0)
            ok = (classes >= 0) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, classes, scores = boxes[ok], classes[ok], scores[ok]
            keep = nms(boxes, scores, classes, d.nms_iou)
            out.append({"boxes": boxes[keep], "classes": classes[keep], "scores": scores[keep]})
        return {"detections": out}

    def metric(self) -> DetectMetric:
        return DetectMetric(self)

    # ---- the user's side: files and pictures --------------------------------------------------------------

    @torch.no_grad()
    def predict_files(self, paths: SequenceOf[str | Path], out: str | Path | None = None, min_score: float = 0.0,
                      **options: Any) -> list[dict]:
        """Detect objects in image files: per image ``{"image", "width", "height", "objects": [{"box" (xyxy
        pixels of the original image), "class", "score"}]}``; with `out` (a directory), one JSON and one PNG
        with the boxes drawn per image, named after the file (``NAME.json``, ``NAME.png``; files of the same
        name from different folders become ``NAME-1``, ``NAME-2`` ..., in the order given)."""
        S, C = self.info.image_size[0], self.info.channels
        out = Path(out) if out else None
        if out:
            if out.exists() and not out.is_dir():
                raise ConfigError(f"--out {out}: is a file; detection writes a directory of JSON and PNG files")
            out.mkdir(parents=True, exist_ok=True)
        stems = unique_stems(paths)
        names = self.info.classes
        results = []
        for i in range(0, len(paths), 32):
            chunk = list(paths[i:i + 32])
            originals, metas, inputs = [], [], []
            for p in chunk:
                im = load_converted(p, C)
                boxed, meta = letterbox(im, S, self.cfg.data.resize)
                originals.append(im)
                metas.append(meta)
                inputs.append(to_tensor(boxed))
            dets = self.predict(to_device({"image": torch.stack(inputs)}, self.device))["detections"]
            for j, (p, im, meta, det) in enumerate(zip(chunk, originals, metas, dets, strict=True)):
                keep = det["scores"] >= min_score
                px = to_pixels(det["boxes"][keep].cpu(), meta, S).tolist()
                cls, scores = det["classes"][keep].tolist(), det["scores"][keep].tolist()
                objs = [{"box": [round(v, 1) for v in b], "class": names[c], "score": round(s, 4)}
                        for b, c, s in zip(px, cls, scores, strict=True)]
                r = {"image": str(p), "width": meta["width"], "height": meta["height"], "objects": objs}
                results.append(r)
                if out:
                    stem = stems[i + j]
                    atomic_write_text(out / f"{stem}.json", json.dumps(r, indent=2) + "\n")
                    shown = [o for o in objs if o["score"] >= self.cfg.detect.draw_score]
                    save_boxes(out / f"{stem}.png", im.convert("RGB"), [o["box"] for o in shown],
                               [f"{o['class']} {o['score']:.2f}" for o in shown],
                               [names.index(o["class"]) for o in shown])
        return results

    def report(self, out: Path, val_set: ImageSet, metrics: dict, prefix: str = "", **options: Any) -> dict:
        """``{prefix}detections.png``: validation images with predicted boxes over the ground truth."""
        if not len(val_set):
            return {}
        items = [val_set[i] for i in range(min(12, len(val_set)))]
        return {"detections_png": str(self.detections_png(items, out / f"{prefix}detections.png"))}

    def detections_png(self, items: list, path: Path) -> Path:
        """Images with predicted boxes (solid, "class score") over the ground truth (dashed, grey)."""
        items = [it for it in items if it is not None]
        images = torch.stack([it["image"] for it in items]).to(self.device)
        self.eval()
        dets = self.predict({"image": images})["detections"]
        S = self.info.image_size[0]
        scale = max(1, 256 // S)
        panels = []
        for item, det in zip(items, dets, strict=True):
            pil = tensor_to_pil(item["image"].cpu(), scale)
            gt = (item["boxes"] * S * scale).tolist()
            pil = draw_boxes(pil, gt, [""] * len(gt), dashed=True, colour="#9e9e9e")
            keep = det["scores"] >= self.cfg.detect.draw_score
            boxes = (det["boxes"][keep] * S * scale).tolist()
            names = [f"{self.info.classes[c]} {s:.2f}" for c, s in zip(det["classes"][keep].tolist(),
                                                                         det["scores"][keep].tolist(), strict=True)]
            panels.append(draw_boxes(pil, boxes, names, det["classes"][keep].tolist()))
        return save_detection_grid(path, panels)


class DetectHook(DecodeHook):
    """How `Detect.predict` decodes: each object token sits at the grid cell its box's coordinates point at
    (``detect.coord_pos``: known only once they are sampled), the glimpse of each box is fed after its y_max
    (``detect.glimpse``), and decoding ends once every image has emitted the end token (checked per object).

    Args:
        task: the detector; images: (B, C, H, W) the images being decoded; n_obj: the most objects per image;
        glimpses: feed glimpses where the detector was trained with them (False: objects that point back at
            objects already read, e.g. `Grounding.point`).
    """

    stop_check = TOKENS_PER_OBJECT

    def __init__(self, task: Detect, images: Tensor | None, n_obj: int, glimpses: bool = True) -> None:
        self.task, self.images = task, images
        self.dynamic = task.cfg.detect.coord_pos          # without it every object token sits at position zero
        self.max_injected = n_obj if task.glimpse and glimpses else 0  # one glimpse per object
        self.stop_token = task.boxes.end

    def position(self, history: Tensor, t: int) -> Tensor:
        """Generated ids so far (B, t + 1) (5 per object: no glimpses) -> the (B, 1, 3) position of the last."""
        return self.task._positions(history[:, t - t % TOKENS_PER_OBJECT:], TOKENS_PER_OBJECT)[:, -1:]

    def inject(self, history: Tensor, t: int) -> Sequence | None:
        """After a generated y_max (slot 3), the glimpse token of that box; else None."""
        if t % TOKENS_PER_OBJECT != 3:
            return None
        task = self.task
        coords = history[:, t - 3:t + 1]                                   # (B, 4) ids
        B, dev = coords.shape[0], coords.device
        pos = task._positions(coords, TOKENS_PER_OBJECT)[:, -1:]           # the box centre, as y_max's
        patch = glimpse(self.images, task.boxes.dequantize(coords), task.cfg.tokenizer.patch_size)   # (B, D)
        return Sequence(ids=torch.full((B, 1), task.glimpse_id, dtype=torch.long, device=dev),
                        labels=torch.full((B, 1), IGNORE, dtype=torch.long, device=dev), pos=pos,
                        patches=patch[:, None], is_patch=torch.ones(B, 1, dtype=torch.bool, device=dev))


class DetectMetric:
    """Validation loss and COCO mAP (AP, AP50, AP75, per-class AP), with the detections as COCO results."""

    def __init__(self, task: Detect) -> None:
        self.task = task
        self.metas: list[dict] = []
        self.results: list[dict] = []
        self.loss_sum, self.n = 0.0, 0

    def update(self, batch: dict) -> None:
        t = self.task
        loss, _ = t(batch, RowRNG(torch.Generator().manual_seed(len(self.metas))))  # noise objects, as in training
        B = batch["image"].shape[0]
        self.loss_sum += float(loss) * B
        self.n += B
        dets = t.predict(batch)["detections"]
        S = t.info.image_size[0]
        cat_ids = t.info.category_ids or list(range(1, len(t.info.classes) + 1))
        for meta, det in zip(batch["meta"], dets, strict=True):
            self.metas.append(meta)
            px = to_pixels(det["boxes"], meta, S)                               # (N, 4) xyxy pixels
            for box, c, s in zip(px.tolist(), det["classes"].tolist(), det["scores"].tolist(), strict=True):
                self.results.append({"image_id": meta["image_id"], "category_id": cat_ids[c],
                                     "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                                              round(box[3] - box[1], 2)], "score": round(s, 5)})

    def compute(self) -> dict:
        t = self.task
        cat_ids = t.info.category_ids or list(range(1, len(t.info.classes) + 1))
        gt = ground_truth(self.metas, cat_ids, t.info.classes)
        m = coco_map(gt, self.results, t.info.classes)
        return {"val_loss": self.loss_sum / max(self.n, 1), **m, "images": self.n,
                "detections_per_image": len(self.results) / max(self.n, 1)}

    def files(self) -> dict[str, Any]:
        """The detections in COCO results format (``detections.json``)."""
        return {"detections.json": self.results}
