"""`folder:PATH`: the user's own images, decoded lazily with Pillow.

One subfolder per class gives a labelled set (class names = subfolder names, sorted); a flat folder gives
an unlabeled set (for pretraining). Every image is converted to the requested channels (grayscale, RGB,
RGBA; palette and transparent images are composited on white) and resized to a square by a documented
policy: ``crop`` (shorter side to S, then centre crop), ``stretch`` (to S x S, aspect ignored) or ``pad``
(longer side to S, then letterboxed on the edge colour of the padding, black).

With a ``metadata.jsonl`` in PATH (the Hugging Face imagefolder convention), each line
``{"file_name": "relative/path.png", "text": "a caption"}`` (optionally also ``"question"`` and ``"answer"``,
for visual question answering) makes one item that carries its ``"text"`` (and ``"question"``/``"answer"``);
labels stay those of the folder layout. Images the metadata does not list are left out (one warning line).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath

import numpy as np
import torch
from PIL import Image

from .base import DataError, DataInfo, ImageSet, Item, skip_or_raise

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert any Pillow image to 1 (L), 3 (RGB) or 4 (RGBA) channels; transparency goes onto white.

    16- and 32-bit integer grayscale is scaled to 8 bits (by 257 when it goes past 255); 32-bit float
    grayscale (mode F) is read as [0, 1] when it lies there (else as 0..255, clipped). A mode Pillow cannot
    convert, or non-finite float pixels, raise `DataError` (callers name the file: `load_converted`)."""
    if im.mode.startswith("I;16") or im.mode == "I":
        # 16-bit (or 32-bit int) grayscale: Pillow's convert("L") clips at 255, so scale to 8 bits first.
        a = np.asarray(im, dtype=np.float64)
        if im.mode != "I" or a.max() > 255:
            a = a / 257.0
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    elif im.mode == "F":
        # Float grayscale: Pillow's convert("L") truncates, which turns a [0, 1] image black.
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise DataError("a float image with NaN or infinite pixels")
        if a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255.0
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    if channels == 4:
        return im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    if channels == 1:
        return im.convert("L")
    if channels == 3:
        return im.convert("RGB")
    raise DataError(f"data.channels={channels}: choose 1, 3 or 4")


def resize(im: Image.Image, size: int, policy: str, resample: int = Image.BICUBIC,
           fill: int | None = None) -> Image.Image:
    """Make `im` size x size by the policy crop | stretch | pad (bicubic resampling; label maps pass
    ``Image.NEAREST`` and the `fill` of the padding, e.g. 255 = ignore)."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    if policy == "stretch":
        return im.resize((size, size), resample)
    if policy == "crop":
        s = size / min(w, h)
        nw, nh = max(size, round(w * s)), max(size, round(h * s))
        im = im.resize((nw, nh), resample)
        left, top = (nw - size) // 2, (nh - size) // 2
        return im.crop((left, top, left + size, top + size))
    if policy in ("pad", "pad_white"):
        s = size / max(w, h)
        nw, nh = max(1, round(w * s)), max(1, round(h * s))
        white = {"L": 255, "RGB": (255, 255, 255), "RGBA": (255, 255, 255, 255)}.get(im.mode, 0)
        canvas = Image.new(im.mode, (size, size), fill if fill is not None else white if policy == "pad_white" else 0)
        canvas.paste(im.resize((nw, nh), resample), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    raise DataError(f"data.resize={policy!r}: choose crop, stretch or pad")


def unresize(im: Image.Image, width: int, height: int, policy: str, fill: int = 0) -> Image.Image:
    """The inverse of `resize` for a label map (nearest): a size x size map back to the original width x
    height. Under ``crop`` the cut-off margins were never seen and get `fill`."""
    size = im.size[0]
    if policy == "stretch" or (width, height) == (size, size):
        return im.resize((width, height), Image.NEAREST)
    if policy == "crop":
        s = size / min(width, height)
        nw, nh = max(size, round(width * s)), max(size, round(height * s))
        canvas = Image.new(im.mode, (nw, nh), fill)
        canvas.paste(im, ((nw - size) // 2, (nh - size) // 2))
        return canvas.resize((width, height), Image.NEAREST)
    s = size / max(width, height)   # pad: cut the padding off, then scale back
    nw, nh = max(1, round(width * s)), max(1, round(height * s))
    left, top = (size - nw) // 2, (size - nh) // 2
    return im.crop((left, top, left + nw, top + nh)).resize((width, height), Image.NEAREST)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """A Pillow image -> (C, H, W) float in [-1, 1]."""
    a = np.asarray(im, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(a).permute(2, 0, 1) / 127.5 - 1.0   # (H, W, C) -> (C, H, W)


@contextmanager
def bomb_is_error() -> Iterator[None]:
    """Within the block Pillow's `DecompressionBombWarning` (an image over ``Image.MAX_IMAGE_PIXELS``, 89M
    pixels by default) is raised like its `DecompressionBombError` (over twice that): the limit is Pillow's."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def load_pil(path: str | Path) -> Image.Image:
    """Open and decode one image file with Pillow; a `DataError` names the file if it cannot.

    An image over Pillow's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is refused before its
    pixels are decoded."""
    try:
        with bomb_is_error(), Image.open(path) as im:
            im.load()
            return im.copy() if im.mode not in ("P", "PA") else im.convert("RGBA")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: refused as a possible decompression bomb ({type(e).__name__}: {e}); Pillow's "
                        "limit is PIL.Image.MAX_IMAGE_PIXELS") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files (OSError, SyntaxError, ...)
        raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from None


