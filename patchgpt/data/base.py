"""What every image source provides, the deterministic batch order, and the training augmentation.

Images leave the data layer as float tensors (C, H, W) in [-1, 1] with an int label (-1 = unlabeled).
Batch order is a pure function of (seed, step), so a resumed run sees exactly the batches it would have
seen, whatever the number of loader workers.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


class DataError(ValueError):
    """Bad input data; the message is one line naming the file or spec at fault."""


@dataclass
class DataInfo:
    """What a task needs to know about its data."""

    channels: int
    image_size: tuple[int, int]
    classes: list[str] | None = None      # None for unlabeled data
    captions: bool = False                # items carry a caption (batch["text"])
    skipped: list[str] = field(default_factory=list)  # files skipped as unreadable ("path: reason")
    boxes: bool = False                   # items carry detection targets (batch["boxes"], ["classes"])
    category_ids: list[int] | None = None  # COCO category id of each class (detection output)
    max_objects: int = 0                  # detection: most (non-crowd) objects in one image of the source
    frames: int = 0                       # video: frames per clip (items are (F, C, H, W)); 0 = images

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 0


def skip_or_raise(info: DataInfo, on_error: str, e: DataError) -> None:
    """An item failed to decode: re-raise (``on_error="stop"``), or print one line and count it in
    ``info.skipped`` (``"skip"``; the caller then returns None for the item)."""
    if on_error == "stop":
        raise e
    print(f"patchgpt: skipping {e}", file=sys.stderr)
    if str(e) not in info.skipped:
        info.skipped.append(str(e))


class ImageSet(Dataset):
    """A map-style dataset of (image (C, H, W) float in [-1, 1], label int) pairs."""

    info: DataInfo

    def images(self, n: int | None = None) -> Tensor:
        """The first `n` images stacked (N, C, H, W) — for fitting palettes and probes' baselines.

        Items that come back as None (files skipped at decode time) are left out."""
        n = len(self) if n is None else min(n, len(self))
        return torch.stack([item[0] for item in (self[i] for i in range(n)) if item is not None])

    def labels(self) -> Tensor:
        return torch.tensor([self[i][1] for i in range(len(self))])


class Subset(ImageSet):
    """A view of an `ImageSet` through a list of indices."""

    def __init__(self, base: ImageSet, indices: list[int]) -> None:
        self.base, self.indices, self.info = base, list(indices), base.info

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.base[self.indices[i]]

    def labels(self) -> Tensor:
        return self.base.labels()[torch.tensor(self.indices, dtype=torch.long)]


class ConcatSet(ImageSet):
    """Two sets one after the other (same `info`)."""

    def __init__(self, a: ImageSet, b: ImageSet) -> None:
        self.a, self.b, self.info = a, b, a.info

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __getitem__(self, i: int):
        return self.a[i] if i < len(self.a) else self.b[i - len(self.a)]

    def labels(self) -> Tensor:
        return torch.cat([self.a.labels(), self.b.labels()])


def split(ds: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Deterministic train/val split by a seeded permutation (the same every run for the same seed)."""
    n = len(ds)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n_val == 0 and n > 1:
        n_val = 1
    return Subset(ds, sorted(perm[n_val:])), Subset(ds, sorted(perm[:n_val]))


def collate(items: list) -> dict:
    """[(image, label[, caption | target]), ...] -> {"image": (B, C, H, W), "label": (B,)[, "text": [str]]}.

    A detection target (a dict of ``boxes`` (N, 4), ``classes`` (N,), ``meta``) becomes ``boxes``
    (B, Nmax, 4) and ``classes`` (B, Nmax) padded with class -1, and ``meta`` (a list). Clips (F, C, H, W)
    become {"video": (B, F, C, H, W), "label": (B,)}. None items (files skipped as unreadable) are dropped.
    """
    items = [it for it in items if it is not None]
    if not items:
        return {"image": torch.zeros(0), "label": torch.zeros(0, dtype=torch.long)}
    key = "video" if items[0][0].dim() == 4 else "image"
    batch = {key: torch.stack([it[0] for it in items]),
             "label": torch.tensor([it[1] for it in items], dtype=torch.long)}
    if len(items[0]) > 2 and isinstance(items[0][2], dict):
        batch.update(pad_targets([it[2] for it in items]))
    elif len(items[0]) > 2:
        batch["text"] = [it[2] for it in items]
    return batch


