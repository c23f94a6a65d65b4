"""WebDataset-style tar shards: `patchgpt shard` writes them, the ``shards:PATTERN`` data spec streams them.

For sets larger than memory or local disk. A shard is a plain tar whose consecutive members share a key
(the WebDataset convention, webdataset/webdataset): one member per field of the item, ``{key}.png`` the image
(``.npy`` when 8-bit PNG cannot hold it exactly, and for clips), ``{key}.cls`` the label, ``{key}.txt`` the
caption, and ``{key}.{field}.{format}`` any other field (detection: ``.boxes.npy``, ``.classes.npy``,
``.meta.json``); `members` has the formats. ``meta.json`` beside the shards holds the `DataInfo` and each
shard's item count. Decoded items equal the source's items bit for bit.

Reading: rank r of `world`, DataLoader worker w of `nw` is reader g = r * nw + w of G = world * nw. With at
least G shards each reader takes shards g, g + G, ...; with fewer, every reader walks all shards and keeps
items g, g + G, .... Each epoch the reader's shard order and a buffer shuffle (WebDataset's
``shuffle(bufsize)``) are seeded by (seed, epoch, g); ``data.shuffle=false`` keeps the written order. Batches
never span epochs (the tail is dropped, as the map-style `StepSampler` does). Resume skips the consumed
batches by counting tar members, without decoding them.
"""

from __future__ import annotations

import glob
import io
import json
import os
import random
import re
import tarfile
from collections.abc import Iterator
from itertools import count, islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..files import atomic_open, atomic_write_text
from .base import DataError, DataInfo, ImageSet, Item, collate, input_key
from .members import decode, item_members

META = "meta.json"


# ---- writing ------------------------------------------------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    tar.addfile(ti, io.BytesIO(data))


def write_shards(ds: ImageSet, out_dir: str | Path, per_shard: int = 1000, prefix: str = "train") -> list[Path]:
    """Write every item of `ds` into ``out_dir/{prefix}-NNNNNN.tar`` shards of `per_shard` items.

    Each shard is written under a temporary name and renamed when complete; ``meta.json`` (the data's
    `DataInfo` and the item count of every shard) is updated last, also atomically."""
    info = ds.info
    if per_shard < 1:
        raise DataError(f"--per-shard {per_shard}: must be positive")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in [*out.glob(f"{prefix}-*.tar"), *out.glob(f".{prefix}-*.tar.tmp")]:  # a previous write's
        old.unlink()
    paths, counts = [], {}
    items = (item for item in (ds[i] for i in range(len(ds))) if item is not None)  # None: a skipped file
    idx = 0
    while chunk := list(islice(items, per_shard)):
        name = f"{prefix}-{len(paths):06d}.tar"
        with atomic_open(out / name) as f, tarfile.open(fileobj=f, mode="w") as tar:
            for item in chunk:
                for member, data in item_members(item, f"{idx:09d}"):
                    _add(tar, member, data)
                idx += 1
        paths.append(out / name)
        counts[name] = len(chunk)
    meta_path = out / META
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"shards": {}}
    meta["info"] = {"channels": info.channels, "image_size": list(info.image_size), "classes": info.classes,
                    "captions": info.captions, "frames": info.frames, "boxes": info.boxes,
                    "category_ids": info.category_ids, "max_objects": info.max_objects}
    meta["shards"] = {k: v for k, v in meta.get("shards", {}).items() if not k.startswith(f"{prefix}-")}
    meta["shards"].update(counts)
    atomic_write_text(meta_path, json.dumps(meta, indent=2))
    return paths


# ---- finding and reading ------------------------------------------------------------------------------

def _braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); ``{x,y}`` -> x, y."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi, width = int(r.group(1)), int(r.group(2)), len(r.group(1))
        choices = [f"{k:0{width}d}" for k in range(lo, hi + 1)]
    else:
        choices = body.split(",")
    return [p for c in choices for p in _braces(head + c + tail)]


def expand(spec: str) -> list[Path]:
    """Shard paths from a directory, a glob, a brace pattern, or several of these joined by ``::``.

    A directory means its ``train-*.tar`` shards if it has any (not the ``val-*`` ones beside them), else
    all its ``*.tar``."""
    paths: list[Path] = []
    for part in spec.split("::"):
        part = os.path.expanduser(part.strip())
        if os.path.isdir(part):
            paths += sorted(Path(part).glob("train-*.tar")) or sorted(Path(part).glob("*.tar"))
            continue
        for p in _braces(part):
            hits = sorted(glob.glob(p)) if glob.has_magic(p) else [p]
            if not hits:
                raise DataError(f"shards:{spec}: nothing matches {p}")
            for h in hits:
                if not os.path.isfile(h):
                    raise DataError(f"shards:{spec}: {h} is not a file")
                paths.append(Path(h))
    if not paths:
        raise DataError(f"shards:{spec}: no .tar shards found")
    return paths


def read_meta(paths: list[Path]) -> tuple[DataInfo, int | None]:
    """The `DataInfo` from the ``meta.json`` beside the first shard, and the total items if every shard is listed."""
    meta_path = paths[0].parent / META
    if not meta_path.is_file():
        raise DataError(f"{meta_path}: missing (shards written by `patchgpt shard` carry it)")
    try:
        meta = json.loads(meta_path.read_text())
        i = meta["info"]
        info = DataInfo(channels=i["channels"], image_size=tuple(i["image_size"]), classes=i["classes"],
                        captions=i["captions"], frames=i.get("frames", 0), boxes=i.get("boxes", False),
                        category_ids=i.get("category_ids"), max_objects=i.get("max_objects", 0))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path}: unreadable ({e})") from None
    counts = meta.get("shards", {})
    total = sum(counts[p.name] for p in paths) if all(p.name in counts for p in paths) else None
    return info, total


