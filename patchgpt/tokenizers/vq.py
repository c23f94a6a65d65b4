"""VQCodes: learned discrete image tokens from a small convolutional VQ-VAE.

References: VQ-VAE (van den Oord et al. 2017, arXiv:1711.00937) — nearest-code quantization, a codebook
loss, a beta-weighted commitment loss and the straight-through gradient estimator; taming-transformers
(Esser et al. 2021) and LlamaGen's VQ tokenizer (Sun et al. 2024, arXiv:2406.06525) — l2-normalised
(cosine-similarity) codes, which keep a small codebook well used. Codes unused for `dead_after` training
steps are restarted from random encoder outputs of the current batch (as in Jukebox / "restart" tricks).
The VQ-VAE is trained separately (its `forward` returns the loss); `VQCodes` wraps a trained one as a
tokenizer with the same interface as `ColorClusters`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checkpoint
from ..config import ConfigError
from ..sequence import IGNORE, Sequence, Vocab
from .patches import grid_positions


@dataclass
class VQConfig:
    """Shape and size of a `VQVAE`.

    Attributes:
        channels: image channels C.
        image_size: (H, W), or one int for square images; both must be multiples of `downsample`.
        downsample: 2, 4 or 8 — the number of stride-2 convs is log2 of it; the code grid is (H/d, W/d).
        hidden: base conv width (the deeper stages use twice it).
        codebook_size: K codes.
        code_dim: D, the code vector width.
        beta: commitment loss weight.
        l2_norm: compare l2-normalised encoder outputs and codes (cosine similarity).
        dead_after: training steps without use after which a code is restarted (<= 0 disables restarts).
    """

    channels: int
    image_size: tuple[int, int] | int
    downsample: int = 4
    hidden: int = 64
    codebook_size: int = 256
    code_dim: int = 32
    beta: float = 0.25
    l2_norm: bool = True
    dead_after: int = 100

    def __post_init__(self) -> None:
        s = self.image_size
        self.image_size = (int(s), int(s)) if isinstance(s, int) else (int(s[0]), int(s[1]))
        if self.downsample not in (2, 4, 8):
            raise ValueError(f"downsample must be 2, 4 or 8, got {self.downsample}")
        H, W = self.image_size
        if H % self.downsample or W % self.downsample:
            raise ValueError(f"image size {H}x{W} is not a multiple of downsample={self.downsample}")

    def to_dict(self) -> dict:
        """JSON-friendly dict (image_size as a list)."""
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VQConfig:
        """Inverse of `to_dict`."""
        return cls(**d)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(8 if ch % 8 == 0 else 1, ch)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv3x3 twice, plus the input (1x1 projected when the width changes)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                  _norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class VQVAE(nn.Module):
    """Convolutional VQ-VAE: (B, C, H, W) images in [-1, 1] <-> (B, H/d, W/d) codebook indices."""

    def __init__(self, config: VQConfig) -> None:
        super().__init__()
        self.config = cfg = config
        n = int(math.log2(cfg.downsample))
        widths = [cfg.hidden * min(2 ** i, 2) for i in range(n + 1)]  # hidden, 2*hidden, 2*hidden, ...
        H, W = cfg.image_size
        self.grid = (H // cfg.downsample, W // cfg.downsample)

        enc: list[nn.Module] = [nn.Conv2d(cfg.channels, widths[0], 3, padding=1)]
        for i in range(n):
            enc += [ResBlock(widths[i], widths[i]), nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1)]
        enc += [ResBlock(widths[n], widths[n]), _norm(widths[n]), nn.SiLU(), nn.Conv2d(widths[n], cfg.code_dim, 1)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [nn.Conv2d(cfg.code_dim, widths[n], 3, padding=1), ResBlock(widths[n], widths[n])]
        for i in reversed(range(n)):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(widths[i + 1], widths[i], 3, padding=1),
                    ResBlock(widths[i], widths[i])]
        dec += [_norm(widths[0]), nn.SiLU(), nn.Conv2d(widths[0], cfg.channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

        self.codebook = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        if not cfg.l2_norm:
            nn.init.uniform_(self.codebook.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
        # Dead-code bookkeeping: buffers, so they survive a state-dict round trip.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(cfg.codebook_size, dtype=torch.long))

    def _codes(self) -> Tensor:
        """(K, D) codebook as used for lookup (l2-normalised when `l2_norm`)."""
        w = self.codebook.weight
        return F.normalize(w, dim=-1) if self.config.l2_norm else w

    def encode_latents(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, D, h, w) continuous encoder outputs (l2-normalised over D when `l2_norm`)."""
        z = self.encoder(images)
        return F.normalize(z, dim=1) if self.config.l2_norm else z

    def nearest(self, z_flat: Tensor) -> Tensor:
        """(N, D) latents -> (N,) indices of the nearest codes (largest cosine similarity when `l2_norm`)."""
        codes = self._codes().detach()
        if self.config.l2_norm:
            return (z_flat.detach() @ codes.t()).argmax(dim=1)                 # (N, K) similarities
        return torch.cdist(z_flat.detach(), codes).argmin(dim=1)               # (N, K) distances

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, D, h, w) latents -> (straight-through quantized (B, D, h, w), indices (B, h, w),
        codebook loss, commitment loss)."""
        B, D, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(B * h * w, D)                  # (B, D, h, w) -> (N, D)
        idx = self.nearest(z_flat)                                             # (N,)
        zq_flat = self._codes()[idx]                                           # (N, D)
        codebook_loss = F.mse_loss(zq_flat, z_flat.detach())                  # moves codes to the encoder
        commit_loss = F.mse_loss(z_flat, zq_flat.detach())                    # keeps the encoder near codes
        zq_flat = z_flat + (zq_flat - z_flat).detach()                        # straight-through estimator
        zq = zq_flat.reshape(B, h, w, D).permute(0, 3, 1, 2)                  # (N, D) -> (B, D, h, w)
        return zq, idx.reshape(B, h, w), codebook_loss, commit_loss           # (N,) -> (B, h, w)

    @torch.no_grad()
    def encode_codes(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, h, w) int64 codebook indices."""
        z = self.encode_latents(images)
        B, D, h, w = z.shape
        z_flat = z.permute(0, 2, 3, 1).reshape(B * h * w, D)                  # (B, D, h, w) -> (N, D)
        return self.nearest(z_flat).reshape(B, h, w)                          # (N,) -> (B, h, w)

    def decode_codes(self, codes: Tensor) -> Tensor:
        """(B, h, w) codebook indices -> (B, C, H, W) images (unclamped)."""
        zq = self._codes()[codes]                                              # (B, h, w, D)
        return self.decoder(zq.permute(0, 3, 1, 2))                            # (B, D, h, w) -> (B, C, H, W)

    @torch.no_grad()
    def restart_dead_codes(self, z_flat: Tensor) -> int:
        """Replace codes unused for more than `dead_after` training steps by random rows of `z_flat` (N, D);
        returns how many were restarted. (Under data parallelism the replacements differ per rank; broadcast
        the codebook afterwards if that matters.)"""
        if self.config.dead_after <= 0:
            return 0
        dead = (self.step - self.last_used) > self.config.dead_after          # (K,)
        n = int(dead.sum())
        if n == 0:
            return 0
        N = z_flat.shape[0]
        pick = torch.randperm(N, device=z_flat.device)[:n] if N >= n else torch.randint(N, (n,), device=z_flat.device)
        self.codebook.weight[dead] = z_flat[pick].detach().to(self.codebook.weight.dtype)
        self.last_used[dead] = self.step
        return n

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, dict[str, float]]:
        """(B, C, H, W) -> (reconstruction (B, C, H, W), loss, stats).

        loss = MSE(recon, images) + codebook loss + beta * commitment loss. In training mode this also
        counts a step, restarts dead codes (before quantizing, from this batch's encoder outputs) and
        records which codes were used.
        """
        z = self.encode_latents(images)
        B, D, h, w = z.shape
        restarted = 0
        if self.training:
            self.step += 1
            restarted = self.restart_dead_codes(z.permute(0, 2, 3, 1).reshape(B * h * w, D))  # (N, D)
        zq, idx, codebook_loss, commit_loss = self.quantize(z)
        recon = self.decoder(zq)
        mse = F.mse_loss(recon, images)
        loss = mse + codebook_loss + self.config.beta * commit_loss

        with torch.no_grad():
            counts = torch.bincount(idx.flatten(), minlength=self.config.codebook_size)   # (K,)
            if self.training:
                self.last_used[counts > 0] = self.step
            p = counts.float() / counts.sum()
            perplexity = torch.exp(-(p * torch.log(p.clamp(min=1e-10))).sum())
        m = float(mse.detach())
        stats = {"mse": m, "psnr": 10.0 * math.log10(4.0 / max(m, 1e-12)),
                 "usage": float((counts > 0).float().mean()), "perplexity": float(perplexity),
                 "codebook_loss": float(codebook_loss.detach()), "commit_loss": float(commit_loss.detach()),
                 "restarted": restarted}
        return recon, loss, stats


