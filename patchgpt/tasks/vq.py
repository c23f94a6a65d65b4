"""Training the VQ tokenizer (`patchgpt train vq`): learned discrete image tokens for the generator.

The task wraps a `VQVAE`; its checkpoint is then named by ``--set tokenizer.kind=vq --set tokenizer.vq=DIR``
when training a generator. Metrics: reconstruction PSNR, codebook usage and perplexity on validation images.
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
from ..data.base import DataError, DataInfo, ImageSet
from ..report import save_rows
from ..rng import RowRNG
from ..sequence import Sequence
from ..tokenizers.vq import VQVAE, VQCodes, VQConfig
from .base import Task


@dataclass
class VQTrainConfig:
    downsample: int = 2          # code grid = image / downsample (2, 4 or 8)
    hidden: int = 64
    codebook_size: int = 256
    code_dim: int = 32
    beta: float = 0.25
    l2_norm: bool = True
    dead_after: int = 100        # restart codes unused for this many steps


def vq_config(cfg: RunConfig, info: DataInfo) -> VQConfig:
    v = cfg.vq
    return VQConfig(channels=info.channels, image_size=tuple(info.image_size), downsample=v.downsample,
                    hidden=v.hidden, codebook_size=v.codebook_size, code_dim=v.code_dim, beta=v.beta,
                    l2_norm=v.l2_norm, dead_after=v.dead_after)


class TrainVQ(Task):
    """Reconstruct images through a quantized bottleneck."""

    name = "vq"
    pretrainer = None   # trains its own encoder
    section = "vq"
    Config = VQTrainConfig
    output_keys = ("codes", "recon")
    metric_keys = ("psnr", "codebook_usage", "perplexity")
    best_metric = ("psnr", "max")
    examples = [
        'patchgpt train vq --data emoji --out runs/vq',
        'patchgpt train generate --data emoji --set tokenizer.kind=vq --set tokenizer.vq=runs/vq',
    ]

    @classmethod
    def defaults(cls, cfg: RunConfig) -> None:
        cfg.train.lr, cfg.train.steps, cfg.train.warmup, cfg.train.weight_decay = 2e-3, 2000, 50, 0.0
        cfg.data.augment = False

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        v = cfg.vq
        check_choices({"vq.downsample": (v.downsample, (2, 4, 8))})
        check_ranges({"vq.hidden": (v.hidden, "[1, inf)"), "vq.codebook_size": (v.codebook_size, "[2, inf)"),
                      "vq.code_dim": (v.code_dim, "[1, inf)"), "vq.beta": (v.beta, "[0, inf)")})

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        if info.frames:
            raise DataError(f"{cfg.data.spec} holds clips: the VQ tokenizer trains on images")
        try:
            config = vq_config(cfg, info)
        except ValueError as e:  # the images do not divide into the code grid
            raise ConfigError(f"vq: {e}; set vq.downsample or data.image_size") from None
        self.vq = VQVAE(config)

    def networks(self) -> list[nn.Module]:
        return [self.vq]

    def describe(self) -> str:
        return "VQ-VAE"

    def init_from(self, path: str | Path) -> None:
        from .. import checkpoint

        self.vq.load_state_dict(checkpoint.read_weights(path, prefix="vq."))

    def fit(self, train_set: ImageSet, seed: int = 0) -> None:
        """Nothing to fit before training."""

    def sequence(self, batch: dict, rng: RowRNG | None = None) -> Sequence:
        """The images as the code tokens a generator would read (ids from a vocabulary of the codes alone)."""
        return VQCodes(self.vq).encode(batch["image"])

    def forward(self, batch: dict, rng: RowRNG | None = None) -> tuple[Tensor, dict]:
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

    @torch.no_grad()
    def predict_files(self, paths: SequenceOf[str | Path], out: str | Path | None = None,
                      **options: Any) -> list[dict]:
        """Each image's reconstruction PSNR and its code grid; with `out` (a directory), ``reconstructions.png``."""
        self.eval()
        images = self.read_files(paths)["image"]
        pred = self.predict({"image": images})
        mse = (pred["recon"] - images).pow(2).flatten(1).mean(1).clamp(min=1e-12)            # (B,)
        results = [{"image": str(p), "psnr": float(10 * torch.log10(4.0 / m)), "codes": c.tolist()}
                   for p, m, c in zip(paths, mse.cpu(), pred["codes"].cpu(), strict=True)]
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            self._reconstructions_png(images[:16], Path(out) / "reconstructions.png", float("nan"))
        return results

    def report(self, out: Path, val_set: ImageSet, metrics: dict, prefix: str = "", **options: Any) -> dict:
        """``reconstructions.png``: validation images above their reconstructions through the codes."""
        if not len(val_set):
            return {}
        images = torch.stack([val_set[i]["image"] for i in range(min(16, len(val_set)))]).to(self.device)
        psnr = metrics.get("psnr", float("nan"))
        path = self._reconstructions_png(images, out / f"{prefix}reconstructions.png", psnr)
        return {"reconstructions_png": str(path)}

    def _reconstructions_png(self, images: Tensor, path: Path, psnr: float) -> Path:
        recon = self.predict({"image": images})["recon"]
        return save_rows(path, [("original", images.cpu()), (f"{psnr:.1f} dB", recon.cpu())],
                         scale=max(1, 64 // self.info.image_size[0]))


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
