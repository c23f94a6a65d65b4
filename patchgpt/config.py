"""Run configuration as dataclasses, saved as JSON in every checkpoint, and the one `--set` parser.

Recipes are Python (big_vision style): `default_config(task)` gives a sensible run for a task, and
``--set section.key=value`` overrides any field, checked against its declared type.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field, fields

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
    shift: int = 1               # max translation in pixels
    flip: bool = False           # horizontal flips (off by default: digits and text are not symmetric)
    num_workers: int = 0         # DataLoader worker processes for decoding
    frames: int = 0              # video: frames per clip; 0 = the source's default (videos: 8, moving-digits: 4)
    frame_stride: int = 0        # video: 0 = sample frames uniformly over the clip | N = every Nth from the start
    shuffle: bool = True         # a new order each epoch; false = the source's order (map-style and shards)
    shuffle_buffer: int = 1000   # shards: items held in the streaming shuffle buffer


@dataclass
class TokenizerConfig:
    kind: str = "patches"        # patches (continuous, AIM/ViT) | colors (iGPT discrete pixels)
    patch_size: int = 2
    n_colors: int = 16
    vq: str = ""                 # kind=vq: the `patchgpt train vq` run whose codes are the image tokens
    vq_config: str = ""          # filled in from that run (JSON), so checkpoints load without it
    tubelet: int = 2             # video: frames per T x P x P tubelet


@dataclass
class PretrainConfig:
    target: str = "patches"      # patches: next-patch regression (AIM) | tokens: next-token CE (iGPT)
    prefix: bool = True          # random bidirectional prefix per batch (AIM), so probes may look both ways
    norm_pix: bool = True        # regress per-patch normalized pixels
    head_hidden: int = 2         # MLP head width as a multiple of n_embd; 0 = a linear head


@dataclass
class ClassifyConfig:
    mode: str = "finetune"       # finetune | linear | attentive
    layer: int = -1              # probe features from this block (1-based; -1 = last, with final norm)
    label_smoothing: float = 0.1
    attention: str = "bidirectional"  # bidirectional | causal
    head_dropout: float = 0.0


@dataclass
class GenerateConfig:
    condition: str = "auto"      # auto (captions -> text, labels -> class, else none) | none | class | text
    p_uncond: float = 0.1        # training: drop the condition to the null token this often (for guidance)
    text_len: int = 32           # caption bytes kept (padded/truncated)
    temperature: float = 1.0     # sampling defaults (CLI flags override)
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 0.0       # guidance: logits = cond + s * (cond - uncond); 0 = plain conditional


@dataclass
class DetectConfig:
    bins: int = 64               # coordinate bins over [0, 1] (about one per input pixel is plenty)
    max_objects: int = 0         # objects per image, real plus noise (0: the data's most + 2); more are dropped
    noise: bool = True           # Pix2Seq sequence augmentation: pad with noise objects up to max_objects
    jitter: float = 0.2          # noise boxes: real boxes shifted/resized by up to this fraction of their size
    scale_jitter: float = 0.0    # training zoom by a factor in [1 - s, 1 + s] about a random point (0 = off)
    noise_weight: float = 1.0    # loss weight of the noise class token
    class_weight: float = 1.0    # loss weight of real class tokens (coordinates weigh 1)
    order: str = "random"        # object order in training: random | area | raster
    coord_pos: bool = True       # coordinate tokens carry the patch-grid row/column they point at
    glimpse: bool = True         # an input-only token with the box's pixels (one patch) precedes each class
    temperature: float = 0.0     # decoding: 0 = greedy; > 0 samples (with top_p for nucleus sampling)
    top_p: float = 1.0
    nms_iou: float = 0.7         # class-wise NMS threshold on decoded boxes (1 = off)
    draw_score: float = 0.3      # pictures: draw boxes scoring at least this


@dataclass
class VQTrainConfig:
    downsample: int = 2          # code grid = image / downsample (2, 4 or 8)
    hidden: int = 64
    codebook_size: int = 256
    code_dim: int = 32
    beta: float = 0.25
    l2_norm: bool = True
    dead_after: int = 100        # restart codes unused for this many steps


@dataclass
class TrainConfig:
    steps: int = 1000
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
    eval_every: int = 0          # 0 = only at the end
    ckpt_every: int = 0          # 0 = at evaluations and at the end
    keep: int = 2                # checkpoints kept
    device: str = "auto"         # auto | cpu | cuda | mps
    compile: bool = False
    threads: int = 0             # torch threads on CPU; 0 = torch's default
    fsdp: bool = False           # torchrun: shard parameters, gradients and optimizer state (FSDP2) instead of DDP


@dataclass
class RunConfig:
    task: str = "pretrain"
    out: str = "runs/run"
    init: str = ""               # checkpoint to start from (backbone and tokenizer)
    size: str = "micro"          # a key of SIZES, applied to `model`
    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    vq: VQTrainConfig = field(default_factory=VQTrainConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        cfg = cls()
        for f in fields(cls):
            if f.name not in d:
                continue
            cur = getattr(cfg, f.name)
            if dataclasses.is_dataclass(cur):
                known = {g.name for g in fields(cur)}
                setattr(cfg, f.name, type(cur)(**{k: v for k, v in d[f.name].items() if k in known}))
            else:
                setattr(cfg, f.name, d[f.name])
        return cfg

    def dumps(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


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
            return float(raw)
        if typ == "str":
            return raw
    except ValueError:
        raise ConfigError(f"--set {key}={raw}: expected {typ}") from None
    raise ConfigError(f"--set {key}: cannot set a field of type {typ}")


def set_override(cfg: RunConfig, assignment: str) -> None:
    """Apply one ``section.key=value`` override, checked against the field's type."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected key=value")
    key, raw = assignment.split("=", 1)
    obj = cfg
    parts = key.strip().split(".")
    for i, part in enumerate(parts):
        names = {f.name: f for f in fields(obj)}
        if part not in names:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"--set {key}: unknown key {part!r} in {where} (known: {', '.join(names)})")
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


