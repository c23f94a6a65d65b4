"""WebDataset-style tar shards: `patchgpt shard` writes them, the ``shards:PATTERN`` data spec streams them.

For sets larger than memory or local disk. A shard is a plain tar whose consecutive members share a key
(the WebDataset convention, webdataset/webdataset): one member per field of the item, ``{key}.png`` the image
(``.npy`` when 8-bit PNG cannot hold it exactly, and for clips), ``{key}.cls`` the label, ``{key}.txt`` the
caption, and ``{key}.{field}.{format}`` any other field (detection: ``.boxes.npy``, ``.classes.npy``,
``.meta.json``); `members` has the formats. Decoded items equal the source's items bit for bit.

One unit: ``meta.json`` beside the shards is their manifest, the `DataInfo` and each shard's item count and
size in bytes. A write stages its shards under hidden names (``.train-000000.tar.new``), then commits by
replacing ``meta.json`` atomically with the new manifest and a ``pending`` note, then renames the staged
shards into place, deletes the split's old shards the new set lacks, and drops the note. Readers go by the
manifest: before the commit they see the old set (staged files are not listed), after it the new one (a
shard whose rename is pending is read from its staged file, one whose deletion is pending is left out); so a
kill at any moment leaves the old set or the new one, never a mix, and the next write finishes an
interrupted commit first. Every shard read must be listed; its size is checked when the set is opened and
its item count while it is read, so a truncated or replaced shard is a one-line `DataError`, never fewer
items. A write replaces only shards its manifest lists (other ``{split}-*.tar`` files in the way are a
one-line refusal, and nothing is changed). Shards of the earlier format (a manifest of item counts without
sizes) still read, their counts checked.

Shards `patchgpt shard` did not write (the `webdataset` library's, img2dataset's: ``.jpg``/``.png``/``.webp``
images with ``.cls``, ``.txt`` and ``.json`` members) read too: a pattern's shards in a directory without a
``meta.json``, and ``pipe:COMMAND`` shards (the command's standard output is the tar; braces expand into one
command per name), are opened by `wds` with the data settings (``data.image_size``, ``data.channels``,
``data.resize``, ``data.on_error``), which turn their images into items as ``folder:`` does. Everything below
(streaming, ranks and workers, shuffling, resume) is the same for both kinds.

Reading: rank r of `world`, DataLoader worker w of `nw` is reader g = r * nw + w of G = world * nw. With at
least G shards each reader takes shards g, g + G, ...; with fewer, every reader walks all shards and keeps
items g, g + G, .... Each epoch the reader's shard order and a buffer shuffle (WebDataset's
``shuffle(bufsize)``) are seeded by (seed, epoch, g); ``data.shuffle=false`` keeps the written order. Batches
never span epochs (the tail is dropped, as the map-style `StepSampler` does). Resume skips the consumed
batches by counting tar members, without decoding them.
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import os
import random
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..files import atomic_write_text
from .base import MAX_CLASSES, DataError, DataInfo, ImageSet, Item, collate, input_key, one_line_errors
from .members import decode, item_members
from .wds import MAX_MEMBER, OPTIONS, WdsRead, is_pipe, open_set
from .wds import decode as wds_decode
from .wds import samples as wds_samples

META = "meta.json"
MAX_NAMES = 100_000      # shard names one spec may expand to: a brace range is expanded into every name
_NAME = re.compile(r"[^/\\\x00]+\.tar")  # a shard's name in a manifest: a plain file name


def _staged(d: Path, name: str) -> Path:
    """Where shard `name` of directory `d` is written before the commit that renames it into place."""
    return d / f".{name}.new"


# ---- the manifest ---------------------------------------------------------------------------------------

def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _info_dict(info: DataInfo) -> dict:
    return {"channels": info.channels, "image_size": list(info.image_size), "classes": info.classes,
            "captions": info.captions, "frames": info.frames, "boxes": info.boxes,
            "category_ids": info.category_ids, "max_objects": info.max_objects}


def _info_problem(i) -> str | None:
    """Why a manifest's ``info`` is not one `patchgpt shard` writes, or None."""
    if not isinstance(i, dict):
        return "'info' is not an object"
    checks = {
        "channels": _is_int(i.get("channels"), 1),
        "image_size": isinstance(i.get("image_size"), list) and len(i["image_size"]) == 2
        and all(_is_int(v, 1) for v in i["image_size"]),
        "classes": i.get("classes") is None or isinstance(i["classes"], list)
        and len(i["classes"]) <= MAX_CLASSES and all(isinstance(c, str) for c in i["classes"]),
        "captions": isinstance(i.get("captions", False), bool),
        "frames": _is_int(i.get("frames", 0)),
        "boxes": isinstance(i.get("boxes", False), bool),
        "category_ids": i.get("category_ids") is None or isinstance(i["category_ids"], list)
        and all(_is_int(c, -2**63) for c in i["category_ids"]),
        "max_objects": _is_int(i.get("max_objects", 0)),
    }
    bad = [k for k, ok in checks.items() if not ok]
    return f"info.{bad[0]} is {i.get(bad[0])!r}" if bad else None


