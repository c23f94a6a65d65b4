"""Run configuration as dataclasses, saved as JSON in every checkpoint, and the one `--set` parser.

This module holds what every run shares (``model``, ``data``, ``tokenizer``, ``train``); each task brings its
own section (a dataclass nested in the task class) and its recipe, and the task registry assembles them:
``patchgpt.tasks.default_config(task)`` gives a sensible run for a task (big_vision-style recipes in Python),
and ``--set section.key=value`` overrides any field, checked against its declared type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .model import SIZES, GPTConfig


class ConfigError(ValueError):
    """A bad configuration value; its message is one line meant for the user."""


@dataclass
class DataConfig:
    spec: str = "digits"         # digits | folder:PATH | idx:PATH | emoji | coco:ANN.json[:DIR] | digit-scenes
    val_spec: str = ""           # a separate validation source (the whole of `spec` then trains)
    image_size: int = 0          # square side after resizing; 0 = the source's native size (folders: 32)
    channels: int = 0            # 1 or 3 (or 4); 0 = the source's native channels (folders: 3, RGB)
    resize: str = "crop"         # crop: shorter side to size then centre crop | stretch | pad (letterbox)
    val_fraction: float = 0.2    # held-out fraction where the source has no validation split
    split_seed: int = 0
    on_error: str = "stop"       # unreadable file: stop | skip (skipped files are counted and reported)
    augment: bool = True         # random translation (and flips if `flip`) during training
    shift: int = -1              # max translation in pixels (-1: side / 14 for recognition, else 1)
    flip: bool = False           # horizontal flips with shifts (off by default: digits and text are not symmetric)
    crop: float = -1.0           # > 0: random resized crops of at least this area, with flips, instead of shifts
    #                              (-1: 0.5 for colour images of 32 px and more where the task allows, else 0)
    num_workers: int = 0         # DataLoader worker processes for decoding
    frames: int = 0              # video: frames per clip; 0 = the source's default (videos: 8, moving-digits: 4)
    frame_stride: int = 0        # video: 0 = sample frames uniformly over the clip | N = every Nth from the start
    shuffle: bool = True         # a new order each epoch; false = the source's order (map-style and shards)
    shuffle_buffer: int = 1000   # shards: items held in the streaming shuffle buffer
    masks: bool = False          # coco: also read each image's label map from the segmentations (segment sets it)


@dataclass
class TokenizerConfig:
    kind: str = "patches"        # patches (continuous, AIM/ViT) | colors (iGPT discrete pixels)
    patch_size: int = 0          # 0 = chosen from the image size (`tokenizers.patches.auto_patch_size`)
    n_colors: int = 16
    vq: str = ""                 # kind=vq: the `patchgpt train vq` run whose codes are the image tokens
    vq_config: str = ""          # filled in from that run (JSON), so checkpoints load without it
    tubelet: int = 2             # video: frames per T x P x P tubelet


@dataclass
class TrainConfig:
    steps: int = 1000            # 0: from the data, the task's `epochs` over the training set (1000..8000 steps)
    batch_size: int = 64         # images per optimizer step (split over `accum` micro-batches)
    accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.05   # cosine decays to lr * min_lr_ratio
    warmup: int = 100
    weight_decay: float = 0.05   # matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    log_to: str = "jsonl"         # jsonl (log.jsonl, always written) | tensorboard (also OUT/tensorboard events)
    eval_every: int = 0          # 0 = only at the end
    ckpt_every: int = 0          # 0 = at evaluations and at the end
    keep: int = 2                # checkpoints kept
    device: str = "auto"         # auto | cpu | cuda | mps
    compile: bool = False
    threads: int = 0             # torch threads on CPU; 0 = torch's default
    fsdp: bool = False           # torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    time: float = 0.0            # a wall-clock budget in seconds (0 = none): steps follow the measured throughput
    ema: float = 0.0             # decay of a moving average of the weights, evaluated and saved (0: none;
    #                              -1: 1 - 10 / steps, within [0.99, 0.9999]: the last tenth of the run)
    layer_decay: float = -1.0    # lr x layer_decay**(depth from the top) (-1: the task recipe with --init, else 1)


@dataclass
class RunConfig:
    """What every run shares, plus the sections of its task (``sections``, supplied by the task registry).

    A task's section reads as an attribute (``cfg.classify.mode``) and is set with ``--set classify.mode=...``;
    in ``config.json`` it sits beside the shared sections, so the file reads the same as before sections
    became the tasks' own.
    """

    task: str = ""               # a key of patchgpt.tasks.TASKS
    out: str = "runs/run"
    init: str = ""               # checkpoint to start from (backbone and tokenizer)
    size: str = "micro"          # a key of SIZES, applied to `model`
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sections: dict[str, Any] = field(default_factory=dict)  # the task's own config sections, by name

    def __getattr__(self, name: str) -> Any:
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"RunConfig has no field or section {name!r}")

    def to_dict(self) -> dict:
        d = {f.name: (asdict(v) if dataclasses.is_dataclass(v) else v)
             for f in fields(self) if f.name != "sections" for v in [getattr(self, f.name)]}
        d.update({name: asdict(sec) for name, sec in self.sections.items()})
        return d

    @classmethod
    def from_dict(cls, d: dict, sections: dict[str, type] | None = None) -> RunConfig:
        """A config from its JSON; `sections` (name -> dataclass) says which task sections to read.

        Unknown keys are ignored, so files written by older versions (which held every task's section)
        still load."""
        cfg = cls()
        for f in fields(cls):
            if f.name == "sections" or f.name not in d:
                continue
            cur = getattr(cfg, f.name)
            setattr(cfg, f.name, _section(type(cur), d[f.name]) if dataclasses.is_dataclass(cur) else d[f.name])
        cfg.sections = {name: _section(typ, d.get(name, {})) for name, typ in (sections or {}).items()}
        return cfg

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _section(typ: type, values: dict) -> Any:
    known = {g.name for g in fields(typ)}
    return typ(**{k: v for k, v in values.items() if k in known})


def apply_size(cfg: RunConfig, size: str) -> None:
    """Set the backbone's depth and width from `SIZES[size]`."""
    if size not in SIZES:
        raise ConfigError(f"unknown model size {size!r}; choose one of {', '.join(SIZES)}")
    cfg.size = size
    for k, v in SIZES[size].items():
        setattr(cfg.model, k, v)


def _convert(raw: str, typ: str, key: str):
    typ = typ.replace(" ", "")
    try:
        if typ == "bool":
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ == "int":
            return int(raw)
        if typ == "float":
            value = float(raw)
        elif typ == "str":
            return raw
        else:
            raise ConfigError(f"--set {key}: cannot set a field of type {typ}")
    except ConfigError:
        raise
    except ValueError:
        raise ConfigError(f"--set {key}={raw}: expected {typ}") from None
    if not math.isfinite(value):  # nan and inf parse as floats, but no setting wants them
        raise ConfigError(f"--set {key}={raw}: expected a finite number")
    return value


def set_override(cfg: RunConfig, assignment: str) -> None:
    """Apply one ``section.key=value`` override, checked against the field's type."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected key=value")
    key, raw = assignment.split("=", 1)
    obj = cfg
    parts = key.strip().split(".")
    for i, part in enumerate(parts):
        names = {f.name: f for f in fields(obj) if f.name != "sections"}
        if obj is cfg and part in cfg.sections:
            obj = cfg.sections[part]
            if i == len(parts) - 1:
                raise ConfigError(f"--set {key}: is a section; set one of its keys, e.g. {key}.<name>=...")
            continue
        if part not in names:
            where = ".".join(parts[:i]) or "the config"
            known = [*names, *cfg.sections] if obj is cfg else list(names)
            raise ConfigError(f"--set {key}: unknown key {part!r} in {where} (known: {', '.join(known)})")
        f = names[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"--set {key}: is a section; set one of its keys, e.g. {key}.<name>=...")
            typ = f.type if isinstance(f.type, str) else f.type.__name__
            if key == "size":
                apply_size(cfg, raw)
            else:
                setattr(obj, part, _convert(raw, typ, key))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"--set {key}: {part!r} is not a section")


def read_recipe(path: str | Path) -> dict:
    """A recipe file (a whole run's settings) as a dict: TOML (read by the standard library), JSON (a run's own
    ``config.json`` is a recipe) or YAML (``.yaml``/``.yml``, when PyYAML is installed); one-line errors."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    suffix = p.suffix.lower()
    try:
        text = p.read_text(encoding="utf-8")
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:   # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError:
                    raise ConfigError(f"--config {path}: TOML needs Python 3.11+ or pip install tomli") from None
            d = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError(f"--config {path}: YAML needs PyYAML (pip install pyyaml), or write TOML") from None
            d = yaml.safe_load(text)
        elif suffix == ".json":
            d = json.loads(text)
        else:
            raise ConfigError(f"--config {path}: write the recipe as .toml, .json or .yaml")
    except ConfigError:
        raise
    except (ValueError, UnicodeDecodeError) as e:   # tomllib, json and yaml errors are ValueErrors or wrap one
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--config {path}: not valid {suffix[1:].upper()} ({first})") from None
    except Exception as e:   # yaml.YAMLError does not derive from ValueError
        raise ConfigError(f"--config {path}: not valid {suffix[1:].upper()} ({type(e).__name__})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--config {path}: expected a table of settings at the top, got {type(d).__name__}")
    return d


RECIPE_TOP = ("task", "out", "init", "size")   # the recipe's top-level keys; the rest are sections


def apply_recipe(cfg: RunConfig, recipe: dict, where: str = "--config") -> None:
    """Apply a recipe's sections (``[train] lr = 3e-4``) as `set_override` would, type-checked; its ``size``
    first, then every ``section.key``; unknown sections and keys are one-line errors naming `where`."""
    if "size" in recipe:
        apply_size(cfg, str(recipe["size"]))
    for key in ("out", "init"):
        if key in recipe:
            setattr(cfg, key, str(recipe[key]))
    for section, values in recipe.items():
        if section in RECIPE_TOP:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: {section} = {values!r}: unknown top-level key (known: "
                              f"{', '.join(RECIPE_TOP)}, and sections such as [train])")
        for key, value in values.items():
            if isinstance(value, (dict, list)):
                raise ConfigError(f"{where}: {section}.{key}: expected a single value, got {type(value).__name__}")
            text = str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, float) \
                else str(value)
            try:
                set_override(cfg, f"{section}.{key}={text}")
            except ConfigError as e:
                raise ConfigError(f"{where}: {str(e).removeprefix('--set ')}") from None


