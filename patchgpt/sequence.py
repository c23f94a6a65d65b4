"""The sequence contract: everything the backbone ever sees is a `Sequence`.

Tokenizers write `Sequence`s, tasks build them from batches, and the GPT reads them. The backbone knows
nothing about images, boxes or text. Continuous inputs (flattened patches) ride beside the token ids and
replace the id embedding where `is_patch` is True (as in AIM, arXiv:2401.08541); discrete inputs (colour
clusters as in iGPT, class tokens, text bytes) are ids from one shared `Vocab`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

IGNORE = -1
"""Label value that contributes no loss."""


@dataclass(frozen=True)
class Sequence:
    """A batch of token sequences, aligned on (B, T).

    Attributes:
        ids: (B, T) int64 ids from the shared `Vocab`.
        labels: (B, T) what position t should predict next; `IGNORE` means no loss.
        pos: (B, T, 3) (frame, row, col) + 1 for grid tokens, 0 for non-grid tokens.
        patches: (B, T, D) continuous inputs (flattened patches), or None.
        is_patch: (B, T) True where ``patches[:, t]`` replaces ``ids[:, t]``, or None.
        weights: (B, T) per-token loss weight, or None (all ones).
        prefix_len: leading positions that attend to each other both ways (0 = fully causal).
    """

    ids: Tensor
    labels: Tensor
    pos: Tensor
    patches: Tensor | None = None
    is_patch: Tensor | None = None
    weights: Tensor | None = None
    prefix_len: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """(B, T)."""
        return tuple(self.ids.shape)  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> Sequence:
        """Move every tensor to `device`."""
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return replace(self, ids=mv(self.ids), labels=mv(self.labels), pos=mv(self.pos),
                       patches=mv(self.patches), is_patch=mv(self.is_patch), weights=mv(self.weights))

    def with_prefix(self, prefix_len: int) -> Sequence:
        """The same sequence with a different bidirectional prefix length."""
        return replace(self, prefix_len=int(prefix_len))


class Vocab:
    """One id space shared by all tokenizers of a model.

    Each tokenizer reserves a contiguous, named range: ``vocab.add("colors", 16) -> range(…)``.
    Adding the same name twice with the same size returns the same range, so building a task twice is
    idempotent. The vocab is saved in the checkpoint config as ``[[name, size], ...]``.
    """

    def __init__(self, entries: list[tuple[str, int]] | None = None) -> None:
        self._ranges: dict[str, range] = {}
        self.size = 0
        for name, n in entries or []:
            self.add(name, n)

    def add(self, name: str, n: int) -> range:
        """Reserve `n` consecutive ids under `name` and return them."""
        if name in self._ranges:
            r = self._ranges[name]
            if len(r) != n:
                raise ValueError(f"vocab range {name!r} already has {len(r)} ids, asked for {n}")
            return r
        if n <= 0:
            raise ValueError(f"vocab range {name!r} needs a positive size, got {n}")
        r = range(self.size, self.size + n)
        self._ranges[name] = r
        self.size += n
        return r

    def __getitem__(self, name: str) -> range:
        return self._ranges[name]

    def __contains__(self, name: str) -> bool:
        return name in self._ranges

    def entries(self) -> list[list]:
        """JSON-friendly ``[[name, size], ...]`` in id order."""
        return [[k, len(r)] for k, r in self._ranges.items()]

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={r.start}..{r.stop - 1}" for k, r in self._ranges.items())
        return f"Vocab(size={self.size}: {inner})"


def tokens(ids: Tensor, labels: Tensor | None = None) -> Sequence:
    """A non-grid `Sequence` of plain ids (B, T): special tokens, class tokens, text bytes."""
    B, T = ids.shape
    return Sequence(ids=ids, labels=torch.full_like(ids, IGNORE) if labels is None else labels,
                    pos=torch.zeros(B, T, 3, dtype=torch.long, device=ids.device))


def concat(*seqs: Sequence, prefix_len: int = 0) -> Sequence:
    """Join sequences along T. Patches are zero-filled where a part has none."""
    B = seqs[0].ids.shape[0]
    dev = seqs[0].ids.device
    cat = lambda xs: torch.cat(xs, dim=1)  # noqa: E731
    patches = is_patch = weights = None
    if any(s.patches is not None for s in seqs):
        D = next(s.patches.shape[-1] for s in seqs if s.patches is not None)
        dtype = next(s.patches.dtype for s in seqs if s.patches is not None)
        patches = cat([s.patches if s.patches is not None
                       else torch.zeros(B, s.ids.shape[1], D, device=dev, dtype=dtype) for s in seqs])
        is_patch = cat([s.is_patch if s.is_patch is not None
                        else torch.full_like(s.ids, s.patches is not None, dtype=torch.bool) for s in seqs])
    if any(s.weights is not None for s in seqs):
        weights = cat([s.weights if s.weights is not None else torch.ones_like(s.ids, dtype=torch.float)
                       for s in seqs])
    return Sequence(ids=cat([s.ids for s in seqs]), labels=cat([s.labels for s in seqs]),
                    pos=cat([s.pos for s in seqs]), patches=patches, is_patch=is_patch, weights=weights,
                    prefix_len=prefix_len)
