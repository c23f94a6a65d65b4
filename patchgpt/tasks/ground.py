"""Boxes before words: tasks that answer in words first write the image's objects, as a detector does.

A grounded caption or answer is one sequence: the image and a grounding task token (a bidirectional
prefix), the objects as Pix2Seq box tokens, each class read from a glimpse of its box (`Detect`), left to
right and padded with end tokens to a fixed length, then the task's own token and its words. Training
teacher-forces the true boxes and puts the loss on the objects and the words; decoding first detects with
the KV cache, then writes the words after the objects it found. Reading a small digit anywhere in the image
is what a plain captioner of 1M parameters learns last (README, Captioning); reading it from the glimpse of a
box it has just placed is what the detector already does well, and the words then only have to be read off
the boxes. It is the grounded-caption idea of Kosmos-2 and of Pix2Seq v2's shared box tokens, used here as
a chain of thought: the boxes are also returned with the words.

Used by `Caption` and `AnswerQuestions` when their data carry boxes (``caption.ground``, ``vqa.ground``).
"""

from __future__ import annotations

import copy
from functools import partial

import torch
from torch import Tensor, nn

from ..config import ConfigError, RunConfig
from ..data.base import DataError, DataInfo
from ..rng import RowRNG
from ..sampling import SamplingParams, sample
from ..sequence import IGNORE, Sequence, Vocab, concat, tokens
from ..tokenizers.boxes import TOKENS_PER_OBJECT
from ..tokenizers.inputs import PixelInput
from .detect import Detect, DetectHook, left_to_right

CHOICES = ("auto", "on", "off")


def wants(setting: str, available: bool, key: str, what: str) -> bool:
    """Whether an optional part of a sequence is on: ``on`` (the data must have `what`, or a one-line error),
    ``off``, or ``auto`` (whenever the data have it). `key` names the setting in messages."""
    if setting not in CHOICES:
        raise ConfigError(f"{key}={setting!r}: must be one of {', '.join(CHOICES)}")
    if setting == "on" and not available:
        raise DataError(f"{key}=on needs data with {what} (digit-scenes); this data has none")
    return setting == "on" or (setting == "auto" and available)


class GroundedWords:
    """What grounded tasks (`Caption`, `AnswerQuestions`) share beside `Grounding`: they save that their data
    had boxes, and skip the generic pixel shifts, which would move the pixels away from the boxes. Mix in
    before `Task`; the task sets ``self.ground`` (a `Grounding` or None)."""

    ground: Grounding | None

    def state(self) -> dict:
        extra = {"boxes": True, "category_ids": self.info.category_ids} if self.ground else {}
        return {**super().state(), **extra}

    def augment(self, batch: dict, rng: RowRNG) -> dict:
        return batch if self.ground else super().augment(batch, rng)

    def augmentation_note(self, note: str) -> str:
        if self.ground and note.startswith("augmentation"):
            return "no augmentation (grounded: shifts would move the pixels away from their boxes)"
        return super().augmentation_note(note)