def load_converted(path: str | Path, channels: int) -> Image.Image:
    """`load_pil` then `to_mode`; a mode that cannot be converted is a `DataError` naming the file."""
    im = load_pil(path)
    try:
        return to_mode(im, channels)
    except DataError as e:
        if "data.channels" in str(e):
            raise
        raise DataError(f"{path}: cannot convert the {im.mode} image ({e})") from None
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot convert the {im.mode} image ({type(e).__name__}: {e})") from None


def load_image(path: str | Path, channels: int, size: int, policy: str = "crop") -> torch.Tensor:
    """Read one image file as (C, size, size) in [-1, 1]; a `DataError` names the file if it cannot."""
    return to_tensor(resize(load_converted(path, channels), size, policy))


def list_images(root: Path, exts: set[str] = IMAGE_EXTS) -> list[Path]:
    """Files under `root` (recursively) whose extension is in `exts`, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def scan_class_folder(root: Path, exts: set[str], spec: str, what: str) -> tuple[list[str] | None, list]:
    """One subfolder per class (labelled), or a flat folder (unlabeled) -> (classes or None, [(path, label)]).

    Labels are indices into the sorted subfolder names (-1 when unlabeled); a missing folder or one with no
    file of `exts` is a one-line `DataError` naming ``spec:root``.
    """
    if not root.is_dir():
        raise DataError(f"{spec}:{root}: no such directory")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    top = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in exts]
    labelled = bool(subdirs) and not top
    if labelled:
        per_class = [list_images(d, exts) for d in subdirs]
        files = [(p, ci) for ci, found in enumerate(per_class) for p in found]
        empty = [d.name for d, found in zip(subdirs, per_class, strict=True) if not found]
        if files and empty:
            print(f"patchgpt: warning: {spec}:{root}: class folder(s) {', '.join(empty)} hold no {what}; they "
                  "stay classes with no examples", file=sys.stderr)
    else:
        files = [(p, -1) for p in list_images(root, exts)]
        if top and any(list_images(d, exts) for d in subdirs):
            print(f"patchgpt: warning: {spec}:{root}: {len(top)} {what} at the top level beside subfolders, so "
                  f"the subfolders are not classes: all {len(files)} {what} are read as unlabeled", file=sys.stderr)
    if not files:
        raise DataError(f"{spec}:{root}: no {what} found (extensions: {', '.join(sorted(exts))})")
    return ([d.name for d in subdirs] if labelled else None), files


METADATA = "metadata.jsonl"
TEXT_FIELDS = ("text", "question", "answer")   # metadata.jsonl fields an item carries (strings)


def _inside(file_name: str) -> str | None:
    """`file_name` as a normalized relative POSIX path, or None if it is absolute or leaves its folder."""
    fn = file_name.replace("\\", "/")
    if fn.startswith("/") or PureWindowsPath(file_name).drive or Path(file_name).is_absolute():
        return None
    norm = os.path.normpath(fn).replace(os.sep, "/")
    if norm in (".", "..") or norm.startswith("../"):
        return None
    return norm


def read_metadata(path: Path) -> list[tuple[int, str, dict[str, str]]]:
    """``metadata.jsonl`` -> [(line number, normalized file_name, {"text", ["question", "answer",
    ["rationale"]]})].

    Blank lines are skipped. A line that is not a JSON object, a missing or non-string ``file_name``, one
    outside the folder, a missing or empty ``text``, a ``question`` without an ``answer`` (or the reverse),
    a field that is not a non-empty string, a ``rationale`` (how the answer follows; a string, maybe empty)
    without a question, or lines that disagree on carrying questions: a one-line `DataError` naming the file
    and line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    rows: list[tuple[int, str, dict[str, str]]] = []
    for n, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}: line {n}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 ({e})") from None
        if n == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise DataError(f"{where}: not valid JSON ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict):
            raise DataError(f"{where}: not a JSON object (a {type(d).__name__})")
        fn = d.get("file_name")
        if not isinstance(fn, str) or not fn:
            raise DataError(f"{where}: needs 'file_name', a non-empty string (got {str(fn)[:60]!r})")
        rel = _inside(fn)
        if rel is None:
            raise DataError(f"{where}: file_name {fn!r} is outside the folder (absolute, or through '..')")
        if "text" not in d:
            raise DataError(f"{where}: no 'text' (the caption)")
        if ("question" in d) != ("answer" in d):
            raise DataError(f"{where}: 'question' and 'answer' go together; this line has only "
                            f"{'question' if 'question' in d else 'answer'!r}")
        if "rationale" in d and "question" not in d:
            raise DataError(f"{where}: 'rationale' explains an answer; this line has no 'question' and 'answer'")
        if "rationale" in d and not isinstance(d["rationale"], str):
            raise DataError(f"{where}: 'rationale' must be a string, maybe empty (got {type(d['rationale']).__name__} "
                            f"{str(d['rationale'])[:40]!r})")
        fields = {"rationale": d["rationale"]} if "rationale" in d else {}
        for k in TEXT_FIELDS:
            if k in d:
                v = d[k]
                if not isinstance(v, str):
                    raise DataError(f"{where}: {k!r} must be a string (got {type(v).__name__} {str(v)[:40]!r})")
                if not v.strip():
                    raise DataError(f"{where}: empty {k!r}")
                fields[k] = v
        if rows and ("question" in fields) != ("question" in rows[0][2]):
            raise DataError(f"{where}: {'has' if 'question' in fields else 'lacks'} 'question'/'answer' but line "
                            f"{rows[0][0]} {'lacks' if 'question' in fields else 'has'} them: all lines or none")
        rows.append((n, rel, fields))
    if not rows:
        raise DataError(f"{path}: no entries")
    return rows


def _with_metadata(root: Path, files: list[tuple[Path, int]]) -> tuple[list[tuple[Path, int]], list[dict]]:
    """The items ``PATH/metadata.jsonl`` lists, in its order: ([(path, label)], [text fields]); an entry
    whose file is not one of the folder's images is a `DataError` naming the line; images it does not list
    are left out with one warning."""
    meta = root / METADATA
    by_rel = {p.relative_to(root).as_posix(): (p, c) for p, c in files}
    out: list[tuple[Path, int]] = []
    texts: list[dict] = []
    for n, rel, fields in read_metadata(meta):
        if rel not in by_rel:
            why = "no such file" if not (root / rel).is_file() else \
                f"not an image of the folder (extensions: {', '.join(sorted(IMAGE_EXTS))})"
            raise DataError(f"{meta}: line {n}: {rel}: {why}")
        out.append(by_rel[rel])
        texts.append(fields)
    unlisted = len(set(by_rel) - {p.relative_to(root).as_posix() for p, _ in out})
    if unlisted:
        print(f"patchgpt: warning: folder:{root}: {unlisted} image(s) not in {METADATA} are left out",
              file=sys.stderr)
    return out, texts


class ImageFolder(ImageSet):
    """Images under `root`, decoded on access: items {"image": (C, S, S) in [-1, 1], "label"}, plus "text"
    (and "question", "answer", "rationale") from ``root/metadata.jsonl`` when it exists (`read_metadata`).

    Unreadable files found while scanning (Pillow cannot identify or verify them) stop the run with one
    line naming the file (``on_error="stop"``) or are skipped and counted in ``info.skipped``
    (``on_error="skip"``). A file that fails later, at decode time, follows the same rule.
    """

    def __init__(self, root: str | Path, channels: int = 3, size: int = 32, resize: str = "crop",
                 on_error: str = "stop") -> None:
        root = Path(root).expanduser()
        classes, files = scan_class_folder(root, IMAGE_EXTS, "folder", "images")
        texts: list[dict] | None = None
        if (root / METADATA).is_file():
            files, texts = _with_metadata(root, files)
        self.channels, self.size, self.policy, self.on_error = channels, size, resize, on_error
        skipped: list[str] = []
        self.files: list[tuple[Path, int]] = []
        self.texts: list[dict] | None = None if texts is None else []
        checked: dict[Path, str | None] = {}   # a file metadata.jsonl lists twice is checked once
        for k, (p, c) in enumerate(files):
            if p not in checked:
                checked[p] = self._check(p)
            elif checked[p] is not None:
                continue
            why = checked[p]
            if why is None:
                self.files.append((p, c))
                if self.texts is not None and texts is not None:
                    self.texts.append(texts[k])
            elif on_error == "stop":
                raise DataError(f"{p}: cannot read image ({why}); set data.on_error=skip to skip such files")
            else:
                skipped.append(f"{p}: {why}")
        if skipped:
            print(f"patchgpt: skipped {len(skipped)} unreadable image(s) in {root}, e.g. {skipped[0]}",
                  file=sys.stderr)
        if not self.files:
            raise DataError(f"folder:{root}: every image was unreadable ({len(skipped)} skipped)")
        # answers with a rationale on some lines: the others answer directly (an empty rationale)
        rationales = self.texts is not None and any("rationale" in t for t in self.texts)
        if rationales and self.texts is not None:
            for t in self.texts:
                t.setdefault("rationale", "")
        self.info = DataInfo(channels=channels, image_size=(size, size), classes=classes, skipped=skipped,
                             captions=self.texts is not None, rationales=rationales)

    @staticmethod
    def _check(path: Path) -> str | None:
        """None if Pillow can identify and verify `path`, else the reason (the pixels are not kept)."""
        try:
            with bomb_is_error(), Image.open(path) as im:
                im.verify()
            return None
        except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad files (and bombs)
            return f"{type(e).__name__}: {e}"

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Item | None:
        path, label = self.files[i]
        try:
            item = {"image": load_image(path, self.channels, self.size, self.policy), "label": label}
        except DataError as e:
            skip_or_raise(self.info, self.on_error, e)
            return None
        if self.texts is not None:
            item.update(self.texts[i])
        return item

    def labels(self) -> torch.Tensor:
        return torch.tensor([c for _, c in self.files])
