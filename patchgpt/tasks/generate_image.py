"""Autoregressive image generation: unconditional, class-conditional and text-conditional.

The sequence is ``[condition] [bos] image tokens`` where the condition is nothing, one class token, or the
caption's bytes (a bidirectional prefix). Image tokens are colour clusters (iGPT, Chen et al. 2020) or learned
VQ codes (VQGAN/LlamaGen style). During training the condition is replaced by the null condition with
probability ``generate.p_uncond``, which enables classifier-free guidance at sampling time (Ho & Salimans
2022; LlamaGen's doubled batch).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..config import ConfigError, RunConfig
from ..data.base import DataInfo, rows
from ..generate import sample
from ..sequence import IGNORE, Sequence, concat, tokens
from ..tokenizers import Bytes, ClassLabel
from .base import ImageInput, Task, build_backbone, next_token_loss


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

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        super().__init__(cfg, info)
        self.condition = resolve_condition(cfg, info)
        if self.condition == "class":
            self.labels = ClassLabel(self.vocab, len(info.classes))
        elif self.condition == "text":
            self.text = Bytes(self.vocab, cfg.generate.text_len)
        self.input = ImageInput(cfg, info, self.vocab)
        self.prefix_len = {"none": 0, "class": 1, "text": cfg.generate.text_len}[self.condition]
        self.backbone = build_backbone(cfg, self.vocab, 0, self.prefix_len + self.input.length, self.input.grid)

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

    def sequence(self, batch: dict, gen: torch.Generator | None = None) -> Sequence:
        images = batch["image"]
        drop = None
        if gen is not None and self.condition != "none" and self.cfg.generate.p_uncond > 0:
            first, total = rows(batch)  # drawn for the global batch: the same drops on any number of processes
            drop = (torch.rand(total, generator=gen) < self.cfg.generate.p_uncond)[first:first + images.shape[0]]
            drop = drop.to(images.device)
        img = self.input.encode(images)                                   # [bos] + image tokens
        labels = torch.full_like(img.ids, IGNORE)
        labels[:, :-1] = img.ids[:, 1:]                                   # bos predicts the first token, ...
        img = Sequence(ids=img.ids, labels=labels, pos=img.pos)
        cond = self.condition_seq(batch, drop)
        return img if cond is None else concat(cond, img, prefix_len=self.prefix_len)

    def forward(self, batch: dict, gen: torch.Generator | None = None) -> tuple[Tensor, dict]:
        seq = self.sequence(batch, gen)
        loss = next_token_loss(self.backbone.logits(self.backbone(seq)), seq)
        return loss, {"loss": loss.detach()}

    # ---- sampling --------------------------------------------------------------------------------------
    def prompt(self, n: int, classes: Tensor | None = None, texts: list[str] | None = None,
               null: bool = False) -> Sequence:
        """Condition prefix (or its null version) followed by the begin token, for `n` rows."""
        dev = self.backbone.wte.weight.device
        bos = tokens(torch.full((n, 1), self.input.bos, dtype=torch.long, device=dev))
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
    def generate(self, n: int, classes: Tensor | None = None, texts: list[str] | None = None,
                 keep: Tensor | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, cfg_scale: float | None = None, seed: int = 0,
                 use_cache: bool = True) -> Tensor:
        """Sample `n` images (n, C, H, W) in [-1, 1].

        Args:
            classes: (n,) class indices for a class-conditional model.
            texts: n captions for a text-conditional model.
            keep: (n, k) image tokens (vocab ids) to keep as given, in raster order (completion).
            temperature, top_k, top_p, cfg_scale: default to the ``generate`` config section.
            seed: seeds the sampler, so the same call gives the same images.
        """
        g = self.cfg.generate
        temperature = g.temperature if temperature is None else temperature
        top_k = g.top_k if top_k is None else top_k
        top_p = g.top_p if top_p is None else top_p
        cfg_scale = g.cfg_scale if cfg_scale is None else cfg_scale
        self.eval()
        N = self.input.tok.num_patches
        dev = self.backbone.wte.weight.device
        prompt = self.prompt(n, classes, texts)
        uncond = self.prompt(n, classes, texts, null=True) if cfg_scale and self.condition != "none" else None
        grid_pos = self.input.encode(torch.zeros(1, self.info.channels, *self.info.image_size, device=dev)).pos[0, 1:]
        k = 0
        if keep is not None:
            k = keep.shape[1]
            kept = Sequence(ids=keep.to(dev), labels=torch.full_like(keep, IGNORE).to(dev),
                            pos=grid_pos[:k].expand(n, k, 3))
            prompt = concat(prompt, kept, prefix_len=prompt.prefix_len)
            if uncond is not None:
                uncond = concat(uncond, kept, prefix_len=uncond.prefix_len)
        gen = torch.Generator(device=dev).manual_seed(seed)
        ids = sample(self.backbone, prompt, N - k, positions=grid_pos[k:], temperature=temperature, top_k=top_k,
                     top_p=top_p, generator=gen, allowed=[self.input.tok.ids], uncond_prompt=uncond,
                     cfg_scale=cfg_scale, use_cache=use_cache)                       # (n, N - k)
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
