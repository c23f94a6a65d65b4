"""What every image source provides, the item and batch format, the deterministic batch order, and the
training augmentation.

An item is a dict keyed by field: ``"image"`` (C, H, W) float in [-1, 1] or ``"video"`` (F, C, H, W), ``"label"``
(int, -1 = unlabeled), and whatever else the source carries (``"text"``: a caption; detection: ``"boxes"``
(N, 4), ``"classes"`` (N,), ``"meta"``). None stands for an item skipped as unreadable. `collate` batches
items by key, knowing no field but the pad values in `PAD`. Batch order is a pure function of (seed, step),
so a resumed run sees exactly the batches it would have seen, whatever the number of loader workers.
"""

from __future__ import annotations

import math
import numbers
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..rng import RowRNG

Item = dict[str, Any]   # one data item, {"image" | "video": Tensor, "label": int, ...}

# Pad value of fields whose tensors differ in length along their first dimension (default 0).
PAD: dict[str, int | float] = {"classes": -1}

# Most classes a source may have: each is a class name and an output logit, so a stray label of two billion
# in a label file must not become two billion of them.
MAX_CLASSES = 100_000

# A batch most of whose items were skipped as unreadable is reported on stderr, at most once per this many
# batches (per process: each DataLoader worker counts its own).
SKIP_WARN_EVERY = 100


class DataError(ValueError):
    """Bad input data; the message is one line naming the file or spec at fault (line breaks in it, e.g. from
    a quoted exception, become spaces)."""

    def __init__(self, message: object = "") -> None:
        super().__init__(re.sub(r"\s*[\r\n]+\s*", " ", str(message)).strip())


def one_line_errors(batches: Iterator[dict]) -> Iterator[dict]:
    """`batches` (a DataLoader's), with a `DataError` raised in a loader worker process re-raised as its own
    one line: torch re-raises it in the main process with the worker's whole traceback as the message."""
    try:
        yield from batches
    except DataError as e:
        msg = str(e)
        if "Traceback (most recent call last)" not in msg or "DataError: " not in msg:
            raise
        raise DataError(msg.rsplit("DataError: ", 1)[1]) from None


class SkipMeter:
    """Counts the items `collate` sees skipped (None) and warns, one line on stderr, when most of a batch was
    skipped: on the first such batch, then at most once every `SKIP_WARN_EVERY` batches."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.batches = self.items = self.skipped = 0
        self.since: int | None = None   # batches since the last warning (None: none yet)

    def add(self, n: int, skipped: int) -> None:
        self.batches, self.items, self.skipped = self.batches + 1, self.items + n, self.skipped + skipped
        if self.since is not None:
            self.since += 1
        if n and 2 * skipped > n and (self.since is None or self.since >= SKIP_WARN_EVERY):
            print(f"patchgpt: warning: {skipped} of the {n} items of a batch were skipped as unreadable "
                  f"(data.on_error=skip; {self.skipped} of {self.items} in {self.batches} batches so far; "
                  f"repeated at most every {SKIP_WARN_EVERY} batches)", file=sys.stderr)
            self.since = 0


SKIPS = SkipMeter()


@dataclass
class DataInfo:
    """What a task needs to know about its data."""

    channels: int
    image_size: tuple[int, int]
    classes: list[str] | None = None      # None for unlabeled data
    captions: bool = False                # items carry a caption (batch["text"])
    questions: int = 0                    # items carry up to this many questions about their image (batch["qa"]:
                                          # per item a list of {"question", "answer"}); 0 = none or one
    refs: bool = False                    # questions name the objects their answers are about (batch["refs"]:
                                          # per item indices into its boxes; also in each "qa" entry)
    rationales: bool = False              # answers come with a rationale, how they follow from the image
                                          # (batch["rationale"], a string, maybe empty; also in each "qa" entry)
    skipped: list[str] = field(default_factory=list)  # files skipped as unreadable ("path: reason")
    boxes: bool = False                   # items carry detection targets (batch["boxes"], ["classes"])
    category_ids: list[int] | None = None  # COCO category id of each class (detection output)
    max_objects: int = 0                  # detection: most (non-crowd) objects in one image of the source
    frames: int = 0                       # video: frames per clip (items are (F, C, H, W)); 0 = images
    masks: list[str] | None = None        # segmentation: the name of each label value of batch["mask"] (H, W)
    parts: dict[str, DataInfo] | None = None  # a mixture (multi-task data): each task's own data, by task

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 0


def skip_or_raise(info: DataInfo, on_error: str, e: DataError) -> None:
    """An item failed to decode: re-raise (``on_error="stop"``), or count it in ``info.skipped`` and print one
    line the first time this process meets it (``"skip"``; the caller then returns None for the item)."""
    if on_error == "stop":
        raise e
    if str(e) not in info.skipped:
        print(f"patchgpt: skipping {e}", file=sys.stderr)
        info.skipped.append(str(e))


class ImageSet(Dataset):
    """A map-style dataset of items: dicts with ``"image"`` (C, H, W) float in [-1, 1] (or ``"video"``) and
    ``"label"`` (int), or None for an item skipped as unreadable."""

    info: DataInfo

    def __getitem__(self, i: int) -> Item | None:
        raise NotImplementedError

    def images(self, n: int | None = None) -> Tensor:
        """The first `n` images (N, C, H, W) or clips (N, F, C, H, W) stacked — for fitting palettes and
        probes' baselines. Items that come back as None (files skipped at decode time) are left out."""
        n = len(self) if n is None else min(n, len(self))
        got = [item[input_key(item)] for item in (self[i] for i in range(n)) if item is not None]
        if not got:
            raise DataError(f"none of the first {n} items could be read (every one was skipped or the set is empty)")
        return torch.stack(got)

    def labels(self) -> Tensor:
        """Every item's label (N,)."""
        return torch.tensor([self[i]["label"] for i in range(len(self))])


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


