"""`digit-scenes`: real handwritten digits pasted onto canvases, with exact boxes — detection with no download.

Each scene is a pure function of (seed, index): 1 to `max_digits` digits from scikit-learn's bundled set,
each upscaled to a random size and pasted at a random place (overlaps limited), ink composited by maximum.
A box is the tight extent of its digit's ink on the canvas; a caption, derived from the exact boxes, names the
digits and their layout ("a small 3 left of a large 7"), and one question-answer pair per scene, also derived
from the exact boxes (`ask`), makes it a VQA set whose answers are always right. Training and validation scenes
draw their digits from disjoint halves of the 1,797 handwritten digits (the same fixed split as ``digits``), so
validation measures detection of handwriting never seen in training.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from .base import DataInfo, ImageSet, Item, split
from .digits import Digits


def _iou(a: tuple, b: tuple) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class DigitScenes(ImageSet):
    """Scenes with boxes; items are {"image": (1, S, S) in [-1, 1], "label": -1, "boxes": (N, 4) normalized
    xyxy, "classes": (N,), "meta": image id, the canvas size, and the ground truth in pixels as COCO annotations
    for evaluation, "text": a caption naming the digits and their layout (`describe`), "question", "answer" and
    "qtype": one question about the scene, its answer and its type (`ask`)}.

    Args:
        digits: the source digits (images in [-1, 1], ink bright) and labels.
        n: number of scenes.
        size: canvas side S in pixels.
        min_digits, max_digits: digits per scene.
        scale: (min, max) digit side in pixels.
        seed: scene generator seed.
        max_overlap: largest IoU allowed between two pasted digit squares.
    """

    def __init__(self, digits: ImageSet, n: int, size: int = 64, min_digits: int = 1, max_digits: int = 4,
                 scale: tuple[int, int] = (12, 28), seed: int = 0, max_overlap: float = 0.1) -> None:
        self.digits = digits
        self.labels_ = digits.labels()
        self.n, self.size, self.seed = n, size, seed
        self.min_digits, self.max_digits = min_digits, max_digits
        self.scale = (min(scale[0], size), min(scale[1], size))
        self.max_overlap = max_overlap
        self.info = DataInfo(channels=1, image_size=(size, size), classes=[str(i) for i in range(10)],
                             boxes=True, category_ids=list(range(1, 11)), max_objects=max_digits, captions=True)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Item:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        S = self.size
        canvas = torch.zeros(S, S)
        k = int(torch.randint(self.min_digits, self.max_digits + 1, (1,), generator=g))
        placed: list[tuple] = []
        boxes, classes = [], []
        for _ in range(k):
            for _try in range(30):
                s = int(torch.randint(self.scale[0], self.scale[1] + 1, (1,), generator=g))
                x = int(torch.randint(0, S - s + 1, (1,), generator=g))
                y = int(torch.randint(0, S - s + 1, (1,), generator=g))
                sq = (x, y, x + s, y + s)
                if all(_iou(sq, p) <= self.max_overlap for p in placed):
                    break
            else:
                continue
            j = int(torch.randint(0, len(self.digits), (1,), generator=g))
            img = (self.digits[j]["image"][0] + 1) / 2                            # (8, 8) in [0, 1]
            big = F.interpolate(img[None, None], size=(s, s), mode="bilinear",
                                align_corners=False)[0, 0].clamp(0, 1)            # (s, s)
            ink = big > 0.2
            if not ink.any():
                continue
            rows, cols = ink.any(1).nonzero()[:, 0], ink.any(0).nonzero()[:, 0]
            canvas[y:y + s, x:x + s] = torch.maximum(canvas[y:y + s, x:x + s], big)
            placed.append(sq)
            boxes.append([x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1])
            classes.append(int(self.labels_[j]))
        px = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)              # (N, 4) pixels xyxy
        gt = [{"bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "category_id": c + 1, "iscrowd": 0}
              for b, c in zip(boxes, classes, strict=True)]
        meta = {"image_id": i, "width": S, "height": S, "scale": (1.0, 1.0), "offset": (0.0, 0.0), "gt": gt}
        return {"image": canvas[None] * 2 - 1, "label": -1,                     # (1, S, S) in [-1, 1]
                "boxes": px / S, "classes": torch.tensor(classes, dtype=torch.long), "meta": meta,
                "text": describe(boxes, classes, S), **ask(boxes, classes, S, self.question_rng(i))}

    def question_rng(self, i: int) -> random.Random:
        """The generator of scene `i`'s question: its own stream, a pure function of (seed, index), so the
        question's draws leave the scene's generator (and every other field) as it was."""
        return random.Random(f"digit-scenes-qa:{self.seed}:{i}")


def _size_word(box: list[int], S: int) -> str:
    """"small" / "" / "large" by the digit's ink height relative to the canvas (thirds of the drawn range)."""
    h = (box[3] - box[1]) / S
    return "small " if h < 0.25 else "large " if h > 0.36 else ""


