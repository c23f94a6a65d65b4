"""Visual question answering as a token sequence: the image, a task token and the question, then the answer.

The image's tokens, the task token and the question's UTF-8 bytes (padded to ``vqa.question_len``) form one
bidirectional prefix (Pix2Seq v2's task prompt, with the question in it); the answer follows as bytes and an
end token, trained by next-token cross-entropy on the answer only. Decoding is greedy on the KV cache
(`patchgpt.sampling.sample`), constrained to bytes and the end token. Metrics: exact-match accuracy, overall
and per question type, or VQA's soft accuracy where a batch carries several human answers per question.
``vqa.blind=true`` trains and answers from a constant image: the question-only baseline, which shows how much
the image adds. With ``vqa.reason`` the model first writes the answer's rationale (the items' "rationale", in a
fixed-length block after the question), then the answer: a comparison the answer would have to make across a
long sequence becomes one between neighbouring tokens it has just written (README, "Reasoning before
answering").

References: Pix2Seq v2 (Chen et al. 2022); ByT5 (Xue et al. 2022); VQA (Antol et al. 2015) and its accuracy;
chain of thought (Wei et al. 2022), Multimodal-CoT (Zhang et al. 2023) and A-OKVQA's rationales (Schwenk et
al. 2022).
"""

from __future__ import annotations

import textwrap
from collections import defaultdict
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, RunConfig
from ..data.base import DataError, DataInfo, ImageSet
from ..report import save_text_grid
from ..rng import RowRNG
from ..sequence import IGNORE, Sequence, Vocab, concat, tokens
from ..tokenizers import Bytes
from .base import Task, build_backbone
from .detect import DetectConfig
from .ground import GroundedWords, Grounding, wants
from .text import read_bytes, text_recipe, write_bytes

NO_QUESTIONS = ("vqa needs items with a question and an answer; {} has none (use digit-scenes, or a folder whose "
                "metadata.jsonl gives each image a question and an answer)")


@dataclass
class VQAConfig:
    question_len: int = 32       # question bytes read (longer questions are cut)
    answer_len: int = 8          # answer bytes written (longer answers are cut for training)
    blind: bool = False          # the question-only baseline: every image replaced by a constant one
    ground: str = "auto"         # detect the objects first, then answer after them: auto (when the data
                                 # have boxes) | on | off (`patchgpt.tasks.ground`)
    describe: str = "auto"       # grounded answers: write the scene's caption after the objects, before the
                                 # question: auto (when the items carry captions too) | on | off
    caption_len: int = 48        # the caption's bytes (describe)
    question_first: bool = False  # grounded answers: the question in the prefix, before the objects (and the
                                  # caption), so they are written knowing what is asked; the answer follows a
                                  # second task token
    answer_weight: float = 1.0   # the answer's tokens (and its pointer's and rationale's) weigh this much more in
                                 # the loss than the objects' and the caption's before them (grounded answers)
    turns: int = 1               # questions per training sequence, asked one after another about one image,
                                 # where items carry several (batch["qa"]); -1 = as many as the data offers
    point: str = "off"           # grounded answers: after the question, first point at the objects the answer
                                 # is about (their boxes and classes; returned as "evidence"), then answer:
                                 # auto (when the questions name them, batch["refs"]) | on | off
    reason: str = "off"          # after the question (and pointer), first write the answer's rationale (the
                                 # items' "rationale": the steps from the image to the answer, returned as
                                 # "rationale"), then the answer: auto (when the items carry rationales) | on | off
    rationale_len: int = 32      # the rationale's bytes (reason; longer ones are cut for training)


def soft_accuracy(predicted: str, humans: SequenceOf[str]) -> float:
    """VQA's accuracy of one answer against the human answers to its question: min(1, #humans who gave it / 3)
    (answers compared stripped and lower-cased)."""
    p = predicted.strip().lower()
    return min(1.0, sum(h.strip().lower() == p for h in humans) / 3)