def collate(items: list[Item | None]) -> dict:
    """Items -> one batch, field by field: None items (files skipped as unreadable) are dropped, then

    - tensors of one shape are stacked (B, ...);
    - tensors of different lengths N along their first dimension, or all of length 0, are padded with
      ``PAD.get(key, 0)`` to the longest (at least 1) and stacked (B, Nmax, ...): detection ``boxes`` become
      (B, Nmax, 4) zero-padded and ``classes`` (B, Nmax) padded with -1;
    - Python numbers become a tensor (B,) (``label``: long);
    - anything else (captions, detection ``meta``) becomes a list.

    A batch whose every item was skipped is ``{}`` (`batch_len` 0); a batch most of whose items were skipped
    is reported on stderr (`SkipMeter`).
    """
    n = len(items)
    items = [it for it in items if it is not None]
    SKIPS.add(n, n - len(items))
    if not items:
        return {}
    keys = items[0].keys()
    for it in items:
        if it.keys() != keys:
            raise DataError(f"items of one batch have different fields: {sorted(keys)} and {sorted(it.keys())}")
    return {k: collate_field(k, [it[k] for it in items]) for k in keys}


def collate_field(key: str, values: list) -> Any:
    """One field of a batch's items -> a stacked, padded-and-stacked tensor or a list (see `collate`)."""
    first = values[0]
    if torch.is_tensor(first):
        if all(v.shape == first.shape for v in values) and (first.dim() == 0 or first.shape[0] > 0):
            return torch.stack(values)
        return pad_stack(values, PAD.get(key, 0), key)
    if isinstance(first, numbers.Number):
        return torch.tensor(values)   # ints -> long, floats -> float32, bools -> bool
    return list(values)


def pad_stack(values: list[Tensor], pad: int | float, key: str = "field") -> Tensor:
    """Tensors (N_b, ...) -> (B, max(N_b, 1), ...) filled with `pad` past each one's length."""
    tail = values[0].shape[1:]
    if any(v.dim() == 0 or v.shape[1:] != tail for v in values):
        raise DataError(f"{key!r}: cannot batch tensors of shapes {sorted({tuple(v.shape) for v in values})}")
    n = max([len(v) for v in values] + [1])
    out = torch.full((len(values), n, *tail), pad, dtype=values[0].dtype)
    for b, v in enumerate(values):
        out[b, :len(v)] = v
    return out


def input_key(batch: dict) -> str:
    """The pixel input of a batch or an item: "video" for clips, else "image"."""
    return "video" if "video" in batch else "image"


def batch_len(batch: dict) -> int:
    """Items in a batch (0 for a batch whose every file was skipped); a batch of named batches (a `Mixture`'s)
    counts the items of all."""
    x = batch.get(input_key(batch))
    if x is None:
        return sum(batch_len(v) for v in batch.values() if isinstance(v, dict))
    return x.shape[0] if x.numel() else 0


def to_device(batch: dict, device: torch.device | str) -> dict:
    """Move a batch's tensors to `device` (captions stay lists of str; named batches are moved inside)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else to_device(v, device)
            if isinstance(v, dict) else v for k, v in batch.items()}


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

    `batch_size` is the global micro-batch; this rank gets its ``batch_size // world`` slice of each. A set
    that draws its own batches (a `Mixture`: its ``train_batches`` method) is asked to, with the same arguments."""
    own = getattr(ds, "train_batches", None)
    if callable(own):
        return own(batch_size, seed, start, steps, num_workers, rank, world, shuffle, pin_memory)
    sampler = StepSampler(len(ds), batch_size, seed, start, steps, shuffle=shuffle, rank=rank, world=world)
    return one_line_errors(iter(DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                                           persistent_workers=False, pin_memory=pin_memory)))


