"""Image captioning as a token sequence: the image, a task token, then the caption written byte by byte.

The image's tokens and the task token form a bidirectional prefix (AIM's prefix attention; Pix2Seq v2's
task prompt); the caption follows as UTF-8 bytes (ByT5-style, no vocabulary file, any language) and an end
token, trained by next-token cross-entropy. Decoding runs on the KV cache (`patchgpt.sampling.sample`),
greedy by default, constrained to bytes and the end token, and stops once every caption has ended.
Metrics: BLEU-4 (sacrebleu, corpus level), CIDEr-D (Vedantam et al. 2015), exact match and same words.

References: Pix2Seq v2 (Chen et al. 2022, "A Unified Sequence Interface for Vision Tasks"); ByT5 (Xue et al.
2022); CIDEr (Vedantam et al. 2015; the coco-caption evaluation code).
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
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
from ..sampling import SamplingParams
from ..sequence import IGNORE, Sequence, Vocab, concat, tokens
from ..tokenizers import Bytes
from .base import Task, build_backbone
from .detect import DetectConfig
from .ground import GroundedWords, Grounding, wants
from .text import read_bytes, text_recipe, write_bytes


@dataclass
class CaptionConfig:
    max_len: int = 48            # caption bytes written (longer captions are cut for training)
    temperature: float = 0.0     # decoding: 0 = greedy; > 0 samples (with top_p for nucleus sampling)
    top_p: float = 1.0
    ground: str = "auto"         # write the objects' boxes first, then the caption: auto (when the data have
                                 # boxes) | on | off (`patchgpt.tasks.ground`)


class Caption(GroundedWords, Task):
    """Describe an image in words: image tokens, a task token, then the caption's bytes."""

    name = "caption"
    shares_backbone = True
    prompt_words = ("caption", "describe", "describe the image")
    section = "caption"
    Config = CaptionConfig
    output_keys = ("captions",)
    metric_keys = ("bleu4", "cider", "exact_match")
    best_metric = ("cider", "max")
    demo_data = "digit-scenes"
    examples = ["patchgpt train caption --data digit-scenes --out runs/cap",
                "patchgpt predict runs/cap scene.png"]

    @classmethod
    def defaults(cls, cfg: RunConfig) -> None:
        text_recipe(cfg)

    @classmethod
    def config_sections(cls) -> dict[str, type]:
        """``caption``, and ``detect`` for the boxes of a grounded caption (``detect.bins``, ...)."""
        return {"caption": CaptionConfig, "detect": DetectConfig}

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cfg.caption.max_len < 1:
            raise ConfigError(f"caption.max_len={cfg.caption.max_len}: must be positive")
        if cfg.caption.temperature < 0 or not 0 < cfg.caption.top_p <= 1:
            raise ConfigError("caption.temperature must be >= 0 and caption.top_p in (0, 1]")

    def __init__(self, cfg: RunConfig, info: DataInfo, vocab: Vocab | None = None) -> None:
        super().__init__(cfg, info, vocab)
        if not info.captions:
            raise DataError(f"captioning needs captions; {cfg.data.spec} has none (use digit-scenes, emoji, or a "
                            "folder with a metadata.jsonl of captions)")
        self.input = self.make_input()
        self.task_id = self.vocab.add("task_caption", 1).start
        self.text = Bytes(self.vocab, cfg.caption.max_len)    # UTF-8 bytes (its pad id is not used here)
        self.bytes = self.text.ids
        self.end = self.vocab.add("caption_end", 1).start
        self.max_len = cfg.caption.max_len
        grounded = wants(cfg.caption.ground, bool(info.boxes), "caption.ground", "boxes")
        cfg.caption.ground = "on" if grounded else "off"       # what the checkpoint was trained as
        self.ground = Grounding(cfg, info, self.vocab, self.input) if grounded else None
        length = self.input.length + (self.ground.length if self.ground else 0) + 1 + self.max_len + 1
        self.backbone = build_backbone(cfg, self.vocab, self.input.patch_dim, length, self.input.grid)
        if self.ground:
            self.ground.attach(self)

    # ---- sequences ------------------------------------------------------------------------------------

    def encode_text(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Captions -> (ids (B, 1 + L), labels (B, 1 + L)): the task token, the bytes, the end token, padded
        with end tokens that carry no loss; labels are the next token."""
        cut = [t.encode("utf-8")[:self.max_len].decode("utf-8", errors="ignore").encode("utf-8") for t in texts]
        rows = [[self.task_id] + [self.bytes.start + b for b in t] + [self.end] for t in cut]   # whole characters
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.end, dtype=torch.long)
        labels = torch.full((len(rows), L), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            labels[i, :len(r) - 1] = torch.tensor(r[1:])
        return ids, labels

    def sequence(self, batch: dict, rng: RowRNG | None = None) -> Sequence:
        """Image prefix + task token + caption bytes + end; labels on the caption and its end. Grounded: image
        prefix + the objects (`Grounding.tokens`, labelled) + task token + caption bytes + end."""
        images = batch["image"]
        img = self.input.encode(images)
        texts = list(batch["text"])
        if rng is not None and "captions" in batch:   # several captions per image (COCO): one drawn per step
            draws = rng.rand(len(texts)).tolist()
            texts = [caps[int(u * len(caps))] if caps else t for t, caps, u in zip(texts, batch["captions"], draws,
                                                                                 strict=True)]
        ids, labels = self.encode_text(texts)
        text = tokens(ids.to(images.device), labels.to(images.device))
        if self.ground:
            objs = self.ground.tokens(batch["boxes"], batch["classes"], images)
            return concat(img, objs, text, prefix_len=img.ids.shape[1] + 1)
        return concat(img, text, prefix_len=img.ids.shape[1] + 1)

    def forward(self, batch: dict, rng: RowRNG | None = None) -> tuple[Tensor, dict]:
        loss, _, _ = self.prefix_loss(self.sequence(batch, rng))
        return loss, {"loss": loss.detach()}

    # ---- inference ------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, batch: dict, seed: int = 0) -> dict:
        """``{"captions": [str, ...], "ids": (B, steps)}`` for ``batch["image"]`` (B, C, H, W); greedy unless
        ``caption.temperature`` > 0. Grounded: the objects are detected first (also returned, as
        ``"objects"``: per image ``[{"box", "label"}]``) and the caption is written after them."""
        c = self.cfg.caption
        images = batch["image"]
        prompt, found = self.task_prompt(images, self.task_id), {}
        if self.ground:
            boxes, classes = self.ground.detect(images)
            prompt = self.ground.prompt(self.input.encode(images), boxes, classes, images, self.task_id)
            found = {"objects": self.ground.objects(boxes, classes)}
        params = SamplingParams(temperature=c.temperature, top_p=c.top_p)
        ids = write_bytes(self.backbone, prompt, self.max_len + 1, self.bytes, self.end, params, seed)
        return {"captions": [self.decode(row) for row in ids.tolist()], "ids": ids, **found}   # ids (B, max_len + 1)

    def decode(self, ids: list[int]) -> str:
        """Generated ids -> the caption: bytes up to the first end token, as UTF-8."""
        return read_bytes(ids, self.bytes, self.end)

    def metric(self) -> CaptionMetric:
        return CaptionMetric(self)

    @torch.no_grad()
    def predict_files(self, paths: SequenceOf[str | Path], out: str | Path | None = None,
                      **options: Any) -> list[dict]:
        """Caption image files: ``[{"image": path, "caption": str}]``; with `out` (a directory),
        ``captions.png``: the images with their captions."""
        self.eval()
        results: list[dict] = []
        for i in range(0, len(paths), 64):
            chunk = list(paths[i:i + 64])
            batch = self.read_files(chunk)
            pred = self.predict(batch)
            caps = pred["captions"]
            objs = pred.get("objects", [None] * len(caps))
            results += [{"image": str(p), "caption": c, **({"objects": o} if o is not None else {})}
                        for p, c, o in zip(chunk, caps, objs, strict=True)]
            if out and i == 0:
                Path(out).mkdir(parents=True, exist_ok=True)
                self.captions_png(batch["image"][:16], caps[:16], None, Path(out) / "captions.png")
        return results

    def report(self, out: Path, val_set: ImageSet, metrics: dict, prefix: str = "", **options: Any) -> dict:
        """``{prefix}captions.png``: validation images with the predicted (black) and true (grey) captions."""
        if not len(val_set):
            return {}
        items = [it for it in (val_set[i] for i in range(min(12, len(val_set)))) if it is not None]
        images = torch.stack([it["image"] for it in items]).to(self.device)
        self.eval()
        caps = self.predict({"image": images})["captions"]
        path = self.captions_png(images, caps, [it["text"] for it in items], out / f"{prefix}captions.png")
        return {"captions_png": str(path)}

    def captions_png(self, images: Tensor, predicted: list[str], true: list[str] | None, path: Path) -> Path:
        """A grid of images, each above its predicted caption (and the true one, in grey, where known)."""
        lines = [[(p, "black")] + ([(true[k], "#888888")] if true is not None else [])
                 for k, p in enumerate(predicted)]
        return save_text_grid(path, images, lines, scale=max(1, 128 // self.info.image_size[0]))


class CaptionMetric:
    """Validation loss, BLEU-4 (sacrebleu), CIDEr-D, exact match and same words (the caption's words in any
    order: on digit-scenes, the right digits named, whatever the layout) of greedy captions."""

    def __init__(self, task: Caption) -> None:
        self.task, self.loss_sum, self.n = task, 0.0, 0
        self.predicted: list[str] = []
        self.references: list[str] = []

    def update(self, batch: dict) -> None:
        loss, _ = self.task(batch)
        B = batch["image"].shape[0]
        self.loss_sum += float(loss) * B
        self.n += B
        self.predicted += self.task.predict(batch)["captions"]
        self.references += list(batch["text"])

    def compute(self) -> dict:
        pred, ref = self.predicted, self.references
        m = {"val_loss": self.loss_sum / max(self.n, 1), "n": self.n,
             "exact_match": sum(p == r for p, r in zip(pred, ref, strict=True)) / max(len(ref), 1),
             "same_words": sum(Counter(p.split()) == Counter(r.split()) for p, r in zip(pred, ref, strict=True))
             / max(len(ref), 1),
             "same_numbers": sum(numbers(p) == numbers(r) for p, r in zip(pred, ref, strict=True)) / max(len(ref), 1),
             "cider": cider(pred, [[r] for r in ref])}
        try:
            import sacrebleu
        except ImportError:
            print("patchgpt: BLEU needs sacrebleu (pip install 'patchgpt[text]')", file=sys.stderr)
        else:
            m["bleu4"] = sacrebleu.corpus_bleu(pred, [ref]).score / 100 if pred else 0.0
        return m

    def files(self) -> dict[str, Any]:
        """Every validation caption, predicted and true (``captions.json``)."""
        return {"captions.json": [{"predicted": p, "true": r} for p, r in zip(self.predicted, self.references,
                                                                              strict=True)]}


def numbers(text: str) -> Counter:
    """The numerals a caption names, as a multiset: for ``digit-scenes``, the digits of the scene ("a 3 left of a
    large 7" -> {3, 7}), so ``same_numbers`` is the share of captions that name the right digits."""
    return Counter(re.findall(r"\d+", text))


def _ngrams(text: str, n: int) -> Counter:
    words = text.lower().split()
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _tfidf(text: str, n: int, df: Counter, N: int) -> tuple[dict, float, int]:
    """TF-IDF vector of `text`'s n-grams, its norm and the text's length in words."""
    v = {g: c * math.log(max(1.0, N) / max(1.0, df[g])) for g, c in _ngrams(text, n).items()}
    return v, math.sqrt(sum(x * x for x in v.values())), len(text.split())


def cider(predicted: list[str], references: list[list[str]], n_max: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D over a corpus: for n = 1..4, the cosine of TF-IDF n-gram vectors (document frequencies from the
    references), clipped to the reference counts, with a Gaussian length penalty; averaged over n and
    references, times 10 (as the coco-caption code reports it)."""
    if not predicted:
        return 0.0
    N = len(references)
    score = 0.0
    for n in range(1, n_max + 1):
        df: Counter = Counter()
        for refs in references:
            df.update({g for r in refs for g in _ngrams(r, n)})

        for cand, refs in zip(predicted, references, strict=True):
            vc, nc, lc = _tfidf(cand, n, df, N)
            s = 0.0
            for r in refs:
                vr, nr, lr = _tfidf(r, n, df, N)
                dot = sum(min(vc[g], vr[g]) * vr[g] for g in vc if g in vr)
                if nc and nr:
                    s += dot / (nc * nr) * math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2))
            score += s / len(refs) / n_max
    return 10.0 * score / N
