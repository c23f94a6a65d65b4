"""Tar shards that `patchgpt shard` did not write: those of the `webdataset` library, img2dataset, and
any other tar that follows the WebDataset convention (`shards` reads them where no ``meta.json`` lists them).

A sample is the run of consecutive members that share a key: a member's name up to the first dot of its
base name (directories kept), as webdataset groups them; the rest, lower-cased, is its extension. Read are
the image (``.jpg``, ``.jpeg``, ``.png`` or ``.webp``; the first of these a sample has), ``.cls`` (a class
index as text), ``.txt`` (the caption) and ``.json`` (img2dataset's metadata: its ``"caption"`` or
``"text"``, when a string, is the caption of a sample without a ``.txt``; otherwise ignored, as is a
``.json`` that does not parse); other members are skipped unread. An image is decoded, converted to
``data.channels`` (default 3) and resized to ``data.image_size`` (default 32) by ``data.resize`` exactly as
``folder:`` images are (`images.load_image`). Items: {"image": (C, S, S) in [-1, 1], "label": int (-1 when
the set has no classes), "text": str (when the set has captions; "" for a sample without one)}.

Opening a set reads every shard once (tar headers, and the small ``.cls``/``.txt``/``.json`` members; no
image is decoded) to count its samples and find its classes and captions: a ``classes.txt`` beside the
shards (one class name per line) names the classes and ``.cls`` values index it; without one the classes are
"0".."K-1", K = the largest ``.cls`` value + 1 (or the classes given, a checkpoint's or the training set's,
when every value indexes them). A set with no ``.cls`` member (and no ``classes.txt``) is unlabeled.

A shard may be a command, ``pipe:COMMAND``, whose standard output is the tar (as in webdataset): ``pipe:cat
/data/a.tar``, ``pipe:curl -s https://host/a.tar``. The command runs once to open the set and once per
pass; its classes.txt is looked for beside the command's last argument ending in ``.tar``. A command that
fails (non-zero exit) or whose output is not a tar is a one-line `DataError` naming the command.

Bad samples follow ``data.on_error``. Found while opening (a sample with no image member, a ``.cls`` that is
not a class index, a sample with no ``.cls`` in a set that has classes): ``stop`` is a one-line `DataError`
naming the shard and sample; ``skip`` leaves the sample out of the set (not counted in its length), with one
line on stderr for them all. Found while reading (an image member Pillow cannot decode, a ``.txt`` that is
not UTF-8): ``stop`` is a one-line `DataError` naming the shard and member; ``skip`` drops the item (counted
in ``info.skipped``, one line per distinct error).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .base import MAX_CLASSES, DataError, DataInfo, Item, skip_or_raise
from .images import load_image

IMAGES = ("jpg", "jpeg", "png", "webp")   # image extensions read, in the order a sample's image is chosen
READ = frozenset((*IMAGES, "cls", "txt", "json"))
SCAN = frozenset(("cls", "txt", "json"))  # what opening a set reads (images are only looked for)
CLASSES = "classes.txt"
MAX_MEMBER = 1 << 30   # bytes of one tar member read into memory (one field of one item)
PIPE = "pipe:"
OPTIONS = "__read__"   # the sample field that carries its shard's `WdsRead`
_KEY = re.compile(r"((?:.*/|)[^.]+)\.([^/]*)")   # webdataset's base_plus_ext: (key, extension)
_SKIP_HINT = "; set data.on_error=skip to skip such samples"


@dataclass(frozen=True)
class WdsRead:
    """How items are made from a WebDataset shard's samples (from the data settings), and the set's class
    count once it is open (a ``.cls`` value must index the classes; 0: the set has none)."""

    channels: int = 3
    size: int = 32
    resize: str = "crop"
    on_error: str = "stop"
    classes: int = 0

    @classmethod
    def of(cls, data: Any) -> WdsRead:
        """The options of a `DataConfig` (``data.channels``, ``data.image_size``, ``data.resize``,
        ``data.on_error``; 0 means 3 channels and 32 px, as for ``folder:``)."""
        return cls(data.channels or 3, data.image_size or 32, data.resize, data.on_error)


def is_pipe(source: str | Path) -> bool:
    """Whether a shard is a ``pipe:COMMAND``."""
    return isinstance(source, str) and source.startswith(PIPE)


# ---- members and samples -----------------------------------------------------------------------------------

def _walk(tar: tarfile.TarFile, where: str, wanted: frozenset, size: int | None) -> Iterator[tuple[str, str, Any]]:
    """(key, extension, bytes if the extension is `wanted` else None) of each file member, in tar order."""
    for m in tar:
        if not m.isfile():
            continue
        limit = MAX_MEMBER if size is None else min(MAX_MEMBER, size - m.offset_data)
        if m.size > limit:
            raise DataError(f"{where}: member {m.name} claims {m.size:,} bytes (at most {limit:,} can be read)")
        parts = _KEY.fullmatch(m.name)
        base = m.name.rsplit("/", 1)[-1]
        if parts is None or (base.startswith("__") and base.endswith("__")):   # no extension; webdataset's meta
            continue
        ext = parts.group(2).lower()
        yield parts.group(1), ext, tar.extractfile(m).read() if ext in wanted else None


def _tail(err) -> str:
    """The last line a command wrote to stderr (at most 300 characters)."""
    err.seek(0, os.SEEK_END)
    err.seek(max(0, err.tell() - 4096))
    lines = [x for x in err.read().decode("utf-8", "replace").splitlines() if x.strip()]
    return lines[-1].strip()[:300] if lines else ""


def _failure(proc: subprocess.Popen, err, where: str) -> DataError | None:
    """The error of a command that failed (exited non-zero, not from a closed pipe), or None."""
    proc.stdout.close()                        # a writer still running gets SIGPIPE
    try:
        rc = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        return None
    if rc in (0, -13, 141):                    # ok, or stopped by the pipe we closed
        return None
    tail = _tail(err)
    return DataError(f"{where}: the command failed (exit status {rc}{': ' + tail if tail else ''})")


def _pipe_members(where: str, wanted: frozenset) -> Iterator[tuple[str, str, Any]]:
    """`_walk` over the standard output of ``pipe:COMMAND`` `where`; the command is killed if the reader
    stops early, and its failure, or output that is not a tar, is a one-line `DataError` naming it."""
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(where[len(PIPE):], shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=err, start_new_session=True)   # its own group: killed with its children
    try:
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
                yield from _walk(tar, where, wanted, None)
            while proc.stdout.read(1 << 16):   # the tar's end padding, and anything after it
                pass
        except (tarfile.TarError, OSError, EOFError) as e:
            raise _failure(proc, err, where) or DataError(
                f"{where}: the command's output is not a tar ({type(e).__name__}: {e})") from None
        proc.stdout.close()
        if proc.wait():
            raise _failure(proc, err, where) or DataError(f"{where}: the command failed (exit status "
                                                          f"{proc.returncode})")
    finally:
        if proc.poll() is None:
            _kill(proc)
        proc.wait()
        proc.stdout.close()
        err.close()


def _kill(proc: subprocess.Popen) -> None:
    """Kill a command the reader no longer needs, with the processes it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (OSError, AttributeError):   # gone already; no process groups (Windows)
        proc.kill()