def eval_batches(ds: ImageSet, batch_size: int, num_workers: int = 0) -> Iterator[dict]:
    """One ordered pass over `ds` (a set with its own ``eval_batches`` method, a `Mixture`, makes its own)."""
    own = getattr(ds, "eval_batches", None)
    if callable(own):
        return own(batch_size, num_workers)
    return one_line_errors(iter(DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate,
                                           num_workers=num_workers)))


def augment(images: Tensor, rng: RowRNG | None, shift: int = 1, flip: bool = False, crop: float = 0.0) -> Tensor:
    """Random translation by up to `shift` pixels (edge-replicated) and optional horizontal flips; with
    `crop` > 0, random resized crops (of at least that share of the area) with flips instead (`resized_crop`).

    Clips (B, F, C, H, W) get one shift, crop and flip per clip, the same for all its frames. The draws are
    made for the whole global batch and this process's rows taken (`RowRNG`), so each image gets what a
    one-process run gives it. ``rng=None`` returns the images unchanged."""
    if rng is None:
        return images
    if images.dim() == 5:
        B, F_, C, H, W = images.shape
        out = augment(images.reshape(B, F_ * C, H, W), rng, shift, flip, crop)   # frames folded into channels
        return out.reshape(B, F_, C, H, W)
    if crop > 0:
        return resized_crop(images, rng, crop)
    B, C, H, W = images.shape
    if shift > 0:
        padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")   # (B, C, H+2s, W+2s)
        offs = rng.randint(0, 2 * shift + 1, B, 2).tolist()
        images = torch.stack([padded[b, :, dy:dy + H, dx:dx + W] for b, (dy, dx) in enumerate(offs)])
    if flip:
        mask = (rng.rand(B) < 0.5).to(images.device)
        images = torch.where(mask[:, None, None, None], images.flip(-1), images)
    return images


def resized_crop(images: Tensor, rng: RowRNG, min_area: float, max_ratio: float = 4 / 3) -> Tensor:
    """Inception-style random resized crops with horizontal flips (the photograph recipe of ViT/DeiT/MAE):
    a window of area in [min_area, 1] of the image and aspect ratio in [1/max_ratio, max_ratio] (log-uniform),
    anywhere inside it, flipped half the time, resampled (bilinear) back to H x W. (B, C, H, W) -> same."""
    B, C, H, W = images.shape
    u = rng.rand(B, 5)                                                             # (B, 5) uniform draws
    area = min_area + (1 - min_area) * u[:, 0]
    ratio = torch.exp((2 * u[:, 1] - 1) * math.log(max_ratio))
    w = torch.sqrt(area * ratio).clamp(max=1.0)                                   # window width / image width
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx, cy = (2 * u[:, 2] - 1) * (1 - w), (2 * u[:, 3] - 1) * (1 - h)               # centre, normalised [-1, 1]
    sx = torch.where(u[:, 4] < 0.5, -w, w)                                        # a negative x scale flips
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta.to(images), [B, C, H, W], align_corners=False)      # (B, H, W, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def auto_augmentation(d: Any, channels: int, size: tuple[int, int], by_size: bool) -> str:
    """Fill in the augmentation settings left at -1 (auto) from the images, and say what was chosen.

    For recognition (`by_size`: the task's labels survive crops and flips): shifts of about a fourteenth of
    the side (8 px digits: 1; 28 px: 2, where 3 cost 0.2 points on MNIST validation; 32 px: 2), and for
    colour images of 32 px and more random resized crops of at least half the area with flips instead
    (photographs, where a flip keeps the label). Grey images (digits, glyphs, scans) are never flipped by
    default. Other tasks (generation, boxes, words about positions) keep 1-pixel shifts and no crops."""
    side = min(size)
    if d.shift == -1:
        d.shift = max(1, round(side / 14)) if by_size else 1
    if d.crop == -1:
        d.crop = 0.5 if (by_size and channels >= 3 and side >= 32) else 0.0
    if not d.augment:
        return "no augmentation (data.augment=false)"
    if d.crop > 0:
        return f"augmentation: random resized crops (area >= {d.crop:g}) and flips (set data.crop=0 for shifts)"
    return (f"augmentation: random shifts of up to {d.shift} px{' and flips' if d.flip else ''} "
            "(set data.shift, data.flip, data.crop to choose)")
