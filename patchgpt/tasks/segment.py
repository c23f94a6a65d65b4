"""Semantic segmentation as a token sequence: the image, a task token, then one class token per patch cell.

The image's tokens and the task token form a bidirectional prefix; the GPT then writes, in raster order, one
token per cell of the patch grid (`patchgpt.tokenizers.masks.CellMasks`): the cell's foreground class, or
background. Each cell token sits at its cell's grid position, so it meets the image patch under it through the
same position embeddings. A small head refines each written cell to pixels: from the cell token's hidden state
and the patch's own pixels it predicts, per pixel, "this cell's class" or "background". Decoding runs on the KV
cache (`patchgpt.sampling.sample`), greedy by default, constrained to class tokens; one more forward pass over
the written cells gives the pixel bits.

Metrics: mean IoU over the classes present (in the ground truth or the prediction), per-class IoU, pixel
accuracy; pixels labelled 255 are not scored.

References: Pix2Seq v2 (Chen et al. 2022) and UViM (Kolesnikov et al. 2022) write dense outputs as tokens;
SETR (Zheng et al. 2021) decodes ViT patch features to pixels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import ConfigError, RunConfig
from ..data.base import DataError, DataInfo, ImageSet
from ..data.images import load_converted, resize, to_tensor, unresize
from ..data.masks import read_mask
from ..files import atomic_open, atomic_write_text
from ..report import save_panel_rows, tensor_to_pil
from ..rng import RowRNG
from ..sampling import SamplingParams, sample
from ..sequence import IGNORE, Sequence, Vocab, concat, tokens
from ..tokenizers.masks import IGNORE_LABEL, CellMasks
from ..tokenizers.patches import grid_positions
from .base import Task, build_backbone, next_token_loss, scene_recipe


@dataclass
class SegmentConfig:
    pixel_weight: float = 1.0    # weight of the per-pixel refinement loss beside the cell-token loss
    temperature: float = 0.0     # decoding: 0 = greedy; > 0 samples the cell classes
    alpha: float = 0.5           # overlay pictures: opacity of the mask over the image


def palette(k: int) -> np.ndarray:
    """(k, 3) uint8 colours, PASCAL VOC's colour map (label 0 black; bits of the label spread over R, G, B)."""
    out = np.zeros((k, 3), dtype=np.uint8)
    for i in range(k):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


def mask_image(mask: np.ndarray, k: int) -> Image.Image:
    """(H, W) labels -> a palette PNG image (255 = ignore, white)."""
    im = Image.fromarray(mask.astype(np.uint8), "P")
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[:k] = palette(k)
    pal[IGNORE_LABEL] = 255
    im.putpalette(pal.reshape(-1).tolist())
    return im


