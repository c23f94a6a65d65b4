"""One data item as the members of a tar shard, and back (`shards` writes and reads them).

Each field of an item is one member named ``{key}.{field}.{format}``, the format chosen by the value's type:
``png`` for a float tensor (C, H, W) in [-1, 1] that 8-bit PNG holds exactly, ``npy`` for any other tensor
(dtype and shape kept), ``txt`` for a str, ``cls`` for an int (as text) and ``json`` for anything else
(tuples kept). The fields shards have always had keep the names they had, just the format: ``{key}.png`` /
``{key}.npy`` the image or clip, ``{key}.cls`` the label, ``{key}.txt`` the caption. The ``{key}.json``
detection target (boxes, classes, meta) of shards written before fields were generic still reads. Members
of other formats are ignored. Decoding gives back the written item bit for bit.

Decoding trusts nothing in the bytes: a ``.npy`` header must describe exactly the bytes that follow (checked
before anything is allocated), a PNG's header must give the size the manifest says before its pixels are
decoded (Pillow's decompression-bomb limit holds for any other PNG field), and the item must fit the
manifest's `DataInfo`: the image or clip of its shape, float32, finite, in [-1, 1]; the label -1 or a class
index; detection boxes (N, 4) in [0, 1] with N class indices. Anything else is a one-line `DataError` naming
the shard and the sample.
"""

from __future__ import annotations

import io
import json
import math
import warnings

import numpy as np
import torch

from .base import DataError, DataInfo, Item, input_key

# Fields written under just their format (``{key}.cls``), as shards named them before fields were generic;
# every other field is ``{key}.{field}.{format}``. On reading, ``pixels`` is "video" for clips, else "image".
BARE = {"image": ("png", "npy"), "video": ("png", "npy"), "label": ("cls",), "text": ("txt",)}
FROM_BARE = {"png": "pixels", "npy": "pixels", "cls": "label", "txt": "text"}
FORMATS = ("png", "npy", "txt", "cls", "json")
_TUPLE = "__tuple__"  # JSON has no tuples: {"__tuple__": [...]} stands for one