def check(cfg: RunConfig) -> None:
    """Validate choices that types cannot express; raise a one-line `ConfigError`."""
    choices = {
        "data.resize": (cfg.data.resize, ("crop", "stretch", "pad")),
        "data.on_error": (cfg.data.on_error, ("stop", "skip")),
        "tokenizer.kind": (cfg.tokenizer.kind, ("patches", "colors", "vq")),
        "pretrain.target": (cfg.pretrain.target, ("patches", "tokens")),
        "classify.mode": (cfg.classify.mode, ("finetune", "linear", "attentive")),
        "classify.attention": (cfg.classify.attention, ("bidirectional", "causal")),
        "generate.condition": (cfg.generate.condition, ("auto", "none", "class", "text")),
        "detect.order": (cfg.detect.order, ("random", "area", "raster")),
    }
    for key, (val, ok) in choices.items():
        if val not in ok:
            raise ConfigError(f"{key}={val!r}: choose one of {', '.join(ok)}")
    t = cfg.train
    if t.steps < 1 or t.batch_size < 1 or t.accum < 1:
        raise ConfigError("train.steps, train.batch_size and train.accum must be positive")
    if t.batch_size % t.accum:
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by train.accum={t.accum}")
    if cfg.model.n_embd % cfg.model.n_head:
        raise ConfigError(f"model.n_embd={cfg.model.n_embd} is not divisible by model.n_head={cfg.model.n_head}")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError("data.val_fraction must be in [0, 1)")
    if cfg.pretrain.target == "tokens" and cfg.tokenizer.kind != "colors":
        raise ConfigError("pretrain.target=tokens needs tokenizer.kind=colors (discrete pixels)")
    if cfg.task == "generate" and cfg.tokenizer.kind == "patches":
        raise ConfigError("generate needs discrete image tokens: tokenizer.kind=colors or vq")
    if cfg.task.startswith("video-") and cfg.tokenizer.kind != "patches":
        raise ConfigError(f"{cfg.task} reads clips as tubelets: tokenizer.kind must be patches")
    if cfg.tokenizer.kind == "vq" and not (cfg.tokenizer.vq or cfg.tokenizer.vq_config):
        raise ConfigError("tokenizer.kind=vq needs tokenizer.vq=RUN_DIR of a `patchgpt train vq` run")


def default_config(task: str) -> RunConfig:
    """A sensible run for `task` on a laptop CPU."""
    cfg = RunConfig(task=task, out=f"runs/{task}")
    apply_size(cfg, "micro")
    if task == "pretrain":
        cfg.train.lr, cfg.train.steps, cfg.train.warmup = 1e-3, 1500, 100
    elif task == "classify":
        cfg.train.lr, cfg.train.steps, cfg.train.warmup = 5e-4, 1000, 50
    elif task == "vq":
        cfg.train.lr, cfg.train.steps, cfg.train.warmup, cfg.train.weight_decay = 2e-3, 2000, 50, 0.0
        cfg.data.augment = False
    elif task == "generate":
        cfg.tokenizer.kind, cfg.tokenizer.n_colors = "colors", 16
        cfg.train.lr, cfg.train.steps, cfg.train.warmup = 1e-3, 3000, 100
        cfg.data.augment = False  # a shifted digit is a different image to generate
    elif task == "detect":
        cfg.tokenizer.patch_size = 8
        cfg.data.resize = "pad"   # letterbox: every box stays inside the image
        cfg.train.lr, cfg.train.steps, cfg.train.warmup, cfg.train.batch_size = 1e-3, 2500, 200, 32
        cfg.train.eval_every = 500
    elif task in ("video-classify", "video-pretrain"):
        cfg.data.spec = "moving-digits"
        cfg.tokenizer.patch_size, cfg.tokenizer.tubelet = 4, 2
        cfg.train.lr, cfg.train.steps, cfg.train.warmup = 2e-3, 2000, 50
        cfg.pretrain.norm_pix = False  # next-frame pictures roll predictions out in pixel space
    return cfg