SEEDS = "[0, 4294967295]"  # seeds as numpy takes them (32 bits), far from torch's 64-bit overflow when combined


def check(cfg: RunConfig) -> None:
    """Validate the shared sections' values that types cannot express; raise a one-line `ConfigError`.

    Each task checks its own section (``Task.check``); what needs the data's size (a patch size that divides
    the images) is checked where the input tokenizer is built, and ``train.device`` where it is picked."""
    check_choices({
        "data.resize": (cfg.data.resize, ("crop", "stretch", "pad")),
        "data.on_error": (cfg.data.on_error, ("stop", "skip")),
        "tokenizer.kind": (cfg.tokenizer.kind, ("patches", "colors", "vq")),
        "train.log_to": (cfg.train.log_to, ("jsonl", "tensorboard")),
        "model.norm": (cfg.model.norm, ("layer", "rms")),
        "model.activation": (cfg.model.activation, ("gelu", "gelu_tanh", "quick_gelu")),
    })
    m, d, tok, t = cfg.model, cfg.data, cfg.tokenizer, cfg.train
    check_ranges({
        "model.n_layer": (m.n_layer, "[1, inf)"), "model.n_head": (m.n_head, "[1, inf)"),
        "model.n_embd": (m.n_embd, "[1, inf)"), "model.mlp_ratio": (m.mlp_ratio, "(0, inf)"),
        "model.dropout": (m.dropout, "[0, 1)"), "model.block_size": (m.block_size, "[1, inf)"),
        "model.max_frames": (m.max_frames, "[1, inf)"), "model.max_rows": (m.max_rows, "[1, inf)"),
        "model.max_cols": (m.max_cols, "[1, inf)"),
        "data.image_size": (d.image_size, "[0, inf)"), "data.channels": (d.channels, "[0, inf)"),
        "data.val_fraction": (d.val_fraction, "[0, 1)"), "data.shift": (d.shift, "[-1, inf)"),
        "data.crop": (d.crop, "(0, 1]") if d.crop not in (-1, 0) else (1, "(0, 1]"),
        "data.num_workers": (d.num_workers, "[0, inf)"), "data.frames": (d.frames, "[0, inf)"),
        "data.frame_stride": (d.frame_stride, "[0, inf)"), "data.shuffle_buffer": (d.shuffle_buffer, "[1, inf)"),
        "data.split_seed": (d.split_seed, SEEDS),
        "tokenizer.patch_size": (tok.patch_size, "[0, inf)"), "tokenizer.n_colors": (tok.n_colors, "[2, inf)"),
        "tokenizer.tubelet": (tok.tubelet, "[1, inf)"),
        "train.steps": (t.steps, "[0, inf)"), "train.batch_size": (t.batch_size, "[1, inf)"),
        "train.accum": (t.accum, "[1, inf)"), "train.lr": (t.lr, "(0, inf)"),
        "train.min_lr_ratio": (t.min_lr_ratio, "[0, 1]"), "train.warmup": (t.warmup, "[0, inf)"),
        "train.weight_decay": (t.weight_decay, "[0, inf)"), "train.beta1": (t.beta1, "[0, 1)"),
        "train.beta2": (t.beta2, "[0, 1)"), "train.grad_clip": (t.grad_clip, "[0, inf)"),
        "train.log_every": (t.log_every, "[1, inf)"), "train.eval_every": (t.eval_every, "[0, inf)"),
        "train.ckpt_every": (t.ckpt_every, "[0, inf)"), "train.keep": (t.keep, "[1, inf)"),
        "train.time": (t.time, "[0, inf)"), "train.ema": (t.ema, "[0, 1)") if t.ema != -1 else (0, "[0, 1)"),
        "model.drop_path": (m.drop_path, "[0, 1)") if m.drop_path != -1 else (0, "[0, 1)"),
        "train.layer_decay": (t.layer_decay, "(0, 1]") if t.layer_decay != -1 else (1, "(0, 1]"),
        "train.threads": (t.threads, "[0, inf)"), "train.seed": (t.seed, SEEDS),
    })
    if t.batch_size % t.accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.accum={t.accum}")
    if m.n_embd % m.n_head:
        raise ConfigError(f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}")
    if tok.kind == "vq" and not (tok.vq or tok.vq_config):
        raise ConfigError("tokenizer.kind=vq needs tokenizer.vq=RUN_DIR of a `patchgpt train vq` run")
    check_model_fits(m)


