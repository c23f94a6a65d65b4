"""Training the VQ tokenizer (`patchgpt train vq`): learned discrete image tokens for the generator.

The task wraps a `VQVAE`; its checkpoint is then named by ``--set tokenizer.kind=vq --set tokenizer.vq=DIR``
when training a generator. Metrics: reconstruction PSNR, codebook usage and perplexity on validation images.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import RunConfig
from ..data.base import DataError, DataInfo
from ..tokenizers.vq import VQVAE, VQConfig
from .base import Task


def vq_config(cfg: RunConfig, info: DataInfo) -> VQConfig:
    v = cfg.vq
    return VQConfig(channels=info.channels, image_size=tuple(info.image_size), downsample=v.downsample,
                    hidden=v.hidden, codebook_size=v.codebook_size, code_dim=v.code_dim, beta=v.beta,
                    l2_norm=v.l2_norm, dead_after=v.dead_after)


class TrainVQ(Task):
    """Reconstruct images through a quantized bottleneck."""

    name = "vq"

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        if info.frames:
            raise DataError(f"{cfg.data.spec} holds clips: the VQ tokenizer trains on images")
        self.vq = VQVAE(vq_config(cfg, info))

    def forward(self, batch: dict, gen: torch.Generator | None = None) -> tuple[Tensor, dict]:
        _, loss, stats = self.vq(batch["image"])
        return loss, {"loss": loss.detach(), **{k: torch.tensor(float(v)) for k, v in stats.items()}}

    @torch.no_grad()
    def predict(self, batch: dict) -> dict:
        """{"recon": (B, C, H, W) reconstructions in [-1, 1], "codes": (B, h, w)}."""
        codes = self.vq.encode_codes(batch["image"])
        return {"codes": codes, "recon": self.vq.decode_codes(codes).clamp(-1, 1)}

    def state(self) -> dict:
        return {**super().state(), "vq": self.vq.config.to_dict()}

    def metric(self) -> VQMetric:
        return VQMetric(self)


class VQMetric:
    """PSNR of encode -> decode, codebook usage (share of codes used on the validation set) and perplexity."""

    def __init__(self, task: TrainVQ) -> None:
        self.task, self.se, self.n_px, self.n = task, 0.0, 0, 0
        self.counts = torch.zeros(task.vq.config.codebook_size, dtype=torch.long)

    def update(self, batch: dict) -> None:
        out = self.task.predict(batch)
        self.se += float((out["recon"] - batch["image"]).pow(2).sum())
        self.n_px += batch["image"].numel()
        self.n += batch["image"].shape[0]
        self.counts += torch.bincount(out["codes"].flatten().cpu(), minlength=len(self.counts))

    def compute(self) -> dict:
        mse = self.se / max(1, self.n_px)
        p = self.counts.float() / self.counts.sum().clamp(min=1)
        perplexity = float(torch.exp(-(p * p.clamp(min=1e-10).log()).sum()))
        return {"val_loss": mse, "psnr": 10 * math.log10(4.0 / max(mse, 1e-12)),
                "codebook_usage": float((self.counts > 0).float().mean()), "perplexity": perplexity, "n": self.n}
