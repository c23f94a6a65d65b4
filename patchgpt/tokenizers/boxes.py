"""Boxes: objects as token sequences, ``x_min y_min x_max y_max class`` each, then an end token (Pix2Seq).

Reference: Pix2Seq (Chen et al. 2022, google-research/pix2seq ``tasks/object_detection.py``, ``vocab.py``):
coordinates quantized into `bins` uniform bins over [0, 1], one token per coordinate; a class token per
object; noise objects for sequence augmentation carry their own class. Ranges come from the shared `Vocab`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..sequence import Vocab

TOKENS_PER_OBJECT = 5


class Boxes:
    """Quantize normalized xyxy boxes and class indices into tokens, and back.

    Args:
        bins: coordinate bins over [0, 1]; bin q stands for the value q / (bins - 1).
        num_classes: real classes; the id after them is the "noise" class (sequence augmentation).
        vocab: the shared vocab; reserves ``box_coords`` (bins), ``box_classes`` (num_classes + 1), ``box_end``.
    """

    def __init__(self, bins: int, num_classes: int, vocab: Vocab) -> None:
        if bins < 2:
            raise ValueError(f"Boxes needs at least 2 bins, got {bins}")
        self.bins, self.num_classes = bins, num_classes
        self.coords = vocab.add("box_coords", bins)
        self.classes = vocab.add("box_classes", num_classes + 1)
        self.noise = self.classes.stop - 1
        self.end = vocab.add("box_end", 1).start

    def quantize(self, boxes: Tensor) -> Tensor:
        """(..., 4) floats in [0, 1] -> (..., 4) coordinate ids (values outside [0, 1] are clipped)."""
        q = torch.round(boxes.clamp(0, 1) * (self.bins - 1)).long()
        return q + self.coords.start

    def dequantize(self, ids: Tensor) -> Tensor:
        """(..., 4) coordinate ids -> (..., 4) floats in [0, 1] (bin centres)."""
        return (ids - self.coords.start).clamp(0, self.bins - 1).float() / (self.bins - 1)

    def encode(self, boxes: Tensor, classes: Tensor) -> Tensor:
        """One image's (N, 4) normalized xyxy boxes and (N,) class indices (-1 = noise) -> (5N + 1,) ids.

        The objects keep the given order; the last id is the end token.
        """
        cls = torch.where(classes >= 0, classes + self.classes.start, torch.full_like(classes, self.noise))
        obj = torch.cat([self.quantize(boxes), cls[:, None]], dim=1)        # (N, 5)
        end = torch.tensor([self.end], dtype=torch.long, device=boxes.device)
        return torch.cat([obj.reshape(-1), end])                            # (N, 5) -> (5N + 1,)

    def decode(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(L,) ids -> (boxes (N, 4) in [0, 1], classes (N,)) up to the first end token.

        Objects must be well formed (4 coordinate ids, then a class id); decoding stops at the first
        one that is not, so a truncated or malformed tail is dropped. Noise objects come back as class -1;
        coordinates are sorted so that x_min <= x_max and y_min <= y_max.
        """
        ids = ids.tolist()
        boxes, classes = [], []
        for i in range(0, len(ids) - TOKENS_PER_OBJECT + 1, TOKENS_PER_OBJECT):
            obj = ids[i:i + TOKENS_PER_OBJECT]
            if obj[0] == self.end or not all(c in self.coords for c in obj[:4]) or obj[4] not in self.classes:
                break
            boxes.append(obj[:4])
            classes.append(-1 if obj[4] == self.noise else obj[4] - self.classes.start)
        if not boxes:
            return torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
        b = self.dequantize(torch.tensor(boxes))                              # (N, 4)
        x0, x1 = torch.minimum(b[:, 0], b[:, 2]), torch.maximum(b[:, 0], b[:, 2])
        y0, y1 = torch.minimum(b[:, 1], b[:, 3]), torch.maximum(b[:, 1], b[:, 3])
        return torch.stack([x0, y0, x1, y1], dim=1), torch.tensor(classes, dtype=torch.long)

    def grid_pos(self, ids: Tensor, grid: tuple[int, int], period: int = TOKENS_PER_OBJECT) -> Tensor:
        """(B, L) object tokens (objects back to back from slot 0) -> (B, L, 3) grid positions.

        `period` is the number of tokens per object in `ids`: 5, or 6 when an input-only glimpse token sits
        between ``y_max`` and the class (it gets the box-centre cell too).

        Each coordinate points at the patch-grid cell it names, through the same row/column embeddings as the
        image's patches: ``x_min`` gets its column, ``y_min`` the cell (y_min, x_min), ``x_max`` the cell
        (y_min, x_max), and ``y_max`` — the token whose output predicts the class — the cell at the box's
        centre, so the class is read where the object is. Classes and the end token get 0 (no position).
        Rows and columns are ``floor(v * n) + 1``.
        """
        B, L = ids.shape
        v = self.dequantize(ids)                                          # (B, L) in [0, 1]
        is_coord = (ids >= self.coords.start) & (ids < self.coords.stop)
        back = lambda k: torch.cat([v[:, :1].expand(B, k), v], dim=1)[:, :L]   # noqa: E731  value k tokens back
        cell = lambda x, n: (x * n).floor().long().clamp(0, n - 1) + 1   # noqa: E731
        R, C = grid
        slot = torch.arange(L, device=ids.device) % period                 # (L,)
        rows = torch.stack([torch.zeros_like(v), back(0), back(1), (back(2) + v) / 2], dim=0)  # per slot 0..3
        cols = torch.stack([v, back(1), v, (back(3) + back(1)) / 2], dim=0)
        s = slot.clamp(max=3)[None, :, None].expand(1, L, B).transpose(1, 2)  # (1, B, L)
        row = rows.gather(0, s)[0]                                        # (B, L)
        col = cols.gather(0, s)[0]
        pos = torch.zeros(B, L, 3, dtype=torch.long, device=ids.device)
        ok = is_coord & (slot < 4)[None]
        pos[..., 1] = torch.where(ok & (slot > 0)[None], cell(row, R), 0)
        pos[..., 2] = torch.where(ok, cell(col, C), 0)
        if period > TOKENS_PER_OBJECT:   # the glimpse after y_max shares its (centre) position
            g = (slot == 4).nonzero()[:, 0]
            pos[:, g] = pos[:, g - 1]
        return pos

    def allowed(self, step: int, max_objects: int | None = None, with_noise: bool = False) -> list[range]:
        """Ids a decoder may emit at generated position `step` (0-based, objects back to back).

        Coordinates at slots 0-3 (slot 0 may also end the sequence), a class at slot 4; the noise class
        only if `with_noise`; only the end token once `max_objects` objects are out.
        """
        if max_objects is not None and step >= TOKENS_PER_OBJECT * max_objects:
            return [range(self.end, self.end + 1)]
        slot = step % TOKENS_PER_OBJECT
        if slot == 0:
            return [self.coords, range(self.end, self.end + 1)]
        if slot < 4:
            return [self.coords]
        return [self.classes] if with_noise else [range(self.classes.start, self.noise)]
