"""Image classification: full fine-tuning, a linear probe, or an attentive probe on frozen features.

References: iGPT's linear probe on average-pooled features of a chosen layer (Chen et al. 2020); AIM's
attentive probe, a learned query cross-attending over the frozen patch features (El-Nouby et al. 2024);
MAE's BatchNorm-without-affine before the linear probe (He et al. 2022).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig
from ..data.base import DataError, DataInfo
from ..sequence import Sequence
from .base import ImageInput, Task, build_backbone


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
    key = "image"  # the batch entry read as input ("video" for clips)

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        if not info.classes:
            raise DataError(f"classification needs labelled data; {cfg.data.spec} has no classes "
                            "(use one subfolder per class)")
        self.input = self.make_input(cfg, info)
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

    def make_input(self, cfg: RunConfig, info: DataInfo) -> nn.Module:
        """The input tokenizer (images here; `VideoClassify` reads clips as tubelets)."""
        return ImageInput(cfg, info, self.vocab)

    @property
    def frozen(self) -> bool:
        return self.mode != "finetune"

    def train(self, mode: bool = True) -> Classify:
        super().train(mode)
        if self.frozen:
            self.backbone.eval()  # a probe never changes the backbone
        return self

    def sequence(self, batch: dict) -> Sequence:
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

    def forward(self, batch: dict, gen: torch.Generator | None = None) -> tuple[Tensor, dict]:
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
