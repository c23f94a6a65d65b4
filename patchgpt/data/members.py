"""One data item as the members of a tar shard, and back (`shards` writes and reads them).

Each field of an item is one member named ``{key}.{field}.{format}``, the format chosen by the value's type:
``png`` for a float tensor (C, H, W) in [-1, 1] that 8-bit PNG holds exactly, ``npy`` for any other tensor
(dtype and shape kept), ``txt`` for a str, ``cls`` for an int (as text) and ``json`` for anything else
(tuples kept). The fields shards have always had keep the names they had, just the format: ``{key}.png`` /
``{key}.npy`` the image or clip, ``{key}.cls`` the label, ``{key}.txt`` the caption. The ``{key}.json``
detection target (boxes, classes, meta) of shards written before fields were generic still reads. Members
of other formats are ignored. Decoding gives back the written item bit for bit.
"""

from __future__ import annotations

import io
import json

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


def _decode(fmt: str, raw: bytes):
    """The inverse of `_encode` for one member's format and bytes."""
    if fmt == "png":
        from PIL import Image

        from .images import to_tensor

        return to_tensor(Image.open(io.BytesIO(raw)))
    if fmt == "npy":
        return torch.from_numpy(np.load(io.BytesIO(raw), allow_pickle=False))
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
    """A raw sample {"__key__": key, suffix: bytes, ...} -> an item (see the module docstring)."""
    key, item = sample["__key__"], {}
    for suffix, raw in sample.items():
        field, _, fmt = suffix.rpartition(".")
        if fmt not in FORMATS:   # "__key__", and members of other formats
            continue
        if not field and fmt == "json":   # a detection target of shards written before fields were generic
            item.update(_target(raw, key))
            continue
        if not field:
            field = FROM_BARE[fmt]
            field = ("video" if info.frames else "image") if field == "pixels" else field
        try:
            item[field] = _decode(fmt, raw)
        except (ValueError, TypeError, OSError, EOFError, SyntaxError) as e:
            raise DataError(f"shard sample {key}: unreadable .{suffix} member ({e})") from None
    if input_key(item) not in item:
        raise DataError(f"shard sample {key}: no .png or .npy member")
    item.setdefault("label", -1)
    if info.captions:
        item.setdefault("text", "")
    if info.boxes and "boxes" not in item:
        raise DataError(f"shard sample {key}: no detection target")
    return item


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
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise DataError(f"shard sample {key}: unreadable detection target ({e})") from None
