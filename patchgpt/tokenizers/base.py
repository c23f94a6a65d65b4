"""The protocol every pixel tokenizer follows, so tasks and the input module treat them alike.

`Patches` and `Tubelets` give continuous tokens (``patch_dim`` > 0, AIM/ViT/ViViT); `ColorClusters` and
`VQCodes` give discrete ids from one vocabulary range (``ids``; ``patch_dim`` 0, iGPT/VQGAN).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from ..sequence import Sequence


@runtime_checkable
class Tokenizer(Protocol):
    """Images (or clips) <-> a `Sequence` of tokens on a (frames, rows, cols) grid."""

    grid: tuple[int, int]     # (rows, cols) of tokens per frame
    num_patches: int          # tokens per image (or clip)
    patch_dim: int            # width of a continuous token; 0 for discrete ids
    fitted: bool              # False until `fit` has seen data (a colour palette); True for the others

    def encode(self, pixels: Tensor) -> Sequence:
        """(B, C, H, W) images or (B, F, C, H, W) clips in [-1, 1] -> a `Sequence` (labels IGNORE)."""
        ...

    def decode(self, seq_or_tokens: Sequence | Tensor) -> Tensor:
        """Tokens (ids or continuous patches) -> pixels in [-1, 1]."""
        ...

    def fit(self, images: Tensor, seed: int = 0) -> object:
        """Learn what the tokenizer needs from training images (no-op where nothing is learned)."""
        ...