def _cut(text: str, n: int) -> bytes:
    """`text`'s UTF-8 bytes, cut to at most `n` on a character boundary."""
    return text.encode("utf-8")[:n].decode("utf-8", errors="ignore").encode("utf-8")


class AnswerQuestions(GroundedWords, Task):
    """Answer a question about an image: image tokens, a task token and the question's bytes, then the answer's
    bytes and an end token."""

    name = "vqa"
    section = "vqa"
    Config = VQAConfig
    output_keys = ("answers",)
    metric_keys = ("accuracy", "per_type")
    best_metric = ("accuracy", "max")
    demo_data = "digit-scenes"
    demo_options = {"question": "how many digits?"}
    shares_backbone = True
    prompt_words = ("vqa",)
    answers_questions = True
    examples = ["patchgpt train vqa --data digit-scenes --out runs/vqa",
                "patchgpt train vqa --data digit-scenes --out runs/vqa-blind --set vqa.blind=true"]

    @classmethod
    def defaults(cls, cfg: RunConfig) -> None:
        text_recipe(cfg)

    @classmethod
    def config_sections(cls) -> dict[str, type]:
        """``vqa``, and ``detect`` for the boxes of grounded answers (``detect.bins``, ...)."""
        return {"vqa": VQAConfig, "detect": DetectConfig}

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        v = cfg.vqa
        if min(v.question_len, v.answer_len, v.caption_len, v.rationale_len) < 1:
            raise ConfigError(f"vqa.question_len={v.question_len}, vqa.answer_len={v.answer_len}, "
                              f"vqa.caption_len={v.caption_len}, vqa.rationale_len={v.rationale_len}: must be "
                              "positive")
        if not v.answer_weight > 0:
            raise ConfigError(f"vqa.answer_weight={v.answer_weight}: must be positive")
        if v.turns == 0 or v.turns < -1:
            raise ConfigError(f"vqa.turns={v.turns}: must be -1 (as many as the data offers) or positive")

    def __init__(self, cfg: RunConfig, info: DataInfo, vocab: Vocab | None = None) -> None:
        super().__init__(cfg, info, vocab)
        self.input = self.make_input()
        self.task_id = self.vocab.add("task_vqa", 1).start
        v = cfg.vqa
        self.text = Bytes(self.vocab, v.question_len)     # UTF-8 bytes; its pad id pads the question
        self.bytes, self.pad = self.text.ids, self.text.pad
        self.end = self.vocab.add("answer_end", 1).start
        self.question_len, self.answer_len, self.blind = v.question_len, v.answer_len, v.blind
        # the question-only baseline sees no boxes either: they would come from the image
        grounded = wants(v.ground, bool(info.boxes), "vqa.ground", "boxes") and not v.blind
        v.ground = "on" if grounded else "off"                 # what the checkpoint was trained as
        self.ground = Grounding(cfg, info, self.vocab, self.input) if grounded else None
        self.caption_first = grounded and wants(v.describe, bool(info.captions), "vqa.describe", "captions")
        v.describe = "on" if self.caption_first else "off"
        if self.caption_first:   # the caption's own prompt and end tokens (shared with a captioner beside it)
            self.caption_id = self.vocab.add("task_caption", 1).start
            self.caption_end = self.vocab.add("caption_end", 1).start
        # several questions per training sequence where the items carry them: the image (and objects, caption)
        # is read once for all of them; every turn has the same length, the first one is what `predict` asks
        v.turns = max(1, info.questions) if v.turns == -1 else v.turns
        self.turns = v.turns
        # grounded answers point first at the objects they are about, where the questions name them
        point = wants(v.point, info.refs, "vqa.point", "questions that name the objects they are about (refs)")
        if v.point == "on" and not grounded:
            raise ConfigError("vqa.point=on points at objects the answer was grounded on: it needs vqa.ground "
                              "(on, or auto with boxes) and not vqa.blind")
        self.point = grounded and point
        v.point = "on" if self.point else "off"
        self.point_len = self.ground.point_length if self.point else 0
        # the answer's rationale first, where the items give one (the blind baseline has none: it is about the image)
        self.reason = wants(v.reason, info.rationales, "vqa.reason", "rationales") and not v.blind
        v.reason = "on" if self.reason else "off"
        self.reason_len = v.rationale_len + 1 if self.reason else 0
        if self.reason:
            self.reason_end = self.vocab.add("rationale_end", 1).start
        self.turn_len = 1 + self.question_len + self.point_len + self.reason_len + self.answer_len + 1
        self.question_first = bool(grounded and v.question_first)
        v.question_first = self.question_first
        length = (self.input.length + (self.ground.length if self.ground else 0) + self.turns * self.turn_len
                  + (v.caption_len + 2 if self.caption_first else 0) + int(self.question_first))
        self.backbone = build_backbone(cfg, self.vocab, self.input.patch_dim, length, self.input.grid)
        if self.ground:
            self.ground.attach(self)

    def state(self) -> dict:
        """`GroundedWords.state`, that the questions named their objects (``vqa.point``) and that the answers
        had rationales (``vqa.reason``)."""
        return {**super().state(), **({"refs": True} if self.point else {}),
                **({"rationales": True} if self.reason else {})}

    def fit(self, train_set: ImageSet, seed: int = 0) -> None:
        """Checks that the data asks questions (its first readable item has "question" and "answer"), then fits
        the input tokenizer as every task does."""
        first = next((it for it in (train_set[i] for i in range(min(len(train_set), 8))) if it is not None), None)
        if first is not None and not {"question", "answer"} <= set(first):
            raise DataError(NO_QUESTIONS.format(self.cfg.data.spec))
        super().fit(train_set, seed)

    # ---- sequences ------------------------------------------------------------------------------------

    def pixels(self, images: Tensor) -> Tensor:
        """The images the model sees: themselves, or a constant (all -1) image for the blind baseline."""
        return torch.full_like(images, -1.0) if self.blind else images

    def encode_qa(self, questions: SequenceOf[str | None], answers: SequenceOf[str | None] | None = None,
                  width: int | None = None, points: SequenceOf[tuple[Tensor, Tensor] | None] | None = None,
                  rationales: SequenceOf[str | None] | None = None) -> Sequence:
        """Questions (and answers) -> a (B, 1 + question_len [+ L]) `Sequence`: the task token, the question's
        bytes padded with the pad token to question_len, then (with ``vqa.point``) the pointer part, the objects
        the answer is about (`Grounding.pointer`, from `points`: per row (k, 4) boxes and (k,) classes), then
        (with ``vqa.reason``) the rationale's bytes and its end token, padded with end tokens to rationale_len + 1,
        then the answer's bytes and the end token, padded with end tokens that carry no loss (to `width` tokens
        in all, where given). Labels are the next token, on the pointer, the rationale and its first end, the
        answer and its end only (from the last question position on). A None question (a turn that row does not
        have) is end tokens only, without loss."""
        Q, P, R = self.question_len, self.point_len, self.reason_len
        rows, labelled = [], []
        for k, q in enumerate(questions):
            if q is None:
                rows.append([])
                labelled.append([])
                continue
            qb = [self.bytes.start + b for b in _cut(q, Q)]
            row = [self.task_id] + qb + [self.pad] * (Q - len(qb))
            lab: list[int] = []
            if answers is not None:
                if P:   # the pointer (its written objects and first end labelled), then the answer
                    if points is None or points[k] is None:
                        raise DataError(f"vqa.point=on needs the objects each answer is about (refs); question "
                                        f"{q!r} has none")
                    ptr, n = self.ground.pointer(*points[k])
                    lab += range(Q, Q + n)
                    row += ptr
                if R:   # the rationale (its bytes and first end labelled), padded to a fixed length
                    why = rationales[k] if rationales is not None else None
                    if why is None:
                        raise DataError(f"vqa.reason=on needs a rationale with each answer; question {q!r} has none")
                    text = [self.bytes.start + b for b in _cut(why, R - 1)] + [self.reason_end]
                    lab += range(len(row) - 1, len(row) - 1 + len(text))
                    row += text + [self.reason_end] * (R - len(text))
                answer = [self.bytes.start + b for b in _cut(answers[k], self.answer_len)] + [self.end]
                lab += range(len(row) - 1, len(row) - 1 + len(answer))
                row += answer
            rows.append(row)
            labelled.append(lab)
        L = width or max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.end, dtype=torch.long)
        labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
        for i, (r, lab) in enumerate(zip(rows, labelled, strict=True)):
            if r:
                ids[i, :len(r)] = torch.tensor(r)
            if lab:
                at = torch.tensor(lab)
                labels[i, at] = ids[i, at + 1]
        seq = tokens(ids, labels)
        if P and answers is not None:   # the pointer's tokens sit at the cells their boxes name
            seq.pos[:, Q + 1:Q + 1 + P] = self.ground.point_positions(ids[:, Q + 1:Q + 1 + P])
        return seq

    def encode_turns(self, qa: list[list[dict]], boxes: Tensor | None = None,
                     classes: Tensor | None = None) -> Sequence:
        """Per image a list of ``{"question", "answer"[, "refs", "rationale"]}`` -> a (B, turns * turn_len)
        `Sequence`: the first `turns` of them one after another, each as `encode_qa` writes one (fixed length),
        rows with fewer filled with end tokens that carry no loss. `boxes` and `classes` (per image) are what
        "refs" index (``vqa.point``)."""
        parts = []
        for t in range(self.turns):
            here = [row[t] if t < len(row) else None for row in qa]
            points = ([None if h is None else self.pointed(boxes[i], classes[i], h.get("refs"))
                       for i, h in enumerate(here)] if self.point else None)
            parts.append(self.encode_qa([h["question"] if h else None for h in here],
                                        [h["answer"] if h else "" for h in here], width=self.turn_len,
                                        points=points, rationales=[h.get("rationale") if h else None for h in here]))
        return concat(*parts)

    @staticmethod
    def pointed(boxes: Tensor, classes: Tensor, refs: SequenceOf[int] | None) -> tuple[Tensor, Tensor] | None:
        """One image's (N, 4) boxes and (N,) classes and the indices an answer is about -> those objects'
        (k, 4) boxes and (k,) classes (None without refs)."""
        if refs is None:
            return None
        at = torch.as_tensor(list(refs), dtype=torch.long)
        return boxes.reshape(-1, 4)[at], classes.reshape(-1)[at]

    def encode_caption(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Captions -> (ids, labels), each (B, caption_len + 2): the caption token, the bytes, the caption's end
        token, then end tokens as padding; labels (the next token) on the bytes and the first end."""
        C = self.cfg.vqa.caption_len
        ids = torch.full((len(texts), C + 2), self.caption_end, dtype=torch.long)
        labels = torch.full((len(texts), C + 2), IGNORE, dtype=torch.long)
        for i, t in enumerate(texts):
            row = [self.caption_id] + [self.bytes.start + b for b in _cut(t, C)] + [self.caption_end]
            ids[i, :len(row)] = torch.tensor(row)
            labels[i, :len(row) - 1] = torch.tensor(row[1:])
        return ids, labels

    def sequence(self, batch: dict, rng: RowRNG | None = None) -> Sequence:
        """Image prefix + task token + question bytes (all bidirectional) [+ rationale, with ``vqa.reason``] +
        answer bytes + end; labels on the rationale, the answer and its end. Grounded: image prefix + the objects
        (labelled) [+ the caption (labelled), with ``vqa.describe``] + task token + question [+ rationale] +
        answer + end. In training, where the items carry several
        questions (``batch["qa"]``) and ``vqa.turns`` > 1, the turns (task token, question, answer, end) follow
        one another after the image (the first turn's question stays in the bidirectional prefix)."""
        if "question" not in batch or "answer" not in batch:
            raise DataError(NO_QUESTIONS.format(self.cfg.data.spec))
        images = self.pixels(batch["image"])
        img = self.input.encode(images)
        if self.point and "refs" not in batch:
            raise DataError("vqa.point=on needs the objects each answer is about (batch['refs']); this data has none")
        if self.training and self.turns > 1 and "qa" in batch:   # every question the items carry, in turn
            qa = self.encode_turns(list(batch["qa"]), batch.get("boxes"), batch.get("classes"))
        else:
            points = ([self.pointed(b, c, r) for b, c, r in zip(batch["boxes"], batch["classes"], batch["refs"],
                                                                 strict=True)] if self.point else None)
            qa = self.encode_qa(list(batch["question"]), list(batch["answer"]), points=points,
                                rationales=batch.get("rationale"))
        qa = qa.to(images.device)
        if self.ground and self.cfg.vqa.answer_weight != 1:   # the answer against the chain before it
            qa = Sequence(ids=qa.ids, labels=qa.labels, pos=qa.pos,
                          weights=torch.full(qa.ids.shape, float(self.cfg.vqa.answer_weight), device=qa.ids.device))
        if self.ground:   # image [+ question] (prefix) + objects (labelled) [+ caption] + [task token +] answer
            head, tail = self.split_question(qa) if self.question_first else (None, qa)
            front = img if head is None else concat(img, head)
            cap = []
            if self.caption_first:
                c_ids, c_labels = self.encode_caption(list(batch["text"]))
                cap = [tokens(c_ids.to(images.device), c_labels.to(images.device))]
            objs = self.ground.tokens(batch["boxes"], batch["classes"], images)
            return concat(front, objs, *cap, tail, prefix_len=front.ids.shape[1] + 1)
        return concat(img, qa, prefix_len=img.ids.shape[1] + 1 + self.question_len)

    def split_question(self, qa: Sequence) -> tuple[Sequence, Sequence]:
        """`encode_qa`'s (B, 1 + question_len + L) tokens -> the task token and question (input only), and the
        answer part: a second task token, then the pointer (``vqa.point``), the rationale (``vqa.reason``), the answer
        and its end, labelled as before (the task token predicts what the question's last position did)."""
        Q1 = 1 + self.question_len
        B, dev = qa.ids.shape[0], qa.ids.device
        task = torch.full((B, 1), self.task_id, dtype=torch.long, device=dev)
        head = tokens(qa.ids[:, :Q1])
        answer = Sequence(ids=torch.cat([task, qa.ids[:, Q1:]], 1), labels=qa.labels[:, Q1 - 1:],
                          pos=torch.cat([torch.zeros_like(qa.pos[:, :1]), qa.pos[:, Q1:]], 1),
                          weights=None if qa.weights is None else qa.weights[:, Q1 - 1:])
        return head, answer

    def forward(self, batch: dict, rng: RowRNG | None = None) -> tuple[Tensor, dict]:
        loss, _, _ = self.prefix_loss(self.sequence(batch, rng))
        return loss, {"loss": loss.detach()}

    # ---- inference ------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, batch: dict) -> dict:
        """``{"answers": [str, ...], "ids": (B, answer_len + 1)}``: greedy answers to ``batch["question"]``
        (one string per image) about ``batch["image"]`` (B, C, H, W). Grounded: the objects are detected first
        (also returned, as ``"objects"``: per image ``[{"box", "label"}]``) and the answer follows them; with
        ``vqa.point`` the answer follows the objects it is about (``"evidence"``, in the same form); with
        ``vqa.reason`` it follows the rationale the model writes first (``"rationales"``, one string per image)."""
        images = self.pixels(batch["image"])
        B, dev = images.shape[0], images.device
        img = self.input.encode(images)
        ids = self.encode_qa(list(batch["question"])).ids
        found = {}
        if self.ground:   # the objects [and the caption] first; the question before them or after them
            question = tokens(ids.to(dev))
            head = (concat(img, question, prefix_len=img.ids.shape[1] + ids.shape[1]) if self.question_first
                    else img)
            boxes, classes = self.ground.detect(images, head if self.question_first else None)
            found = {"objects": self.ground.objects(boxes, classes)}
            prompt = self.ground.prompt(head, boxes, classes, images, *([self.caption_id] if self.caption_first
                                                                          else []))
            if self.caption_first:
                cap = write_bytes(self.backbone, prompt, self.cfg.vqa.caption_len + 1, self.bytes, self.caption_end)
                found["captions"] = [read_bytes(row, self.bytes, self.caption_end) for row in cap.tolist()]
                prompt = concat(prompt, tokens(cap), prefix_len=prompt.prefix_len)
            after = tokens(torch.full((B, 1), self.task_id, dtype=torch.long, device=dev)) if self.question_first \
                else question   # the answer's own task token, or the question
            prompt = concat(prompt, after, prefix_len=prompt.prefix_len)
            if self.point:   # the objects the answer is about, then the answer
                ptr, ev_boxes, ev_classes = self.ground.point(prompt)
                found["evidence"] = self.ground.objects(ev_boxes, ev_classes)
                prompt = concat(prompt, ptr, prefix_len=prompt.prefix_len)
        else:
            prompt = concat(img, tokens(ids.to(dev)), prefix_len=img.ids.shape[1] + ids.shape[1])
        if self.reason:   # the rationale, then the answer after it
            why = write_bytes(self.backbone, prompt, self.reason_len, self.bytes, self.reason_end)  # (B, R + 1)
            found["rationales"] = [read_bytes(row, self.bytes, self.reason_end) for row in why.tolist()]
            prompt = concat(prompt, tokens(why), prefix_len=prompt.prefix_len)
        out = write_bytes(self.backbone, prompt, self.answer_len + 1, self.bytes, self.end)  # (B, answer_len + 1)
        return {"answers": [self.decode(row) for row in out.tolist()], "ids": out, **found}

    def decode(self, ids: list[int]) -> str:
        """Generated ids -> the answer: bytes up to the first end token, as UTF-8."""
        return read_bytes(ids, self.bytes, self.end)

    def metric(self) -> VQAMetric:
        return VQAMetric(self)

    @torch.no_grad()
    def predict_files(self, paths: SequenceOf[str | Path], out: str | Path | None = None,
                      **options: Any) -> list[dict]:
        """Answer ``options["question"]`` (one string for every file, or a list of one per file) about each
        image file: ``[{"image": path, "question": str, "answer": str}]``; with `out` (a directory),
        ``answers.png``. Without a question: a one-line `ConfigError`."""
        question = options.get("question")
        if question is None:
            raise ConfigError("vqa needs a question: patchgpt predict CKPT IMAGE... --question 'how many digits?'")
        questions = [question] * len(paths) if isinstance(question, str) else list(question)
        if len(questions) != len(paths) or not all(isinstance(q, str) and q.strip() for q in questions):
            raise ConfigError(f"vqa needs a question: one non-empty string, or one per file ({len(paths)}); "
                              f"got {question!r}")
        self.eval()
        results: list[dict] = []
        for i in range(0, len(paths), 64):
            chunk, qs = list(paths[i:i + 64]), questions[i:i + 64]
            batch = self.read_files(chunk)
            pred = self.predict({**batch, "question": qs})
            answers = pred["answers"]
            extra = [{k: pred[k][j] for k in ("objects", "captions", "evidence", "rationales") if k in pred}
                     for j in range(len(answers))]
            results += [{"image": str(p), "question": q, "answer": a,
                         **{{"captions": "caption", "rationales": "rationale"}.get(k, k): v for k, v in e.items()}}
                        for p, q, a, e in zip(chunk, qs, answers, extra, strict=True)]
            if out and i == 0:
                Path(out).mkdir(parents=True, exist_ok=True)
                self.answers_png(batch["image"][:16], qs[:16], answers[:16], None, Path(out) / "answers.png",
                                 pred.get("rationales"))
        return results

    def report(self, out: Path, val_set: ImageSet, metrics: dict, prefix: str = "", **options: Any) -> dict:
        """``{prefix}answers.png``: validation images with the question, the rationale the model wrote (green,
        ``vqa.reason``), the predicted answer (black) and the true one (grey)."""
        if not len(val_set):
            return {}
        items = [it for it in (val_set[i] for i in range(min(12, len(val_set)))) if it is not None]
        images = torch.stack([it["image"] for it in items]).to(self.device)
        questions = [it["question"] for it in items]
        self.eval()
        pred = self.predict({"image": images, "question": questions})
        path = self.answers_png(images, questions, pred["answers"], [it["answer"] for it in items],
                                out / f"{prefix}answers.png", pred.get("rationales"))
        return {"answers_png": str(path)}

    def answers_png(self, images: Tensor, questions: list[str], predicted: list[str], true: list[str] | None,
                    path: Path, rationales: list[str] | None = None) -> Path:
        """A grid of images, each above its question, the rationale written before the answer (where there is
        one, wrapped), the predicted answer and (in grey, where known) the true one."""
        lines = [[(q, "#1f4e9c")]
                 + [(w, "#2e7d32") for w in textwrap.wrap(rationales[k] if rationales else "", 38)]
                 + [(f"-> {p}", "black")] + ([(f"true: {true[k]}", "#888888")] if true is not None else [])
                 for k, (q, p) in enumerate(zip(questions, predicted, strict=True))]
        return save_text_grid(path, images, lines, scale=max(1, 128 // self.info.image_size[0]))


class VQAMetric:
    """Validation loss and the accuracy of greedy answers: exact match against ``batch["answer"]``, or VQA's soft
    accuracy (`soft_accuracy`) where the batch has a list of human answers per question under ``"answers"``;
    overall and per question type (``batch["qtype"]``, where present)."""

    def __init__(self, task: AnswerQuestions) -> None:
        self.task, self.loss_sum, self.n = task, 0.0, 0
        self.rows: list[dict] = []

    def update(self, batch: dict) -> None:
        loss, _ = self.task(batch)
        B = batch["image"].shape[0]
        self.loss_sum += float(loss) * B
        self.n += B
        pred = self.task.predict(batch)
        humans = batch.get("answers")
        qtypes = batch.get("qtype")
        for k, p in enumerate(pred["answers"]):
            true = batch["answer"][k]
            score = soft_accuracy(p, humans[k]) if humans is not None else float(p == true)
            self.rows.append({"question": batch["question"][k], "predicted": p, "true": true, "score": score,
                              **({"qtype": qtypes[k]} if qtypes is not None else {}),
                              **({"rationale": pred["rationales"][k]} if "rationales" in pred else {})})

    def compute(self) -> dict:
        by_type: dict[str, list[float]] = defaultdict(list)
        for r in self.rows:
            if "qtype" in r:
                by_type[r["qtype"]].append(r["score"])
        return {"val_loss": self.loss_sum / max(self.n, 1), "n": self.n,
                "accuracy": sum(r["score"] for r in self.rows) / max(len(self.rows), 1),
                "per_type": {t: sum(s) / len(s) for t, s in sorted(by_type.items())}}

    def files(self) -> dict[str, Any]:
        """Every validation question with its predicted and true answer (``answers.json``)."""
        return {"answers.json": self.rows}
