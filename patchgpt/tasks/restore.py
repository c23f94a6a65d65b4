"""Image restoration as a sequence: the corrupted image, a task token, then the clean image written after it.

``restore.kind`` picks the corruption, drawn on the fly from any image source per (seed, step)
(`patchgpt.data.corrupt`): ``denoise`` (Gaussian noise of ``restore.sigma``), ``inpaint`` (a ``box`` or
``free``-form hole; the hole enters as an extra input channel), ``superres`` (``restore.factor``-times
downsampled, then bicubic-upsampled) or ``colorize`` (luminance only).

The corrupted image's patches and the task token are a bidirectional prefix; then one output token per patch
cell, at that cell's grid position, writes the clean patch: a small head regresses it from the token's hidden
state and the corrupted patch under it, as a correction added to that patch (mean-squared error in pixels;
inpainting keeps the known pixels and writes only the hole).
The clean image is written as regressed patches, not colour or VQ tokens: a VQ tokenizer caps the result at
its own reconstruction quality, and colour tokens quantize every pixel to the palette (both measured in
docs/restoration.md); regression in one pass has no such ceiling.

Metrics (scikit-image): PSNR and SSIM of the restored image against the clean one, beside the same scores of
the corrupted input and of a classical baseline of the same kind: Gaussian filtering and non-local means for
denoising, biharmonic filling for inpainting, bicubic upsampling for super-resolution, the luminance for
colourisation. References: Zamir et al. 2022 (Restormer) for the task set; Yu et al. 2019 (DeepFill v2) for
free-form holes; Wang et al. 2004 (SSIM).
"""

from __future__ import annotations

import json
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import ConfigError, RunConfig, check_choices
from ..data.base import DataError, DataInfo, ImageSet
from ..data.corrupt import KINDS, corrupt, luminance, upsample
from ..data.images import load_converted, to_tensor
from ..files import atomic_open, atomic_write_text
from ..report import save_panel_rows, tensor_to_pil
from ..rng import RowRNG
from ..sequence import Sequence, Vocab, concat, tokens
from ..tokenizers.inputs import PixelInput
from ..tokenizers.patches import Patches, grid_positions
from .base import Task, build_backbone, scene_recipe


@dataclass
class RestoreConfig:
    kind: str = "denoise"        # denoise | inpaint | superres | colorize
    sigma: float = 0.1           # denoise: noise std in [0, 1] pixel units
    holes: str = "box"           # inpaint: box | free (brush strokes)
    factor: int = 2              # superres: 2 or 4


