"""Layout first, then pixels: a text-to-image model that writes the objects' boxes before the image.

A layout-first sequence is the caption (the bidirectional prefix), a layout task token, the objects as Pix2Seq
box tokens (left to right, each token at the grid cell its coordinates name, padded with end tokens to a fixed
length), then a class map: one input-only token per image-token cell, naming the class of the object whose box
covers the cell's centre (the smallest, where boxes overlap) or background, at the grid position of the input
that predicts that cell (the image token before it in raster order: next-token prediction); then
the begin token and the image tokens. Training teacher-forces the true boxes, with the loss on the objects and
the image tokens; sampling draws the objects from the caption first (on the KV cache), renders their class map,
then draws the image after them. Which digit goes where is decided once, in a few box tokens read straight
off the caption, and every image token finds its object's class at its own grid position: the binding of
words to places that a 1M-parameter text-to-image model otherwise gets wrong (README, Unseen combinations).
It is the layout-then-image idea of Make-A-Scene's scene tokens and of LayoutGPT, on patchgpt's own detection
tokens (`Grounding`, without glimpses: there is no image yet).

Used by `Generate` when its data carry captions and boxes (``generate.layout``).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from ..config import RunConfig
from ..data.base import DataInfo
from ..sampling import SamplingParams, sample
from ..sequence import IGNORE, Sequence, Vocab, concat, tokens
from ..tokenizers.boxes import TOKENS_PER_OBJECT
from ..tokenizers.inputs import PixelInput
from ..tokenizers.patches import grid_positions
from .detect import DetectHook
from .ground import Grounding


class BoxLayout:
    """The layout part of a layout-first sequence, on the calling task's vocabulary and backbone.

    Args:
        cfg: the task's config; its ``detect`` section sets the bins and ``max_objects`` (0: the data's most).
        info: the data (with boxes and classes); vocab: the task's shared vocabulary.
        input: the task's image tokenizer (its grid of tokens is the class map's).
    """

    def __init__(self, cfg: RunConfig, info: DataInfo, vocab: Vocab, input: PixelInput) -> None:
        self.objects = Grounding(cfg, info, vocab, input, token="task_layout")
        self.background = vocab.add("layout_background", 1).start
        self.grid = tuple(input.grid)
        self.grid_pos = grid_positions(1, *self.grid)                       # (N, 3) the image tokens' cells
        self.length = self.objects.length + self.grid[0] * self.grid[1]    # objects, then one map token per cell

    def attach(self, owner: nn.Module) -> None:
        """Decode with `owner`'s backbone, whatever it is at the time."""
        self.objects.attach(owner)

    @property
    def boxes(self):
        """The box tokenizer (`patchgpt.tokenizers.boxes.Boxes`)."""
        return self.objects.det.boxes

    def class_map(self, boxes: list[Tensor], classes: list[Tensor], device: torch.device) -> Tensor:
        """Per image (N, 4) normalized xyxy boxes and (N,) classes (-1: none) -> (B, rows * cols) map ids: at
        each cell the class token of the smallest box covering the cell's centre, else background."""
        R, C = self.grid
        ys = (torch.arange(R, dtype=torch.float32) + 0.5) / R
        xs = (torch.arange(C, dtype=torch.float32) + 0.5) / C
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")                      # (R, C) cell centres
        cy, cx = cy.reshape(-1), cx.reshape(-1)                               # (R*C,)
        out = torch.full((len(boxes), R * C), self.background, dtype=torch.long)
        for r, (b, c) in enumerate(zip(boxes, classes, strict=True)):
            b, c = b.reshape(-1, 4).float().cpu(), c.reshape(-1).cpu()
            keep = c >= 0
            b, c = b[keep], c[keep]
            if not len(c):
                continue
            inside = ((cx[None] >= b[:, :1]) & (cx[None] <= b[:, 2:3])
                      & (cy[None] >= b[:, 1:2]) & (cy[None] <= b[:, 3:4]))    # (N, R*C)
            area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))[:, None].expand_as(inside)   # (N, R*C)
            area = torch.where(inside, area, torch.full_like(area, float("inf")))
            best = area.argmin(0)                                             # (R*C,) smallest covering box
            covered = inside.any(0)
            out[r, covered] = self.boxes.classes.start + c[best[covered]]
        return out.to(device)

    def tokens(self, boxes: list[Tensor] | Tensor, classes: list[Tensor] | Tensor, device: torch.device,
               drop: Tensor | None = None) -> Sequence:
        """The (B, length) layout part: the objects (labelled: coordinates, classes and the first end token)
        and the class map (input only). Rows where `drop` is True (the null condition, for guidance) get no
        objects, a background map and no loss."""
        boxes, classes = list(boxes), list(classes)
        if drop is not None:
            for r in drop.nonzero().flatten().tolist():
                boxes[r], classes[r] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
        objs = self.objects.tokens(boxes, classes, None, device)              # (B, objects.length)
        if drop is not None and drop.any():
            labels = objs.labels.masked_fill(drop.to(device)[:, None], IGNORE)
            objs = Sequence(ids=objs.ids, labels=labels, pos=objs.pos)
        ids = self.class_map(boxes, classes, device)                          # (B, R*C)
        B, N = ids.shape
        pos = self.map_pos.to(device)[None].expand(B, N, 3)
        cells = Sequence(ids=ids, labels=torch.full_like(ids, IGNORE), pos=pos)
        return concat(objs, cells)

    @property
    def map_pos(self) -> Tensor:
        """(N, 3) positions of the class map's tokens: each at the position of the input that predicts its cell
        (the image token before it in raster order; none for the first cell, which the begin token predicts),
        so the token being written finds its class at its own position."""
        return torch.cat([torch.zeros(1, 3, dtype=self.grid_pos.dtype), self.grid_pos[:-1]])   # (N, 3)

    @torch.no_grad()
    def sample(self, cond: Sequence, params: SamplingParams, generator: torch.Generator | None = None,
               uncond: Sequence | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Draw each row's objects after the condition `cond` (B, T) (with guidance against `uncond`, where
        given) -> per row (N, 4) boxes and (N,) classes."""
        self.objects._sync()
        det, M = self.objects.det, self.objects.max_objects
        B, dev = cond.shape[0], cond.ids.device
        task = tokens(torch.full((B, 1), det.task_id, dtype=torch.long, device=dev))
        prompt = concat(cond, task, prefix_len=cond.prefix_len)
        null = concat(uncond, task, prefix_len=uncond.prefix_len) if uncond is not None else None
        ids = sample(det.backbone, prompt, TOKENS_PER_OBJECT * M + 1, params, generator=generator,
                     allowed=partial(self.boxes.allowed, max_objects=M), hook=DetectHook(det, None, M),
                     uncond_prompt=null)
        out = [self.boxes.decode(row.cpu()) for row in ids]
        return [b for b, _ in out], [c for _, c in out]

    def objects_of(self, boxes: list[Tensor], classes: list[Tensor]) -> list[list[dict]]:
        """Per image ``[{"box", "label"}]``, left to right (`Grounding.objects`)."""
        return self.objects.objects(boxes, classes)