def _samples(path: Path) -> Iterator[dict]:
    """Raw samples of one shard in tar order: {"__key__": key, ext: bytes, ...}."""
    try:
        with tarfile.open(path, "r") as tar:
            cur: dict = {}
            for m in tar:
                if not m.isfile():
                    continue
                key, _, ext = m.name.partition(".")
                if cur and key != cur["__key__"]:
                    yield cur
                    cur = {}
                cur["__key__"] = key
                cur[ext] = tar.extractfile(m).read()
            if cur:
                yield cur
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{path}: unreadable shard ({e})") from None


class ShardSet(IterableDataset):
    """The items of some shards as a stream (`stream_batches` batches it for training)."""

    def __init__(self, paths: list[Path], info: DataInfo, total: int | None) -> None:
        self.paths, self.info, self.total = list(paths), info, total

    def __len__(self) -> int:
        return self.total if self.total is not None else 0

    def __iter__(self) -> Iterator[Item]:
        for p in self.paths:
            for s in _samples(p):
                yield decode(s, self.info)

    def images(self, n: int | None = None) -> torch.Tensor:
        """The first `n` images (N, C, H, W) or clips stacked (for fitting a colour palette)."""
        out = []
        for item in self:
            out.append(item[input_key(item)])
            if n is not None and len(out) >= n:
                break
        return torch.stack(out)


class MemorySet(ImageSet):
    """Shards read fully into memory: map-style, for validation."""

    def __init__(self, items: list[Item], info: DataInfo) -> None:
        self.items, self.info = items, info

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]


def shard_sets(spec: str, val_fraction: float) -> tuple[ImageSet | ShardSet, ImageSet, DataInfo]:
    """(train stream, validation set, info) for ``shards:SPEC``.

    With ``val_fraction == 0`` (a separate ``data.val_spec``) every shard trains; otherwise the last shard
    is held out for validation."""
    paths = expand(spec)
    info, _ = read_meta(paths)
    if val_fraction == 0:
        return ShardSet(paths, info, read_meta(paths)[1]), MemorySet([], info), info
    if len(paths) < 2:
        raise DataError(f"shards:{spec}: one shard, none left to hold out; give data.val_spec (e.g. the val "
                        "shards from `patchgpt shard --split val`)")
    train, held = paths[:-1], paths[-1:]
    return ShardSet(train, info, read_meta(train)[1]), all_items(held, info), info


def all_items(paths: list[Path], info: DataInfo) -> MemorySet:
    return MemorySet(list(ShardSet(paths, info, None)), info)


# ---- streaming batches --------------------------------------------------------------------------------

class _Batches(IterableDataset):
    """Endless micro-batches of one rank (and of each DataLoader worker), epoch after epoch."""

    def __init__(self, ds: ShardSet, batch_size: int, seed: int, start: int, rank: int, world: int,
                 shuffle: bool, buffer: int) -> None:
        self.ds, self.bs, self.seed, self.start = ds, batch_size, seed, start
        self.rank, self.world, self.shuffle, self.buffer = rank, world, shuffle, buffer

    def _raw(self, epoch: int, g: int, G: int) -> Iterator[dict]:
        paths = self.ds.paths
        if self.shuffle:  # the same shard order on every reader, so they split it without overlap
            paths = random.Random(self.seed * 100_003 + epoch).sample(paths, len(paths))
        mine = paths[g::G] if len(paths) >= G else paths
        rng = random.Random(self.seed * 100_003 + epoch * 1_009 + g)  # this reader's buffer
        items = (s for p in mine for s in _samples(p))
        if len(paths) < G:
            items = (s for k, s in enumerate(items) if k % G == g)
        if not self.shuffle or self.buffer <= 1:
            yield from items
            return
        buf: list[dict] = []
        for s in items:  # WebDataset's buffer shuffle: emit a random held item once the buffer is full
            buf.append(s)
            if len(buf) >= self.buffer:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def __iter__(self) -> Iterator[dict]:
        w = get_worker_info()
        wid, nw = (w.id, w.num_workers) if w is not None else (0, 1)
        # The DataLoader takes batches from its workers in turn, from worker 0: micro-batch k of this rank
        # comes from the worker playing part v = k % nw, so after a resume at `start` worker `wid` plays
        # part (wid + start) % nw, and skips that part's batches below `start`.
        v = (wid + self.start) % nw
        g, G = self.rank * nw + v, self.world * nw
        skip = max(0, -(-(self.start - v) // nw))
        for epoch in count():
            batch, made = [], 0
            for s in self._raw(epoch, g, G):
                batch.append(s)
                if len(batch) == self.bs:
                    made += 1
                    if skip > 0:
                        skip -= 1
                    else:
                        yield collate([decode(x, self.ds.info) for x in batch])
                    batch = []
            if made == 0:
                raise DataError(f"shards: reader {g} of {G} (rank {self.rank}) got fewer than {self.bs} items "
                                "in an epoch; use fewer processes or workers, or more shards")


def stream_batches(ds: ShardSet, batch_size: int, seed: int, start: int = 0, num_workers: int = 0,
                   rank: int = 0, world: int = 1, shuffle: bool = True, buffer: int = 1000,
                   pin_memory: bool = False) -> Iterator[dict]:
    """This rank's micro-batches of `batch_size` from micro-step `start` on (for ever)."""
    loader = DataLoader(_Batches(ds, batch_size, seed, start, rank, world, shuffle, buffer), batch_size=None,
                        num_workers=num_workers, pin_memory=pin_memory)
    return iter(loader)