def describe(boxes: list[list[int]], classes: list[int], S: int) -> str:
    """A caption from exact boxes (pixels xyxy) and classes: "a 3", "a small 3 left of a large 7", "a 7 above
    a 2", or for three or more digits "a 3, a 7 and a 1 from left to right"."""
    if not classes:
        return "nothing"
    named = [f"a {_size_word(b, S)}{c}" for b, c in zip(boxes, classes, strict=True)]
    if len(classes) == 1:
        return named[0]
    cx = [(b[0] + b[2]) / 2 for b in boxes]
    cy = [(b[1] + b[3]) / 2 for b in boxes]
    if len(classes) == 2:
        dx, dy = cx[1] - cx[0], cy[1] - cy[0]
        if abs(dx) >= abs(dy):
            first, second = (0, 1) if dx >= 0 else (1, 0)
            return f"{named[first]} left of {named[second]}"
        first, second = (0, 1) if dy >= 0 else (1, 0)
        return f"{named[first]} above {named[second]}"
    order = sorted(range(len(classes)), key=lambda i: (cx[i], cy[i]))
    plain = [f"a {classes[i]}" for i in order]
    return f"{', '.join(plain[:-1])} and {plain[-1]} from left to right"


QTYPES = ("count", "presence", "leftmost", "largest", "left_of")


def _apart(values: list[float], k: int, others: list[int], margin: float) -> bool:
    """Whether ``values[k]`` differs from ``values[j]`` by at least `margin` for every j in `others`."""
    return all(abs(values[k] - values[j]) >= margin for j in others)


def ask(boxes: list[list[int]], classes: list[int], S: int, r: random.Random) -> dict[str, str]:
    """One question about a scene, with its answer, from exact boxes (pixels xyxy) and classes:
    ``{"qtype", "question", "answer"}``. The type is drawn uniformly among those whose answer is unambiguous:

    - count: "how many digits?" -> "3";
    - presence: "is there a 5?" -> "yes" / "no" (each half the time);
    - leftmost: "which digit is leftmost?" -> "7" (by box centre; asked when no digit of another class is
      within S/16 of it);
    - largest: "which digit is largest?" -> "2" (by box area; two or more digits, asked when the runner-up's
      area is under 90% of the largest);
    - left_of: "what is left of the 4?" -> the digit whose centre is nearest on the left, or "nothing" (asked
      when the 4 is the only one, no other centre is within S/16 of its own, and every digit on its left within
      S/16 of the nearest names the same digit).
    """
    n = len(classes)
    cx = [(b[0] + b[2]) / 2 for b in boxes]
    area = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    margin = S / 16
    options: dict[str, tuple[str, str]] = {"count": ("how many digits?", str(n))}
    if r.random() < 0.5 and n:
        d = classes[r.randrange(n)]
        options["presence"] = (f"is there a {d}?", "yes")
    else:
        d = r.choice([c for c in range(10) if c not in classes])
        options["presence"] = (f"is there a {d}?", "no")
    if n:
        k = min(range(n), key=lambda j: cx[j])
        if _apart(cx, k, [j for j in range(n) if classes[j] != classes[k]], margin):
            options["leftmost"] = ("which digit is leftmost?", str(classes[k]))
    if n >= 2:
        by_area = sorted(range(n), key=lambda j: -area[j])
        if area[by_area[1]] < 0.9 * area[by_area[0]]:
            options["largest"] = ("which digit is largest?", str(classes[by_area[0]]))
    unique = [j for j in range(n) if classes.count(classes[j]) == 1]
    if unique:
        k = unique[r.randrange(len(unique))]
        left = sorted((j for j in range(n) if cx[j] < cx[k]), key=lambda j: -cx[j])
        clear = _apart(cx, k, [j for j in range(n) if j != k], margin)
        if clear and (not left or _apart(cx, left[0], [j for j in left if classes[j] != classes[left[0]]], margin)):
            options["left_of"] = (f"what is left of the {classes[k]}?", str(classes[left[0]]) if left else "nothing")
    qtype = r.choice([t for t in QTYPES if t in options])
    question, answer = options[qtype]
    return {"question": question, "answer": answer, "qtype": qtype}


def digit_scenes(size: int = 64, n_train: int = 16000, n_val: int = 500, val_fraction: float = 0.2,
                 split_seed: int = 0, **kw) -> tuple[DigitScenes, DigitScenes]:
    """Train and validation scenes built from disjoint digits (the ``digits`` split)."""
    train_digits, val_digits = split(Digits(), val_fraction, split_seed)
    return (DigitScenes(train_digits, n_train, size, seed=1, **kw),
            DigitScenes(val_digits, n_val, size, seed=2, **kw))
