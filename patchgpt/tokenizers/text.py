"""Bytes: text as UTF-8 bytes, one token per byte, padded to a fixed length (ByT5-style, no vocabulary file)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..sequence import Sequence, Vocab, tokens


class Bytes:
    """Encode captions as (B, max_len) byte tokens; reserves 256 byte ids and one pad id."""

    def __init__(self, vocab: Vocab, max_len: int = 32) -> None:
        self.ids = vocab.add("bytes", 256)
        self.pad = vocab.add("text_pad", 1).start
        self.max_len = max_len

    def encode(self, texts: list[str], device: torch.device | str = "cpu") -> Sequence:
        """Captions -> a non-grid `Sequence` (B, max_len): bytes then pad; longer captions are truncated."""
        out = torch.full((len(texts), self.max_len), self.pad, dtype=torch.long)
        for i, t in enumerate(texts):
            b = list(t.encode("utf-8"))[: self.max_len]
            if b:
                out[i, : len(b)] = torch.tensor(b) + self.ids.start
        return tokens(out.to(device))

    def decode(self, ids: Tensor) -> list[str]:
        """(B, T) ids -> captions (pads and non-byte ids dropped)."""
        texts = []
        for row in ids.tolist():
            b = bytes(i - self.ids.start for i in row if i in self.ids)
            texts.append(b.decode("utf-8", errors="replace"))
        return texts
