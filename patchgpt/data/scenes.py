"""`digit-scenes`: real handwritten digits pasted onto canvases, with exact boxes — detection with no download.

Each scene is a pure function of (seed, index): 1 to `max_digits` digits from scikit-learn's bundled set,
each upscaled to a random size and pasted at a random place (overlaps limited), ink composited by maximum.
A box is the tight extent of its digit's ink on the canvas; a caption, derived from the exact boxes, names the
digits and their layout ("a small 3 left of a large 7"), and one question-answer pair per scene, also derived
from the exact boxes (`ask`), makes it a VQA set whose answers are always right. Training and validation scenes
draw their digits from disjoint halves of the 1,797 handwritten digits (the same fixed split as ``digits``), so
validation measures detection of handwriting never seen in training.

Three options, written after the spec's colon (``digit-scenes:holdout=0,canvas=64``, `scene_options`):

- ``holdout=N`` holds out 10 (digit pair, relation) combinations from the training scenes (`held_out`, seeded by
  N): no training scene shows, between any two of its digits, a held-out combination such as "a 3 left of a 7"
  (by the rule `describe` uses for two digits), while "a 7 left of a 3" and "a 3 above a 7" stay. A training
  scene is the scene without the option unless that one shows a held-out combination; then it is redrawn
  (a pure function of (seed, index, attempt)). Validation scenes are unchanged. The held-out captions
  (`held_out_captions`) are for checking a text-to-image model on combinations it never saw.
- ``canvas=PX`` draws each scene on a PX canvas (layout, digit sizes, captions and questions as there) and
  resizes it to ``data.image_size``: the same scenes at a lower resolution, e.g. for a generator.
- ``scenes=N`` sets the number of training scenes (16,000 by default). Scenes are drawn when read, so more of
  them cost no memory; the first 16,000 are the default's. A generator trained for many epochs on 16,000
  scenes overfits them (its validation loss rises), and more scenes keep the layouts fresh.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import DataError, DataInfo, ImageSet, Item, split
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
    "qtype": one question about the scene, its answer and its type (`ask`), "refs": the indices of the objects
    its answer is about, "rationale": how the answer follows from them, "qa": every question `ask_all` can ask
    about it, that one first (``[{"question", "answer", "qtype", "refs", "rationale"}, ...]``)}.

    Args:
        digits: the source digits (images in [-1, 1], ink bright) and labels.
        n: number of scenes.
        size: canvas side S in pixels.
        min_digits, max_digits: digits per scene.
        scale: (min, max) digit side in pixels.
        seed: scene generator seed.
        max_overlap: largest IoU allowed between two pasted digit squares.
        holdout: (digit, relation, digit) combinations no scene may show between two of its digits (`held_out`).
        canvas: side of the canvas the scene is drawn on (0: `size`); the image is then resized to `size`.
            Boxes (normalized), captions and questions follow the canvas; ``meta`` is in pixels of the image.
    """

    def __init__(self, digits: ImageSet, n: int, size: int = 64, min_digits: int = 1, max_digits: int = 4,
                 scale: tuple[int, int] = (12, 28), seed: int = 0, max_overlap: float = 0.1,
                 holdout: Iterable[tuple[int, str, int]] = (), canvas: int = 0) -> None:
        self.digits = digits
        self.labels_ = digits.labels()
        self.n, self.size, self.seed = n, size, seed
        self.canvas = canvas or size
        self.min_digits, self.max_digits = min_digits, max_digits
        self.scale = (min(scale[0], self.canvas), min(scale[1], self.canvas))
        self.max_overlap = max_overlap
        self.holdout = frozenset(holdout)
        self.info = DataInfo(channels=1, image_size=(size, size), classes=[str(i) for i in range(10)],
                             boxes=True, category_ids=list(range(1, 11)), max_objects=max_digits, captions=True,
                             questions=len(QTYPES), refs=True, rationales=True,
                             masks=["background"] + [str(i) for i in range(10)])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Item:
        if not 0 <= i < self.n:
            raise IndexError(i)
        for attempt in range(MAX_REDRAWS):   # without a holdout, or when it shows none: the first draw
            canvas, label, boxes, classes = self._draw(torch.Generator().manual_seed(self._seed(i, attempt)))
            if not self.holdout or not relations(boxes, classes) & self.holdout:
                break
        else:
            raise RuntimeError(f"digit-scenes: scene {i} showed a held-out combination {MAX_REDRAWS} times")
        S, out = self.canvas, self.size
        image = canvas[None]                                                      # (1, S, S) in [0, 1]
        if out != S:
            mode = dict(mode="area") if out < S else dict(mode="bilinear", align_corners=False)
            image = F.interpolate(image[None], size=(out, out), **mode)[0].clamp(0, 1)   # (1, out, out)
            label = F.interpolate(label[None, None].float(), size=(out, out), mode="nearest-exact")[0, 0]
        px = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)              # (N, 4) canvas pixels xyxy
        gt = [{"bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]], "category_id": c + 1, "iscrowd": 0}
              for b, c in zip(boxes, classes, strict=True)]
        if out != S:   # COCO annotations in pixels of the image
            gt = [{**a, "bbox": [v * out / S for v in a["bbox"]]} for a in gt]
        qa = ask_all(boxes, classes, S, self.question_rng(i))
        meta = {"image_id": i, "width": out, "height": out, "scale": (1.0, 1.0), "offset": (0.0, 0.0), "gt": gt}
        return {"image": image * 2 - 1, "label": -1, "mask": label.to(torch.uint8),   # (1, S, S) in [-1, 1]; (S, S)
                "boxes": px / S, "classes": torch.tensor(classes, dtype=torch.long), "meta": meta,
                "text": describe(boxes, classes, S), **qa[0], "qa": qa}

    def _seed(self, i: int, attempt: int) -> int:
        """The generator seed of scene `i`'s draw number `attempt` (0: the scene without a holdout; torch's CPU
        generator keeps 32 bits of a seed, so redraws take a hash of (seed, index, attempt))."""
        if attempt == 0:
            return self.seed * 1_000_003 + i
        return random.Random(f"digit-scenes-redraw:{self.seed}:{i}:{attempt}").getrandbits(32)

    def _draw(self, g: torch.Generator) -> tuple[Tensor, Tensor, list[list[int]], list[int]]:
        """One scene from generator `g`: the canvas (S, S) in [0, 1], its label map (S, S) (0 background,
        1 + digit on each digit's ink where that digit is the brightest), boxes (pixels xyxy) and classes."""
        S = self.canvas
        canvas = torch.zeros(S, S)
        label = torch.zeros(S, S, dtype=torch.uint8)
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
            region = canvas[y:y + s, x:x + s]
            label[y:y + s, x:x + s][ink & (big >= region)] = int(self.labels_[j]) + 1
            canvas[y:y + s, x:x + s] = torch.maximum(region, big)
            placed.append(sq)
            boxes.append([x + int(cols[0]), y + int(rows[0]), x + int(cols[-1]) + 1, y + int(rows[-1]) + 1])
            classes.append(int(self.labels_[j]))
        return canvas, label, boxes, classes

    def question_rng(self, i: int) -> random.Random:
        """The generator of scene `i`'s question: its own stream, a pure function of (seed, index), so the
        question's draws leave the scene's generator (and every other field) as it was."""
        return random.Random(f"digit-scenes-qa:{self.seed}:{i}")


def _size_word(box: list[int], S: int) -> str:
    """"small" / "" / "large" by the digit's ink height relative to the canvas (thirds of the drawn range)."""
    h = (box[3] - box[1]) / S
    return "small " if h < 0.25 else "large " if h > 0.36 else ""


RELATIONS = ("left of", "above")
MAX_REDRAWS = 1000   # a held-out scene is redrawn; with 10 of 200 combinations held out, 4 digits pass 74% of draws


def pair_relation(a: list, b: list) -> tuple[int, str, int]:
    """What `describe` says of two boxes (xyxy): ``(first, relation, second)`` with first, second the indices
    0 and 1 in the order named: "left of" when the centres differ more across than down, else "above"."""
    dx = (b[0] + b[2]) / 2 - (a[0] + a[2]) / 2
    dy = (b[1] + b[3]) / 2 - (a[1] + a[3]) / 2
    if abs(dx) >= abs(dy):
        return (0, "left of", 1) if dx >= 0 else (1, "left of", 0)
    return (0, "above", 1) if dy >= 0 else (1, "above", 0)


def relations(boxes: list, classes: list[int]) -> set[tuple[int, str, int]]:
    """Every (digit, relation, digit) a scene shows between two of its digits, by `pair_relation`."""
    out = set()
    for i in range(len(classes)):
        for j in range(i + 1, len(classes)):
            first, rel, second = pair_relation(boxes[i], boxes[j])
            pair = (classes[i], classes[j])
            out.add((pair[first], rel, pair[second]))
    return out


def describe(boxes: list[list[int]], classes: list[int], S: int) -> str:
    """A caption from exact boxes (pixels xyxy) and classes: "a 3", "a small 3 left of a large 7", "a 7 above
    a 2", or for three or more digits "a 3, a 7 and a 1 from left to right". `parse_caption` inverts it."""
    if not classes:
        return "nothing"
    named = [f"a {_size_word(b, S)}{c}" for b, c in zip(boxes, classes, strict=True)]
    if len(classes) == 1:
        return named[0]
    if len(classes) == 2:
        first, rel, second = pair_relation(boxes[0], boxes[1])
        return f"{named[first]} {rel} {named[second]}"
    cx = [(b[0] + b[2]) / 2 for b in boxes]
    cy = [(b[1] + b[3]) / 2 for b in boxes]
    order = sorted(range(len(classes)), key=lambda i: (cx[i], cy[i]))
    plain = [f"a {classes[i]}" for i in order]
    return f"{', '.join(plain[:-1])} and {plain[-1]} from left to right"


@dataclass(frozen=True)
class Layout:
    """What a `describe` caption asks for: the digits in the order named, their size words ("small", "" or
    "large"; "" for three or more digits) and the relation ("left of", "above", "left to right" for three or
    more, None for one digit or none)."""

    digits: tuple[int, ...]
    sizes: tuple[str, ...]
    relation: str | None

    def caption(self) -> str:
        """The caption back (``parse_caption(t).caption() == t`` for every caption `describe` writes)."""
        named = [f"a {s + ' ' if s else ''}{d}" for d, s in zip(self.digits, self.sizes, strict=True)]
        if not named:
            return "nothing"
        if len(named) == 1:
            return named[0]
        if len(named) == 2:
            return f"{named[0]} {self.relation} {named[1]}"
        return f"{', '.join(named[:-1])} and {named[-1]} from left to right"

    def plain(self) -> str:
        """The caption without size words."""
        return Layout(self.digits, ("",) * len(self.digits), self.relation).caption()


_ONE = r"a (?:(small|large) )?(\d)"
_PAIR = re.compile(rf"{_ONE} (left of|above) {_ONE}")
_SINGLE = re.compile(_ONE)
_ROW = re.compile(r"(a \d(?:, a \d)+) and a (\d) from left to right")


def parse_caption(text: str) -> Layout:
    """A `describe` caption -> the `Layout` it asks for; a ValueError for any other text."""
    if text == "nothing":
        return Layout((), (), None)
    if m := _SINGLE.fullmatch(text):
        return Layout((int(m[2]),), (m[1] or "",), None)
    if m := _PAIR.fullmatch(text):
        return Layout((int(m[2]), int(m[5])), (m[1] or "", m[4] or ""), m[3])
    if m := _ROW.fullmatch(text):
        digits = tuple(int(part[2:]) for part in m[1].split(", ")) + (int(m[2]),)
        return Layout(digits, ("",) * len(digits), "left to right")
    raise ValueError(f"not a digit-scenes caption: {text!r}")


def held_out(seed: int) -> tuple[tuple[int, str, int], ...]:
    """The 10 (digit, relation, digit) combinations ``digit-scenes:holdout=SEED`` keeps out of training: the
    digits in a seeded cycle (each digit in two combinations, no two combinations of the same two digits), each
    pair in a seeded order with a seeded relation. For every held-out "a 3 left of a 7", training still shows
    "a 7 left of a 3", "a 3 above a 7" and "a 7 above a 3"."""
    r = random.Random(f"digit-scenes-holdout:{seed}")
    cycle = list(range(10))
    r.shuffle(cycle)
    out = []
    for k in range(10):
        a, b = cycle[k], cycle[(k + 1) % 10]
        if r.random() < 0.5:
            a, b = b, a
        out.append((a, r.choice(RELATIONS), b))
    return tuple(out)


CHECK_SIZES = (("", ""), ("small", "large"), ("large", "small"))   # size words of the held-out captions


def held_out_captions(combos: Iterable[tuple[int, str, int]]) -> list[str]:
    """Captions of the held-out combinations, as `describe` would write them, three per combination (size
    words as in `CHECK_SIZES`): "a 3 left of a 7", "a small 3 left of a large 7", "a large 3 left of a small 7"."""
    return [Layout((a, b), sizes, rel).caption() for a, rel, b in combos for sizes in CHECK_SIZES]


def scene_options(arg: str) -> dict[str, int | None]:
    """``holdout=N,canvas=PX,scenes=N`` (any of them, or none) -> ``{"holdout": N or None, "canvas": PX or 0,
    "scenes": N or None}``; a one-line DataError for anything else."""
    opts: dict[str, int | None] = {"holdout": None, "canvas": 0, "scenes": None}
    for part in filter(None, (p.strip() for p in arg.split(","))):
        key, eq, value = part.partition("=")
        if key not in opts or not eq or not value.strip().isdigit():
            raise DataError(f"digit-scenes:{arg}: options are holdout=N (a seed: 10 digit pair/relation "
                            "combinations kept out of training), canvas=PX (drawn at PX, resized to "
                            "data.image_size) and scenes=N (training scenes, default 16000), e.g. "
                            "digit-scenes:holdout=0,canvas=64")
        opts[key] = int(value)
    if opts["canvas"] and not 8 <= opts["canvas"] <= 1024:
        raise DataError(f"digit-scenes:{arg}: canvas={opts['canvas']} must be in [8, 1024] pixels")
    if opts["scenes"] == 0:
        raise DataError(f"digit-scenes:{arg}: scenes=0: there must be at least one training scene")
    return opts


QTYPES = ("count", "presence", "leftmost", "largest", "left_of")


def _apart(values: list[float], k: int, others: list[int], margin: float) -> bool:
    """Whether ``values[k]`` differs from ``values[j]`` by at least `margin` for every j in `others`."""
    return all(abs(values[k] - values[j]) >= margin for j in others)


def ask(boxes: list[list[int]], classes: list[int], S: int, r: random.Random) -> dict[str, str]:
    """One question about a scene, with its answer, from exact boxes (pixels xyxy) and classes:
    ``{"qtype", "question", "answer", "refs"}``, its type drawn uniformly among those `ask_all` can ask."""
    return ask_all(boxes, classes, S, r)[0]


def ask_all(boxes: list[list[int]], classes: list[int], S: int, r: random.Random) -> list[dict[str, str]]:
    """Every question `ask` could ask about a scene, one per type, with its answer, from exact boxes (pixels
    xyxy) and classes: ``[{"qtype", "question", "answer", "refs"}, ...]``, where "refs" lists the indices of the
    objects the answer is about (the evidence a grounded answer points at first: ``vqa.point``). The first one's
    type is drawn uniformly (it is `ask`'s question), the others follow in random order. The types, each asked
    only when its answer is unambiguous (refs in brackets):

    - count: "how many digits?" -> "3" [every digit];
    - presence: "is there a 5?" -> "yes" / "no" (each half the time) [the 5s; none];
    - leftmost: "which digit is leftmost?" -> "7" [that 7] (by box centre; asked when no digit of another class
      is within S/16 of it);
    - largest: "which digit is largest?" -> "2" [that 2] (by box area; two or more digits, asked when the
      runner-up's area is under 90% of the largest);
    - left_of: "what is left of the 4?" -> the digit whose centre is nearest on the left [it], or "nothing"
      [none] (asked when the 4 is the only one, no other centre is within S/16 of its own, and every digit on its
      left within S/16 of the nearest names the same digit).

    Each also carries a "rationale", the steps from the objects to the answer (``vqa.reason``): for presence,
    every digit in reading order (left to right by box edge, as grounded answers write the objects) checked
    against the asked one, "3=5n,5=5y" (n: not it, y: it; the verdict right after the two digits it compares);
    for left_of, the same up to the asked digit, whose answer is the digit read just before it (empty in the
    rare scenes where reading order by edge and the order by centre disagree there); empty for the other
    types, whose answers need no such steps.
    """
    n = len(classes)
    cx = [(b[0] + b[2]) / 2 for b in boxes]
    area = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    margin = S / 16
    reading = sorted(range(n), key=lambda j: (boxes[j][0], boxes[j][1]))   # the order objects are written in

    def check(upto: list[int], e: int) -> str:   # each digit of `upto` compared with e: "3=5n,5=5y"
        return ",".join(f"{classes[j]}={e}{'y' if classes[j] == e else 'n'}" for j in upto)

    options: dict[str, tuple[str, str, list[int]]] = {"count": ("how many digits?", str(n), list(range(n)))}
    if r.random() < 0.5 and n:
        d = classes[r.randrange(n)]
        options["presence"] = (f"is there a {d}?", "yes", [j for j in range(n) if classes[j] == d])
    else:
        d = r.choice([c for c in range(10) if c not in classes])
        options["presence"] = (f"is there a {d}?", "no", [])
    if n:
        k = min(range(n), key=lambda j: cx[j])
        if _apart(cx, k, [j for j in range(n) if classes[j] != classes[k]], margin):
            options["leftmost"] = ("which digit is leftmost?", str(classes[k]), [k])
    if n >= 2:
        by_area = sorted(range(n), key=lambda j: -area[j])
        if area[by_area[1]] < 0.9 * area[by_area[0]]:
            options["largest"] = ("which digit is largest?", str(classes[by_area[0]]), [by_area[0]])
    unique = [j for j in range(n) if classes.count(classes[j]) == 1]
    if unique:
        k = unique[r.randrange(len(unique))]
        left = sorted((j for j in range(n) if cx[j] < cx[k]), key=lambda j: -cx[j])
        clear = _apart(cx, k, [j for j in range(n) if j != k], margin)
        if clear and (not left or _apart(cx, left[0], [j for j in left if classes[j] != classes[left[0]]], margin)):
            options["left_of"] = (f"what is left of the {classes[k]}?", str(classes[left[0]]) if left else "nothing",
                                  left[:1])
    why = {"presence": check(reading, d)}
    if "left_of" in options:   # read up to the asked digit: the one read before it is the answer
        at = reading.index(k)
        if (str(classes[reading[at - 1]]) if at else "nothing") == options["left_of"][1]:
            why["left_of"] = check(reading[:at + 1], classes[k])
    qtype = r.choice([t for t in QTYPES if t in options])
    rest = [t for t in QTYPES if t in options and t != qtype]
    r.shuffle(rest)
    return [{"question": options[t][0], "answer": options[t][1], "qtype": t, "refs": options[t][2],
             "rationale": why.get(t, "")} for t in [qtype, *rest]]


def digit_scenes(size: int = 64, n_train: int = 16000, n_val: int = 500, val_fraction: float = 0.2,
                 split_seed: int = 0, holdout: int | None = None, canvas: int = 0,
                 **kw) -> tuple[DigitScenes, DigitScenes]:
    """Train and validation scenes built from disjoint digits (the ``digits`` split); with `holdout` (a seed)
    the training scenes never show the combinations `held_out(holdout)`; `canvas`: see `DigitScenes`."""
    train_digits, val_digits = split(Digits(), val_fraction, split_seed)
    combos = held_out(holdout) if holdout is not None else ()
    return (DigitScenes(train_digits, n_train, size, seed=1, holdout=combos, canvas=canvas, **kw),
            DigitScenes(val_digits, n_val, size, seed=2, canvas=canvas, **kw))
