"""Video tasks: clips as space-time tubelet sequences over the same GPT.

- ``video-classify``: one label per clip; fine-tuning, a linear or an attentive probe, exactly as `Classify`
  does for images (the pooling, probes and metric are inherited; only the input differs).
- ``video-pretrain``: generative pretraining by next-tubelet regression, AIM's objective with its random
  bidirectional prefix (inherited from `Pretrain`), and next-frame prediction: given the first frames, the
  model rolls out the following tubelets one by one through the KV cache, feeding its predictions back.

References: ViViT tubelets (Arnab et al. 2021), VideoMAE (Tong et al. 2022), AIM (El-Nouby et al. 2024),
Moving MNIST next-frame prediction (Srivastava et al. 2015).
"""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError, RunConfig
from ..data.base import ImageSet
from ..report import save_rows
from ..sequence import IGNORE, Sequence
from ..tokenizers.patches import TOKEN_TARGET
from .classify import Classify
from .pretrain import Pretrain, PretrainMetric


def clip_defaults(cfg: RunConfig) -> None:
    """The recipe both video tasks share: moving digits, 4x4 patches over 2-frame tubelets."""
    cfg.data.spec = "moving-digits"
    cfg.tokenizer.patch_size, cfg.tokenizer.tubelet = 4, 2
    cfg.train.lr, cfg.train.steps, cfg.train.warmup = 2e-3, 2000, 50


def check_clips(cfg: RunConfig) -> None:
    if cfg.tokenizer.kind != "patches":
        raise ConfigError(f"{cfg.task} reads clips as tubelets: tokenizer.kind must be patches")


class VideoClassify(Classify):
    """Predict one label per clip (``classify.mode``: finetune|linear|attentive, as for images)."""

    name = "video-classify"
    reads_clips = True
    pretrainer = "video-pretrain"
    augment_by_size = False   # clips keep the image tasks' earlier defaults: 1-pixel shifts, 64 tokens a slice
    demo_data = "moving-digits"
    examples = [
        'patchgpt train video-classify --data videos:~/clips --out runs/clips',
        'patchgpt predict runs/clips clip.mp4',
    ]

    @classmethod
    def defaults(cls, cfg: RunConfig) -> None:
        clip_defaults(cfg)

    @classmethod
    def token_target(cls, cfg: RunConfig) -> int:
        return TOKEN_TARGET

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        super().check(cfg)
        check_clips(cfg)


