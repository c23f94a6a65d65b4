"""`coco-captions:CAPTIONS.json[:IMAGES_DIR]`: COCO caption annotations and their images, for captioning.

Reference: the COCO captions format (cocodataset.org/#format-data): ``images`` (id, file_name, width, height)
and ``annotations`` (image_id, caption). Each image with at least one caption is one item
{"image", "label": -1, "text": one caption, "captions": all of the image's captions, in file order}. Which
caption is ``"text"`` is a pure function of the item's index (so a resumed run sees the same ones): the first
for validation items, caption ``i % k`` of the k for training item i. Images resolve against IMAGES_DIR, or
else the JSON's folder, then its ``images/`` folder.

Malformed entries (an image entry without an integer ``id`` or a ``file_name``, a duplicate image id, an
annotation that is not an object, without an integer ``image_id`` or a string ``caption``, an unknown image
id, an empty caption) get one line naming the file and the entry; with ``data.on_error=stop`` (the default)
the first stops the run, with ``skip`` they are dropped and counted. Listed image files that do not exist
follow the same rule; images with no caption are left out with one warning line.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from .base import DataError, DataInfo, ImageSet, Item, skip_or_raise
from .coco import AnnotationFile, _is_id
from .images import load_image

PICKS = ("cycle", "first")   # how an item's "text" is chosen among its image's captions


def _check_caption(a, images: dict) -> str | None:
    """Why caption annotation `a` is malformed, or None."""
    if not isinstance(a, dict):
        return f"not an object (a {type(a).__name__})"
    for key in ("image_id", "caption"):
        if key not in a:
            return f"missing key {key!r}"
    if not _is_id(a["image_id"]):
        return f"image_id {a['image_id']!r} is not an integer"
    if not isinstance(a["caption"], str):
        return f"caption {a['caption']!r:.40} is not a string"
    if not a["caption"].strip():
        return "empty caption"
    if a["image_id"] not in images:
        return f"unknown image_id {a['image_id']!r}"
    return None


class CocoCaptions(AnnotationFile, ImageSet):
    """Images of a COCO captions file, each with its captions: items {"image", "label": -1, "text",
    "captions"}.

    Args:
        ann_file: the captions JSON (``captions_train2017.json`` and the like).
        images_dir: where ``file_name``s resolve (default: the JSON's folder, then its ``images/`` folder).
        channels, size, resize: output channels, square side and resize policy (crop | stretch | pad).
        on_error: ``stop`` or ``skip`` for malformed entries, missing and unreadable images.
        pick: ``cycle`` (training: caption ``i % k`` for item i) or ``first`` (validation); `with_pick`
            gives a view of the same images with the other choice.
    """

    def __init__(self, ann_file: str | Path, images_dir: str | Path | None = None, channels: int = 3,
                 size: int = 64, resize: str = "crop", on_error: str = "stop", pick: str = "cycle") -> None:
        self.ann_file = Path(ann_file).expanduser()
        if pick not in PICKS:
            raise ValueError(f"pick={pick!r}: choose one of {PICKS}")
        if not self.ann_file.is_file():
            raise DataError(f"{ann_file}: no such caption file")
        if images_dir and not Path(images_dir).expanduser().is_dir():
            raise DataError(f"{images_dir}: no such images directory (for {ann_file})")
        try:
            d = json.loads(self.ann_file.read_bytes())
        except (ValueError, RecursionError) as e:   # bad JSON or UTF-8, or nesting too deep
            raise DataError(f"{ann_file}: not valid JSON ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict) or not all(isinstance(d.get(k), list) for k in ("images", "annotations")):
            raise DataError(f"{ann_file}: not a COCO captions file (needs lists 'images' and 'annotations')")
        self.channels, self.size, self.resize, self.on_error, self.pick = channels, size, resize, on_error, pick
        self.images_dir = Path(images_dir).expanduser() if images_dir else None
        self.skipped: list[str] = []

        images = self._index_images(d["images"])
        caps: dict[int, list[str]] = {i: [] for i in images}
        for n, a in enumerate(d["annotations"]):
            why = _check_caption(a, images)
            if why is not None:
                ident = a.get("id", "?") if isinstance(a, dict) else "?"
                self._bad(f"annotation #{n} (id {ident}): {why}")
                continue
            caps[a["image_id"]].append(a["caption"])
        self.records: list[tuple[Path, list[str]]] = []
        bare = 0
        for i in sorted(images):
            if not caps[i]:
                bare += 1
                continue
            path = self._path(images[i]["file_name"])
            if not path.is_file():
                self._bad(f"image id {i}: {path}: no such file")
                continue
            self.records.append((path, caps[i]))
        if bare:
            print(f"patchgpt: warning: {ann_file}: {bare} image(s) with no caption are left out", file=sys.stderr)
        if self.skipped:
            print(f"patchgpt: skipped {len(self.skipped)} malformed entries of {ann_file} "
                  f"(first: {self.skipped[0]})", file=sys.stderr)
        if not self.records:
            raise DataError(f"{ann_file}: no captioned images")
        self.info = DataInfo(channels=channels, image_size=(size, size), captions=True, skipped=self.skipped)


    def with_pick(self, pick: str) -> CocoCaptions:
        """The same images (and `info`) with ``"text"`` chosen by `pick` (``cycle`` | ``first``)."""
        if pick not in PICKS:
            raise ValueError(f"pick={pick!r}: choose one of {PICKS}")
        view = copy.copy(self)
        view.pick = pick
        return view

    def caption(self, i: int) -> str:
        """Item `i`'s ``"text"``: a pure function of `i` (and `pick`)."""
        caps = self.records[i][1]
        return caps[0] if self.pick == "first" else caps[i % len(caps)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Item | None:
        path, caps = self.records[i]
        try:
            image = load_image(path, self.channels, self.size, self.resize)
        except DataError as e:
            skip_or_raise(self.info, self.on_error, e)
            return None
        return {"image": image, "label": -1, "text": self.caption(i), "captions": list(caps)}