def overlay(image: Image.Image, mask: np.ndarray, k: int, alpha: float = 0.5) -> Image.Image:
    """The image with its labels blended over it (background and ignore left as they are)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    colours = palette(max(k, 1)).astype(np.float32)[np.clip(mask, 0, k - 1)]          # (H, W, 3)
    on = ((mask > 0) & (mask != IGNORE_LABEL))[..., None]
    out = np.where(on, (1 - alpha) * rgb + alpha * colours, rgb)
    return Image.fromarray(out.round().astype(np.uint8), "RGB")


class Segment(Task):
    """Label every pixel: image tokens, a task token, one class token per cell, refined to pixels."""

    name = "segment"
    shares_backbone = True
    prompt_words = ("segment", "segmentation", "mask", "masks")
    section = "segment"
    Config = SegmentConfig
    output_keys = ("masks",)
    metric_keys = ("miou", "pixel_accuracy", "per_class_iou")
    best_metric = ("miou", "max")
    demo_data = "digit-scenes"
    examples = ["patchgpt train segment --data digit-scenes --out runs/seg",
                "patchgpt train segment --data masks:my_data --out runs/seg",
                "patchgpt predict runs/seg photo.jpg --out masks/"]

    @classmethod
    def defaults(cls, cfg: RunConfig) -> None:
        scene_recipe(cfg)
        cfg.data.augment = False   # the generic shifts would move the pixels away from their labels
        cfg.data.masks = True      # coco: read the segmentations
        cfg.data.resize = "pad"    # letterbox: the padding is marked ignore

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        s = cfg.segment
        if s.pixel_weight < 0 or s.temperature < 0 or not 0 <= s.alpha <= 1:
            raise ConfigError("segment.pixel_weight and segment.temperature must be >= 0, segment.alpha in [0, 1]")
        if cfg.tokenizer.kind != "patches":
            raise ConfigError(f"segment reads patches (tokenizer.kind=patches), not {cfg.tokenizer.kind}")
        if cfg.data.augment:
            raise ConfigError("segment does not augment (data.augment=false): the shifts and crops move the "
                              "pixels, not their labels")

    def __init__(self, cfg: RunConfig, info: DataInfo, vocab: Vocab | None = None) -> None:
        super().__init__(cfg, info, vocab)
        if not info.masks:
            raise DataError(f"segmentation needs masks; {cfg.data.spec} has none (use digit-scenes, or "
                            "masks:PATH with images/ and masks/ label-map PNGs)")
        self.input = self.make_input()
        self.task_id = self.vocab.add("task_segment", 1).start
        self.K = len(info.masks)
        self.class_ids = self.vocab.add("mask_class", self.K)
        P = cfg.tokenizer.patch_size
        self.masks = CellMasks(P, self.K, tuple(info.image_size))
        self.N = self.masks.grid[0] * self.masks.grid[1]
        length = self.input.length + 1 + self.N
        self.backbone = build_backbone(cfg, self.vocab, self.input.patch_dim, length, self.input.grid)
        C, D = cfg.model.n_embd, self.input.patch_dim
        self.refine = nn.Sequential(nn.Linear(C + D, C), nn.GELU(), nn.Linear(C, P * P))   # pixel bits of a cell

    def state(self) -> dict:
        return {**super().state(), "masks": self.info.masks}

    # ---- sequences ------------------------------------------------------------------------------------

    def cell_positions(self, device: torch.device | str) -> Tensor:
        """(N, 3) grid positions of the cells, raster order (those of the image patches)."""
        return grid_positions(1, *self.masks.grid, device=device)

    def sequence(self, batch: dict, rng: RowRNG | None = None) -> Sequence:
        """Image + task token + the cells' class tokens; labels: each cell's class, predicted one step ahead."""
        images = batch["image"]
        classes, _, _ = self.masks.encode(batch["mask"].to(images.device))              # (B, N)
        return self._with_cells(images, classes)

    def _with_cells(self, images: Tensor, classes: Tensor) -> Sequence:
        """The full sequence for cell classes (B, N) (IGNORE: no target; fed as background)."""
        B, dev = images.shape[0], images.device
        prompt = self.task_prompt(images, self.task_id)
        ids = self.class_ids.start + classes.clamp(min=0)                                 # (B, N)
        labels = torch.cat([classes[:, 1:], torch.full((B, 1), IGNORE, dtype=torch.long, device=dev)], 1)
        labels = torch.where(labels >= 0, labels + self.class_ids.start, IGNORE)
        cells = replace(tokens(ids, labels), pos=self.cell_positions(dev).expand(B, self.N, 3))
        prompt.labels[:, -1] = torch.where(classes[:, 0] >= 0, classes[:, 0] + self.class_ids.start, IGNORE)
        return concat(prompt, cells, prefix_len=prompt.prefix_len)

    def _bits(self, h: Tensor, seq: Sequence) -> Tensor:
        """Hidden states of the cell tokens (B, N, C) -> pixel-bit logits (B, N, P*P), from each cell's state and
        its patch (the sequence's first N tokens are the image's patches, cell by cell)."""
        patches = seq.patches[:, :self.N]                                                 # (B, N, D)
        return self.refine(torch.cat([h, patches.to(h.dtype)], dim=-1))

    def forward(self, batch: dict, rng: RowRNG | None = None) -> tuple[Tensor, dict]:
        images = batch["image"]
        classes, bits, valid = self.masks.encode(batch["mask"].to(images.device))
        seq = self._with_cells(images, classes)
        P0 = seq.prefix_len - 1
        h = self.backbone(seq)                                                           # (B, T, C)
        tail = Sequence(ids=seq.ids[:, P0:], labels=seq.labels[:, P0:], pos=seq.pos[:, P0:])
        cell_loss = next_token_loss(self.backbone.logits(h[:, P0:]), tail)
        logits = self._bits(h[:, P0 + 1:], seq)                                          # (B, N, P*P)
        on = valid & (classes[..., None] > 0)          # cells of a foreground class: which pixels are it
        bce = F.binary_cross_entropy_with_logits(logits, bits, reduction="none")       # (B, N, P*P)
        pixel_loss = (bce * on).sum() / on.sum().clamp(min=1)
        loss = cell_loss + self.cfg.segment.pixel_weight * pixel_loss
        return loss, {"loss": loss.detach(), "cell_loss": cell_loss.detach(), "pixel_loss": pixel_loss.detach()}

    # ---- inference ------------------------------------------------------------------------------------

    @torch.no_grad()
    def write_cells(self, images: Tensor, seed: int = 0) -> Tensor:
        """The cells' classes (B, N) in [0, K), written after the image on the KV cache (greedy unless
        ``segment.temperature`` > 0)."""
        prompt = self.task_prompt(images, self.task_id)
        params = SamplingParams(temperature=self.cfg.segment.temperature)
        gen = torch.Generator(device=images.device).manual_seed(seed)
        ids = sample(self.backbone, prompt, self.N, params, positions=self.cell_positions(images.device),
                     generator=gen, allowed=[self.class_ids])
        return ids - self.class_ids.start

    @torch.no_grad()
    def predict(self, batch: dict, seed: int = 0) -> dict:
        """``{"masks": (B, H, W) long labels, "cells": (B, N) cell classes}`` for ``batch["image"]``."""
        images = batch["image"]
        classes = self.write_cells(images, seed)
        seq = self._with_cells(images, classes)
        h = self.backbone(seq)[:, seq.prefix_len:]                                      # (B, N, C) the cells
        bits = torch.sigmoid(self._bits(h, seq))
        return {"masks": self.masks.decode(classes, bits), "cells": classes}

    def metric(self) -> SegmentMetric:
        return SegmentMetric(self)

    @torch.no_grad()
    def predict_files(self, paths: SequenceOf[str | Path], out: str | Path | None = None,
                      **options: Any) -> list[dict]:
        """Segment image files: ``[{"image", "size", "classes": {name: share of pixels}}]``; with `out` (a
        directory), ``NAME_mask.png`` (palette label map at the file's own size) and ``NAME_overlay.png``
        beside ``NAME.json``."""
        self.eval()
        names = self.info.masks or []
        results: list[dict] = []
        for i in range(0, len(paths), 32):
            chunk = list(paths[i:i + 32])
            sources = [load_converted(p, self.info.channels) for p in chunk]   # each file read once
            images = torch.stack([to_tensor(resize(im, self.info.image_size[0], self.cfg.data.resize))
                                  for im in sources]).to(self.device)             # (B, C, S, S), as read_files
            masks = self.predict({"image": images})["masks"].cpu().numpy().astype(np.uint8)
            for p, m, src in zip(chunk, masks, sources, strict=True):
                full = np.asarray(unresize(Image.fromarray(m, "L"), src.size[0], src.size[1], self.cfg.data.resize))
                counts = np.bincount(full.reshape(-1), minlength=self.K)[:self.K] / max(full.size, 1)
                r = {"image": str(p), "size": [src.size[0], src.size[1]],
                     "classes": {names[k]: round(float(counts[k]), 4) for k in range(self.K) if counts[k] > 0}}
                if out:
                    d = Path(out)
                    d.mkdir(parents=True, exist_ok=True)
                    stem = Path(p).stem
                    with atomic_open(d / f"{stem}_mask.png") as f:
                        mask_image(full, self.K).save(f, format="PNG")
                    with atomic_open(d / f"{stem}_overlay.png") as f:
                        overlay(src, full, self.K, self.cfg.segment.alpha).save(f, format="PNG")
                    r["mask"], r["overlay"] = str(d / f"{stem}_mask.png"), str(d / f"{stem}_overlay.png")
                    atomic_write_text(d / f"{stem}.json", json.dumps(r, indent=2))
                results.append(r)
        return results

    def report(self, out: Path, val_set: ImageSet, metrics: dict, prefix: str = "", **options: Any) -> dict:
        """``{prefix}segments.png``: validation images, the true labels and the predicted ones over them."""
        if not len(val_set):
            return {}
        items = [it for it in (val_set[i] for i in range(min(8, len(val_set)))) if it is not None]
        images = torch.stack([it["image"] for it in items]).to(self.device)
        self.eval()
        pred = self.predict({"image": images})["masks"].cpu().numpy()
        scale = max(1, 128 // self.info.image_size[0])
        a = self.cfg.segment.alpha
        rows: list[tuple[str, list[Image.Image]]] = [("image", []), ("true", []), ("predicted", [])]
        for k, it in enumerate(items):
            pil = tensor_to_pil(it["image"], scale)
            up = lambda m: np.kron(m, np.ones((scale, scale), dtype=m.dtype))   # noqa: E731 - nearest upscale
            rows[0][1].append(pil)
            rows[1][1].append(overlay(pil, up(it["mask"].numpy()), self.K, a))
            rows[2][1].append(overlay(pil, up(pred[k]), self.K, a))
        path = save_panel_rows(out / f"{prefix}segments.png", rows)
        return {"segments_png": str(path)}


class SegmentMetric:
    """Validation loss, and over all validation pixels (255 not scored) the confusion matrix: mean IoU over
    the classes present in the ground truth or the prediction, per-class IoU and pixel accuracy. Masks read
    from files (``masks:PATH``) are scored at their own size, the prediction resized back (`unresize`);
    generated ones (digit-scenes) and COCO's at the model's resolution (``at_original_size`` counts the
    former)."""

    def __init__(self, task: Segment) -> None:
        self.task, self.loss_sum, self.n = task, 0.0, 0
        self.confusion = np.zeros((task.K, task.K), dtype=np.int64)   # rows: true, columns: predicted
        self.original = 0   # images scored at their file's own size (masks:PATH)

    def update(self, batch: dict) -> None:
        loss, _ = self.task(batch)
        B = batch["image"].shape[0]
        self.loss_sum += float(loss) * B
        self.n += B
        pred = self.task.predict(batch)["masks"].cpu().numpy().astype(np.uint8)        # (B, S, S)
        metas = batch.get("meta") or [None] * B
        for k, meta in enumerate(metas):
            if isinstance(meta, dict) and "mask_file" in meta:   # the user's masks: scored at their own size
                true = read_mask(Path(meta["mask_file"]))
                full = unresize(Image.fromarray(pred[k], "L"), meta["width"], meta["height"],
                                self.task.cfg.data.resize)
                self.confusion += confusion(true.reshape(-1), np.asarray(full).reshape(-1), self.task.K)
                self.original += 1
            else:
                self.confusion += confusion(batch["mask"][k].cpu().numpy().reshape(-1), pred[k].reshape(-1),
                                            self.task.K)

    def compute(self) -> dict:
        iou = iou_per_class(self.confusion)
        names = self.task.info.masks or [str(k) for k in range(self.task.K)]
        present = ~np.isnan(iou)
        return {"val_loss": self.loss_sum / max(self.n, 1), "n": self.n,
                "miou": float(np.nanmean(iou)) if present.any() else 0.0,
                "pixel_accuracy": float(np.trace(self.confusion) / max(self.confusion.sum(), 1)),
                "per_class_iou": {names[k]: round(float(iou[k]), 4) for k in range(len(iou)) if present[k]},
                "at_original_size": self.original}


def confusion(true: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """(k, k) counts of (true, predicted) label pairs over pixels whose true label is not 255."""
    keep = true != IGNORE_LABEL
    idx = true[keep].astype(np.int64) * k + np.clip(pred[keep].astype(np.int64), 0, k - 1)
    return np.bincount(idx, minlength=k * k).reshape(k, k)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """IoU = TP / (TP + FP + FN) per class from a confusion matrix; NaN where a class is neither true nor
    predicted anywhere."""
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)
