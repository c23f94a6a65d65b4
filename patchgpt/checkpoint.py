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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .version import __version__

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


def _optimizer_tensors(sd: dict) -> tuple[dict, dict]:
    """Split an optimizer state dict into flat tensors and JSON (param groups, per-param non-tensors).

    Parameters are keyed by index (``opt.state_dict()``) or by name (FSDP's full state dict)."""
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
        pid, k = key.rsplit(".", 1)  # the state's own keys (step, exp_avg, ...) have no dots
        state.setdefault(int(pid) if pid.isdigit() else pid, {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def step_dir(out: str | Path, step: int) -> Path:
    """Where checkpoint `step` of run `out` lives."""
    return Path(out) / CKPT_DIR / f"step_{step:07d}"


def save(out: str | Path, task: torch.nn.Module, cfg, step: int,
         optimizer: torch.optim.Optimizer | None = None, trainer: dict | None = None, keep: int = 2,
         full: dict | None = None, extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write checkpoint ``out/checkpoints/step_{step}`` atomically and prune this run's to the newest `keep`.

    Stages: a fresh hidden temp dir, the weights, the optimizer, ``trainer.json``, ``config.json``, fsync,
    then one rename; a kill or error before the rename leaves only the temp dir, which readers ignore and
    the next save of a run sweeps away. `full` holds gathered FSDP state dicts (``model``, ``optimizer``)
    to write instead of the module's and the optimizer's own. `task` provides ``state_dict()`` and ``state()``
    (JSON saved beside the weights); `cfg` provides ``task`` and ``to_dict()``. Pruning removes only
    checkpoints of the same run (``trainer["run"]``), never another run's. `extra` maps more safetensors
    file names to tensors (the trained weights under an EMA, ``trained.safetensors``). A failed write (a
    full disk) leaves no temp dir behind and is one `CheckpointError`."""
    root = Path(out) / CKPT_DIR
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"{root}: cannot create ({e.strerror or e})") from None
    final = step_dir(out, step)
    for stale in root.glob(".tmp_step_*"):  # left by a killed or failed save (only rank 0 writes)
        shutil.rmtree(stale, ignore_errors=True)
    for old in root.glob(".old_step_*"):  # a replaced checkpoint: put back if its successor never arrived
        if (root / _step_name(old)).exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(root / _step_name(old))
    tmp = root / f".tmp_step_{step:07d}_{os.getpid()}"
    try:
        _write(tmp, task, cfg, step, optimizer, trainer, full, extra)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint step {step} in {root} ({e.strerror or e}); "
                              "the previous checkpoints are intact") from None
    _swap_in(tmp, final)
    run = (trainer or {}).get("run")
    mine = [c for c in list_checkpoints(out) if _run_of(c) == run]
    for stale in mine[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename the staged directory `tmp` to `final`; an existing `final` is set aside as ``.old_NAME_PID`` first
    (readers and the next save put it back if a kill lands between the two renames), then removed."""
    if final.exists():
        old = final.parent / f".old_{final.name}_{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


def _run_of(ckpt: Path) -> str | None:
    try:
        return json.loads((ckpt / "trainer.json").read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None


def _write(tmp: Path, task: torch.nn.Module, cfg, step: int, optimizer: torch.optim.Optimizer | None,
           trainer: dict | None, full: dict | None, extra: dict[str, dict[str, torch.Tensor]] | None = None
           ) -> None:
    """Every file of a checkpoint into the fresh directory `tmp`, fsynced; config.json last."""
    tmp.mkdir()
    sd = full["model"] if full is not None else task.state_dict()
    weights = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if optimizer is not None:
        tensors, meta = _optimizer_tensors(full["optimizer"] if full is not None else optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        _write_json(tmp / "optimizer.json", meta)
    for name, tensors in (extra or {}).items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / name))
    if trainer is not None:
        _write_json(tmp / "trainer.json", trainer)
    # config.json last: its presence marks a complete checkpoint even without the rename.
    _write_json(tmp / "config.json", {"patchgpt": __version__, "task": cfg.task, "step": step,
                                      "config": cfg.to_dict(), "state": task.state()})
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _step_name(old: Path) -> str:
    """``.old_step_0000012_345`` -> ``step_0000012``."""
    return "_".join(old.name[len(".old_"):].split("_")[:2])


def list_checkpoints(out: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first.

    A checkpoint being replaced by a save of the same step is briefly ``.old_step_N_PID``: it counts while
    no ``step_N`` exists (a kill between the save's two renames)."""
    root = Path(out) / CKPT_DIR
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.name.startswith(("step_", ".old_step_")) and
            (p / "config.json").is_file() and (p / "model.safetensors").is_file()]
    names = {p.name for p in dirs}
    done = [p for p in dirs if p.name.startswith("step_") or _step_name(p) not in names]
    return sorted(done, key=lambda p: p.name.removeprefix(".old_"))


HUB_PREFIX = "hf:"   # a checkpoint on the Hugging Face hub (`patchgpt.hub`)
BEST = "best"   # checkpoints/best: a copy (hard links) of the checkpoint with the best validation metric


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, a run directory (its newest complete checkpoint), ``RUN/best`` (the checkpoint
    with the best validation metric), ``RUN/STEP`` (the checkpoint of that step) or ``hf:user/repo[@rev]`` (a
    checkpoint on the Hugging Face hub, through its local cache)."""
    if isinstance(path, str) and path.startswith(HUB_PREFIX):   # hf:user/repo[@revision]
        from .hub import HubError, download

        try:
            return resolve(download(path))
        except HubError as e:
            raise CheckpointError(str(e)) from None
    p = Path(path).expanduser()
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    if not p.exists() and (p.name == BEST or p.name.isdigit()) and (p.parent / CKPT_DIR).is_dir():
        want = p.parent / CKPT_DIR / (BEST if p.name == BEST else f"step_{int(p.name):07d}")
        if (want / "config.json").is_file() and (want / "model.safetensors").is_file():
            return want
        have = ", ".join(c.name.removeprefix("step_").lstrip("0") or "0" for c in list_checkpoints(p.parent))
        what = "best checkpoint (no evaluation yet)" if p.name == BEST else f"checkpoint of step {int(p.name)}"
        raise CheckpointError(f"{p}: the run has no {what}; its steps: {have or 'none'}")
    found = list_checkpoints(p)
    if found:
        return found[-1]
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    raise CheckpointError(f"{p}: no complete checkpoint here (expected config.json + model.safetensors)")


def best_record(out: str | Path) -> dict | None:
    """``{"metric", "mode", "value", "step"}`` of the run's best checkpoint, or None."""
    f = Path(out) / CKPT_DIR / BEST / "best.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):
        return None


def update_best(out: str | Path, ckpt: Path, metric: str, mode: str, value: float, step: int) -> bool:
    """Make `ckpt` the run's ``checkpoints/best`` if `value` beats the record (`mode`: "max" or "min"); True if
    it did. The copy is staged (hard links, or copies across file systems) and renamed into place, so a reader
    or a kill never sees half a best checkpoint."""
    old = best_record(out)
    if old is not None and old.get("metric") == metric:
        if (value <= old["value"]) if mode == "max" else (value >= old["value"]):
            return False
    root = Path(out) / CKPT_DIR
    for stale in root.glob(f".tmp_{BEST}_*"):   # left by a killed update
        shutil.rmtree(stale, ignore_errors=True)
    for aside in root.glob(f".old_{BEST}_*"):   # a kill between the two renames: put the old best back
        if (root / BEST).exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            aside.rename(root / BEST)
    tmp = root / f".tmp_{BEST}_{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        for f in ckpt.iterdir():
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        _write_json(tmp / "best.json", {"metric": metric, "mode": mode, "value": value, "step": step})
        _swap_in(tmp, root / BEST)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write {root / BEST} ({e.strerror or e}); the step checkpoints are "
                              "intact") from None
    return True


def read_meta(path: str | Path) -> dict:
    """The ``config.json`` of the checkpoint at `path`: version, task, step, run config and the task's state."""
    ckpt = resolve(path)
    try:
        return json.loads((ckpt / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: unreadable ({e})") from None


def read_weights(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """The weights of the checkpoint at `path` (a run directory resolves to its newest checkpoint), optionally
    only those under ``prefix`` (e.g. ``"vq."``) with the prefix removed."""
    ckpt = resolve(path)
    try:
        weights = load_file(str(ckpt / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types
        raise CheckpointError(f"{ckpt}/model.safetensors: unreadable ({e})") from None
    if not prefix:
        return weights
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def read_extra(ckpt: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of the extra file `name` that `save(extra=...)` wrote into `ckpt`; a `CheckpointError`
    when it is missing or unreadable."""
    try:
        return load_file(str(Path(ckpt) / name))
    except Exception as e:  # noqa: BLE001 - safetensors raises several error types
        raise CheckpointError(f"{ckpt}/{name}: missing or unreadable ({e})") from None


def load_weights(task: torch.nn.Module, ckpt: str | Path) -> None:
    """Load every weight of `task` from `ckpt` (strict) and mark fitted tokenizers as fitted; weights that do
    not fit the model its config.json describes (an edited checkpoint) are one `CheckpointError`."""
    try:
        task.load_state_dict(read_weights(ckpt), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()[:200]
        raise CheckpointError(f"{ckpt}: its weights do not fit the model its config.json describes ({first})") \
            from None
    for m in task.modules():
        if hasattr(m, "fitted"):
            m.fitted = True


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer,
                        fsdp_model: torch.nn.Module | None = None) -> dict:
    """Restore the optimizer from `ckpt` and return its trainer.json.

    With `fsdp_model` the saved state is a full (gathered) one, scattered to this rank's shards."""
    try:
        tensors = load_file(str(ckpt / "optimizer.safetensors"))
        meta = json.loads((ckpt / "optimizer.json").read_text())
    except Exception as e:  # noqa: BLE001 - safetensors and json raise several error types
        raise CheckpointError(f"{ckpt}: unreadable optimizer state ({e})") from None
    if fsdp_model is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # strict=False: parameters the loss never used (an unused LM head) have no optimizer state.
        set_optimizer_state_dict(fsdp_model, optimizer, _optimizer_state(tensors, meta),
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        try:
            optimizer.load_state_dict(_optimizer_state(tensors, meta))
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt}: optimizer state does not fit the model ({e})") from None
    return read_trainer(ckpt)


def read_trainer(ckpt: Path) -> dict:
    """The training state of a checkpoint (``trainer.json``: its step, its run id), after checking that the
    optimizer files are there and readable; a `CheckpointError` otherwise."""
    try:
        trainer = json.loads((ckpt / "trainer.json").read_text())
        json.loads((ckpt / "optimizer.json").read_text())
        with safe_open(str(ckpt / "optimizer.safetensors"), framework="pt") as f:
            f.keys()
    except Exception as e:  # noqa: BLE001 - OSError, JSON and safetensors errors alike
        raise CheckpointError(f"{ckpt}: unreadable training state ({e})") from None
    if not isinstance(trainer, dict) or not isinstance(trainer.get("step"), int):
        raise CheckpointError(f"{ckpt}/trainer.json: no step")
    return trainer


def run_dir(path: str | Path) -> Path:
    """Where a checkpoint's run writes its files: the run directory for ``RUN/checkpoints/step_N`` (or a run
    directory given as such), else the checkpoint directory itself (a checkpoint copied on its own); for a hub
    checkpoint, ``runs/USER--REPO`` (never the hub's cache)."""
    if isinstance(path, str) and path.startswith(HUB_PREFIX):
        resolve(path)
        return Path("runs") / path[len(HUB_PREFIX):].partition("@")[0].replace("/", "--")
    p = Path(path).expanduser()
    ckpt = resolve(p)
    if ckpt.parent.name == CKPT_DIR and ckpt.parent.parent.is_dir():
        return ckpt.parent.parent
    return ckpt