def _meta_problem(meta) -> str | None:
    """Why `meta` is not a manifest `patchgpt shard` writes, or None."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    why = _info_problem(meta.get("info"))
    if why:
        return why
    shards, sizes = meta.get("shards"), meta.get("bytes", {})
    if not isinstance(shards, dict) or not all(_NAME.fullmatch(k) and not k.startswith(".") and _is_int(v)
                                               for k, v in shards.items()):
        return "'shards' is not an object of shard names and item counts"
    if not isinstance(sizes, dict) or not all(k in shards and _is_int(v) for k, v in sizes.items()):
        return "'bytes' is not an object of listed shard names and sizes"
    pending = meta.get("pending")
    if pending is not None and not (isinstance(pending, dict) and pending.keys() == {"rename", "retire"}
                                    and all(isinstance(pending[k], list) for k in pending)
                                    and all(n in shards for n in pending["rename"])
                                    and all(isinstance(n, str) and _NAME.fullmatch(n) and n not in shards
                                            for n in pending["retire"])):
        return "'pending' is not a note of listed shards to rename and unlisted ones to delete"
    return None


def _load_meta(path: Path) -> dict | None:
    """A directory's manifest, checked for shape (one-line `DataError` if it is not one); None if absent."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:   # ValueError: bad JSON or UTF-8
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    why = _meta_problem(meta)
    if why:
        raise DataError(f"{path}: {why} (not a manifest written by `patchgpt shard`)")
    return meta


def _info_from(meta: dict) -> DataInfo:
    i = meta["info"]
    return DataInfo(channels=i["channels"], image_size=tuple(i["image_size"]), classes=i["classes"],
                    captions=i.get("captions", False), frames=i.get("frames", 0), boxes=i.get("boxes", False),
                    category_ids=i.get("category_ids"), max_objects=i.get("max_objects", 0))


def _describe(info: DataInfo) -> str:
    frames = f"{info.frames} frames of " if info.frames else ""
    classes = f"{len(info.classes)} classes" if info.classes else "no classes"
    return f"{frames}{info.channels}x{info.image_size[0]}x{info.image_size[1]}, {classes}" + (
        ", boxes" if info.boxes else "") + (", captions" if info.captions else "")


# ---- writing ------------------------------------------------------------------------------------------

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
    tar.addfile(ti, io.BytesIO(data))