def _file_members(path: Path, where: str, wanted: frozenset) -> Iterator[tuple[str, str, Any]]:
    try:
        size = path.stat().st_size
        with tarfile.open(path, "r:") as tar:   # plain tar only: no decompression to bound
            yield from _walk(tar, where, wanted, size)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{where}: unreadable shard ({type(e).__name__}: {e})") from None


def raw_samples(source: str | Path, where: str, wanted: frozenset = READ) -> Iterator[dict]:
    """A shard's samples in tar order, {"__key__", "__url__": `where`, extension: bytes (None where the
    extension is not `wanted`)}; a member twice in one sample is a one-line `DataError`."""
    members = _pipe_members(str(source), wanted) if is_pipe(source) else _file_members(Path(source), where, wanted)
    cur: dict | None = None
    for key, ext, data in members:
        if cur is not None and key != cur["__key__"]:
            yield cur
            cur = None
        if cur is None:
            cur = {"__key__": key, "__url__": where}
        if ext in cur:
            raise DataError(f"{where}: member {key}.{ext} appears twice in sample {key}")
        cur[ext] = data
    if cur is not None:
        yield cur


def _cls(raw: bytes) -> int | None:
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return None


def problem(s: dict, limit: int, labelled: bool) -> str | None:
    """Why sample `s` makes no item (no image member; a ``.cls`` that is not a class index below `limit`;
    no ``.cls`` where the set is `labelled`), or None."""
    if not any(e in s for e in IMAGES):
        own = any(e == "npy" or e.endswith(".npy") for e in s)   # as `patchgpt shard` writes some images
        return "no image member (.jpg, .jpeg, .png or .webp)" + (
            "; a shard `patchgpt shard` wrote needs the meta.json beside it" if own else "")
    if "cls" in s:
        c = _cls(s["cls"]) if s["cls"] is not None else None
        if c is None or not 0 <= c < limit:
            text = (s["cls"] or b"")[:20].decode("utf-8", "replace")
            return (f".cls {text!r} is not a class index 0..{limit - 1}" if limit else
                    ".cls member in a set without classes")
    elif labelled:
        return "no .cls member, where the set has classes"
    return None


