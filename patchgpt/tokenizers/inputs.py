"""`PixelInput`: images or clips -> the backbone's input `Sequence`, with whichever tokenizer the run names.

``tokenizer.kind``:
- ``patches``: one continuous token per P x P patch (AIM/ViT), or per T x P x P tubelet for clips (ViViT);
- ``colors``: a begin token, then one colour-cluster token per pixel (iGPT), so the first pixel is predicted too;
- ``vq``: a begin token, then one learned code per VQ-VAE grid cell (VQGAN/LlamaGen).
"""

from __future__ import annotations

import json
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..config import TokenizerConfig
from ..sequence import Sequence, Vocab, concat, tokens
from .base import Tokenizer
from .colors import ColorClusters
from .patches import TOKEN_TARGET, Patches, auto_patch_size
from .tubelets import Tubelets
from .vq import VQVAE, VQCodes, VQConfig, load_vq_run, vq_run_config


def resolve_runs(cfg: TokenizerConfig) -> None:
    """Before training: copy into the tokenizer section what it needs from the runs it names (a trained VQ
    tokenizer's configuration), so the checkpoint that results loads on its own."""
    if cfg.kind == "vq" and cfg.vq:
        cfg.vq_config = vq_run_config(cfg.vq)


class PixelInput(nn.Module):
    """The input tokenizer of a task, with a begin token where the tokens are discrete.

    Args:
        cfg: the run's tokenizer section.
        channels, image_size: the data's pixels.
        vocab: the task's shared vocabulary.
        frames: frames per clip (clips are read as tubelets); 0 for images.
        token_target: tokens per image (per time slice) the automatic patch size aims at (``patch_size=0``).
    Raises:
        ValueError: the clip shape does not divide into tubelets (the message names the settings).
    """

    def __init__(self, cfg: TokenizerConfig, channels: int, image_size: tuple[int, int], vocab: Vocab,
                 frames: int = 0, token_target: int = TOKEN_TARGET) -> None:
        super().__init__()
        self.kind = cfg.kind
        self.channels, self.image_size = channels, tuple(image_size)   # the data's pixels
        self.key = "video" if frames else "image"   # the batch entry this input reads
        self.note = ""                               # how the input was chosen, for the start-up line
        if cfg.kind == "patches" and cfg.patch_size == 0:
            cfg.patch_size, self.note = auto_patch_size(*image_size, target=token_target)   # saved in the config
        self.tok: Tokenizer
        if frames:
            if cfg.kind != "patches":
                raise ValueError("clips are read as tubelets: tokenizer.kind must be patches")
            self.tok = Tubelets(cfg.tubelet, cfg.patch_size, channels, frames, tuple(image_size), vocab)
        else:
            self.bos = vocab.add("bos", 1).start
            if cfg.kind == "patches":
                self.tok = Patches(cfg.patch_size, channels, image_size, vocab)
            elif cfg.kind == "vq":
                vq = VQVAE(VQConfig.from_dict(json.loads(cfg.vq_config)))
                vq.requires_grad_(False)  # a trained tokenizer: the GPT learns over its codes, never changes them
                self.tok = VQCodes(vq, vocab)
            else:
                self.tok = ColorClusters(cfg.n_colors, channels, image_size, vocab)
        self.grid = self.tok.grid
        self.slices = getattr(self.tok, "slices", 1)  # time slices of the position grid: 1 for images

    def fit(self, images: Callable[[], Tensor], run: str = "", seed: int = 0) -> None:
        """Before training from scratch: load the trained tokenizer of `run` (``tokenizer.vq``), or fit the
        tokenizer to training images (a colour palette; `images` is called only then)."""
        if self.kind == "vq" and run:
            load_vq_run(self.tok, run, self.channels, self.image_size)
        if not self.tok.fitted:
            self.tok.fit(images(), seed=seed)

    @property
    def patch_dim(self) -> int:
        """Width of a continuous token (0 for discrete tokens)."""
        return self.tok.patch_dim

    @property
    def length(self) -> int:
        """Tokens per image or clip (with the begin token of discrete inputs)."""
        return self.tok.num_patches + (0 if self.kind == "patches" else 1)

    def encode(self, pixels: Tensor) -> Sequence:
        """(B, C, H, W) images or (B, F, C, H, W) clips in [-1, 1] -> input `Sequence` (labels IGNORE)."""
        seq = self.tok.encode(pixels)
        if self.kind != "patches":
            bos = torch.full((pixels.shape[0], 1), self.bos, dtype=torch.long, device=pixels.device)
            seq = concat(tokens(bos), seq)
        return seq
