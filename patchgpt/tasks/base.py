"""The task plugin interface and what image tasks share: building the backbone and the image input.

A task turns a batch (a dict, see DESIGN.md) into a `Sequence`, owns its head and loss, decodes
predictions and accumulates its metric. ``forward(batch) -> (loss, logs)`` so ``DDP(task)`` just works.
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import RunConfig
from ..data.base import DataError, DataInfo
from ..model import GPT
from ..sequence import IGNORE, Sequence, Vocab, concat, tokens
from ..tokenizers import ColorClusters, Patches
from ..tokenizers.vq import VQVAE, VQCodes, VQConfig


def next_token_loss(logits: Tensor, seq: Sequence) -> Tensor:
    """Mean cross-entropy of (B, T, V) logits against ``seq.labels`` (IGNORE skipped, weights applied)."""
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V).float(), seq.labels.reshape(-1), ignore_index=IGNORE,
                           reduction="none")                                   # (B*T,)
    valid = (seq.labels.reshape(-1) != IGNORE).float()
    w = valid if seq.weights is None else valid * seq.weights.reshape(-1)
    return (loss * w).sum() / w.sum().clamp(min=1e-8)


class ImageInput(nn.Module):
    """Images -> the backbone's input `Sequence`, with either tokenizer.

    ``patches``: one continuous token per P x P patch (AIM/ViT). ``colors``: a begin token then one colour
    token per pixel (iGPT), so the first pixel is predicted too. ``vq``: a begin token then one learned code
    per VQ-VAE grid cell.
    """

    def __init__(self, cfg: RunConfig, info: DataInfo, vocab: Vocab) -> None:
        super().__init__()
        if info.frames:
            raise DataError(f"{cfg.data.spec} holds clips: use video-classify or video-pretrain")
        t = cfg.tokenizer
        self.kind = t.kind
        self.bos = vocab.add("bos", 1).start
        if t.kind == "patches":
            self.tok = Patches(t.patch_size, info.channels, info.image_size, vocab)
        elif t.kind == "vq":
            vq = VQVAE(VQConfig.from_dict(json.loads(t.vq_config)))
            vq.requires_grad_(False)  # a trained tokenizer: the GPT learns over its codes, never changes them
            self.tok = VQCodes(vq, vocab)
        else:
            self.tok = ColorClusters(t.n_colors, info.channels, info.image_size, vocab)
        self.grid = self.tok.grid
        self.slices = 1  # time slices of the position grid: 1 for images

    @property
    def patch_dim(self) -> int:
        return self.tok.patch_dim if self.kind == "patches" else 0

    @property
    def length(self) -> int:
        """Tokens per image."""
        return self.tok.num_patches + (0 if self.kind == "patches" else 1)

    def encode(self, images: Tensor) -> Sequence:
        """(B, C, H, W) in [-1, 1] -> input `Sequence` (labels IGNORE)."""
        seq = self.tok.encode(images)
        if self.kind != "patches":
            bos = torch.full((images.shape[0], 1), self.bos, dtype=torch.long, device=images.device)
            seq = concat(tokens(bos), seq)
        return seq


def build_backbone(cfg: RunConfig, vocab: Vocab, patch_dim: int, length: int, grid: tuple[int, int],
                   frames: int = 1) -> GPT:
    """The GPT sized by `cfg.model`, with vocab, patch width and position tables fitted to the input
    (`frames`: time slices of a clip's tubelets)."""
    m = cfg.model
    m.vocab_size, m.patch_dim = vocab.size, patch_dim
    m.block_size = max(m.block_size, length)
    m.max_frames = max(m.max_frames, frames)
    m.max_rows, m.max_cols = max(m.max_rows, grid[0]), max(m.max_cols, grid[1])
    return GPT(m)


class Task(nn.Module):
    """Base class: subclasses set ``name`` and implement `forward`, `predict` and `metric`."""

    name = "task"
    own_augment = False  # True: the task augments its batches itself (e.g. moving boxes with the pixels)

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__()
        self.cfg, self.info = cfg, info
        self.vocab = Vocab()

    def forward(self, batch: dict) -> tuple[Tensor, dict]:  # pragma: no cover - interface
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, batch: dict) -> dict:  # pragma: no cover - interface
        raise NotImplementedError

    def metric(self):  # pragma: no cover - interface
        raise NotImplementedError

    def state(self) -> dict:
        """JSON-friendly state saved in config.json beside the weights (classes, vocab, ...)."""
        return {"vocab": self.vocab.entries(), "classes": self.info.classes,
                "channels": self.info.channels, "image_size": list(self.info.image_size),
                "captions": self.info.captions, "frames": self.info.frames}

    def needs_fit(self) -> bool:
        """True if a tokenizer must be fitted on training data before training (a colour palette)."""
        inp = getattr(self, "input", None)
        return inp is not None and inp.kind == "colors" and not inp.tok.fitted

    def num_params(self) -> int:
        """Trainable and frozen parameters of the whole task."""
        return sum(p.numel() for p in self.parameters())

    def fit_tokenizer(self, images: Tensor, seed: int = 0) -> None:
        self.input.tok.fit(images, seed=seed)