def _caption(s: dict) -> str | None:
    """A sample's ``.json`` caption (img2dataset: "caption", else "text"), or None."""
    try:
        meta = json.loads(s["json"]) if s.get("json") is not None else None
    except (ValueError, RecursionError):
        return None
    if isinstance(meta, dict):
        for k in ("caption", "text"):
            if isinstance(meta.get(k), str):
                return meta[k]
    return None


def samples(source: str | Path, where: str, read: WdsRead) -> Iterator[dict]:
    """The samples of one shard that make items, tagged with `read` for `decode`; samples with a
    `problem` were counted when the set was opened: left out under ``skip``, an error under ``stop``."""
    for s in raw_samples(source, where):
        why = problem(s, read.classes, read.classes > 0)
        if why is None:
            s[OPTIONS] = read
            yield s
        elif read.on_error == "stop":
            raise DataError(f"{where}: sample {s['__key__']}: {why}{_SKIP_HINT}")


class _Member(io.BytesIO):
    """A member's bytes that name the member in messages (`images.load_image` quotes its file by str)."""

    def __init__(self, data: bytes, name: str) -> None:
        super().__init__(data)
        self.label = name

    def __str__(self) -> str:
        return self.label

    def __repr__(self) -> str:
        return repr(self.label.rsplit(" ", 1)[-1])


def decode(s: dict, info: DataInfo) -> Item | None:
    """A sample of `samples` -> its item, or None where a member cannot be read under ``skip``."""
    read: WdsRead = s[OPTIONS]
    ext = next(e for e in IMAGES if e in s)
    key, where = s["__key__"], s["__url__"]
    try:
        item: Item = {"image": load_image(_Member(s[ext], f"{where}: member {key}.{ext}"), read.channels,
                                          read.size, read.resize),
                      "label": _cls(s["cls"]) if "cls" in s else -1}
        if info.captions:
            item["text"] = _text(s, where)
    except DataError as e:
        skip_or_raise(info, read.on_error, DataError(f"{e}{_SKIP_HINT}") if read.on_error == "stop" else e)
        return None
    return item


def _text(s: dict, where: str) -> str:
    if "txt" not in s:
        return _caption(s) or ""
    try:
        return s["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: member {s['__key__']}.txt: not UTF-8 ({e})") from None


# ---- opening a set -----------------------------------------------------------------------------------------

@dataclass
class _Scan:
    """What opening found in the shards so far."""

    items: list[int] = field(default_factory=list)   # per shard: samples without a problem
    max_cls: int = -1
    captions: bool = False
    unlabelled: list[tuple[int, str]] = field(default_factory=list)  # per shard: (how many have no .cls, a key)
    skipped: list[str] = field(default_factory=list)           # "where: sample key: why" of those left out


def _scan_shard(source: str | Path, where: str, limit: int, on_error: str, scan: _Scan) -> None:
    n, bare, first = 0, 0, ""
    for s in raw_samples(source, where, SCAN):
        why = problem(s, limit, False)
        if why is not None:
            if on_error == "stop":
                raise DataError(f"{where}: sample {s['__key__']}: {why}{_SKIP_HINT}")
            scan.skipped.append(f"{where}: sample {s['__key__']}: {why}")
            continue
        n += 1
        if "cls" in s:
            scan.max_cls = max(scan.max_cls, _cls(s["cls"]))
        else:
            bare, first = bare + 1, first or s["__key__"]
        scan.captions = scan.captions or "txt" in s or _caption(s) is not None
    scan.items.append(n)
    scan.unlabelled.append((bare, first))