class VideoPretrain(Pretrain):
    """Next-tubelet regression over clips, and next-frame prediction by rolling the predictions out."""

    name = "video-pretrain"
    reads_clips = True
    pretrainer = "video-pretrain"
    augment_by_size = False
    demo_data = "moving-digits"
    metric_keys = ("next_frames_mse", "repeat_last_frame_mse")
    examples = ["patchgpt train video-pretrain --data moving-digits --out runs/vpre"]

    @classmethod
    def defaults(cls, cfg: RunConfig) -> None:
        clip_defaults(cfg)
        cfg.pretrain.norm_pix = False  # next-frame pictures roll predictions out in pixel space

    @classmethod
    def token_target(cls, cfg: RunConfig) -> int:
        return TOKEN_TARGET

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        if cfg.pretrain.target != "patches":
            raise ConfigError("video-pretrain regresses tubelets: pretrain.target must be patches")
        super().check(cfg)
        check_clips(cfg)

    def context_slices(self) -> int:
        """Time slices given to next-frame prediction: the first half of the clip (at least one)."""
        return max(1, self.input.slices // 2)

    @torch.no_grad()
    def predict_frames(self, video: Tensor, context: int | None = None) -> Tensor:
        """Given the first `context` time slices (default: half the clip), predict the rest.

        Args:
            video: (B, F, C, H, W) clips in [-1, 1]; only the first ``context * tubelet`` frames are read.
            context: given time slices (each ``tokenizer.tubelet`` frames), 1..slices-1.
        Returns:
            (B, F, C, H, W): the given frames, then the predicted ones. Each predicted tubelet is fed back as
            the next input (prefill the context as a bidirectional prefix, then one token per step through
            the KV cache). Models trained with ``pretrain.norm_pix`` predict normalised tubelets; they are
            mapped back with each true tubelet's mean and std, as MAE shows its reconstructions.
        """
        tok = self.input.tok
        context = self.context_slices() if context is None else context
        if not 1 <= context < tok.slices:
            raise ValueError(f"context={context}: choose 1..{tok.slices - 1} time slices")
        seq = self.input.encode(video)
        B, N, _ = seq.patches.shape
        n_ctx = context * tok.per_slice
        pos = seq.pos[0]                                                    # (N, 3)
        prompt = Sequence(ids=seq.ids[:, :n_ctx], labels=seq.labels[:, :n_ctx], pos=seq.pos[:, :n_ctx],
                          patches=seq.patches[:, :n_ctx], is_patch=seq.is_patch[:, :n_ctx], prefix_len=n_ctx)
        cache = self.backbone.new_cache(B, N)
        hidden = self.backbone(prompt, cache=cache)[:, -1]                  # (B, C)
        out = [seq.patches[:, :n_ctx]]
        for j in range(n_ctx, N):
            pred = self.head(hidden)                                        # (B, D)
            if self.cfg.pretrain.norm_pix:
                true = seq.patches[:, j]
                std = true.var(-1, keepdim=True, unbiased=False).add(1e-6).sqrt()
                pred = pred * std + true.mean(-1, keepdim=True)
            pred = pred.clamp(-1, 1)
            out.append(pred[:, None])
            if j + 1 < N:
                step = Sequence(ids=seq.ids[:, j:j + 1], labels=torch.full_like(seq.ids[:, j:j + 1], IGNORE),
                                pos=pos[j:j + 1].expand(B, 1, 3), patches=pred[:, None].to(seq.patches.dtype),
                                is_patch=seq.is_patch[:, j:j + 1])
                hidden = self.backbone(step, cache=cache)[:, -1]
        return tok.unpatchify(torch.cat(out, dim=1))                        # (B, N, D) -> (B, F, C, H, W)

    def metric(self) -> VideoPretrainMetric:
        return VideoPretrainMetric(self)

    @torch.no_grad()
    def predict_files(self, paths: SequenceOf[str | Path], out: str | Path | None = None,
                      **options: Any) -> list[dict]:
        """Each clip's next-tubelet loss and, for clips of two or more time slices, the error of its rolled-out
        second half (``next_frames_mse``); with `out` (a directory), ``next_frames.png``."""
        self.eval()
        clips = self.read_files(paths)["video"]                                 # (B, F, C, H, W)
        results = []
        for i, p in enumerate(paths):
            m = self.metric()
            m.update({"video": clips[i:i + 1]})
            results.append({"video": str(p), **{k: v for k, v in m.compute().items() if k != "val_loss"},
                            "loss": m.compute()["val_loss"]})
        if out and self.input.slices > 1:
            Path(out).mkdir(parents=True, exist_ok=True)
            self.next_frames_png(clips[:4], Path(out) / "next_frames.png")
        return results

    def report(self, out: Path, val_set: ImageSet, metrics: dict, prefix: str = "", **options: Any) -> dict:
        """``next_frames.png``: validation clips above the model's next-frame roll-outs."""
        if not len(val_set) or self.input.slices < 2:
            return {}
        clips = torch.stack([it["video"] for it in (val_set[i] for i in range(min(4, len(val_set))))
                             if it is not None])
        path = self.next_frames_png(clips.to(self.device), out / f"{prefix}next_frames.png")
        return {"next_frames_png": str(path)}

    def next_frames_png(self, clips: Tensor, path: Path) -> Path:
        """For each clip (B, F, C, H, W): its real frames above the model's (given frames, then predicted)."""
        self.eval()
        pred = self.predict_frames(clips).cpu()
        k = self.context_slices() * self.input.tok.tubelet
        rows = []
        for b in range(clips.shape[0]):
            rows += [(f"real {b + 1}", clips[b].cpu()), (f"given {k}, pred", pred[b])]
        return save_rows(path, rows, scale=max(1, 64 // self.info.image_size[0]))


class VideoPretrainMetric(PretrainMetric):
    """Validation next-tubelet loss, and next-frame prediction error: the mean squared error of the rolled-out
    second half of each clip, against the naive forecast that repeats the last given frame."""

    def __init__(self, task: VideoPretrain) -> None:
        super().__init__(task)
        self.se, self.se_copy, self.n_px = 0.0, 0.0, 0

    def update(self, batch: dict) -> None:
        super().update(batch)
        video = batch["video"]
        task: VideoPretrain = self.task  # type: ignore[assignment]
        if task.input.slices < 2:
            return
        k = task.context_slices() * task.input.tok.tubelet                 # given frames
        pred = task.predict_frames(video)[:, k:]
        true = video[:, k:]
        self.se += float((pred - true).pow(2).sum())
        self.se_copy += float((video[:, k - 1:k] - true).pow(2).sum())
        self.n_px += true.numel()

    def compute(self) -> dict:
        m = super().compute()
        if self.n_px:
            m["next_frames_mse"] = self.se / self.n_px
            m["repeat_last_frame_mse"] = self.se_copy / self.n_px
        return m