def _fsync_dir(d: Path) -> None:
    """Make the renames and deletions in `d` durable (where a directory can be opened: POSIX)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _finish(d: Path, meta: dict) -> dict:
    """Carry out a committed manifest's ``pending`` deletions and renames (they may have been done in part:
    each step is idempotent); returns the manifest without the note, as now written."""
    pending = meta.get("pending")
    if not pending:
        return meta
    for name in pending["retire"]:
        (d / name).unlink(missing_ok=True)
    for name in pending["rename"]:
        if _staged(d, name).exists():
            os.replace(_staged(d, name), d / name)
    _fsync_dir(d)
    meta = {k: v for k, v in meta.items() if k != "pending"}
    atomic_write_text(d / META, json.dumps(meta, indent=2))
    return meta


def write_shards(ds: ImageSet, out_dir: str | Path, per_shard: int = 1000, prefix: str = "train") -> list[Path]:
    """Write every item of `ds` into ``out_dir/{prefix}-NNNNNN.tar`` shards of `per_shard` items, as one unit.

    The shards are staged under hidden names, then ``meta.json`` (the data's `DataInfo`, each shard's item
    count and size) is replaced atomically, then they are renamed into place and the split's old shards that
    the new set lacks are deleted: a kill at any moment leaves the old set or the new one (module docstring).
    Refused with a one-line `DataError`, changing nothing: ``{prefix}-*.tar`` files the directory's
    ``meta.json`` does not list (or whose size it records otherwise), a ``meta.json`` that describes other
    data for the other split, and a set with no item to write."""
    if per_shard < 1:
        raise DataError(f"--per-shard {per_shard}: must be positive")
    if not re.fullmatch(r"[A-Za-z0-9_]+", prefix):
        raise DataError(f"--split {prefix!r}: use letters, digits and _ only")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: not a directory")
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / META
    meta = _load_meta(meta_path)
    meta = _finish(out, meta) if meta is not None else {"shards": {}, "bytes": {}}
    mine = {n for n in meta["shards"] if n.startswith(f"{prefix}-")}
    recorded = meta.get("bytes", {})
    for p in sorted(out.glob(f"{prefix}-*.tar")):
        if p.name not in mine:
            raise DataError(f"{p}: not a shard listed in {meta_path}, so not one `patchgpt shard` wrote there; "
                            "move it away or choose another --out (nothing was changed)")
        if p.name in recorded and p.stat().st_size != recorded[p.name]:
            raise DataError(f"{p}: changed since `patchgpt shard` wrote it ({p.stat().st_size:,} bytes, "
                            f"{meta_path} records {recorded[p.name]:,}); move it away or choose another --out "
                            "(nothing was changed)")
    others = sorted(n for n in meta["shards"] if n not in mine)
    new_info = _info_dict(ds.info)
    if others and _info_dict(_info_from(meta)) != new_info:
        splits = sorted({n.rsplit("-", 1)[0] for n in others})
        raise DataError(f"{meta_path}: its {'/'.join(splits)} shards hold other data "
                        f"({_describe(_info_from(meta))}) than these ({_describe(ds.info)}), and one meta.json "
                        "describes both; write both splits with the same data settings, or use another --out "
                        "(nothing was changed)")
    for p in [*out.glob(f".{prefix}-*.tar.new"), *out.glob(f".{prefix}-*.tar.tmp")]:  # a killed write's
        p.unlink()
    staged: list[str] = []
    counts, sizes = {}, {}
    items = (item for item in (ds[i] for i in range(len(ds))) if item is not None)  # None: a skipped file
    idx = 0
    try:
        while chunk := list(islice(items, per_shard)):
            name = f"{prefix}-{len(staged):06d}.tar"
            staged.append(name)
            with open(_staged(out, name), "wb") as f:
                with tarfile.open(fileobj=f, mode="w") as tar:
                    for item in chunk:
                        for member, data in item_members(item, f"{idx:09d}"):
                            _add(tar, member, data)
                        idx += 1
                f.flush()
                os.fsync(f.fileno())
            counts[name], sizes[name] = len(chunk), _staged(out, name).stat().st_size
        if not staged:
            raise DataError(f"--split {prefix}: no items to write (nothing was changed in {out})")
    except BaseException:
        for name in staged:
            _staged(out, name).unlink(missing_ok=True)
        raise
    _fsync_dir(out)
    commit = {"format": 2, "info": new_info,
              "shards": {**{n: meta["shards"][n] for n in others}, **counts},
              "bytes": {**{n: recorded[n] for n in others if n in recorded}, **sizes},
              "pending": {"rename": staged, "retire": sorted(mine - set(counts))}}
    atomic_write_text(meta_path, json.dumps(commit, indent=2))   # the commit: readers now see the new set
    _finish(out, commit)
    return [out / n for n in staged]


# ---- finding and reading ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    """One shard of a set: its name (as a path), the file read, and what its manifest records (for a
    WebDataset shard, what opening the set found)."""

    name: Path | str    # the shard as a spec names it: directory / train-NNNNNN.tar, or "pipe:COMMAND"
    path: Path | str    # the file read: `name`, or its staged file while a committed rename is pending
    items: int          # item count recorded in meta.json
    size: int | None    # size in bytes recorded in meta.json (None: written before sizes were recorded; a pipe)
    wds: WdsRead | None = None   # a WebDataset shard (no meta.json lists it): how its samples become items


class _Listing:
    """A directory's manifest as readers see it: the live shards (pending renames and deletions applied)."""

    def __init__(self, d: Path, meta: dict) -> None:
        self.meta_path, self.info = d / META, _info_from(meta)
        pending = meta.get("pending") or {"rename": [], "retire": []}
        self.retired = set(pending["retire"])
        self.shards: dict[str, Shard] = {}
        for name, n in meta["shards"].items():
            staged = name in pending["rename"] and _staged(d, name).is_file()
            self.shards[name] = Shard(d / name, _staged(d, name) if staged else d / name, n,
                                      meta.get("bytes", {}).get(name))


