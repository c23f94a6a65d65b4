"""`vqa:QUESTIONS.json:ANNOTATIONS.json[:IMAGES_DIR]`: the official VQA v2 files and their COCO images.

Reference: the VQA v2 format (visualqa.org/download.html): the questions file holds ``{"questions":
[{"image_id", "question", "question_id"}, ...]}`` and the annotations file ``{"annotations": [{"question_id",
"image_id", "question_type", "answer_type", "multiple_choice_answer", "answers": [{"answer",
"answer_confidence", "answer_id"}, ...]}, ...]}`` (ten human answers per question). Each question is one item
{"image", "label": -1, "question", "answer": its ``multiple_choice_answer`` (the most common human answer: the
training target), "answers": every human answer (so the VQA task scores by VQA's soft accuracy, min(1,
#humans who gave the answer / 3)), "qtype": its ``answer_type``}.

The per-type key is ``answer_type`` (``yes/no``, ``number``, ``other``), not ``question_type``: it is the
breakdown the VQA papers and the official evaluation report beside the overall accuracy, and three types give
figures each backed by many questions, where the 65 ``question_type`` prefixes ("what color is the", "how
many", ...) split a validation set into many small, noisy ones.

The questions name no image file, only an ``image_id``: the image is the file in IMAGES_DIR (or else the
questions file's folder, then its ``images/`` folder: `AnnotationFile`'s places) whose name stem ends with the
id, zero-padded or not, after a non-digit (COCO's ``COCO_train2014_000000000123.jpg``, ``000000000123.jpg``,
``123.png``). Without ``data.val_spec`` (say ``vqa:`` over the val2014 files), ``data.val_fraction`` of the
*images* is held out, with all their questions, so no validation image is seen in training.

Malformed input gets one line naming the file: a missing file, one that is not JSON or lacks its list; a
question or annotation that is not an object, lacks a key or has one of the wrong JSON type, an empty
question or answer, a duplicate ``question_id``, an annotation whose ``image_id`` differs from its question's,
a question with no annotation, an ``image_id`` with no image file or with two. With ``data.on_error=stop``
(the default) the first stops the run, with ``skip`` the questions concerned are dropped and counted.
Annotations of questions the questions file does not hold are left out with one warning line.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch

from .base import DataError, DataInfo, ImageSet, Item, Subset, skip_or_raise
from .coco import AnnotationFile, _is_id
from .images import IMAGE_EXTS, load_image

_TRAILING_ID = re.compile(r"(?:^|\D)(\d+)$")   # the digits that end a file name's stem


def _read(path: Path, what: str, key: str) -> list:
    """The list under `key` of JSON file `path`; a one-line `DataError` if the file is missing, not JSON, or
    has no such list."""
    if not path.is_file():
        raise DataError(f"{path}: no such {what} file")
    try:
        d = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as e:   # bad JSON or UTF-8, or nesting too deep
        raise DataError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or not isinstance(d.get(key), list):
        raise DataError(f"{path}: not a VQA {what} file (needs a list {key!r})")
    return d[key]


def _check_question(q) -> str | None:
    """Why question entry `q` is malformed, or None."""
    if not isinstance(q, dict):
        return f"not an object (a {type(q).__name__})"
    for key in ("question_id", "image_id", "question"):
        if key not in q:
            return f"missing key {key!r}"
    for key in ("question_id", "image_id"):
        if not _is_id(q[key]):
            return f"{key} {q[key]!r:.40} is not an integer"
    if not isinstance(q["question"], str):
        return f"question {q['question']!r:.40} is not a string"
    if not q["question"].strip():
        return "empty question"
    return None


def _check_annotation(a) -> str | None:
    """Why annotation entry `a` is malformed, or None."""
    if not isinstance(a, dict):
        return f"not an object (a {type(a).__name__})"
    for key in ("question_id", "image_id", "answer_type", "multiple_choice_answer", "answers"):
        if key not in a:
            return f"missing key {key!r}"
    for key in ("question_id", "image_id"):
        if not _is_id(a[key]):
            return f"{key} {a[key]!r:.40} is not an integer"
    for key in ("answer_type", "multiple_choice_answer"):
        if not isinstance(a[key], str):
            return f"{key} {a[key]!r:.40} is not a string"
        if not a[key].strip():
            return f"empty {key}"
    answers = a["answers"]
    if not isinstance(answers, list) or not answers:
        return f"answers {answers!r:.40} is not a non-empty list"
    for k, h in enumerate(answers):
        if not isinstance(h, dict):
            return f"answers[{k}] is not an object (a {type(h).__name__})"
        if "answer" not in h:
            return f"answers[{k}]: missing key 'answer'"
        if not isinstance(h["answer"], str):
            return f"answers[{k}]: answer {h['answer']!r:.40} is not a string"
        if not h["answer"].strip():
            return f"answers[{k}]: empty answer"
    return None


def _where(n: int, entry, kind: str) -> str:
    """``question #n (question_id Q)``: an entry by its place in its file, and its id where it has one."""
    qid = entry.get("question_id") if isinstance(entry, dict) else None
    return f"{kind} #{n}" + ("" if qid is None else f" (question_id {qid!r:.20})")


