"""The pictures each task leaves next to its numbers: confusion matrices, next-patch predictions."""

from __future__ import annotations

from pathlib import Path

import torch

from .data.base import ImageSet
from .report import draw_boxes, save_confusion, save_detection_grid, save_grid, save_rows, tensor_to_pil
from .tasks import Classify, Detect, Generate, Pretrain, Task, TrainVQ, VideoClassify, VideoPretrain


def predictions_png(task: Pretrain, images: torch.Tensor, path: Path) -> Path:
    """Originals above the model's causal next-patch (or next-pixel) predictions."""
    pred = task.reconstruct(images)
    scale = max(1, 96 // images.shape[-1])
    return save_rows(path, [("original", images.cpu()), ("predicted", pred.cpu())], scale=scale)


def next_frames_png(task: VideoPretrain, clips: torch.Tensor, path: Path) -> Path:
    """For each clip (B, F, C, H, W): its real frames above the model's (given frames, then predicted ones)."""
    pred = task.predict_frames(clips).cpu()
    k = task.context_slices() * task.input.tok.tubelet
    rows = []
    for b in range(clips.shape[0]):
        rows += [(f"real {b + 1}", clips[b].cpu()), (f"given {k}, pred", pred[b])]
    return save_rows(path, rows, scale=_scale(task))


def clips_png(task: VideoClassify, clips: torch.Tensor, labels: list[int], path: Path) -> Path:
    """One row of frames per clip (B, F, C, H, W), labelled "true: predicted"."""
    pred = task.predict({"video": clips})["pred"].tolist()
    names = task.info.classes
    rows = [(f"{names[y]}: {names[p]}", clips[b].cpu()) for b, (y, p) in enumerate(zip(labels, pred, strict=True))]
    return save_rows(path, rows, scale=_scale(task))


def task_pictures(task: Task, out: Path, metrics: dict, val_set: ImageSet, device) -> list[Path]:
    """Write the task's PNGs into `out` and return their paths."""
    written = []
    if isinstance(task, Classify) and "confusion" in metrics:
        written.append(save_confusion(out / "confusion.png", metrics["confusion"], task.info.classes,
                                      title=f"validation top-1 {metrics['top1']:.3f}"))
    if isinstance(task, VideoClassify) and len(val_set):
        items = [it for it in (val_set[i] for i in range(min(6, len(val_set)))) if it is not None]
        task.eval()
        written.append(clips_png(task, torch.stack([it[0] for it in items]).to(device),
                                 [it[1] for it in items], out / "clips.png"))
    if isinstance(task, VideoPretrain) and len(val_set) and task.input.slices > 1:
        clips = torch.stack([it[0] for it in (val_set[i] for i in range(min(4, len(val_set)))) if it is not None])
        task.eval()
        written.append(next_frames_png(task, clips.to(device), out / "next_frames.png"))
    elif isinstance(task, Pretrain) and not isinstance(task, VideoPretrain) and len(val_set):
        images = torch.stack([val_set[i][0] for i in range(min(8, len(val_set)))
                              if val_set[i] is not None]).to(device)
        task.eval()
        written.append(predictions_png(task, images, out / "predictions.png"))
    if isinstance(task, Generate):
        written.append(samples_png(task, out / "samples.png", val_set))
    if isinstance(task, TrainVQ) and len(val_set):
        images = torch.stack([val_set[i][0] for i in range(min(16, len(val_set)))]).to(device)
        recon = task.predict({"image": images})["recon"]
        psnr = metrics.get("psnr", float("nan"))
        written.append(save_rows(out / "reconstructions.png", [("original", images.cpu()),
                                                               (f"{psnr:.1f} dB", recon.cpu())], scale=_scale(task)))
    if isinstance(task, Detect) and len(val_set):
        written.append(detections_png(task, [val_set[i] for i in range(min(12, len(val_set)))], out / "detections.png",
                                      device))
    return written


def detections_png(task: Detect, items: list, path: Path, device="cpu") -> Path:
    """Validation images with predicted boxes (solid, "class score") over the ground truth (dashed, grey)."""
    items = [it for it in items if it is not None]
    images = torch.stack([it[0] for it in items]).to(device)
    task.eval()
    dets = task.predict({"image": images})["detections"]
    S = task.info.image_size[0]
    scale = max(1, 256 // S)
    panels = []
    for (image, _, target), det in zip(items, dets, strict=True):
        pil = tensor_to_pil(image.cpu(), scale)
        gt = (target["boxes"] * S * scale).tolist()
        pil = draw_boxes(pil, gt, [""] * len(gt), dashed=True, colour="#9e9e9e")
        keep = det["scores"] >= task.cfg.detect.draw_score
        boxes = (det["boxes"][keep] * S * scale).tolist()
        names = [f"{task.info.classes[c]} {s:.2f}" for c, s in zip(det["classes"][keep].tolist(),
                                                                      det["scores"][keep].tolist(), strict=True)]
        panels.append(draw_boxes(pil, boxes, names, det["classes"][keep].tolist()))
    return save_detection_grid(path, panels)


def _scale(task: Task) -> int:
    return max(1, 64 // task.info.image_size[0])


def samples_png(task: Generate, path: Path, val_set: ImageSet | None = None, per_row: int = 8, seed: int = 0,
                **kw) -> Path:
    """A grid of samples: one row per class, per caption (from the validation set), or 4 rows."""
    if task.condition == "class":
        K = min(len(task.info.classes), 16)
        classes = torch.arange(K).repeat_interleave(per_row)
        images = task.generate(len(classes), classes=classes, seed=seed, **kw)
        rows = [(task.info.classes[k], images[k * per_row:(k + 1) * per_row]) for k in range(K)]
        return save_rows(path, rows, scale=_scale(task))
    if task.condition == "text":
        texts: list[str] = []
        for i in range(len(val_set) if val_set is not None else 0):
            item = val_set[i]
            if item is not None and item[2] not in texts:
                texts.append(item[2])
            if len(texts) == 6:
                break
        return prompts_png(task, path, texts, per_row, seed, **kw)
    images = task.generate(4 * per_row, seed=seed, **kw)
    return save_grid(path, images.cpu(), nrow=per_row, scale=_scale(task))


def prompts_png(task: Generate, path: Path, texts: list[str], per_row: int = 8, seed: int = 0, **kw) -> Path:
    """One row of samples per caption, labelled with the caption."""
    images = task.generate(len(texts) * per_row, texts=[t for t in texts for _ in range(per_row)], seed=seed, **kw)
    rows = [(t[:24], images[i * per_row:(i + 1) * per_row]) for i, t in enumerate(texts)]
    return save_rows(path, rows, scale=_scale(task))