def _listing(d: Path, cache: dict) -> _Listing | None:
    """`d`'s manifest (read once per spec), or None where `d` has no meta.json."""
    key = os.path.realpath(d)
    if key not in cache:
        meta = _load_meta(d / META)
        cache[key] = _Listing(d, meta) if meta is not None else None
    return cache[key]


def _choices(body: str, pattern: str, spec: str) -> list[str]:
    """The alternatives of one ``{...}``: a range ``lo..hi`` (zero padding kept) or a comma list."""
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if not r:
        return body.split(",")
    lo, hi, width = int(r.group(1)), int(r.group(2)), len(r.group(1))
    if hi < lo:
        raise DataError(f"shards:{spec}: {{{body}}} in {pattern} counts down; write the range from low to high")
    if hi - lo + 1 > MAX_NAMES:
        raise DataError(f"shards:{spec}: {{{body}}} names {hi - lo + 1:,} shards, more than {MAX_NAMES:,} "
                        "(a brace range is expanded into every name: a typo? give the directory or a glob)")
    return [f"{k:0{width}d}" for k in range(lo, hi + 1)]


def _braces(pattern: str, spec: str = "") -> list[str]:
    """``a-{000..002}.tar`` -> a-000.tar, a-001.tar, a-002.tar (zero padding kept); ``{x,y}`` -> x, y; at
    most `MAX_NAMES` names in all, else a one-line `DataError`."""
    level = [pattern]
    while True:
        nxt: list[str] = []
        for p in level:
            m = re.search(r"\{([^{}]*)\}", p)
            if not m:
                nxt.append(p)
                continue
            choices = _choices(m.group(1), pattern, spec)
            if len(nxt) + len(choices) > MAX_NAMES:
                raise DataError(f"shards:{spec}: {pattern} names more than {MAX_NAMES:,} shards (brace ranges are "
                                "expanded into every name: a typo? give the directory or a glob)")
            nxt += [p[:m.start()] + c + p[m.end():] for c in choices]
        if nxt == level:
            return level
        level = nxt


def _match(d: Path, pattern: str, cache: dict) -> list[Path]:
    """The shards of directory `d` whose names match `pattern`: its files and the names its manifest lists,
    less those a pending commit deletes."""
    names = {p.name for p in d.iterdir() if p.is_file()}
    listing = _listing(d, cache)
    if listing is not None:
        names = (names | set(listing.shards)) - listing.retired
    return [d / n for n in sorted(names) if fnmatch.fnmatchcase(n, pattern) and not n.startswith(".")]


def expand(spec: str) -> list[Path | str]:
    """Shard paths from a directory, a glob, a brace pattern, a ``pipe:COMMAND`` (braces expanded: one
    command per name, kept as a str), or several of these joined by ``::``.

    A directory means its ``train-*.tar`` shards if it has any (not the ``val-*`` ones beside them), else
    all its ``*.tar``. A directory's names are its files and those its ``meta.json`` lists, as the manifest
    says (see the module docstring)."""
    paths: list[Path | str] = []
    cache: dict = {}
    for part in spec.split("::"):
        if is_pipe(part.strip()):
            paths += _braces(part.strip(), spec)
            continue
        part = os.path.expanduser(part.strip())
        if not part:
            raise DataError(f"shards:{spec}: an empty pattern (nothing between '::')")
        if os.path.isdir(part):
            d = Path(part)
            paths += _match(d, "train-*.tar", cache) or _match(d, "*.tar", cache)
            continue
        for p in _braces(part, spec):
            head, tail = os.path.split(p)
            if glob.has_magic(p):
                dirs = sorted(glob.glob(head)) if glob.has_magic(head) else [head]
                hits = [h for d in dirs if os.path.isdir(d or ".") for h in _match(Path(d or "."), tail, cache)]
                if not hits:
                    raise DataError(f"shards:{spec}: nothing matches {p}")
                paths += hits
                continue
            listing = _listing(Path(head or "."), cache) if os.path.isdir(head or ".") else None
            if listing is not None and tail in listing.retired:
                raise DataError(f"shards:{spec}: {p} is not in the set {listing.meta_path} describes (the last "
                                "`patchgpt shard` write dropped it)")
            if not os.path.isfile(p) and not (listing is not None and tail in listing.shards):
                raise DataError(f"shards:{spec}: {p} is not a file")
            paths.append(Path(p))
    if not paths:
        raise DataError(f"shards:{spec}: no .tar shards found")
    return paths


