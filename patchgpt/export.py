"""``patchgpt export CKPT --format onnx``: a classifier (images -> logits), or any task's backbone as a feature
extractor (images -> token features), as an ONNX file with a dynamic batch, through PyTorch's exporter (the
``[export]`` extra: onnx, onnxscript; onnxruntime to run it)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from .checkpoint import CheckpointError
from .config import ConfigError
from .files import atomic_open
from .tasks import Task, load

WHAT = ("auto", "logits", "features")


class Logits(nn.Module):
    """(B, C, H, W) images in [-1, 1] -> (B, K) class logits: a classifier's own `logits`."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.task = task

    def forward(self, images: Tensor) -> Tensor:
        return self.task.logits(images)


class Features(nn.Module):
    """(B, C, H, W) images in [-1, 1] -> (B, T, C) the backbone's final (normed) token features over the image
    read as a bidirectional prefix: what probes and retrieval read."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.input, self.backbone = task.input, task.backbone

    def forward(self, images: Tensor) -> Tensor:
        seq = self.input.encode(images)
        return self.backbone(seq.with_prefix(seq.ids.shape[1]))                    # (B, T, C)


def export_onnx(ckpt: str | Path, out: str | Path, what: str = "auto", opset: int = 18) -> dict:
    """Write the ONNX file `out` (atomically) for the checkpoint at `ckpt`: ``logits`` (classifiers; the default
    for them) or ``features`` (any task whose input is image patches; the default otherwise). Input
    ``images`` (batch, C, H, W) float32 in [-1, 1], the batch dynamic. Returns what was written."""
    if what not in WHAT:
        raise ConfigError(f"--what {what}: choose one of {', '.join(WHAT)}")
    task = load(ckpt).float().eval()
    if task.info.frames:
        raise ConfigError(f"{ckpt}: export takes image models; this one reads clips")
    if getattr(task.input, "kind", "") != "patches":
        raise ConfigError(f"{ckpt}: export takes models over image patches (tokenizer.kind=patches), not "
                          f"{getattr(task.input, 'kind', '?')} tokens")
    classifier = callable(getattr(task, "logits", None))
    what = ("logits" if classifier else "features") if what == "auto" else what
    if what == "logits" and not classifier:
        raise ConfigError(f"{ckpt}: a {task.name!r} model has no class logits; export --what features")
    module = Logits(task) if what == "logits" else Features(task)
    C, (H, W) = task.info.channels, task.info.image_size
    example = torch.zeros(2, C, H, W)
    batch = torch.export.Dim("batch", min=1, max=4096)
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)   # the exporter's notes on optional torchvision ops are not the user's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example,), dynamo=True, input_names=["images"],
                                        output_names=[what], dynamic_shapes={"images": {0: batch}},
                                        opset_version=opset, external_data=False, verbose=False)
    except ImportError as e:
        raise ConfigError(f"export --format onnx needs onnx and onnxscript: pip install 'patchgpt[export]' ({e})"
                          ) from None
    finally:
        quiet.setLevel(level)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_open(out) as f:
            f.write(program.model_proto.SerializeToString())
    except OSError as e:
        raise CheckpointError(f"{out}: cannot write ({e.strerror or e})") from None
    return {"onnx": str(out), "output": what, "input": ["batch", C, H, W], "classes": task.info.classes
            if what == "logits" else None}
