"""Autoregressive image generation: unconditional, class-conditional and text-conditional.

The sequence is ``[condition] [bos] image tokens`` where the condition is nothing, one class token, or the
caption's bytes (a bidirectional prefix): whatever data carries captions (``item["text"]``: a folder's
``metadata.jsonl``, ``coco-captions:``, ``emoji``) trains a text-to-image model, and ``patchgpt sample --prompt``
draws from any new caption. Only a caption's first ``generate.text_len`` bytes condition the model (a warning
says when captions or prompts are longer). Image tokens are colour clusters (iGPT, Chen et al. 2020) or learned
VQ codes (VQGAN/LlamaGen style). During training the condition is replaced by the null condition with
probability ``generate.p_uncond``, which enables classifier-free guidance at sampling time (Ho & Salimans
2022; LlamaGen's doubled batch).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from ..config import ConfigError, RunConfig, check_choices, check_ranges
from ..data import load_image
from ..data.base import DataInfo, ImageSet
from ..report import save_grid, save_rows
from ..rng import RowRNG
from ..sampling import SamplingParams, sample
from ..sequence import IGNORE, Sequence, concat, tokens
from ..tokenizers import Bytes, ClassLabel
from ..tokenizers.patches import grid_positions
from .base import Task, build_backbone, next_token_loss
from .compose import compose_report
from .detect import DetectConfig
from .ground import wants
from .layout import BoxLayout


@dataclass
class GenerateConfig:
    condition: str = "auto"      # auto (captions -> text, labels -> class, else none) | none | class | text
    p_uncond: float = 0.1        # training: drop the condition to the null token this often (for guidance)
    text_len: int = 32           # caption bytes kept (padded/truncated)
    temperature: float = 1.0     # sampling defaults (CLI flags override)
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 0.0       # guidance: logits = cond + s * (cond - uncond); 0 = plain conditional
    layout: str = "off"          # text-to-image: write the objects' boxes (and their class map) before the
                                 # image: on | off | auto (when the data have captions and boxes); tasks/layout.py


def resolve_condition(cfg: RunConfig, info: DataInfo) -> str:
    """The conditioning the data supports: captions -> text, labels -> class, neither -> none."""
    want = cfg.generate.condition
    if want == "auto":
        return "text" if info.captions else "class" if info.classes else "none"
    if want == "text" and not info.captions:
        raise ConfigError(f"generate.condition=text needs captions; {cfg.data.spec} has none")
    if want == "class" and not info.classes:
        raise ConfigError(f"generate.condition=class needs labels; {cfg.data.spec} has none")
    return want


class Generate(Task):
    """Next-token prediction of discrete image tokens after an optional condition prefix."""

    name = "generate"
    prompt_words = ("draw", "generate", "sample")
    section = "generate"
    Config = GenerateConfig
    output_keys = ("nll", "loss")
    metric_keys = ("bits_per_dim",)
    best_metric = ("bits_per_dim", "min")
    examples = [
        'patchgpt train generate --data digits --set generate.condition=class --out runs/gen',
        'patchgpt sample runs/gen --class 7 --n 16 --cfg 1.5 --out sevens.png',
        'patchgpt complete runs/gen digit.png --class 3 --keep 0.5 --out completion.png',
        'patchgpt eval runs/gen --judge runs/cls',
    ]

    @classmethod
    def defaults(cls, cfg: RunConfig) -> None:
        cfg.tokenizer.kind, cfg.tokenizer.n_colors = "colors", 16
        cfg.train.lr, cfg.train.steps, cfg.train.warmup = 1e-3, 3000, 100
        cfg.data.augment = False  # a shifted digit is a different image to generate

    @classmethod
    def config_sections(cls) -> dict[str, type]:
        """``generate``, and ``detect`` for the boxes of a layout-first model (``detect.bins``, ...)."""
        return {"generate": GenerateConfig, "detect": DetectConfig}

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        g = cfg.generate
        check_choices({"generate.condition": (g.condition, ("auto", "none", "class", "text"))})
        check_ranges({"generate.p_uncond": (g.p_uncond, "[0, 1]"), "generate.text_len": (g.text_len, "[1, inf)"),
                      "generate.temperature": (g.temperature, "[0, inf)"), "generate.top_k": (g.top_k, "[0, inf)"),
                      "generate.top_p": (g.top_p, "(0, 1]"), "generate.cfg_scale": (g.cfg_scale, "[-inf, inf]")})
        if cfg.tokenizer.kind == "patches":
            raise ConfigError("generate needs discrete image tokens: tokenizer.kind=colors or vq")

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        self.condition = resolve_condition(cfg, info)
        if self.condition == "class":
            self.labels = ClassLabel(self.vocab, len(info.classes))
        elif self.condition == "text":
            self.text = Bytes(self.vocab, cfg.generate.text_len)
        self.input = self.make_input()
        self.prefix_len = {"none": 0, "class": 1, "text": cfg.generate.text_len}[self.condition]
        # layout first: captions and boxes -> the objects, their class map, then the image (tasks/layout.py)
        layout = wants(cfg.generate.layout, bool(info.boxes and self.condition == "text"), "generate.layout",
                       "captions and boxes (generate.condition=text)")
        cfg.generate.layout = "on" if layout else "off"                      # what the checkpoint was trained as
        self.layout = BoxLayout(cfg, info, self.vocab, self.input) if layout else None
        self.last_objects: list[list[dict]] = []   # layout first: the objects the last `sample_images` drew
        length = self.prefix_len + (self.layout.length if self.layout else 0) + self.input.length
        self.backbone = build_backbone(cfg, self.vocab, 0, length, self.input.grid)
        if self.layout:
            self.layout.attach(self)

    @property
    def grid_pos(self) -> Tensor:
        """(N, 3) grid positions (frame, row, col) + 1 of the image tokens, raster order."""
        return grid_positions(1, *self.input.grid)

    def state(self) -> dict:
        extra = {"boxes": True, "category_ids": self.info.category_ids} if self.layout else {}
        return {**super().state(), **extra}

    def fit(self, train_set: ImageSet, seed: int = 0) -> None:
        """Fits the image tokenizer (`Task.fit`); for a text-conditional model, warns (one line) when captions
        among the first 64 training items are longer than ``generate.text_len`` bytes, which are all it reads."""
        super().fit(train_set, seed)
        if self.condition == "text":
            items = (islice(iter(train_set), 64) if isinstance(train_set, IterableDataset)    # shards: a stream
                     else (train_set[i] for i in range(min(len(train_set), 64))))
            self.warn_long([it["text"] for it in items if it is not None], "first training captions")

    def warn_long(self, texts: list[str], what: str) -> None:
        """One warning line if any of `texts` is longer than the ``generate.text_len`` bytes the model reads."""
        n = self.cfg.generate.text_len
        long = [t for t in texts if len(t.encode("utf-8")) > n]
        if long:
            longest = max(long, key=lambda t: len(t.encode("utf-8")))
            print(f"patchgpt: warning: {len(long)} of {len(texts)} {what} exceed generate.text_len={n} bytes (e.g. "
                  f"{longest[:48]!r}, {len(longest.encode('utf-8'))} bytes); only their first {n} bytes condition "
                  f"the generator (raise generate.text_len when training)", file=sys.stderr)

    # ---- sequences -------------------------------------------------------------------------------------
    def condition_seq(self, batch: dict, drop: Tensor | None = None) -> Sequence | None:
        """The condition prefix for a batch; rows where `drop` is True get the null condition."""
        B = batch["image"].shape[0] if "image" in batch else len(batch.get("text") or batch["label"])
        dev = self.backbone.wte.weight.device
        if self.condition == "class":
            labels = batch["label"].to(dev)
            if drop is not None:
                labels = torch.where(drop, torch.full_like(labels, -1), labels)
            return self.labels.encode(labels)
        if self.condition == "text":
            texts = list(batch["text"])
            if drop is not None:
                texts = ["" if d else t for d, t in zip(drop.tolist(), texts, strict=True)]
            return self.text.encode(texts, dev)
        _ = B
        return None

    def sequence(self, batch: dict, rng: RowRNG | None = None) -> Sequence:
        """``[condition] [bos] image tokens`` with next-token labels on the image; with `rng`, conditions are
        dropped to the null condition with probability ``generate.p_uncond`` (for guidance)."""
        images = batch["image"]
        drop = None
        if rng is not None and self.condition != "none" and self.cfg.generate.p_uncond > 0:
            drop = (rng.rand(images.shape[0]) < self.cfg.generate.p_uncond).to(images.device)
        img = self.input.encode(images)                                   # [bos] + image tokens
        labels = torch.full_like(img.ids, IGNORE)
        labels[:, :-1] = img.ids[:, 1:]                                   # bos predicts the first token, ...
        img = Sequence(ids=img.ids, labels=labels, pos=img.pos)
        cond = self.condition_seq(batch, drop)
        if self.layout:   # caption, then the objects (labelled) and their class map, then the image
            lay = self.layout.tokens(batch["boxes"], batch["classes"], images.device, drop)
            return concat(cond, lay, img, prefix_len=self.prefix_len)
        return img if cond is None else concat(cond, img, prefix_len=self.prefix_len)

    def forward(self, batch: dict, rng: RowRNG | None = None) -> tuple[Tensor, dict]:
        seq = self.sequence(batch, rng)
        loss = next_token_loss(self.backbone.logits(self.backbone(seq)), seq)
        return loss, {"loss": loss.detach()}

    # ---- sampling --------------------------------------------------------------------------------------
    def prompt(self, n: int, classes: Tensor | None = None, texts: list[str] | None = None,
               null: bool = False, layout: Sequence | None = None) -> Sequence:
        """Condition prefix (or its null version) [and the `layout` part] followed by the begin token, for `n`
        rows."""
        dev = self.backbone.wte.weight.device
        bos = tokens(torch.full((n, 1), self.input.bos, dtype=torch.long, device=dev))
        if layout is not None:
            bos = concat(layout, bos)
        if self.condition == "class":
            if classes is None:
                raise ValueError("this model is class-conditional: give classes")
            c = torch.full((n,), -1, device=dev) if null else classes.to(dev)
            return concat(self.labels.encode(c), bos, prefix_len=1)
        if self.condition == "text":
            if texts is None:
                raise ValueError("this model is text-conditional: give prompts")
            return concat(self.text.encode([""] * n if null else texts, dev), bos, prefix_len=self.prefix_len)
        return bos

    @torch.no_grad()
    def sample_images(self, n: int, classes: Tensor | None = None, texts: list[str] | None = None,
                 keep: Tensor | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, cfg_scale: float | None = None, seed: int = 0) -> Tensor:
        """Sample `n` images (n, C, H, W) in [-1, 1].

        Args:
            classes: (n,) class indices for a class-conditional model.
            texts: n captions for a text-conditional model.
            keep: (n, k) image tokens (vocab ids) to keep as given, in raster order (completion).
            temperature, top_k, top_p, cfg_scale: default to the ``generate`` config section.
            seed: seeds the sampler, so the same call gives the same images.
        A layout-first model draws the objects first and keeps them in ``last_objects`` (per image
        ``[{"box", "label"}]``).
        """
        g = self.cfg.generate
        temperature = g.temperature if temperature is None else temperature
        top_k = g.top_k if top_k is None else top_k
        top_p = g.top_p if top_p is None else top_p
        cfg_scale = g.cfg_scale if cfg_scale is None else cfg_scale
        self.eval()
        N = self.input.tok.num_patches
        dev = self.backbone.wte.weight.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale)
        guided = bool(cfg_scale) and self.condition != "none"
        layout = null_layout = None
        if self.layout:   # the objects first, drawn from the caption; then their class map
            if texts is None:
                raise ValueError("this model is text-conditional: give prompts")
            cond, null = self.text.encode(texts, dev), self.text.encode([""] * n, dev)
            boxes, labels = self.layout.sample(cond, params, gen, null if guided else None)
            self.last_objects = self.layout.objects_of(boxes, labels)
            layout = self.layout.tokens(boxes, labels, dev)
            null_layout = self.layout.tokens(boxes, labels, dev, drop=torch.ones(n, dtype=torch.bool))
        prompt = self.prompt(n, classes, texts, layout=layout)
        uncond = self.prompt(n, classes, texts, null=True, layout=null_layout) if guided else None
        grid_pos = self.grid_pos.to(dev)
        k = 0
        if keep is not None:
            k = keep.shape[1]
            kept = Sequence(ids=keep.to(dev), labels=torch.full_like(keep, IGNORE).to(dev),
                            pos=grid_pos[:k].expand(n, k, 3))
            prompt = concat(prompt, kept, prefix_len=prompt.prefix_len)
            if uncond is not None:
                uncond = concat(uncond, kept, prefix_len=uncond.prefix_len)
        ids = sample(self.backbone, prompt, N - k, params, positions=grid_pos[k:], generator=gen,
                     allowed=[self.input.tok.ids], uncond_prompt=uncond)                # (n, N - k)
        if keep is not None:
            ids = torch.cat([keep.to(dev), ids], dim=1)
        return self.input.tok.decode(ids)

    @torch.no_grad()
    def predict(self, batch: dict) -> dict:
        """Per-image negative log-likelihood: {"nll": (B,) nats per image, "loss": mean nats per token}."""
        seq = self.sequence(batch)
        logits = self.backbone.logits(self.backbone(seq)).float()
        B, T, V = logits.shape
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, V), seq.labels.reshape(-1),
                                                ignore_index=IGNORE, reduction="none").reshape(B, T)
        return {"nll": nll.sum(1), "loss": next_token_loss(logits, seq)}

    def metric(self) -> GenerateMetric:
        return GenerateMetric(self)

    # ---- the user's side: files, pictures, judging -------------------------------------------------------

    @torch.no_grad()
    def predict_files(self, paths: SequenceOf[str | Path], out: str | Path | None = None, label: int = 0,
                      text: str = "", **options: Any) -> list[dict]:
        """How likely the model finds each image: ``[{"image", "nll" (nats), "bits_per_dim"}]``, under the
        condition `label` or `text` where the model is conditional."""
        self.eval()
        images = self.read_files(paths)["image"]
        B = images.shape[0]
        batch = {"image": images, "label": torch.full((B,), label, dtype=torch.long, device=images.device),
                 "text": [text] * B}
        nll = self.predict(batch)["nll"].cpu()
        dims = self.info.channels * self.info.image_size[0] * self.info.image_size[1]
        return [{"image": str(p), "nll": float(v), "bits_per_dim": float(v) / (dims * math.log(2))}
                for p, v in zip(paths, nll, strict=True)]

    def ask_file(self, image: str | Path | None, out: Path, **options: Any) -> dict:
        """``ask``: "draw: TEXT" (or "draw" for an unconditional model) samples 4 images into
        ``out/samples.png`` (TEXT: a caption, or a class name of a class-conditional model); a bare prompt
        with an image scores the image (`predict_files`)."""
        text = options.get("text")
        if text is None and image is not None:
            return super().ask_file(image, out, **options)
        n = 4
        kw = {"prompts": [text]} if self.condition == "text" else {"classes": [text]} if text else {}
        path = self.sample_png(out / "samples.png", n=n, **kw)
        return {"samples": str(path), "prompt": text or "", "n": n}

    def report(self, out: Path, val_set: ImageSet, metrics: dict, prefix: str = "", judge: Task | None = None,
               per_class: int = 20, **kw: Any) -> dict:
        """``{prefix}samples.png`` (a row per class, per validation caption, or 4 rows); with a `judge` (a
        classifier of the same classes), the share of class-conditional samples it assigns to the class asked
        for, and ``{prefix}judged_samples.png``; with a detector as the judge (of a text-conditional model of
        digit-scenes captions), the compositional check (`compose.compose_report`: ``compose_*`` metrics,
        `per_class` samples per held-out caption, ``{prefix}compose.png``). `kw`: sampling settings
        (cfg_scale, temperature ...)."""
        kw = {k: v for k, v in kw.items() if k in ("temperature", "top_k", "top_p", "cfg_scale")}
        res: dict = {"samples_png": str(self.samples_png(out / f"{prefix}samples.png", val_set, **kw))}
        if judge is not None and judge.info.boxes:   # a detector: the compositional check
            res.update(compose_report(self, judge, out / f"{prefix}compose.png", val_set, per_caption=per_class,
                                      **kw))
        elif judge is not None and self.condition == "class":
            r = judge_accuracy(self, judge, per_class=per_class, **kw)
            K = len(self.info.classes)
            rows = [(self.info.classes[k], r["samples"][r["requested"] == k][:10]) for k in range(K)]
            res["judged_png"] = str(save_rows(out / f"{prefix}judged_samples.png", rows, scale=self.scale))
            res.update({k: v for k, v in r.items() if k.startswith("judge")})
        return res

    @property
    def scale(self) -> int:
        """Pixel magnification of pictures (small images are drawn larger)."""
        return max(1, 64 // self.info.image_size[0])

    def samples_png(self, path: Path, val_set: ImageSet | None = None, per_row: int = 8, seed: int = 0,
                    **kw: Any) -> Path:
        """A grid of samples: one row per class, per caption (from the validation set), or 4 rows."""
        if self.condition == "class":
            K = min(len(self.info.classes), 16)
            classes = torch.arange(K).repeat_interleave(per_row)
            images = self.sample_images(len(classes), classes=classes, seed=seed, **kw)
            rows = [(self.info.classes[k], images[k * per_row:(k + 1) * per_row]) for k in range(K)]
            return save_rows(path, rows, scale=self.scale)
        if self.condition == "text":
            texts: list[str] = []
            for i in range(len(val_set) if val_set is not None else 0):
                item = val_set[i]
                if item is not None and item["text"] not in texts:
                    texts.append(item["text"])
                if len(texts) == 6:
                    break
            return self.prompts_png(path, texts, per_row, seed, **kw)
        images = self.sample_images(4 * per_row, seed=seed, **kw)
        return save_grid(path, images.cpu(), nrow=per_row, scale=self.scale)

    def prompts_png(self, path: Path, texts: list[str], per_row: int = 8, seed: int = 0, **kw: Any) -> Path:
        """One row of samples per caption, labelled with the caption."""
        images = self.sample_images(len(texts) * per_row, texts=[t for t in texts for _ in range(per_row)],
                                    seed=seed, **kw)
        rows = [(t[:24], images[i * per_row:(i + 1) * per_row]) for i, t in enumerate(texts)]
        return save_rows(path, rows, scale=self.scale)

    def class_indices(self, names: list[str] | None) -> list[int]:
        """Class names or indices -> indices (all classes for None); a one-line error for an unknown one."""
        known = self.info.classes or []
        if not names:
            return list(range(len(known)))
        out = []
        for n in names:
            if n in known:
                out.append(known.index(n))
            elif n.isdigit() and int(n) < len(known):
                out.append(int(n))
            else:
                raise ConfigError(f"--class {n}: unknown; the classes are {', '.join(known)}")
        return out

    def check_conditions(self, classes: list[str] | None, prompts: list[str] | None, n: int) -> None:
        """One-line errors for conditions this model cannot read (a caption for a class-conditional model, a
        class for a text-conditional one) and for a sample count below 1."""
        if n < 1:
            raise ConfigError(f"--n {n}: samples per class or prompt must be >= 1")
        if self.condition == "class" and prompts:
            raise ConfigError("this model is class-conditional: give --class NAME, not --prompt")
        if self.condition == "text" and classes:
            raise ConfigError("this model is text-conditional: give --prompt TEXT, not --class")
        if self.condition == "none" and (classes or prompts):
            raise ConfigError("this model is unconditional: drop --class/--prompt")
        if self.condition == "text" and prompts:
            self.warn_long(prompts, "--prompt captions")

    def sample_png(self, path: str | Path, classes: list[str] | None = None, prompts: list[str] | None = None,
                   n: int = 8, **kw: Any) -> Path:
        """``patchgpt sample``: `n` samples per requested class or prompt (or `n` unconditional) as a PNG grid."""
        self.check_conditions(classes, prompts, n)
        if self.condition == "text":
            if not prompts:
                raise ConfigError("this model is text-conditional: give --prompt TEXT")
            return self.prompts_png(Path(path), prompts, n, **kw)
        if self.condition == "class":
            ks = self.class_indices(classes)
            images = self.sample_images(len(ks) * n, classes=torch.tensor(ks).repeat_interleave(n), **kw).cpu()
            rows = [(self.info.classes[k], images[i * n:(i + 1) * n]) for i, k in enumerate(ks)]
            return save_rows(path, rows, scale=self.scale)
        return save_grid(path, self.sample_images(n, **kw).cpu(), nrow=min(n, 8), scale=self.scale)

    def complete_png(self, image_path: str | Path, path: str | Path, keep: float = 0.5,
                     classes: list[str] | None = None, prompts: list[str] | None = None, n: int = 8,
                     **kw: Any) -> Path:
        """``patchgpt complete``: keep the first `keep` of an image's tokens (raster order), sample the rest
        `n` times; a PNG of the given part, the completions and the original."""
        self.check_conditions(classes, prompts, n)
        if not 0 < keep < 1:
            raise ConfigError(f"--keep {keep}: the fraction of tokens kept must be in (0, 1)")
        if len(classes or []) > 1 or len(prompts or []) > 1:
            raise ConfigError("complete draws every completion under one condition: give one --class or --prompt")
        C, (H, W) = self.info.channels, self.info.image_size
        dev = self.backbone.wte.weight.device
        image = load_image(image_path, C, H, self.cfg.data.resize)[None].to(dev)      # (1, C, H, W)
        ids = self.input.encode(image).ids[:, 1:]                                       # (1, N) without bos
        N = ids.shape[1]
        k = max(1, min(N - 1, round(keep * N)))
        cond: dict = {}
        if self.condition == "class":
            if not classes:
                raise ConfigError("this model is class-conditional: give --class")
            cond["classes"] = torch.tensor(self.class_indices(classes)[:1] * n)
        elif self.condition == "text":
            if not prompts:
                raise ConfigError("this model is text-conditional: give --prompt")
            cond["texts"] = [prompts[0]] * n
        out = self.sample_images(n, keep=ids[:, :k].expand(n, k), **cond, **kw).cpu()
        # The kept tokens' pixels are pasted back from the original, so the given part is exact.
        h, w = self.input.tok.grid
        keep_mask = (torch.arange(h * w) < k).float().reshape(1, 1, h, w)
        keep_mask = torch.nn.functional.interpolate(keep_mask, size=(H, W), mode="nearest")  # (1, 1, H, W)
        image = image.cpu()
        out = out * (1 - keep_mask) + image * keep_mask
        given = image * keep_mask
        return save_rows(path, [("given", given), ("completions", out), ("original", image)], scale=self.scale)


@torch.no_grad()
def judge_accuracy(task: Generate, judge: Task, per_class: int = 20, seed: int = 0, **kw: Any) -> dict:
    """Sample `per_class` images of every class and report how often the judge (an independently trained
    classifier of the same classes) agrees with the request: a classifier-based proxy in the spirit of the
    Inception Score's conditional term."""
    if task.condition != "class":
        raise ConfigError("judge accuracy needs a class-conditional model")
    if judge.info.classes != task.info.classes:
        raise ConfigError(f"the judge's classes {judge.info.classes} differ from {task.info.classes}")
    K = len(task.info.classes)
    want = torch.arange(K).repeat_interleave(per_class)                       # (K * per_class,)
    images = task.sample_images(len(want), classes=want, seed=seed, **kw)
    pred = judge.predict({"image": images.to(judge.device)})["pred"].cpu()
    per = [(pred[want == k] == k).float().mean().item() for k in range(K)]
    return {"judge_accuracy": float((pred == want).float().mean()), "judge_per_class":
            dict(zip(task.info.classes, per, strict=True)), "samples": images.cpu(), "requested": want}


class GenerateMetric:
    """Validation NLL: nats per token and bits per dimension (per sub-pixel, as in iGPT/PixelCNN)."""

    def __init__(self, task: Generate) -> None:
        self.task, self.nll, self.n = task, 0.0, 0
        C, (H, W) = task.info.channels, task.info.image_size
        self.dims, self.tokens = C * H * W, task.input.tok.num_patches

    def update(self, batch: dict) -> None:
        out = self.task.predict(batch)
        self.nll += float(out["nll"].sum())
        self.n += out["nll"].shape[0]

    def compute(self) -> dict:
        per_image = self.nll / max(1, self.n)
        return {"val_loss": per_image / self.tokens, "bits_per_dim": per_image / (self.dims * math.log(2)),
                "n": self.n}