def _file(s: Shard) -> Path | str:
    """The file to read for `s`: its staged file, unless a write has renamed it into place meanwhile."""
    return s.path if s.path == s.name or Path(s.path).exists() else s.name


def decode_sample(sample: dict, info: DataInfo) -> Item | None:
    """A raw sample of `_samples` -> its item (None: a WebDataset member skipped as unreadable)."""
    return wds_decode(sample, info) if OPTIONS in sample else decode(sample, info)


def _check_size(s: Shard) -> None:
    if is_pipe(s.path):
        return
    try:
        n = _file(s).stat().st_size
    except FileNotFoundError:
        raise DataError(f"{s.name}: listed in the {META} beside it, but missing" if s.wds is None else
                        f"{s.name}: missing (it was there when the set was opened)") from None
    if s.wds is not None and n != s.size:
        raise DataError(f"{s.name}: {n:,} bytes, but {s.size:,} when the set was opened (changed since)")
    if s.size is not None and n != s.size:
        raise DataError(f"{s.name}: {n:,} bytes, but the {META} beside it records {s.size:,} (truncated, or "
                        "changed since `patchgpt shard` wrote it)")


def find_shards(spec: str, read: WdsRead | None = None, classes: list[str] | None = None
                ) -> tuple[list[Shard], DataInfo]:
    """The shards of ``shards:SPEC``, checked against their manifests, and their `DataInfo`.

    A shard in a directory with a ``meta.json`` must be listed there, with the size recorded there. Pipes
    and shards in directories without one are WebDataset shards, opened (scanned) by `wds.open_set` with
    `read` (default: 3 channels, 32 px, crop, stop) and `classes`. A shard named twice, or shards that
    describe different data, are one-line `DataError`s too."""
    cache: dict = {}
    entries: list[Shard | Path | str] = []   # a Shard, or a WebDataset shard to open
    seen: set[str] = set()
    for p in expand(spec):
        key = p if is_pipe(p) else os.path.realpath(p)
        if key in seen:
            raise DataError(f"shards:{spec}: {p} is named twice (its items would be read twice)")
        seen.add(key)
        listing = None if is_pipe(p) else _listing(p.parent, cache)
        entries.append(p if listing is None else _listed(listing, p))
    foreign = [e for e in entries if not isinstance(e, Shard)]
    wds_info = None
    if foreign:
        found, wds_info, read = open_set(foreign, read or WdsRead(), classes, spec)
        made = {e: Shard(e, e, n, size, read) for e, (n, size) in zip(foreign, found, strict=True)}
        entries = [made[e] if not isinstance(e, Shard) else e for e in entries]
    return entries, _one_info(spec, entries, cache, wds_info)


def _one_info(spec: str, shards: list[Shard], cache: dict, info: DataInfo | None) -> DataInfo:
    """The `DataInfo` all `shards` share (their manifests', and `info` of the WebDataset ones)."""
    first = "the WebDataset shards" if info is not None else None
    for s in shards:
        if s.wds is not None:
            continue
        listing = _listing(s.name.parent, cache)
        if info is None:
            info, first = listing.info, listing.meta_path
        elif _info_dict(listing.info) != _info_dict(info):
            raise DataError(f"shards:{spec}: {listing.meta_path} ({_describe(listing.info)}) and {first} "
                            f"({_describe(info)}) describe different data")
    return info


def _listed(listing: _Listing, p: Path) -> Shard:
    """Shard `p` as its directory's manifest lists it, its size checked; a one-line `DataError` if unlisted."""
    s = listing.shards.get(p.name)
    if s is None:
        raise DataError(f"{p}: not listed in {listing.meta_path}, so its items cannot be counted (not written "
                        "there by `patchgpt shard`); write the set again with `patchgpt shard`, or move it to a "
                        "directory without a meta.json to read it as a WebDataset shard")
    _check_size(s)
    return s