class Grounding:
    """The object part of a grounded sequence, on the calling task's vocabulary, backbone and input.

    Args:
        cfg: the task's config; its ``detect`` section sets the bins, glimpses and ``max_objects`` (0: the
            data's most, filled in here so the checkpoint keeps it). Objects go left to right, without
            Pix2Seq's noise objects: the words that follow are trained on real boxes only.
        info: the data (must have boxes); vocab: the task's shared vocabulary (box tokens are added to it).
        input: the task's input tokenizer (replaced by the owner's current one at each call).
    """

    def __init__(self, cfg: RunConfig, info: DataInfo, vocab: Vocab, input: PixelInput,
                 token: str = "task_ground") -> None:
        if cfg.detect.max_objects <= 0:
            cfg.detect.max_objects = max(info.max_objects, 1)
        sub = copy.deepcopy(cfg)
        sub.detect.order, sub.detect.noise, sub.detect.temperature = "x", False, 0.0
        self.det = Detect(sub, info, vocab, shared_input=input)   # no backbone of its own: the owner's (`attach`)
        # its own prompt token (`token`): a detector trained beside it (multi-task) keeps its random order and
        # noise boxes
        self.det.task_id = vocab.add(token, 1).start
        self.max_objects, self.period = sub.detect.max_objects, self.det.period
        self.length = 1 + self.period * self.max_objects + 1   # task token, objects, end (then padding)

    def attach(self, owner: nn.Module) -> None:
        """Decode with `owner`'s backbone and input tokenizer, whatever they are at the time: a multi-task model
        replaces its parts' own with shared ones after building them."""
        self.owner = owner
        self._sync()

    def _sync(self) -> None:
        for attr in ("backbone", "input"):
            self.det._modules.pop(attr, None)
            self.det.__dict__[attr] = getattr(self.owner, attr)   # kept unregistered here: saved once

    def tokens(self, boxes: list[Tensor] | Tensor, classes: list[Tensor] | Tensor, images: Tensor | None,
               device: torch.device | None = None) -> Sequence:
        """Each image's (N, 4) normalized xyxy boxes and (N,) classes (-1: none) -> the (B, length) object part:
        the grounding task token, the objects left to right with glimpses (of `images`; none without them),
        the end token, then end tokens as padding. Labels (the next token) on the coordinates, classes and the
        first end token. On `images`' device, or `device` without images."""
        self._sync()
        dev = images.device if images is not None else device
        rows = [self.det._targets(b.reshape(-1, 4), c.reshape(-1), None)
                for b, c in zip(boxes, classes, strict=True)]
        L = self.length
        ids = torch.full((len(rows), L), self.det.boxes.end, dtype=torch.long)
        labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
        for r, (i, lab) in enumerate(rows):
            ids[r, :len(i)], labels[r, :len(lab)] = i, lab
        pos = torch.cat([torch.zeros(len(rows), 1, 3, dtype=torch.long), self.det._positions(ids[:, 1:])], dim=1)
        seq = Sequence(ids=ids.to(dev), labels=labels.to(dev), pos=pos.to(dev))
        return self.det._with_glimpses(seq, images) if self.det.glimpse and images is not None else seq

    @torch.no_grad()
    def detect(self, images: Tensor, head: Sequence | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Greedy detection of (B, C, H, W) images on the KV cache -> per image (N, 4) boxes and (N,) classes.
        `head`: what comes before the objects (default: the images' tokens), e.g. the image and a question."""
        self._sync()
        if head is None:
            prompt = self.det.task_prompt(images, self.det.task_id)
        else:
            task = tokens(torch.full((images.shape[0], 1), self.det.task_id, dtype=torch.long, device=images.device))
            prompt = concat(head, task, prefix_len=head.ids.shape[1] + 1)
        _, boxes, classes = self._write_objects(prompt, images)
        return boxes, classes

    def _write_objects(self, prompt: Sequence, images: Tensor | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Greedy objects after `prompt` on the KV cache, with glimpses of `images` (None: without) -> the
        (B, point_length) ids written, and per image (N, 4) boxes and (N,) classes."""
        M = self.max_objects
        hook = DetectHook(self.det, images, M, glimpses=images is not None)
        ids = sample(self.det.backbone, prompt, self.point_length, SamplingParams(temperature=0.0),
                     allowed=partial(self.det.boxes.allowed, max_objects=M), hook=hook)
        out = [self.det.boxes.decode(row.cpu()) for row in ids]
        return ids, [b for b, _ in out], [c for _, c in out]

    # ---- pointing: the objects an answer is about ------------------------------------------------------------

    @property
    def point_length(self) -> int:
        """Tokens of a written object list (a pointer part, or what `detect` writes): `max_objects` objects of 5
        tokens, then the end token."""
        return TOKENS_PER_OBJECT * self.max_objects + 1

    def pointer(self, boxes: Tensor, classes: Tensor) -> tuple[list[int], int]:
        """The objects an answer is about, (k, 4) normalized xyxy boxes and (k,) classes -> (ids, n): the
        `point_length` ids of the pointer part (the objects left to right as box tokens ``x0 y0 x1 y1 class``,
        without glimpses, at most `max_objects`, the end token, then end tokens as padding) and `n`, how many of
        them are written (the objects and the first end; the padding carries no loss)."""
        boxes, classes = boxes.reshape(-1, 4).cpu(), classes.reshape(-1).cpu()
        order = left_to_right(boxes)[:self.max_objects]                  # as the objects are written
        ids = self.det.boxes.encode(boxes[order], classes[order]).tolist()
        return ids + [self.det.boxes.end] * (self.point_length - len(ids)), len(ids)

    def point_positions(self, ids: Tensor) -> Tensor:
        """(B, point_length) pointer ids -> their (B, point_length, 3) grid positions (the cells their boxes
        name, as the objects')."""
        self._sync()
        return self.det._positions(ids, TOKENS_PER_OBJECT)

    @torch.no_grad()
    def point(self, prompt: Sequence) -> tuple[Sequence, list[Tensor], list[Tensor]]:
        """Greedy pointer part after `prompt` (everything up to the question) on the KV cache -> the
        (B, point_length) `Sequence` to append (ids and positions, no labels): the objects the model says the
        answer is about, then end tokens; and those objects' per image (k, 4) boxes and (k,) classes. No
        glimpses: the objects were already read."""
        self._sync()
        ids, boxes, classes = self._write_objects(prompt, None)
        return Sequence(ids=ids, labels=torch.full_like(ids, IGNORE), pos=self.point_positions(ids)), boxes, classes

    def prompt(self, img: Sequence, boxes: list[Tensor], classes: list[Tensor], images: Tensor,
               *task: Sequence | int) -> Sequence:
        """The image's tokens (prefix; or any head, e.g. the image and a question), the object part for `boxes`
        and `classes`, then the calling task's token (an int) and any further input-only sequences (a question):
        what the words are decoded after."""
        B, dev = images.shape[0], images.device
        tail = [tokens(torch.full((B, 1), t, dtype=torch.long, device=dev)) if isinstance(t, int) else t
                for t in task]
        return concat(img, self.tokens(boxes, classes, images), *tail, prefix_len=img.ids.shape[1] + 1)

    def objects(self, boxes: list[Tensor], classes: list[Tensor]) -> list[list[dict]]:
        """Decoded boxes and classes -> per image ``[{"box": [x0, y0, x1, y1] (normalized), "label": name}]``,
        left to right."""
        names = self.det.info.classes
        out = []
        for b, c in zip(boxes, classes, strict=True):
            order = b[:, 0].argsort(stable=True) if len(b) else torch.zeros(0, dtype=torch.long)
            out.append([{"box": [round(v, 4) for v in b[k].tolist()],
                         "label": names[int(c[k])] if 0 <= int(c[k]) < len(names) else str(int(c[k]))}
                        for k in order.tolist()])
        return out