def _u8_exact(x: torch.Tensor) -> np.ndarray | None:
    """`x` (C, H, W) in [-1, 1] as an (H, W[, C]) uint8 array if ``u8 / 127.5 - 1`` gives back `x` exactly."""
    if x.dtype != torch.float32 or x.dim() != 3 or x.shape[0] not in (1, 3, 4):
        return None
    u8 = torch.round((x + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    if not torch.equal(u8.float() / 127.5 - 1.0, x):
        return None
    a = u8.permute(1, 2, 0).numpy()                                   # (C, H, W) -> (H, W, C)
    return a[:, :, 0] if a.shape[2] == 1 else a


def _tag_tuples(v):
    """`v` with every tuple replaced by {"__tuple__": [...]}, for JSON; dict keys must be str."""
    if isinstance(v, tuple):
        return {_TUPLE: [_tag_tuples(x) for x in v]}
    if isinstance(v, list):
        return [_tag_tuples(x) for x in v]
    if isinstance(v, dict):
        if not all(isinstance(k, str) for k in v):
            raise TypeError(f"dict keys {list(v)} are not all str")
        return {k: _tag_tuples(x) for k, x in v.items()}
    return v


def _untag(d: dict):
    return tuple(d[_TUPLE]) if d.keys() == {_TUPLE} else d


def _encode(v) -> tuple[str, bytes]:
    """One field's value -> (format, bytes): png | npy for tensors, txt for str, cls for int, json otherwise."""
    from PIL import Image

    if torch.is_tensor(v):
        buf = io.BytesIO()
        a = _u8_exact(v)
        if a is not None:
            Image.fromarray(a).save(buf, format="PNG")
            return "png", buf.getvalue()
        np.save(buf, v.detach().cpu().numpy(), allow_pickle=False)
        return "npy", buf.getvalue()
    if isinstance(v, str):
        return "txt", v.encode("utf-8")
    if isinstance(v, int) and not isinstance(v, bool):
        return "cls", str(v).encode()
    return "json", json.dumps(_tag_tuples(v)).encode()


def load_npy(raw: bytes) -> np.ndarray:
    """A ``.npy`` file's array, its header checked against the bytes that follow before anything is
    allocated (a header may claim terabytes); object arrays are refused. `ValueError` says what is wrong."""
    f = io.BytesIO(raw)
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    elif version == (2, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    else:
        raise ValueError(f"npy format version {version} is not supported")
    if dtype.hasobject:
        raise ValueError("an object array (pickled data) is not allowed")
    n = math.prod(shape)
    need, have = n * dtype.itemsize, len(raw) - f.tell()
    if need != have:
        raise ValueError(f"its header claims shape {shape} of {dtype} ({need:,} bytes) but {have:,} bytes follow")
    a = np.frombuffer(raw, dtype=dtype, count=n, offset=f.tell())
    return a.reshape(shape, order="F" if fortran else "C").copy()


def _png(raw: bytes, size: tuple[int, int] | None):
    """A PNG member as (C, H, W) in [-1, 1]; with `size` (H, W) its header must say so before decoding."""
    from PIL import Image

    from .images import to_tensor

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(raw))
            if im.format != "PNG":
                raise ValueError(f"a {im.format} image, not a PNG")
            if size is not None and im.size != (size[1], size[0]):
                raise ValueError(f"a {im.size[0]}x{im.size[1]} image where the shards are {size[1]}x{size[0]}")
            if im.mode not in ("L", "RGB", "RGBA"):
                raise ValueError(f"mode {im.mode}, not the L, RGB or RGBA `patchgpt shard` writes")
            return to_tensor(im)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"{e}") from None


def _decode(fmt: str, raw: bytes, size: tuple[int, int] | None = None):
    """The inverse of `_encode` for one member's format and bytes (`size`: what a PNG must be, if known)."""
    if fmt == "png":
        return _png(raw, size)
    if fmt == "npy":
        return torch.from_numpy(load_npy(raw))
    if fmt == "txt":
        return raw.decode("utf-8")
    if fmt == "cls":
        return int(raw)
    return json.loads(raw, object_hook=_untag)


def item_members(item: Item, key: str) -> list[tuple[str, bytes]]:
    """An item -> its tar members [(name, bytes)], one per field, in the item's field order."""
    out = []
    for field, value in item.items():
        try:
            fmt, data = _encode(value)
        except (TypeError, ValueError) as e:
            raise DataError(f"item {key}: field {field!r} cannot be written to a shard ({e})") from None
        out.append((f"{key}.{fmt}" if fmt in BARE.get(field, ()) else f"{key}.{field}.{fmt}", data))
    return out


def decode(sample: dict, info: DataInfo) -> Item:
    """A raw sample {"__key__": key, "__url__": shard, suffix: bytes, ...} -> an item (see the module
    docstring); a `DataError` names the shard, the sample and what is wrong."""
    key, item = sample["__key__"], {}
    where = f"{sample['__url__']}: sample {key}" if "__url__" in sample else f"shard sample {key}"
    pixels = "video" if info.frames else "image"
    for suffix, raw in sample.items():
        field, _, fmt = suffix.rpartition(".")
        if fmt not in FORMATS:   # "__key__", "__url__", and members of other formats
            continue
        if not field and fmt == "json":   # a detection target of shards written before fields were generic
            item.update(_target(raw, where))
            continue
        if not field:
            field = FROM_BARE[fmt]
            field = pixels if field == "pixels" else field
        try:
            item[field] = _decode(fmt, raw, tuple(info.image_size) if field == pixels else None)
        except (ValueError, TypeError, OSError, EOFError, SyntaxError, RecursionError, OverflowError) as e:
            raise DataError(f"{where}: unreadable .{suffix} member ({type(e).__name__}: {e})") from None
    if input_key(item) not in item:
        raise DataError(f"{where}: no .png or .npy member")
    item.setdefault("label", -1)
    if info.captions:
        item.setdefault("text", "")
    if info.boxes and "boxes" not in item:
        raise DataError(f"{where}: no detection target")
    why = _misfit(item, info)
    if why:
        raise DataError(f"{where}: {why}")
    return item


def _misfit(item: Item, info: DataInfo) -> str | None:
    """Why a decoded item does not fit the manifest's `info`, or None."""
    key = input_key(item)
    x = item[key]
    want = (info.frames, info.channels, *info.image_size) if info.frames else (info.channels, *info.image_size)
    if not torch.is_tensor(x) or tuple(x.shape) != want or x.dtype != torch.float32:
        got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        return f"the {key} is {got}, the meta.json says float32 {want}"
    if x.numel() and not (torch.isfinite(x).all() and x.abs().max() <= 1 + 1e-5):
        return f"the {key} has values outside [-1, 1] (or NaN)"
    label, n = item["label"], info.num_classes
    if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label < n:
        return f"label {label!r} is not -1 or a class index 0..{n - 1}" if n else f"label {label!r} where the " \
            "shards have no classes (it must be -1)"
    if info.captions and not isinstance(item["text"], str):
        return "the caption is not text"
    if info.boxes:
        b, c = item["boxes"], item.get("classes")
        if not (torch.is_tensor(b) and b.dim() == 2 and b.shape[1] == 4 and b.is_floating_point()):
            return f"boxes are not (N, 4) floats ({tuple(b.shape) if torch.is_tensor(b) else type(b).__name__})"
        if b.numel() and not (torch.isfinite(b).all() and b.min() >= 0 and b.max() <= 1):
            return "boxes lie outside [0, 1] (or hold NaN)"
        if not (torch.is_tensor(c) and c.shape == (len(b),) and c.dtype == torch.long):
            return f"classes are not {len(b)} integers, one per box"
        if c.numel() and not (c.min() >= 0 and c.max() < n):
            return f"box classes {sorted(set(c.tolist()))} are not class indices 0..{n - 1}"
    return None


def _target(raw: bytes, key: str) -> dict:
    """A ``{key}.json`` detection target -> {"boxes": (N, 4), "classes": (N,), "meta"}."""
    try:
        t = json.loads(raw)
        meta = t["meta"]
        for k in ("scale", "offset"):   # JSON has no tuples
            if isinstance(meta.get(k), list):
                meta[k] = tuple(meta[k])
        return {"boxes": torch.tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4),
                "classes": torch.tensor(t["classes"], dtype=torch.long), "meta": meta}
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, OverflowError) as e:
        raise DataError(f"{key}: unreadable detection target ({type(e).__name__}: {e})") from None