def _beside(source: str | Path) -> Path | None:
    """The directory a shard's classes.txt would be in: the file's, or that of a pipe command's last
    argument ending in ``.tar``."""
    if not is_pipe(source):
        return Path(source).parent
    try:
        words = shlex.split(str(source)[len(PIPE):])
    except ValueError:
        return None
    tars = [w for w in words if w.endswith(".tar")]
    return Path(tars[-1]).expanduser().parent if tars else None


def _read_classes(path: Path) -> list[str]:
    """A classes.txt: one class name per line (blank lines left out)."""
    try:
        names = [x.strip() for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    if not names or len(names) > MAX_CLASSES or len(set(names)) != len(names):
        raise DataError(f"{path}: needs 1..{MAX_CLASSES:,} distinct class names, one per line "
                        f"(has {len(names)}, {len(set(names))} distinct)")
    return names


def _classes_txt(sources: list[str | Path]) -> list[str] | None:
    """The classes.txt beside the shards (the same one, or the same names, for all), or None."""
    found: dict[str, list[str]] = {}
    for d in {os.path.realpath(d) for d in map(_beside, sources) if d is not None}:
        if os.path.isfile(os.path.join(d, CLASSES)):
            found[os.path.join(d, CLASSES)] = _read_classes(Path(d, CLASSES))
    if len({tuple(v) for v in found.values()}) > 1:
        raise DataError(f"{' and '.join(sorted(found))} name different classes; the shards of one set share theirs")
    return next(iter(found.values()), None)


def open_set(sources: list[str | Path], read: WdsRead, classes: list[str] | None, spec: str
             ) -> tuple[list[tuple[int, int | None]], DataInfo, WdsRead]:
    """Scan WebDataset shards: ([(items, size in bytes or None for a pipe)] per shard, their `DataInfo`, the
    `read` options with the class count). `classes` (a checkpoint's or the training set's) are taken when
    there is no classes.txt and every ``.cls`` value indexes them."""
    if read.channels not in (1, 3, 4) or read.size < 1:
        raise DataError(f"data.channels={read.channels}, data.image_size={read.size}: WebDataset shards take 1, "
                        "3 or 4 channels and a positive size")
    names = _classes_txt(sources)
    limit = len(names) if names else MAX_CLASSES
    scan, sizes = _Scan(), []
    for src in sources:
        sizes.append(None if is_pipe(src) else _size(Path(src)))
        _scan_shard(src, str(src), limit, read.on_error, scan)
    if names is None and scan.max_cls >= 0:
        fits = classes is not None and scan.max_cls < len(classes)
        names = list(classes) if fits else [str(i) for i in range(scan.max_cls + 1)]
    if names is not None:
        _drop_unlabelled(sources, scan, read.on_error)
    if scan.skipped:
        print(f"patchgpt: skipping {len(scan.skipped)} sample(s) of shards:{spec} (data.on_error=skip), e.g. "
              f"{scan.skipped[0]}", file=sys.stderr)
    if not sum(scan.items):
        raise DataError(f"shards:{spec}: no sample with an image member (.jpg, .jpeg, .png or .webp) in "
                        f"{len(sources)} shard(s) without a meta.json")
    info = DataInfo(channels=read.channels, image_size=(read.size, read.size), classes=names,
                    captions=scan.captions, skipped=scan.skipped)
    return list(zip(scan.items, sizes, strict=True)), info, replace(read, classes=len(names or []))


def _drop_unlabelled(sources: list[str | Path], scan: _Scan, on_error: str) -> None:
    """In a set with classes, samples with no ``.cls``: an error under ``stop``, else left out."""
    for k, (src, (bare, key)) in enumerate(zip(sources, scan.unlabelled, strict=True)):
        if not bare:
            continue
        if on_error == "stop":
            raise DataError(f"{src}: sample {key}: no .cls member, where the set has classes{_SKIP_HINT}")
        scan.items[k] -= bare
        scan.skipped.append(f"{src}: sample {key}" + (f" and {bare - 1} more" if bare > 1 else "") +
                            ": no .cls member, where the set has classes")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise DataError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None