class Restore(Task):
    """Write the clean image after a corrupted one: one regressed patch per cell."""

    name = "restore"
    shares_backbone = True
    prompt_words = ("restore", *KINDS, "upscale", "colourise")   # an instance answers its own kind only
    section = "restore"
    Config = RestoreConfig
    output_keys = ("images",)
    metric_keys = ("psnr", "ssim", "psnr_input", "ssim_input")
    best_metric = ("psnr", "max")
    demo_data = "digit-scenes"
    examples = ["patchgpt train restore --data digit-scenes --set restore.kind=denoise --out runs/denoise",
                "patchgpt train restore --data folder:photos --set restore.kind=superres --out runs/sr",
                "patchgpt predict runs/denoise noisy.png --out clean.png"]

    @classmethod
    def defaults(cls, cfg: RunConfig) -> None:
        scene_recipe(cfg)
        cfg.data.augment = False   # the corruption is the augmentation; shifts would only blur the clean target

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        r = cfg.restore
        check_choices({"restore.kind": (r.kind, KINDS), "restore.holes": (r.holes, ("box", "free"))})
        if r.factor not in (2, 4) or not 0 < r.sigma <= 1:
            raise ConfigError(f"restore.factor={r.factor} must be 2 or 4 and restore.sigma={r.sigma} in (0, 1]")
        if cfg.tokenizer.kind != "patches":
            raise ConfigError(f"restore reads and writes patches (tokenizer.kind=patches), not {cfg.tokenizer.kind}")

    def __init__(self, cfg: RunConfig, info: DataInfo, vocab: Vocab | None = None) -> None:
        super().__init__(cfg, info, vocab)
        r = cfg.restore
        self.prompt_words = ("restore", r.kind, *{"superres": ("upscale",), "colorize": ("colourise",)}.get(r.kind, ()))
        if info.frames:
            raise DataError(f"restore works on images; {cfg.data.spec} holds clips")
        if r.kind == "colorize" and info.channels != 3:
            raise DataError(f"restore.kind=colorize needs colour images; {cfg.data.spec} has {info.channels} "
                            "channel(s) (use emoji or folder:PATH)")
        if r.kind == "superres" and min(info.image_size) // r.factor < 2:
            raise DataError(f"restore.factor={r.factor} leaves less than 2 pixels of {info.image_size[0]}-pixel "
                            "images (use a larger data.image_size)")
        self.holes_in = r.kind == "inpaint"    # the hole mask: an extra input channel
        try:                                   # over the corrupted image (and the hole)
            self.input = PixelInput(cfg.tokenizer, info.channels + int(self.holes_in), tuple(info.image_size),
                                    self.vocab, 0, self.token_target(cfg))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        P = cfg.tokenizer.patch_size
        self.out = Patches(P, info.channels, tuple(info.image_size))       # the clean image, in the same cells
        self.task_id = self.vocab.add("task_restore", 1).start
        self.query_id = self.vocab.add("restore_cell", 1).start
        self.N = self.out.num_patches
        self.backbone = build_backbone(cfg, self.vocab, self.input.patch_dim, self.input.length + 1 + self.N,
                                       self.input.grid)
        C, Din, Dout = cfg.model.n_embd, self.input.patch_dim, self.out.patch_dim
        self.head = nn.Sequential(nn.Linear(C + Din, C), nn.GELU(), nn.Linear(C, Dout))
        nn.init.zeros_(self.head[-1].weight)   # starts as the identity: the corrupted patch itself
        nn.init.zeros_(self.head[-1].bias)

    def unused_parameters(self) -> list[str]:
        """The output is regressed patches: the token head is never used."""
        return ["backbone.lm_head.weight"]

    # ---- sequences ------------------------------------------------------------------------------------

    def corrupt(self, images: Tensor, rng: RowRNG) -> tuple[Tensor, Tensor]:
        """(corrupted images (B, C, H, W), the model's input (B, C or C + 1, H, W))."""
        r = self.cfg.restore
        bad, holes = corrupt(images, r.kind, rng, r.sigma, r.holes, r.factor)
        if self.holes_in:
            return bad, torch.cat([bad, holes.to(bad.dtype) * 2 - 1], 1)    # the hole: +1 inside, -1 outside
        return bad, bad

    def sequence(self, batch: dict, rng: RowRNG | None = None) -> Sequence:
        """Corrupted image + task token (prefix) + one output token per cell (labels: none; the loss is on the
        regressed patches)."""
        _, inputs = self.corrupt(batch["image"], rng or eval_rng(0))
        return self._sequence(inputs)

    def _sequence(self, inputs: Tensor) -> Sequence:
        B, dev = inputs.shape[0], inputs.device
        prompt = self.task_prompt(inputs, self.task_id)
        cells = tokens(torch.full((B, self.N), self.query_id, dtype=torch.long, device=dev))
        cells = replace(cells, pos=grid_positions(1, *self.out.grid, device=dev).expand(B, self.N, 3))
        return concat(prompt, cells, prefix_len=prompt.prefix_len)

    def restore(self, inputs: Tensor) -> Tensor:
        """The model's input (B, C_in, H, W) -> restored images (B, C, H, W) in [-1, 1] (unclipped in training)."""
        seq = self._sequence(inputs)
        h = self.backbone(seq)[:, seq.prefix_len:]                                      # (B, N, C)
        patches = seq.patches[:, :self.N]                                                # (B, N, Din) the input's
        bad = inputs[:, :self.info.channels]                                             # (B, C, H, W)
        base = self.out.patchify(bad)                                                    # (B, N, Dout)
        out = self.out.unpatchify(base + self.head(torch.cat([h, patches.to(h.dtype)], -1)))
        if self.holes_in:   # inpainting keeps every known pixel: only the hole is written
            out = torch.where(inputs[:, -1:] > 0, out, bad)
        return out

    def forward(self, batch: dict, rng: RowRNG | None = None) -> tuple[Tensor, dict]:
        clean = batch["image"]
        _, inputs = self.corrupt(clean, rng or eval_rng(0))
        loss = F.mse_loss(self.restore(inputs), clean)
        return loss, {"loss": loss.detach()}

    # ---- inference ------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, batch: dict, rng: RowRNG | None = None) -> dict:
        """``{"images": restored (B, C, H, W), "corrupted": (B, C, H, W), "holes": ...}`` for clean
        ``batch["image"]`` corrupted by the run's kind (``rng``: a fixed one by default), or, where the batch
        gives ``"corrupted"`` itself (the user's files), those images restored."""
        if "corrupted" in batch:
            bad, inputs = batch["corrupted"], batch["inputs"]
        else:
            bad, inputs = self.corrupt(batch["image"], rng or eval_rng(0))
        return {"images": self.restore(inputs).clamp(-1, 1), "corrupted": bad,
                "holes": inputs[:, -1:] > 0 if self.holes_in else None}

    def metric(self) -> RestoreMetric:
        return RestoreMetric(self)

    @torch.no_grad()
    def predict_files(self, paths: SequenceOf[str | Path], out: str | Path | None = None,
                      **options: Any) -> list[dict]:
        """Restore the user's files at their own size, tile by tile (S x S tiles of the training size, the last
        ones padded by reflection): ``[{"image", "size", "restored"}]``. Super-resolution first upsamples the
        file `factor` times (bicubic), colourisation reads its luminance, inpainting needs ``mask`` (a PNG,
        white where pixels are missing). `out`: a file (one input: ``clean.png``) or a directory
        (``NAME_restored.png`` and ``NAME.json`` each); without it nothing is written."""
        self.eval()
        r, C, S = self.cfg.restore, self.info.channels, self.info.image_size[0]
        mask_path = options.get("mask")
        if r.kind == "inpaint" and not mask_path:
            raise ConfigError("inpainting needs the hole: patchgpt predict CKPT IMAGE --mask HOLE.png (white = "
                              "missing)")
        one_file = out is not None and Path(out).suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp")
        if one_file and len(paths) != 1:
            raise ConfigError(f"--out {out} is one file; give one image, or a directory for {len(paths)}")
        results = []
        for p in paths:
            img = to_tensor(load_converted(p, C))[None].to(self.device)                   # (1, C, h, w)
            if r.kind == "superres":
                img = upsample(img, (img.shape[2] * r.factor, img.shape[3] * r.factor))
            if r.kind == "colorize":
                img = luminance(img)
            parts = [img]
            if self.holes_in:
                hole = to_tensor(load_converted(mask_path, 1))[None].to(self.device) > 0  # (1, 1, h', w')
                if hole.shape[-2:] != img.shape[-2:]:
                    raise DataError(f"{mask_path}: mask is {hole.shape[3]}x{hole.shape[2]}, the image {p} is "
                                    f"{img.shape[3]}x{img.shape[2]}")
                img = img.masked_fill(hole, 0.0)
                parts = [img, hole.to(img.dtype) * 2 - 1]
            restored = self._tiled(torch.cat(parts, 1), S)
            res = {"image": str(p), "size": [int(restored.shape[3]), int(restored.shape[2])]}
            if out is not None:
                dest = Path(out) if one_file else Path(out) / f"{Path(p).stem}_restored.png"
                dest.parent.mkdir(parents=True, exist_ok=True)
                with atomic_open(dest) as f:
                    tensor_to_pil(restored[0]).save(f, format="PNG")
                res["restored"] = str(dest)
                if not one_file:
                    atomic_write_text(Path(out) / f"{Path(p).stem}.json", json.dumps(res, indent=2))
            results.append(res)
        return results

    def _tiled(self, inputs: Tensor, S: int) -> Tensor:
        """(1, C_in, h, w) of any size -> (1, C, h, w) restored in S x S tiles (reflect-padded at the edges)."""
        _, _, h, w = inputs.shape
        ph, pw = -h % S, -w % S
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(inputs, (0, pw, 0, ph), mode=mode)                                     # (1, C_in, H', W')
        H, W = x.shape[-2:]
        tiles = x.unfold(2, S, S).unfold(3, S, S)                                        # (1, C_in, nh, nw, S, S)
        nh, nw = tiles.shape[2:4]
        tiles = tiles.permute(0, 2, 3, 1, 4, 5).reshape(nh * nw, -1, S, S)              # (nh*nw, C_in, S, S)
        out = torch.cat([self.restore(tiles[i:i + 64]).clamp(-1, 1) for i in range(0, len(tiles), 64)])
        C = out.shape[1]
        out = out.reshape(nh, nw, C, S, S).permute(2, 0, 3, 1, 4).reshape(1, C, H, W)   # (1, C, nh*S, nw*S)
        return out[..., :h, :w]

    def report(self, out: Path, val_set: ImageSet, metrics: dict, prefix: str = "", **options: Any) -> dict:
        """``{prefix}restored.png``: validation images corrupted, by the classical baseline, restored, and clean."""
        if not len(val_set):
            return {}
        items = [it for it in (val_set[i] for i in range(min(8, len(val_set)))) if it is not None]
        clean = torch.stack([it["image"] for it in items]).to(self.device)
        self.eval()
        pred = self.predict({"image": clean})
        base = baseline(self.cfg.restore.kind, pred["corrupted"], pred["holes"], self.cfg.restore.sigma)
        scale = max(1, 128 // self.info.image_size[0])
        rows = [(name, [tensor_to_pil(x, scale) for x in imgs]) for name, imgs in
                (("corrupted", pred["corrupted"]), (f"baseline ({BASELINES[self.cfg.restore.kind]})", base),
                 ("restored", pred["images"]), ("clean", clean))]
        return {"restored_png": str(save_panel_rows(out / f"{prefix}restored.png", rows))}


BASELINES = {"denoise": "non-local means", "inpaint": "biharmonic", "superres": "bicubic",
             "colorize": "luminance"}


def eval_rng(i: int) -> RowRNG:
    """The fixed corruption draws of validation batch `i` (the same in every evaluation)."""
    return RowRNG(torch.Generator().manual_seed(1_000_003 + i))


def _skimage():
    try:
        import skimage.metrics
        import skimage.restoration
    except ImportError:
        raise ConfigError("restoration metrics need scikit-image: pip install 'patchgpt[restore]'") from None
    return skimage


def to_numpy(images: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) float64 in [0, 1]."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).double().numpy()


def baseline(kind: str, corrupted: Tensor, holes: Tensor | None, sigma: float) -> Tensor:
    """The classical baseline of `kind` (`BASELINES`) applied to corrupted images (B, C, H, W) in [-1, 1]."""
    if kind in ("superres", "colorize"):
        return corrupted                         # the corruption already is bicubic upsampling / the luminance
    sk = _skimage()
    out = []
    for k, x in enumerate(to_numpy(corrupted)):
        if kind == "denoise":
            y = sk.restoration.denoise_nl_means(x, h=0.8 * sigma, sigma=sigma, patch_size=3, patch_distance=5,
                                                channel_axis=-1, fast_mode=True)
        else:
            y = sk.restoration.inpaint_biharmonic(x, holes[k, 0].cpu().numpy(), channel_axis=-1)
        y = np.asarray(y, dtype=np.float32).reshape(x.shape)            # (H, W, C): one channel may come back 2-D
        out.append(torch.from_numpy(y).permute(2, 0, 1) * 2 - 1)
    return torch.stack(out).to(corrupted.device)


def psnr_ssim(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """PSNR (dB) and SSIM of one (H, W, C) image `a` in [0, 1] against the reference `b` (scikit-image; SSIM's
    window shrinks to fit images under 7 pixels; identical images give PSNR inf)."""
    sk = _skimage()
    win = min(7, a.shape[0], a.shape[1])
    win -= 1 - win % 2
    with np.errstate(divide="ignore"):   # identical images: inf, not a warning
        p = float(sk.metrics.peak_signal_noise_ratio(b, a, data_range=1.0))
    s = float(sk.metrics.structural_similarity(b, a, data_range=1.0, channel_axis=-1, win_size=max(win, 3)))
    return p, s


class RestoreMetric:
    """Validation loss, and mean PSNR / SSIM over validation images of the restored images, the corrupted
    inputs and the classical baseline, each against the clean image."""

    def __init__(self, task: Restore) -> None:
        self.task, self.loss_sum, self.n, self.batches = task, 0.0, 0, 0
        self.scores: dict[str, list[tuple[float, float]]] = {"": [], "_input": [], "_baseline": []}

    def update(self, batch: dict) -> None:
        rng = eval_rng(self.batches)
        self.batches += 1
        loss, _ = self.task(batch, eval_rng(self.batches - 1))
        B = batch["image"].shape[0]
        self.loss_sum += float(loss) * B
        self.n += B
        pred = self.task.predict(batch, rng)
        base = baseline(self.task.cfg.restore.kind, pred["corrupted"], pred["holes"], self.task.cfg.restore.sigma)
        clean = to_numpy(batch["image"])
        for key, imgs in (("", pred["images"]), ("_input", pred["corrupted"]), ("_baseline", base)):
            self.scores[key] += [psnr_ssim(a, c) for a, c in zip(to_numpy(imgs), clean, strict=True)]

    def compute(self) -> dict:
        m: dict[str, Any] = {"val_loss": self.loss_sum / max(self.n, 1), "n": self.n,
                             "baseline": BASELINES[self.task.cfg.restore.kind]}
        for key, pairs in self.scores.items():
            finite = [p for p, _ in pairs if np.isfinite(p)]
            m[f"psnr{key}"] = float(np.mean(finite)) if finite else float("inf")
            m[f"ssim{key}"] = float(np.mean([s for _, s in pairs])) if pairs else 0.0
        return m
