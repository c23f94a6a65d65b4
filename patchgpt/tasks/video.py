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

import torch
from torch import Tensor, nn

from ..config import ConfigError, RunConfig
from ..data.base import DataError, DataInfo
from ..sequence import IGNORE, Sequence, Vocab
from ..tokenizers import Tubelets
from .classify import Classify
from .pretrain import Pretrain, PretrainMetric


class VideoInput(nn.Module):
    """Clips (B, F, C, H, W) -> the backbone's input `Sequence`: one continuous token per T x P x P tubelet,
    positions (time slice, row, col) + 1."""

    kind = "patches"

    def __init__(self, cfg: RunConfig, info: DataInfo, vocab: Vocab) -> None:
        super().__init__()
        if not info.frames:
            raise DataError(f"{cfg.task} needs clips; {cfg.data.spec} has images (use videos:PATH or moving-digits)")
        try:
            self.tok = Tubelets(cfg.tokenizer.tubelet, cfg.tokenizer.patch_size, info.channels, info.frames,
                                tuple(info.image_size), vocab)
        except ValueError as e:
            raise ConfigError(f"{e} (set data.frames, data.image_size, tokenizer.tubelet, tokenizer.patch_size)") \
                from None
        self.grid, self.slices = self.tok.grid, self.tok.slices

    @property
    def patch_dim(self) -> int:
        return self.tok.patch_dim

    @property
    def length(self) -> int:
        """Tokens per clip."""
        return self.tok.num_patches

    def encode(self, video: Tensor) -> Sequence:
        """(B, F, C, H, W) in [-1, 1] -> input `Sequence` (labels IGNORE)."""
        return self.tok.encode(video)


class VideoClassify(Classify):
    """Predict one label per clip (``classify.mode``: finetune|linear|attentive, as for images)."""

    name = "video-classify"
    key = "video"

    def make_input(self, cfg: RunConfig, info: DataInfo) -> nn.Module:
        return VideoInput(cfg, info, self.vocab)


class VideoPretrain(Pretrain):
    """Next-tubelet regression over clips, and next-frame prediction by rolling the predictions out."""

    name = "video-pretrain"
    key = "video"

    def __init__(self, cfg: RunConfig, info: DataInfo) -> None:
        if cfg.pretrain.target != "patches":
            raise ConfigError("video-pretrain regresses tubelets: pretrain.target must be patches")
        super().__init__(cfg, info)

    def make_input(self, cfg: RunConfig, info: DataInfo) -> nn.Module:
        return VideoInput(cfg, info, self.vocab)

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
