"""Generative pretraining on unlabeled images.

Two objectives over the same backbone, chosen by ``pretrain.target``:
- ``patches``: next-patch regression of per-patch normalized pixels with an MLP head (AIM, El-Nouby et al.
  2024); a random bidirectional prefix per batch, with no loss on prefix positions, so downstream probes can
  attend both ways.
- ``tokens``: next-token cross-entropy over colour-cluster tokens (iGPT, Chen et al. 2020).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..data.base import DataInfo
from ..sequence import IGNORE, Sequence
from ..tokenizers import normalize_patches
from .base import ImageInput, Task, build_backbone, next_token_loss


class Pretrain(Task):
    """Next-patch or next-token prediction over images."""

    name = "pretrain"
    key = "image"  # the batch entry read as input ("video" for clips)

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        self.input = self.make_input(cfg, info)
        self.backbone = build_backbone(cfg, self.vocab, self.input.patch_dim, self.input.length, self.input.grid,
                                       self.input.slices)
        self.target = cfg.pretrain.target
        C = cfg.model.n_embd
        if self.target == "patches":
            D, k = self.input.patch_dim, cfg.pretrain.head_hidden
            self.head = nn.Sequential(nn.Linear(C, k * C), nn.GELU(), nn.Linear(k * C, D)) if k else nn.Linear(C, D)

    def make_input(self, cfg: RunConfig, info: DataInfo) -> nn.Module:
        """The input tokenizer (images here; `VideoPretrain` reads clips as tubelets)."""
        return ImageInput(cfg, info, self.vocab)

    def sequence(self, batch: dict, prefix_len: int = 0) -> Sequence:
        """Input sequence with next-token labels; positions inside the prefix carry no loss."""
        seq = self.input.encode(batch[self.key])
        B, T = seq.ids.shape
        labels = torch.full_like(seq.ids, IGNORE)
        if self.target == "tokens":
            labels[:, :-1] = seq.ids[:, 1:]
        if prefix_len > 1:
            labels[:, :prefix_len - 1] = IGNORE  # these positions saw their target inside the prefix
        return Sequence(ids=seq.ids, labels=labels, pos=seq.pos, patches=seq.patches, is_patch=seq.is_patch,
                        prefix_len=prefix_len)

    def sample_prefix(self, gen: torch.Generator | None) -> int:
        """A prefix length uniform in [1, T-1] (1 = plain causal), as in AIM's prefix pretraining."""
        if not self.cfg.pretrain.prefix or gen is None:
            return 0
        T = self.input.length
        return int(torch.randint(1, max(2, T - 1), (1,), generator=gen))

    def _patch_loss(self, hidden: Tensor, seq: Sequence) -> tuple[Tensor, Tensor]:
        """MSE of predicted vs actual next patches; returns (loss, predictions (B, T-1, D))."""
        pred = self.head(hidden[:, :-1])                                   # (B, T-1, D)
        target = seq.patches[:, 1:]
        if self.cfg.pretrain.norm_pix:
            target = normalize_patches(target)
        err = (pred.float() - target.float()).pow(2).mean(-1)              # (B, T-1)
        keep = torch.ones_like(err)
        if seq.prefix_len > 1:
            keep[:, :seq.prefix_len - 1] = 0
        return (err * keep).sum() / keep.sum().clamp(min=1), pred

    def forward(self, batch: dict, gen: torch.Generator | None = None) -> tuple[Tensor, dict]:
        seq = self.sequence(batch, self.sample_prefix(gen))
        hidden = self.backbone(seq)
        if self.target == "patches":
            loss, _ = self._patch_loss(hidden, seq)
        else:
            loss = next_token_loss(self.backbone.logits(hidden), seq)
        return loss, {"loss": loss.detach()}

    @torch.no_grad()
    def predict(self, batch: dict) -> dict:
        """Causal next-patch predictions: {"loss": float, "pred": (B, N, D) images' patches, pixel scale}.

        Normalized predictions are mapped back to pixels with each true patch's mean and std (as MAE shows
        its reconstructions); the first patch has no prediction and is copied from the input.
        """
        seq = self.sequence(batch)
        hidden = self.backbone(seq)
        if self.target == "tokens":
            logits = self.backbone.logits(hidden)
            return {"loss": next_token_loss(logits, seq), "pred": logits[:, :-1].argmax(-1)}
        loss, pred = self._patch_loss(hidden, seq)
        true = seq.patches
        if self.cfg.pretrain.norm_pix:
            mean = true[:, 1:].mean(-1, keepdim=True)
            std = true[:, 1:].var(-1, keepdim=True, unbiased=False).add(1e-6).sqrt()
            pred = pred * std + mean
        return {"loss": loss, "pred": torch.cat([true[:, :1], pred], dim=1).clamp(-1, 1)}

    def reconstruct(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) whose every patch (pixel) after the first is the model's causal prediction."""
        out = self.predict({"image": images})["pred"]
        if self.target == "tokens":
            first = self.input.encode(images).ids[:, 1:2]
            return self.input.tok.decode(torch.cat([first, out[:, 1:]], dim=1))
        return self.input.tok.unpatchify(out)

    def metric(self) -> PretrainMetric:
        return PretrainMetric(self)


class PretrainMetric:
    """Validation loss (MSE for patches; nats and bits per pixel for colour tokens)."""

    def __init__(self, task: Pretrain) -> None:
        self.task, self.total, self.n = task, 0.0, 0

    def update(self, batch: dict) -> None:
        out = self.task.predict(batch)
        b = batch[self.task.key].shape[0]
        self.total += float(out["loss"]) * b
        self.n += b

    def compute(self) -> dict:
        loss = self.total / max(1, self.n)
        m = {"val_loss": loss}
        if self.task.target == "tokens":
            m["bits_per_pixel"] = loss / math.log(2)
        return m


