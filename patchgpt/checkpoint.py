"""Checkpoints: a directory with ``config.json`` and ``model.safetensors`` (no pickle), written atomically.

A run directory keeps its checkpoints under ``checkpoints/step_NNNNNNN/``. Each is first written in full to
a hidden temporary directory and then renamed into place, so a kill at any moment leaves every visible
checkpoint complete. Training checkpoints also hold ``optimizer.safetensors`` and ``trainer.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import RunConfig
from .data.base import DataInfo

CKPT_DIR = "checkpoints"


class CheckpointError(ValueError):
    """A missing or unreadable checkpoint; the message is one line."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state dict into flat tensors and JSON (param groups, per-param non-tensors)."""
    sd = opt.state_dict()
    tensors, extra = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                extra[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "extra": extra}


def _optimizer_state(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in list(tensors.items()) + list(meta["extra"].items()):
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save(out: str | Path, task: torch.nn.Module, cfg: RunConfig, step: int,
         optimizer: torch.optim.Optimizer | None = None, trainer: dict | None = None, keep: int = 2) -> Path:
    """Write checkpoint ``out/checkpoints/step_{step}`` atomically and prune to the newest `keep`."""
    root = Path(out) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in task.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if optimizer is not None:
        tensors, meta = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", meta)
    if trainer is not None:
        _write_json(tmp / "trainer.json", trainer)
    # config.json last: its presence marks a complete checkpoint even without the rename.
    _write_json(tmp / "config.json", {"patchgpt": __version__, "task": cfg.task, "step": step,
                                      "config": cfg.to_dict(), "state": task.state()})
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        old = root / f".old_{final.name}_{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    for stale in list_checkpoints(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith("step_") and (p / "config.json").is_file()
            and (p / "model.safetensors").is_file()]
    return sorted(done, key=lambda p: p.name)


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest complete checkpoint)."""
    p = Path(path).expanduser()
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1]
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    raise CheckpointError(f"{p}: no complete checkpoint here (expected config.json + model.safetensors)")


def read_meta(path: str | Path) -> dict:
    ckpt = resolve(path)
    try:
        return json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: unreadable ({e})") from None


def info_from_meta(meta: dict) -> DataInfo:
    st = meta["state"]
    return DataInfo(channels=st["channels"], image_size=tuple(st["image_size"]), classes=st["classes"],
                    captions=st.get("captions", False), boxes=st.get("boxes", False),
                    category_ids=st.get("category_ids"), frames=st.get("frames", 0))


def load(path: str | Path, device: str | torch.device = "cpu"):
    """Rebuild the task (backbone, heads, tokenizer state) saved at `path`, in eval mode."""
    from .tasks import TASKS

    ckpt = resolve(path)
    meta = read_meta(ckpt)
    cfg = RunConfig.from_dict(meta["config"])
    if cfg.task not in TASKS:
        raise CheckpointError(f"{ckpt}: unknown task {cfg.task!r}")
    task = TASKS[cfg.task](cfg, info_from_meta(meta))
    load_weights(task, ckpt)
    return task.to(device).eval()


def load_weights(task: torch.nn.Module, ckpt: str | Path) -> None:
    try:
        weights = load_file(str(Path(ckpt) / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types
        raise CheckpointError(f"{ckpt}/model.safetensors: unreadable ({e})") from None
    task.load_state_dict(weights, strict=True)
    for m in task.modules():
        if hasattr(m, "fitted"):
            m.fitted = True


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer) -> dict:
    """Restore the optimizer from `ckpt` and return its trainer.json."""
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    meta = json.loads((ckpt / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_state(tensors, meta))
    return json.loads((ckpt / "trainer.json").read_text())