class VQCodes(nn.Module):
    """Tokenizer over a trained `VQVAE`: images -> h*w code tokens in raster order and back (a module so the
    VQ-VAE weights travel with the model's state dict).

    Args:
        vq: the trained VQ-VAE.
        vocab: the shared vocab; reserves `codebook_size` ids under "vq".
    """

    def __init__(self, vq: VQVAE, vocab: Vocab | None = None) -> None:
        super().__init__()
        self.vq = vq
        cfg = vq.config
        self.codebook_size, self.channels, self.image_size = cfg.codebook_size, cfg.channels, cfg.image_size
        self.grid = vq.grid
        self.num_patches = self.grid[0] * self.grid[1]
        self.ids = (vocab or Vocab()).add("vq", cfg.codebook_size)
        self.patch_dim = 0  # discrete ids
        self.fitted = True  # trained separately (`patchgpt train vq`); see `load_run`

    def fit(self, images: Tensor, seed: int = 0) -> None:
        """Nothing to fit here: the codes come from a trained VQ-VAE (`load_run`)."""

    def load_run(self, weights: dict[str, Tensor], source: str) -> None:
        """Load the VQ-VAE's weights from a `patchgpt train vq` checkpoint's ``vq.*`` tensors (prefix removed)."""
        if not weights:
            raise ValueError(f"{source}: holds no VQ-VAE weights (not a `patchgpt train vq` run)")
        self.vq.load_state_dict(weights)

    def encode(self, images: Tensor) -> Sequence:
        """Images (B, C, H, W) in [-1, 1] -> a `Sequence` of h*w code tokens with grid positions (no labels)."""
        codes = self.vq.encode_codes(images)                                   # (B, h, w)
        B = codes.shape[0]
        ids = codes.reshape(B, self.num_patches) + self.ids.start              # (B, h, w) -> (B, N)
        pos = grid_positions(1, *self.grid, device=images.device).expand(B, self.num_patches, 3)
        return Sequence(ids=ids, labels=torch.full_like(ids, IGNORE), pos=pos)

    @torch.no_grad()
    def decode(self, seq_or_ids: Sequence | Tensor) -> Tensor:
        """Code-token ids (B, h*w) (vocab ids, or a `Sequence`) -> images (B, C, H, W) clamped to [-1, 1]."""
        ids = seq_or_ids.ids if isinstance(seq_or_ids, Sequence) else seq_or_ids
        codes = (ids - self.ids.start).clamp(0, self.codebook_size - 1)
        codes = codes.reshape(codes.shape[0], *self.grid)                      # (B, N) -> (B, h, w)
        return self.vq.decode_codes(codes).clamp(-1.0, 1.0)


def vq_run_config(run: str) -> str:
    """The VQ-VAE configuration (JSON) of a `patchgpt train vq` run, kept in a generator's own config so that
    its checkpoint loads without the run."""
    state = checkpoint.read_meta(checkpoint.resolve(run))["state"]
    if "vq" not in state:
        raise ConfigError(f"tokenizer.vq={run}: not a `patchgpt train vq` run")
    return json.dumps(state["vq"])


def load_vq_run(tok: VQCodes, run: str, channels: int, image_size: tuple[int, int]) -> None:
    """Load the trained VQ-VAE of `run` into `tok`; a one-line error if it was trained on other images."""
    st = checkpoint.read_meta(run)["state"]
    if (st["channels"], tuple(st["image_size"])) != (channels, tuple(image_size)):
        raise ConfigError(f"tokenizer.vq={run} was trained on {st['channels']}x{list(st['image_size'])} images, "
                          f"this data is {channels}x{list(image_size)}")
    tok.load_run(checkpoint.read_weights(run, prefix="vq."), run)