def pad_targets(targets: list[dict]) -> dict:
    """Detection targets of one batch -> padded ``boxes`` (B, N, 4), ``classes`` (B, N) (-1 = none), ``meta``."""
    n = max([len(t["classes"]) for t in targets] + [1])
    boxes = torch.zeros(len(targets), n, 4)
    classes = torch.full((len(targets), n), -1, dtype=torch.long)
    for b, t in enumerate(targets):
        k = len(t["classes"])
        boxes[b, :k], classes[b, :k] = t["boxes"], t["classes"]
    return {"boxes": boxes, "classes": classes, "meta": [t["meta"] for t in targets]}


def input_key(batch: dict) -> str:
    """The batch's pixel input: "video" for clips, else "image"."""
    return "video" if "video" in batch else "image"


def batch_len(batch: dict) -> int:
    """Items in a batch (0 for a batch whose every file was skipped)."""
    x = batch[input_key(batch)]
    return x.shape[0] if x.numel() else 0


def rows(batch: dict) -> tuple[int, int]:
    """(first, total): this batch is rows first..first+B-1 of a global batch of `total` split over processes.

    Per-row random draws made for all `total` rows and sliced give each item what one process gives it."""
    return batch.get("rows", (0, batch_len(batch)))


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Move a batch's tensors to `device` (captions stay lists of str)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class StepSampler(torch.utils.data.Sampler):
    """Yields index lists for micro-steps start, start+1, ...: epoch e uses permutation (seed, e).

    Under torchrun, `batch_size` is the global micro-batch (all ranks together) and rank r of `world` gets
    the r-th of `world` equal slices of it, so the data order is the same whatever the number of processes
    (what `torch.utils.data.DistributedSampler` does per epoch, done here per step).
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, steps: int | None = None,
                 shuffle: bool = True, rank: int = 0, world: int = 1) -> None:
        if n == 0:
            raise DataError("the training set is empty")
        if batch_size % world:
            raise DataError(f"batch of {batch_size} cannot be split over {world} processes")
        self.n, self.bs, self.seed = n, batch_size, seed
        self.start, self.steps, self.shuffle = start, steps, shuffle
        self.rank, self.world = rank, world
        self.per_epoch = max(1, n // batch_size)

    def indices(self, step: int) -> list[int]:
        epoch, j = divmod(step, self.per_epoch)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=gen)
        else:
            perm = torch.arange(self.n)
        return perm[j * self.bs:(j + 1) * self.bs].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        s = self.start
        per_rank = self.bs // self.world
        while self.steps is None or s < self.start + self.steps:
            yield self.indices(s)[self.rank * per_rank:(self.rank + 1) * per_rank]
            s += 1

    def __len__(self) -> int:
        return self.steps if self.steps is not None else 2**31


def train_batches(ds: ImageSet, batch_size: int, seed: int, start: int, steps: int,
                  num_workers: int = 0, rank: int = 0, world: int = 1, shuffle: bool = True,
                  pin_memory: bool = False) -> Iterator[dict]:
    """Micro-batches for micro-steps start..start+steps-1, in an order that depends only on (seed, step).

    `batch_size` is the global micro-batch; this rank gets its ``batch_size // world`` slice of each."""
    sampler = StepSampler(len(ds), batch_size, seed, start, steps, shuffle=shuffle, rank=rank, world=world)
    return iter(DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                           persistent_workers=False, pin_memory=pin_memory))


def eval_batches(ds: ImageSet, batch_size: int, num_workers: int = 0) -> Iterator[dict]:
    """One ordered pass over `ds`."""
    return iter(DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate,
                           num_workers=num_workers))


def augment(images: Tensor, gen: torch.Generator, shift: int = 1, flip: bool = False,
            rows: tuple[int, int] | None = None) -> Tensor:
    """Random translation by up to `shift` pixels (edge-replicated) and optional horizontal flips.

    Clips (B, F, C, H, W) get one shift and flip per clip, the same for all its frames. ``rows=(first,
    total)`` says these B images are rows first..first+B-1 of a batch of `total` split over processes: the
    draws are made for all `total` rows and sliced, so each image gets what a one-process run gives it."""
    if images.dim() == 5:
        B, F_, C, H, W = images.shape
        out = augment(images.reshape(B, F_ * C, H, W), gen, shift, flip, rows)   # frames folded into channels
        return out.reshape(B, F_, C, H, W)
    B, C, H, W = images.shape
    first, total = rows if rows is not None else (0, B)
    if shift > 0:
        padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")   # (B, C, H+2s, W+2s)
        offs = torch.randint(0, 2 * shift + 1, (total, 2), generator=gen)[first:first + B].tolist()
        images = torch.stack([padded[b, :, dy:dy + H, dx:dx + W] for b, (dy, dx) in enumerate(offs)])
    if flip:
        mask = (torch.rand(total, generator=gen) < 0.5)[first:first + B].to(images.device)
        images = torch.where(mask[:, None, None, None], images.flip(-1), images)
    return images
