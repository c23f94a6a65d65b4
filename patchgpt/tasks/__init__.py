"""Tasks: each turns batches into `Sequence`s, owns its head, loss, config section, metric and pictures.

`TASKS` is the one registry: a new task is one file in this folder and one line here. The helpers below
assemble what the rest of the library needs from it (a run's config with the task's section, a saved task).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .. import checkpoint
from ..config import ConfigError, RunConfig, apply_size
from ..data.base import DataInfo
from .base import Metric, Task, metric_files, next_token_loss
from .caption import Caption
from .classify import Classify
from .detect import Detect
from .generate_image import Generate
from .multi import Multi
from .pretrain import Pretrain
from .restore import Restore
from .segment import Segment
from .video import VideoClassify, VideoPretrain
from .vq import TrainVQ
from .vqa import AnswerQuestions

TASKS: dict[str, type[Task]] = {
    "pretrain": Pretrain,
    "classify": Classify,
    "generate": Generate,
    "vq": TrainVQ,
    "detect": Detect,
    "video-classify": VideoClassify,
    "video-pretrain": VideoPretrain,
    "caption": Caption,
    "vqa": AnswerQuestions,
    "segment": Segment,
    "restore": Restore,
    "multi": Multi,
}


def task_class(name: str) -> type[Task]:
    """The registered task `name`; a one-line `ConfigError` listing the tasks otherwise."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


def sections(name: str) -> dict[str, type]:
    """The config sections task `name` brings (name -> dataclass)."""
    return task_class(name).config_sections()


def default_config(name: str) -> RunConfig:
    """A sensible run of task `name` on a laptop CPU: the shared defaults, the `micro` backbone, the task's
    own section and its recipe (``Task.defaults``)."""
    cfg = RunConfig(task=name, out=f"runs/{name}")
    cfg.sections = {k: typ() for k, typ in sections(name).items()}
    apply_size(cfg, "micro")
    task_class(name).defaults(cfg)
    return cfg


def config_from_dict(d: dict) -> RunConfig:
    """A run's config from its JSON (a checkpoint's, or one a user wrote), with its task's sections."""
    return RunConfig.from_dict(d, sections(d.get("task", "pretrain")))


def info_from_meta(meta: dict) -> DataInfo:
    """What a saved task knew about its data, from its checkpoint's ``config.json``."""
    st = meta["state"]
    parts = {k: info_from_meta({"state": v}) for k, v in st["parts"].items()} if st.get("parts") else None
    return DataInfo(channels=st["channels"], image_size=tuple(st["image_size"]), classes=st["classes"],
                    captions=st.get("captions", False), boxes=st.get("boxes", False),
                    category_ids=st.get("category_ids"), frames=st.get("frames", 0), masks=st.get("masks"),
                    refs=st.get("refs", False), rationales=st.get("rationales", False),
                    parts=parts)


PRECISIONS = ("auto", "fp32", "int8")


def load(path: str | Path, device: str | torch.device = "cpu", precision: str = "auto") -> Task:
    """Rebuild the task saved at `path` (a checkpoint directory, or a run directory: its newest checkpoint) —
    backbone, heads and tokenizer state — in eval mode on `device`. Nothing is downloaded.

    `precision` picks how sampling and decoding (captions, boxes, answers, images) run: ``"fp32"`` exactly;
    ``"int8"`` with int8 weights on the CPU (`patchgpt.quantize`: faster, slightly different numbers);
    ``"auto"`` (the default) int8 on the CPU, fp32 elsewhere. Teacher-forced scores (losses, logits,
    classification, features) are always fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    ckpt = checkpoint.resolve(path)
    meta = checkpoint.read_meta(ckpt)
    if not isinstance(meta, dict) or meta.get("task") not in TASKS:
        task = meta.get("task") if isinstance(meta, dict) else None
        raise checkpoint.CheckpointError(f"{ckpt}: unknown task {task!r} (written by patchgpt "
                                         f"{meta.get('patchgpt', '?') if isinstance(meta, dict) else '?'})")
    try:
        task = TASKS[meta["task"]](config_from_dict(meta["config"]), info_from_meta(meta))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise checkpoint.CheckpointError(f"{ckpt}/config.json: incomplete or edited ({type(e).__name__}: {e}); "
                                         f"it was written by patchgpt {meta.get('patchgpt', '?')}") from None
    checkpoint.load_weights(task, ckpt)
    set_precision(task, precision)
    return task.to(device).eval()


def set_precision(task: nn.Module, precision: str) -> None:
    """Decode `task`'s backbones with int8 weights on the CPU (``"int8"``, ``"auto"``) or in fp32 (``"fp32"``);
    on a GPU int8 is never used (`patchgpt.sampling`)."""
    for m in task.modules():
        if hasattr(m, "decode_int8"):
            m.decode_int8 = precision != "fp32"


__all__ = ["TASKS", "AnswerQuestions", "Caption", "Classify", "Detect", "Generate", "Metric", "Multi", "Pretrain",
           "Restore", "Segment", "Task", "TrainVQ", "VideoClassify", "VideoPretrain", "config_from_dict",
           "PRECISIONS", "default_config", "info_from_meta", "load", "metric_files", "next_token_loss", "sections",
           "set_precision", "task_class"]