def _samples(shard: Shard) -> Iterator[dict]:
    """Raw samples of one shard in tar order, {"__key__": key, "__url__": shard, ext: bytes, ...}; as many
    as its manifest records, else a one-line `DataError` (a WebDataset shard: those `wds.samples` gives)."""
    _check_size(shard)
    if shard.wds is not None:
        yield from wds_samples(_file(shard), str(shard.name), shard.wds)
        return
    where, n, path = shard.name, 0, _file(shard)
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:") as tar:   # plain tar only: no decompression to bound
            cur: dict = {}
            for m in tar:
                if not m.isfile():
                    continue
                if m.size > min(MAX_MEMBER, size - m.offset_data):
                    raise DataError(f"{where}: member {m.name} claims {m.size:,} bytes (the shard has "
                                    f"{size:,}; at most {MAX_MEMBER:,} are read per member)")
                key, _, ext = m.name.partition(".")
                if cur and key != cur["__key__"]:
                    n += 1
                    if n > shard.items:
                        break
                    yield cur
                    cur = {}
                if ext in cur:
                    raise DataError(f"{where}: member {m.name} appears twice in sample {key}")
                cur["__key__"], cur["__url__"] = key, str(where)
                cur[ext] = tar.extractfile(m).read()
            else:
                if cur:
                    n += 1
                    if n <= shard.items:
                        yield cur
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{where}: unreadable shard ({type(e).__name__}: {e})") from None
    if n != shard.items:
        held = f"more than {shard.items}" if n > shard.items else str(n)
        raise DataError(f"{where}: {held} items, but the {META} beside it records {shard.items} (truncated, or "
                        "changed since `patchgpt shard` wrote it)")


class ShardSet(IterableDataset):
    """The items of some shards as a stream (`stream_batches` batches it for training)."""

    def __init__(self, shards: list[Shard], info: DataInfo) -> None:
        self.shards, self.info = list(shards), info
        self.total = sum(s.items for s in self.shards)

    @property
    def paths(self) -> list[Path | str]:
        return [s.name for s in self.shards]

    def __len__(self) -> int:
        return self.total

    def __iter__(self) -> Iterator[Item]:
        """The items in shard order (those skipped as unreadable left out)."""
        for s in self.shards:
            for x in _samples(s):
                item = decode_sample(x, self.info)
                if item is not None:
                    yield item

    def images(self, n: int | None = None) -> torch.Tensor:
        """The first `n` images (N, C, H, W) or clips stacked (for fitting a colour palette)."""
        out = []
        for item in self:
            out.append(item[input_key(item)])
            if n is not None and len(out) >= n:
                break
        if not out:
            raise DataError(f"shards: no items in {', '.join(str(p) for p in self.paths) or 'no shards'}")
        return torch.stack(out)


class MemorySet(ImageSet):
    """Shards read fully into memory: map-style, for validation."""

    def __init__(self, items: list[Item], info: DataInfo) -> None:
        self.items, self.info = items, info

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Item:
        return self.items[i]


def shard_sets(spec: str, val_fraction: float, read: WdsRead | None = None, classes: list[str] | None = None
               ) -> tuple[ImageSet | ShardSet, ImageSet, DataInfo]:
    """(train stream, validation set, info) for ``shards:SPEC`` (`read`, `classes`: for WebDataset shards,
    see `find_shards`).

    With ``val_fraction == 0`` (a separate ``data.val_spec``) every shard trains; otherwise the last shard
    is held out for validation."""
    shards, info = find_shards(spec, read, classes)
    if val_fraction == 0:
        return ShardSet(shards, info), MemorySet([], info), info
    if len(shards) < 2:
        raise DataError(f"shards:{spec}: one shard, none left to hold out; give data.val_spec (e.g. the val "
                        "shards from `patchgpt shard --split val`)")
    return ShardSet(shards[:-1], info), all_items(shards[-1:], info), info


def all_items(shards: list[Shard], info: DataInfo) -> MemorySet:
    return MemorySet(list(ShardSet(shards, info)), info)


# ---- streaming batches --------------------------------------------------------------------------------

class _Batches(IterableDataset):
    """Endless micro-batches of one rank (and of each DataLoader worker), epoch after epoch."""

    def __init__(self, ds: ShardSet, batch_size: int, seed: int, start: int, rank: int, world: int,
                 shuffle: bool, buffer: int) -> None:
        self.ds, self.bs, self.seed, self.start = ds, batch_size, seed, start
        self.rank, self.world, self.shuffle, self.buffer = rank, world, shuffle, buffer

    def _raw(self, epoch: int, g: int, G: int) -> Iterator[dict]:
        paths = self.ds.shards
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
                        yield collate([decode_sample(x, self.ds.info) for x in batch])
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
    return one_line_errors(iter(loader))