class VQAQuestions(AnnotationFile, ImageSet):
    """The questions of a VQA v2 questions file with their annotations and images: items {"image", "label": -1,
    "question", "answer", "answers", "qtype"} (see the module docstring).

    Args:
        questions_file: the questions JSON (``v2_OpenEnded_mscoco_train2014_questions.json`` and the like).
        annotations_file: the annotations JSON (``v2_mscoco_train2014_annotations.json``).
        images_dir: where the images are (default: the questions file's folder, then its ``images/`` folder).
        channels, size, resize: output channels, square side and resize policy (crop | stretch | pad).
        on_error: ``stop`` or ``skip`` for malformed entries, missing and unreadable images.
    """

    def __init__(self, questions_file: str | Path, annotations_file: str | Path,
                 images_dir: str | Path | None = None, channels: int = 3, size: int = 64, resize: str = "crop",
                 on_error: str = "stop") -> None:
        self.ann_file = Path(questions_file).expanduser()        # AnnotationFile: messages, image places
        self.answers_file = Path(annotations_file).expanduser()
        self.images_dir = Path(images_dir).expanduser() if images_dir else None
        self.channels, self.size, self.resize, self.on_error = channels, size, resize, on_error
        self.skipped: list[str] = []
        questions = _read(self.ann_file, "questions", "questions")
        annotations = _read(self.answers_file, "annotations", "annotations")
        if self.images_dir and not self.images_dir.is_dir():
            raise DataError(f"{images_dir}: no such images directory (for {questions_file})")

        asked: dict[int, tuple[int, dict]] = {}       # question_id -> (position in the file, question)
        for n, q in enumerate(questions):
            why = _check_question(q)
            if why is None and q["question_id"] in asked:
                why = f"a second question with this question_id (the first is #{asked[q['question_id']][0]})"
            if why is not None:
                self._bad(f"{_where(n, q, 'question')}: {why}")
                continue
            asked[q["question_id"]] = (n, q)
        answered: dict[int, dict] = {}
        unasked = 0
        for n, a in enumerate(annotations):
            why = _check_annotation(a)
            if why is None:
                if a["question_id"] in answered:
                    why = "a second annotation of this question_id"
                elif a["question_id"] not in asked:
                    unasked += 1
                    continue
                elif a["image_id"] != asked[a["question_id"]][1]["image_id"]:
                    why = (f"image_id {a['image_id']} differs from its question's "
                           f"({asked[a['question_id']][1]['image_id']})")
            if why is not None:
                self._bad(f"{_where(n, a, 'annotation')}: {why}", self.answers_file)
                continue
            answered[a["question_id"]] = a
        if unasked:
            print(f"patchgpt: warning: {annotations_file}: {unasked} annotation(s) of questions not in "
                  f"{questions_file} are left out", file=sys.stderr)

        paths = self._find_images({q["image_id"] for _, q in asked.values()})
        self.records: list[tuple[Path, str, str, list[str], str, int]] = []
        for qid, (n, q) in asked.items():
            a = answered.get(qid)
            if a is None:
                self._bad(f"{_where(n, q, 'question')}: no annotation in {annotations_file}")
                continue
            path = paths.get(q["image_id"])
            if isinstance(path, str):                       # why it has no single image file
                self._bad(f"{_where(n, q, 'question')}: image_id {q['image_id']}: {path}")
                continue
            self.records.append((path, q["question"], a["multiple_choice_answer"],
                                 [h["answer"] for h in a["answers"]], a["answer_type"], q["image_id"]))
        if self.skipped:
            print(f"patchgpt: skipped {len(self.skipped)} malformed entries of {questions_file} and "
                  f"{annotations_file} (first: {self.skipped[0]})", file=sys.stderr)
        if not self.records:
            raise DataError(f"{questions_file}: no answered questions with images")
        self.info = DataInfo(channels=channels, image_size=(size, size), skipped=self.skipped)

    def _find_images(self, ids: set[int]) -> dict[int, Path | str]:
        """Image id -> its file, or why there is no single one: the files of the first of `_roots` that holds
        any file for the id whose stem ends with the id (after a non-digit, zero-padded or not)."""
        found: dict[int, list[Path]] = {}
        for root in self._roots():
            here: dict[int, list[Path]] = {}
            if root.is_dir():
                with os.scandir(root) as entries:
                    for e in entries:
                        stem, ext = os.path.splitext(e.name)
                        m = _TRAILING_ID.search(stem)
                        if m and ext.lower() in IMAGE_EXTS and int(m[1]) in ids and e.is_file():
                            here.setdefault(int(m[1]), []).append(root / e.name)
            for i, files in here.items():
                found.setdefault(i, sorted(files))
        where = " or ".join(str(r) for r in self._roots())
        out: dict[int, Path | str] = {}
        for i in ids:
            files = found.get(i, [])
            if len(files) == 1:
                out[i] = files[0]
            elif not files:
                out[i] = (f"no image file in {where} (COCO_*_{i:012d}.jpg, {i:012d}.jpg, or any image whose name "
                          f"ends in {i})")
            else:
                out[i] = f"{len(files)} image files ({', '.join(f.name for f in files[:3])}): which one is meant?"
        return out

    def image_ids(self) -> list[int]:
        """Each item's COCO image id."""
        return [r[5] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Item | None:
        path, question, answer, answers, qtype, _ = self.records[i]
        try:
            image = load_image(path, self.channels, self.size, self.resize)
        except DataError as e:
            skip_or_raise(self.info, self.on_error, e)
            return None
        return {"image": image, "label": -1, "question": question, "answer": answer, "answers": list(answers),
                "qtype": qtype}


def split_by_image(ds: VQAQuestions, val_fraction: float, seed: int) -> tuple[Subset, Subset]:
    """Train and validation questions, `val_fraction` of the *images* held out (all their questions) by a
    seeded permutation: the same every run for the same seed, at least one image when the fraction is
    positive and there are two or more."""
    ids = sorted(set(ds.image_ids()))
    perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(len(ids) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(ids) > 1:
        n_val = 1
    held = {ids[k] for k in perm[:n_val]}
    image_of = ds.image_ids()
    return (Subset(ds, [i for i in range(len(ds)) if image_of[i] not in held]),
            Subset(ds, [i for i in range(len(ds)) if image_of[i] in held]))
