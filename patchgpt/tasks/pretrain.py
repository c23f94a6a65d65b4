"""Generative pretraining on unlabeled images.

Two objectives over the same backbone, chosen by ``pretrain.target``:
- ``patches``: next-patch regression of per-patch normalized pixels with an MLP head (AIM, El-Nouby et al.
  2024); a random bidirectional prefix per batch, with no loss on prefix positions, so downstream probes can
  attend both ways.
- ``tokens``: next-token cross-entropy over colour-cluster tokens (iGPT, Chen et al. 2020).
"""

from __future__ import annotations

import math
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError, RunConfig, check_choices, check_ranges
from ..data.base import DataInfo, ImageSet
from ..report import save_rows
from ..rng import RowRNG
from ..sequence import IGNORE, Sequence
from ..tokenizers import normalize_patches
from .base import Task, build_backbone, next_token_loss, recognition_target


@dataclass
class PretrainConfig:
    target: str = "patches"      # patches: next-patch regression (AIM) | tokens: next-token CE (iGPT)
    prefix: bool = True          # random bidirectional prefix per batch (AIM), so probes may look both ways
    norm_pix: bool = True        # regress per-patch normalized pixels
    head_hidden: int = 2         # MLP head width as a multiple of n_embd; 0 = a linear head


class Pretrain(Task):
    """Next-patch or next-token prediction over images."""

    name = "pretrain"
    augment_by_size = True
    section = "pretrain"
    Config = PretrainConfig
    output_keys = ("loss", "pred")
    examples = [
        'patchgpt train pretrain --data folder:~/photos --out runs/pre --steps 2000',
        'torchrun --standalone --nproc_per_node=8 -m patchgpt train pretrain --data digits --set train.batch_size=256',
        'patchgpt train pretrain --data "shards:shards/train-{000000..000009}.tar" '
        '--set data.val_spec=shards:shards/val-*',
    ]

    @classmethod
    def defaults(cls, cfg: RunConfig) -> None:
        cfg.train.lr, cfg.train.steps, cfg.train.warmup = 1e-3, 1500, 100

    @classmethod
    def token_target(cls, cfg: RunConfig) -> int:
        return recognition_target(cfg)

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        check_choices({"pretrain.target": (cfg.pretrain.target, ("patches", "tokens"))})
        check_ranges({"pretrain.head_hidden": (cfg.pretrain.head_hidden, "[0, inf)")})
        if cfg.pretrain.target == "tokens" and cfg.tokenizer.kind != "colors":
            raise ConfigError("pretrain.target=tokens needs tokenizer.kind=colors (discrete pixels)")

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        self.input = self.make_input()
        self.key = self.input.key  # the batch entry read as input: "image", or "video" for clips
        self.backbone = build_backbone(cfg, self.vocab, self.input.patch_dim, self.input.length, self.input.grid,
                                       self.input.slices)
        self.target = cfg.pretrain.target
        C = cfg.model.n_embd
        if self.target == "patches":
            D, k = self.input.patch_dim, cfg.pretrain.head_hidden
            self.head = nn.Sequential(nn.Linear(C, k * C), nn.GELU(), nn.Linear(k * C, D)) if k else nn.Linear(C, D)

    def sequence(self, batch: dict, rng: RowRNG | None = None) -> Sequence:
        """Input sequence with next-token labels; with `rng`, a random bidirectional prefix (AIM) whose
        positions carry no loss."""
        prefix_len = self.sample_prefix(rng)
        seq = self.input.encode(batch[self.key])
        B, T = seq.ids.shape
        labels = torch.full_like(seq.ids, IGNORE)
        if self.target == "tokens":
            labels[:, :-1] = seq.ids[:, 1:]
        if prefix_len > 1:
            labels[:, :prefix_len - 1] = IGNORE  # these positions saw their target inside the prefix
        return Sequence(ids=seq.ids, labels=labels, pos=seq.pos, patches=seq.patches, is_patch=seq.is_patch,
                        prefix_len=prefix_len)

    def unused_parameters(self) -> list[str]:
        """Regressing patches leaves the LM head unused; patch inputs never look up token ids."""
        names = ["backbone.lm_head.weight"] if self.target == "patches" else []
        return names + (["backbone.wte.weight"] if self.input.kind == "patches" else [])

    def sample_prefix(self, rng: RowRNG | None) -> int:
        """A prefix length uniform in [1, T-1] (1 = plain causal), as in AIM's prefix pretraining; one for
        the whole global batch."""
        if not self.cfg.pretrain.prefix or rng is None:
            return 0
        return rng.batch_randint(1, max(2, self.input.length - 1))

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

    def forward(self, batch: dict, rng: RowRNG | None = None) -> tuple[Tensor, dict]:
        seq = self.sequence(batch, rng)
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

    @torch.no_grad()
    def predict_files(self, paths: SequenceOf[str | Path], out: str | Path | None = None,
                      **options: Any) -> list[dict]:
        """Each file's validation loss (next-patch MSE, or nats per token for colour tokens); with `out` (a
        directory), ``predictions.png``: the images above the model's next-patch predictions."""
        self.eval()
        batch = self.read_files(paths)
        x = batch[self.key]
        results = [{self.key: str(p), "loss": float(self.predict({self.key: x[i:i + 1]})["loss"])}
                   for i, p in enumerate(paths)]
        if out and not self.reads_clips:
            Path(out).mkdir(parents=True, exist_ok=True)
            self.report(Path(out), x, {})
        return results

    def report(self, out: Path, val_set: ImageSet | Tensor, metrics: dict, prefix: str = "",
               **options: Any) -> dict:
        """``predictions.png``: validation images above the model's causal next-patch (next-pixel) predictions."""
        if isinstance(val_set, Tensor):
            images = val_set[:8]
        elif len(val_set):
            images = torch.stack([it["image"] for it in (val_set[i] for i in range(min(8, len(val_set))))
                                  if it is not None]).to(self.device)
        else:
            return {}
        self.eval()
        pred = self.reconstruct(images)
        scale = max(1, 96 // images.shape[-1])
        return {"predictions_png": str(save_rows(out / f"{prefix}predictions.png", [("original", images.cpu()),
                                                                           ("predicted", pred.cpu())], scale=scale))}


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


