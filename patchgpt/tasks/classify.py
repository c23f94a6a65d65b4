"""Image classification: full fine-tuning, a linear probe, or an attentive probe on frozen features.

References: iGPT's linear probe on average-pooled features of a chosen layer (Chen et al. 2020); AIM's
attentive probe, a learned query cross-attending over the frozen patch features (El-Nouby et al. 2024);
MAE's BatchNorm-without-affine before the linear probe (He et al. 2022).
"""

from __future__ import annotations

import json
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import dist
from ..config import ConfigError, RunConfig, check_choices, check_ranges
from ..data.base import DataError, DataInfo, ImageSet
from ..files import atomic_write_text
from ..report import save_confusion, save_rows
from ..rng import RowRNG
from ..sequence import Sequence, Vocab
from .base import Task, build_backbone, recognition_target


@dataclass
class ClassifyConfig:
    mode: str = "finetune"       # finetune | linear | attentive
    layer: int = -1              # probe features from this block (1-based; -1 = last, with final norm)
    label_smoothing: float = 0.1
    attention: str = "bidirectional"  # bidirectional | causal
    head_dropout: float = 0.0


class AttentivePool(nn.Module):
    """One learned query attends over (B, T, C) features -> (B, C)."""

    def __init__(self, dim: int, n_head: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.attn = nn.MultiheadAttention(dim, n_head, batch_first=True)
        self.out_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        kv = self.norm(x)
        q = self.query.expand(x.shape[0], -1, -1)                         # (B, 1, C)
        y, _ = self.attn(q, kv, kv, need_weights=False)                   # (B, 1, C)
        return self.out_norm(y[:, 0])


class Classify(Task):
    """Predict one label per image from the GPT's features (``classify.mode``: finetune|linear|attentive)."""

    name = "classify"
    shares_backbone = True
    prompt_words = ("classify", "label", "what is this")
    writes_dir = False
    section = "classify"
    Config = ClassifyConfig
    output_keys = ("logits", "probs", "pred")
    metric_keys = ("top1", "mean_per_class", "per_class", "confusion")
    best_metric = ("top1", "max")
    examples = [
        'patchgpt train classify --data folder:~/photos --init runs/pre --out runs/cls',
        'patchgpt train classify --init runs/pre --set classify.mode=linear --set classify.layer=2',
        'patchgpt predict runs/cls cat.jpg dog.png',
    ]

    augment_by_size = True
    # BEiT/MAE fine-tuning practice, from --init: measured on this project's micro backbone (4 blocks) it cost
    # 0.3 points on digits (98.3 vs 98.6%), so it applies to deep backbones (12+ blocks) only.
    deep_finetune = {"layer_decay": 0.75, "drop_path": 0.1}

    epochs = 15

    @classmethod
    def defaults(cls, cfg: RunConfig) -> None:
        """From the data: 15 epochs (at least 1000 steps), batch 128, an EMA of the weights (see README)."""
        cfg.train.lr, cfg.train.steps, cfg.train.warmup, cfg.train.batch_size = 1e-3, 0, 100, 128
        cfg.train.ema = -1

    @classmethod
    def token_target(cls, cfg: RunConfig) -> int:
        return recognition_target(cfg)

    @classmethod
    def finetune_recipe(cls, cfg: RunConfig) -> dict[str, float]:
        return cls.deep_finetune if cfg.model.n_layer >= 12 else {}

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        c = cfg.classify
        check_choices({"classify.mode": (c.mode, ("finetune", "linear", "attentive")),
                       "classify.attention": (c.attention, ("bidirectional", "causal"))})
        check_ranges({"classify.label_smoothing": (c.label_smoothing, "[0, 1)"),
                      "classify.head_dropout": (c.head_dropout, "[0, 1)")})
        if c.layer != -1 and c.layer < 1:
            raise ConfigError(f"classify.layer={c.layer}: choose a block 1..model.n_layer, or -1 for the last")

    def __init__(self, cfg: RunConfig, info: DataInfo, vocab: Vocab | None = None) -> None:
        super().__init__(cfg, info, vocab)
        if not info.classes:
            raise DataError(f"classification needs labelled data; {cfg.data.spec} has no classes "
                            "(use one subfolder per class)")
        self.input = self.make_input()
        self.key = self.input.key  # the batch entry read as input: "image", or "video" for clips
        self.backbone = build_backbone(cfg, self.vocab, self.input.patch_dim, self.input.length, self.input.grid,
                                       self.input.slices)
        c = cfg.classify
        self.mode = c.mode
        n_layer = cfg.model.n_layer
        self.layer = None if c.layer in (-1, n_layer) or self.mode == "finetune" else c.layer
        if self.layer is not None and not 1 <= self.layer <= n_layer:
            raise DataError(f"classify.layer={c.layer}: choose 1..{n_layer} or -1 for the last block")
        C, K = cfg.model.n_embd, len(info.classes)
        if self.mode == "attentive":
            self.pool = AttentivePool(C, max(1, C // 64))
        elif self.mode == "linear":
            self.pool = nn.BatchNorm1d(C, affine=False)  # normalizes average-pooled features
        else:
            self.pool = nn.Identity()
        self.drop = nn.Dropout(c.head_dropout) if c.head_dropout > 0 else nn.Identity()
        self.head = nn.Linear(C, K)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        if self.frozen:
            self.backbone.requires_grad_(False)
            if cfg.train.ema == -1:  # a probe's few hundred steps: an average over their last tenth only lags
                cfg.train.ema = 0.0

    def fit(self, train_set: ImageSet, seed: int = 0) -> None:
        """Before training: what the input tokenizer fits, and a warning when the data has a single class
        (its top-1 is 1.0 whatever the model learns)."""
        super().fit(train_set, seed)
        if len(self.info.classes) == 1:
            dist.print0(f"patchgpt: warning: {self.cfg.data.spec} has one class ({self.info.classes[0]!r}): "
                        "top-1 is trivially 1.0; give one subfolder per class, two or more")

    def unused_parameters(self) -> list[str]:
        """The LM head (a classifier reads features); the id table too where every input is a patch."""
        return ["backbone.lm_head.weight"] + (["backbone.wte.weight"] if self.input.kind == "patches" else [])

    @property
    def frozen(self) -> bool:
        return self.mode != "finetune"

    def train(self, mode: bool = True) -> Classify:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a probe never changes the backbone
        return self

    def sequence(self, batch: dict, rng: RowRNG | None = None) -> Sequence:
        """The image (clip) tokens, all of them a bidirectional prefix unless ``classify.attention=causal``."""
        seq = self.input.encode(batch[self.key])
        prefix = seq.ids.shape[1] if self.cfg.classify.attention == "bidirectional" else 0
        return seq.with_prefix(prefix)

    def features(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images (or (B, F, C, H, W) clips) -> token features (B, T, C) from the chosen layer."""
        seq = self.sequence({self.key: images})
        if self.frozen:
            with torch.no_grad():
                return self.backbone(seq, upto=self.layer)
        return self.backbone(seq, upto=self.layer)

    def logits(self, images: Tensor) -> Tensor:
        h = self.features(images)                                         # (B, T, C)
        pooled = self.pool(h) if self.mode == "attentive" else self.pool(h.mean(dim=1))  # (B, C)
        return self.head(self.drop(pooled))                               # (B, K)

    def forward(self, batch: dict, rng: RowRNG | None = None) -> tuple[Tensor, dict]:
        logits = self.logits(batch[self.key])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.cfg.classify.label_smoothing)
        acc = (logits.argmax(-1) == batch["label"]).float().mean()
        return loss, {"loss": loss.detach(), "acc": acc.detach()}

    @torch.no_grad()
    def predict(self, batch: dict) -> dict:
        """{"logits": (B, K), "probs": (B, K), "pred": (B,)}."""
        logits = self.logits(batch[self.key])
        probs = logits.float().softmax(-1)
        return {"logits": logits, "probs": probs, "pred": probs.argmax(-1)}

    def metric(self) -> ClassifyMetric:
        return ClassifyMetric(self)

    @torch.no_grad()
    def predict_files(self, paths: SequenceOf[str | Path], out: str | Path | None = None, top: int = 5,
                      **options: Any) -> list[dict]:
        """Classify image (or clip) files: ``[{"image": path, "class", "score", "probs": top-k}]``; with `out`,
        the same JSON is also written to that file."""
        names = self.info.classes
        results = []
        for i in range(0, len(paths), 64):
            chunk = list(paths[i:i + 64])
            probs = self.predict(self.read_files(chunk))["probs"].cpu()      # (B, K)
            for path, pr in zip(chunk, probs, strict=True):
                vals, idx = pr.topk(min(top, len(names)))
                top_k = {names[j]: round(v, 6) for v, j in zip(vals.tolist(), idx.tolist(), strict=True)}
                results.append({self.key: str(path), "class": names[idx[0]], "score": float(vals[0]),
                                "probs": top_k})
        if out:
            atomic_write_text(out, json.dumps(results, indent=2) + "\n")
        return results

    def report(self, out: Path, val_set: ImageSet, metrics: dict, prefix: str = "", **options: Any) -> dict:
        """``confusion.png``; for clips also ``clips.png`` (frames of validation clips, "true: predicted")."""
        files = {}
        if "confusion" in metrics:
            files["confusion_png"] = str(save_confusion(out / f"{prefix}confusion.png", metrics["confusion"],
                                                        self.info.classes,
                                                        title=f"validation top-1 {metrics['top1']:.3f}"))
        if self.reads_clips and len(val_set):
            items = [it for it in (val_set[i] for i in range(min(6, len(val_set)))) if it is not None]
            clips = torch.stack([it["video"] for it in items]).to(self.device)      # (B, F, C, H, W)
            self.eval()
            pred = self.predict({"video": clips})["pred"].tolist()
            names = self.info.classes
            rows = [(f"{names[it['label']]}: {names[p]}", clips[b].cpu())
                    for b, (it, p) in enumerate(zip(items, pred, strict=True))]
            scale = max(1, 64 // self.info.image_size[0])
            files["clips_png"] = str(save_rows(out / f"{prefix}clips.png", rows, scale=scale))
        return files


class ClassifyMetric:
    """Top-1 accuracy, per-class accuracy, mean per-class accuracy, loss and the confusion matrix."""

    def __init__(self, task: Classify) -> None:
        self.task = task
        K = len(task.info.classes)
        self.confusion = torch.zeros(K, K, dtype=torch.long)
        self.loss, self.n = 0.0, 0

    def update(self, batch: dict) -> None:
        out = self.task.predict(batch)
        y = batch["label"].to(out["pred"].device)
        self.loss += float(F.cross_entropy(out["logits"].float(), y, reduction="sum"))
        self.n += len(y)
        K = self.confusion.shape[0]
        idx = (y * K + out["pred"]).cpu()
        self.confusion += torch.bincount(idx, minlength=K * K).reshape(K, K)

    def compute(self) -> dict:
        cm = self.confusion
        per = cm.diag().float() / cm.sum(1).clamp(min=1).float()
        names = self.task.info.classes
        return {"top1": float(cm.diag().sum()) / max(1, self.n), "val_loss": self.loss / max(1, self.n),
                "mean_per_class": float(per[cm.sum(1) > 0].mean()) if self.n else 0.0,
                "per_class": {names[i]: float(per[i]) for i in range(len(names))},
                "confusion": cm.tolist(), "n": self.n}