def check_ranges(ranges: dict[str, tuple[object, str]]) -> None:
    """``{"section.key": (value, interval)}``, intervals written ``"[1, inf)"``, ``"(0, 1]"``: a one-line
    `ConfigError` for the first value that is not a finite number inside its interval."""
    for key, (val, interval) in ranges.items():
        lo_open, hi_open = interval[0] == "(", interval[-1] == ")"
        lo, hi = (float(x) for x in interval[1:-1].split(","))
        number = isinstance(val, (int, float)) and not isinstance(val, bool)
        if not number or not math.isfinite(val):
            where = "" if math.isinf(lo) and math.isinf(hi) else f" in {interval}"
            raise ConfigError(f"{key}={val!r}: must be a finite number{where}")
        if val < lo or val > hi or (lo_open and val == lo) or (hi_open and val == hi):
            low = f"{lo:g}"
            want = (f"must be {'>' if lo_open else '>='} {low}" if math.isinf(hi)
                    else f"must be in {interval}")
            raise ConfigError(f"{key}={val!r}: {want}")


def backbone_params(m: GPTConfig) -> int:
    """About how many parameters `m` makes (blocks and position tables; the vocabulary is left out)."""
    C = m.n_embd
    per_block = int((4 + 2 * m.mlp_ratio) * C * C)
    tables = (m.block_size + m.max_frames + m.max_rows + m.max_cols + 3) * C
    return m.n_layer * per_block + tables


def memory_bytes() -> int:
    """This machine's physical memory in bytes (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 0


def check_model_fits(m: GPTConfig) -> None:
    """A one-line `ConfigError` when the backbone's fp32 weights alone exceed this machine's memory (it is built
    on the CPU first), rather than an allocation failure, or a swap storm, deep inside the model."""
    need, have = 4 * backbone_params(m), memory_bytes()
    if have and need > have:
        raise ConfigError(f"model.n_layer={m.n_layer} x model.n_embd={m.n_embd}: about "
                          f"{backbone_params(m) / 1e9:.1f}B parameters, {need / 2**30:.0f} GiB of weights, do not "
                          f"fit in this machine's {have / 2**30:.0f} GiB; lower --model, model.n_embd or "
                          "model.n_layer")


def check_choices(choices: dict[str, tuple[object, tuple]]) -> None:
    """``{"section.key": (value, allowed values)}``: a one-line `ConfigError` for the first value not allowed."""
    for key, (val, ok) in choices.items():
        if val not in ok:
            raise ConfigError(f"{key}={val!r}: choose one of {', '.join(map(str, ok))}")
