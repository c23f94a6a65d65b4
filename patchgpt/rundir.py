"""The run directory's rules: a new run never lands on an old one, and a resume continues the same run.

- A fresh run into an ``--out`` that already holds a run is refused in one line (use ``--resume``, another
  ``--out``, or ``--overwrite``, which moves the old run aside into ``OUT/replaced-N/`` rather than deleting
  it), so pruning, ``log.jsonl``, ``config.json`` and ``metrics.json`` only ever touch this run's files.
- ``--resume`` continues the saved run: its saved config wins, ``train.steps`` may be raised (or kept, when
  not asked for), and any other setting that differs from the saved run is refused in one line.
- A resume starts from the newest checkpoint whose training state reads; a damaged newest checkpoint is
  reported and the previous one used.
"""

from __future__ import annotations

import dataclasses
import sys
import uuid
from pathlib import Path

from . import checkpoint
from .config import ConfigError, RunConfig
from .tasks import config_from_dict, default_config

RUN_FILES = ("checkpoints", "log.jsonl", "config.json", "metrics.json")


def holds_run(out: Path) -> bool:
    """True if `out` already holds (part of) a training run."""
    return any((out / name).exists() for name in RUN_FILES)


def claim(out: Path, overwrite: bool = False) -> str:
    """Make `out` ready for a fresh run and return the new run's id; see the module docstring."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a directory")
    if holds_run(out):
        if not overwrite:
            raise ConfigError(f"--out {out} already holds a run: continue it with --resume, choose another --out, "
                              f"or pass --overwrite (the old run is moved into {out}/replaced-N/)")
        n = 1
        while (out / f"replaced-{n}").exists():
            n += 1
        aside = out / f"replaced-{n}"
        aside.mkdir()
        for p in list(out.iterdir()):
            if p.name != aside.name and not p.name.startswith("replaced-"):
                p.rename(aside / p.name)
        print(f"patchgpt: --overwrite: the previous run in {out} is now in {aside}", file=sys.stderr)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".patchgpt-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return uuid.uuid4().hex


def _flat(cfg: RunConfig) -> dict:
    out = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


def resume_config(asked: RunConfig, saved: RunConfig) -> RunConfig:
    """The config a resume runs with: the saved run's, with ``train.steps`` raised if the user asked for more.

    What the user asked is what differs from the task's defaults (the CLI and Python API both start from
    `default_config`); asking for anything else that differs from the saved run is a one-line error."""
    if asked.task and asked.task != saved.task:
        raise ConfigError(f"--resume: the run in {asked.out} trains {saved.task!r}, not {asked.task!r}")
    base, want, have = _flat(default_config(saved.task)), _flat(asked), _flat(saved)
    changed = {k: v for k, v in want.items() if k not in ("out", "train.steps", "task") and v != base.get(k)}
    clash = {k: v for k, v in changed.items() if have.get(k) != v}
    # model.* fields are filled in from the data when the model is built; only what the user set counts.
    if clash:
        diff = ", ".join(f"{k}={v!r} (the run has {have.get(k)!r})" for k, v in sorted(clash.items())[:4])
        raise ConfigError(f"--resume continues the saved run unchanged except --steps; these differ: {diff}. "
                          "Drop them, or start a new run with another --out")
    cfg = dataclasses.replace(saved)
    cfg.sections = saved.sections
    if asked.train.steps != base["train.steps"]:
        cfg.train.steps = asked.train.steps
    return cfg


def resume_point(out: Path) -> tuple[Path, RunConfig, dict]:
    """The newest checkpoint of `out` whose config and training state read, its config and its trainer state;
    damaged newer ones are reported (and kept, for inspection)."""
    found = checkpoint.list_checkpoints(out)
    if not found:
        raise ConfigError(f"--resume: no checkpoint in {out}")
    errors = []
    for ckpt in reversed(found):
        try:
            meta = checkpoint.read_meta(ckpt)
            cfg = config_from_dict(meta["config"])
            trainer = checkpoint.read_trainer(ckpt)
        except (checkpoint.CheckpointError, KeyError, TypeError, ValueError) as e:
            errors.append(f"{ckpt.name}: {e}")
            continue
        for err in errors:
            print(f"patchgpt: skipping damaged checkpoint {err}; resuming from {ckpt.name}", file=sys.stderr)
        return ckpt, cfg, trainer
    raise checkpoint.CheckpointError(f"--resume: no readable checkpoint in {out} ({'; '.join(errors)[:300]})")
