"""The task interface: everything about one task lives in a `Task` subclass, so nothing outside `tasks/`
names one (see docs/design.md).

A task turns a batch (a dict of tensors and lists, keyed by field) into a `Sequence`, owns its head and loss,
its config section and recipe, its augmentation, inference on the user's files, its metric and the pictures
it leaves next to its numbers. ``forward(batch, rng) -> (loss, logs)``, so ``DDP(task)`` just works. Adding a
task is one file here plus one line in `TASKS` (``tasks/__init__.py``).
"""

from __future__ import annotations

from abc import ABCMeta, abstractmethod
from collections.abc import Sequence as SequenceOf
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import checkpoint
from ..config import ConfigError, RunConfig
from ..data import build_datasets, load_image
from ..data.base import DataError, DataInfo, ImageSet, augment, input_key, to_device
from ..model import GPT
from ..rng import RowRNG
from ..sequence import IGNORE, Sequence, Vocab, concat, tokens
from ..tokenizers import PixelInput
from ..tokenizers.patches import RECOGNITION_TARGET, TOKEN_TARGET

VOCAB_TABLES = ("wte.weight", "lm_head.weight")   # the backbone's tensors whose rows are the task's token ids


def next_token_loss(logits: Tensor, seq: Sequence) -> Tensor:
    """Mean cross-entropy of (B, T, V) logits against ``seq.labels`` (IGNORE skipped, weights applied)."""
    V = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, V).float(), seq.labels.reshape(-1), ignore_index=IGNORE,
                           reduction="none")                                   # (B*T,)
    valid = (seq.labels.reshape(-1) != IGNORE).float()
    w = valid if seq.weights is None else valid * seq.weights.reshape(-1)
    return (loss * w).sum() / w.sum().clamp(min=1e-8)


def on_gpu(cfg: RunConfig) -> bool:
    """Whether the run will train on an accelerator (``train.device``, or auto with one present)."""
    d = cfg.train.device
    return d in ("cuda", "mps") or (d == "auto" and torch.cuda.is_available())


def recognition_target(cfg: RunConfig) -> int:
    """`Task.token_target` of recognition: few tokens on a CPU (28 px -> 7x7 patches, 16 tokens: 3x the
    throughput of 4x4 at the same accuracy for a laptop's time budget), many on a GPU (224 px -> 14x14)."""
    return RECOGNITION_TARGET["gpu" if on_gpu(cfg) else "cpu"]


def build_backbone(cfg: RunConfig, vocab: Vocab, patch_dim: int, length: int, grid: tuple[int, int],
                   frames: int = 1) -> GPT:
    """The GPT sized by `cfg.model`, with vocab, patch width and position tables fitted to the input
    (`frames`: time slices of a clip's tubelets)."""
    m = cfg.model
    m.vocab_size, m.patch_dim = vocab.size, patch_dim
    m.block_size = max(m.block_size, length)
    m.max_frames = max(m.max_frames, frames)
    m.max_rows, m.max_cols = max(m.max_rows, grid[0]), max(m.max_cols, grid[1])
    try:
        return GPT(m)
    except (RuntimeError, MemoryError) as e:
        raise ConfigError(f"out of memory building the backbone ({type(e).__name__}): lower --model, "
                          "model.n_embd or model.n_layer") from None


def scene_recipe(cfg: RunConfig) -> None:
    """The recipe of the tasks that read 64 px scenes and write after them (captions, answers, masks, clean
    images): digit-scenes, 8x8 patches (64 tokens), batches of 32, lr 1e-3, 2,000 steps, evaluations every 500."""
    cfg.data.spec = "digit-scenes"
    cfg.tokenizer.patch_size = 8
    cfg.train.lr, cfg.train.steps, cfg.train.warmup, cfg.train.batch_size = 1e-3, 2000, 100, 32
    cfg.train.eval_every = 500


class Metric(Protocol):
    """What ``Task.metric()`` returns: fed validation batches one by one, then asked for its results."""

    def update(self, batch: dict) -> None:
        """Accumulate one batch (already on the task's device)."""
        ...

    def compute(self) -> dict:
        """The results: JSON-friendly scalars (``val_loss`` at least), lists and dicts."""
        ...


def metric_files(metric: Metric) -> dict[str, Any]:
    """Large outputs a metric keeps beside its numbers (``{"detections.json": [...]}``): ``metric.files()``
    where the metric has it, else nothing."""
    files = getattr(metric, "files", None)
    return files() if callable(files) else {}


class Task(nn.Module, metaclass=ABCMeta):
    """Base class of every task. Subclasses set the class attributes and implement the abstract methods.

    Class attributes:
        name: the registry key (``patchgpt train NAME``).
        section: the name of the task's own config section (``--set SECTION.key=value``), or None.
        Config: the dataclass of that section, with its defaults.
        reads_clips: True for tasks over (B, F, C, H, W) clips, False for images.
        examples: command lines for ``patchgpt --help``.
        output_keys, metric_keys: the keys `predict` and the metric promise (the contract test checks them).
        demo_data: a bundled data spec the task trains on out of the box.
    """

    name: ClassVar[str] = "task"
    section: ClassVar[str | None] = None
    Config: ClassVar[type | None] = None
    reads_clips: ClassVar[bool] = False
    examples: ClassVar[list[str]] = []   # command lines shown by ``patchgpt --help``
    output_keys: ClassVar[tuple[str, ...]] = ()   # what `predict` returns, at least
    metric_keys: ClassVar[tuple[str, ...]] = ()   # what ``metric().compute()`` returns besides ``val_loss``
    demo_data: ClassVar[str] = "digits"          # a bundled data spec the task trains on (tests, examples)
    demo_options: ClassVar[dict] = {}            # `predict_files` options a demo call needs (a question)
    # Recognition: crops and flips keep the targets, so auto augmentation follows the image size (shifts of a
    # fourteenth of the side; crops and flips for colour photographs); else 1-pixel shifts (``data.shift=-1``).
    augment_by_size: ClassVar[bool] = False
    epochs: ClassVar[float] = 10.0   # passes over the training set when ``train.steps=0`` (auto)
    pretrainer: ClassVar[str | None] = "pretrain"   # the task ``--pretrain-steps`` runs first (None: none)
    # ``ask``: the prompts that pick this task (its name always does), whether a free question does (VQA), and
    # whether ``predict_files(out=...)`` takes a directory (False: a JSON file)
    prompt_words: ClassVar[tuple[str, ...]] = ()
    answers_questions: ClassVar[bool] = False
    writes_dir: ClassVar[bool] = True
    # whether it can be a part of a multi-task model: it reads the image's patches as a prefix and writes after
    # its own task token (or through a head), so it can share one backbone and vocabulary with other such tasks
    shares_backbone: ClassVar[bool] = False
    # the validation result ``checkpoints/best`` follows, and whether higher ("max") or lower ("min") is better
    best_metric: ClassVar[tuple[str, str]] = ("val_loss", "min")

    def __init__(self, cfg: RunConfig, info: DataInfo, vocab: Vocab | None = None) -> None:
        """`vocab`: a vocabulary shared with other tasks on one backbone (`multi`); a fresh one by default."""
        super().__init__()
        self.cfg, self.info = cfg, info
        self.vocab = Vocab() if vocab is None else vocab
        self.notes: list[str] = []   # choices made for the user (auto settings), printed at start-up

    # ---- configuration: class methods, used before a task exists -------------------------------------------

    @classmethod
    def defaults(cls, cfg: RunConfig) -> None:
        """The task's recipe: adjust the shared sections of a fresh config (steps, lr, augmentation ...)."""

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        """Validate the task's section against the whole config; raise a one-line `ConfigError`."""

    @classmethod
    def config_sections(cls) -> dict[str, type]:
        """The config sections the task brings (name -> dataclass): its own section, if any."""
        return {cls.section: cls.Config} if cls.section and cls.Config else {}

    @classmethod
    def datasets(cls, cfg: RunConfig, classes: list[str] | None = None) -> tuple[ImageSet, ImageSet, DataInfo]:
        """The (train, validation, info) sets of ``cfg.data`` (`classes`: a checkpoint's class order)."""
        return build_datasets(cfg.data, classes)

    # ---- building ------------------------------------------------------------------------------------------

    def make_input(self) -> PixelInput:
        """The input tokenizer over the data's images (or clips, for tasks that read clips)."""
        cfg, info = self.cfg, self.info
        if self.reads_clips and not info.frames:
            raise DataError(f"{cfg.task} needs clips; {cfg.data.spec} has images (use videos:PATH or moving-digits)")
        if info.frames and not self.reads_clips:
            raise DataError(f"{cfg.data.spec} holds clips: use video-classify or video-pretrain")
        try:
            return PixelInput(cfg.tokenizer, info.channels, tuple(info.image_size), self.vocab, info.frames,
                              self.token_target(cfg))
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None

    @classmethod
    def finetune_recipe(cls, cfg: RunConfig) -> dict[str, float]:
        """Fine-tuning from --init: values for the settings left at -1 (auto), ``drop_path`` (model.drop_path)
        and ``layer_decay`` (train.layer_decay); what is not given, and every run without --init, gets 0 and 1
        (off). `cfg.model` is the checkpoint's backbone."""
        return {}

    @classmethod
    def token_target(cls, cfg: RunConfig) -> int:
        """Tokens per image the automatic patch size aims at (``tokenizer.patch_size=0``): 64, fine enough for
        pixels, boxes and words to be written back (recognition tasks choose by machine)."""
        return TOKEN_TARGET

    def unused_parameters(self) -> list[str]:
        """Trainable parameters the loss does not reach by design (the contract test allows them): the
        embeddings of token ids this task never feeds, e.g. the id table when every input is a patch."""
        return []

    def networks(self) -> list[nn.Module]:
        """The large networks, which ``train.compile`` compiles and FSDP shards block by block."""
        return [self.backbone]

    def init_from(self, path: str | Path) -> None:
        """Start from another run's backbone and input tokenizer (``--init``); heads stay freshly initialised.

        Any task's run will do: where the two tasks' vocabularies differ in size (a detector's box tokens, a
        captioner's bytes), the token tables (``wte``, ``lm_head``) stay fresh and everything else transfers
        (blocks, positions, the patch projection)."""
        weights = checkpoint.read_weights(path)
        source = checkpoint.read_meta(path).get("task", "?")
        for part in ("backbone", "input"):
            sub = {k[len(part) + 1:]: v for k, v in weights.items() if k.startswith(part + ".")}
            own = getattr(self, part).state_dict()
            fresh = [k for k in VOCAB_TABLES if part == "backbone" and k in sub and k in own
                     and sub[k].shape != own[k].shape]
            try:
                if fresh:
                    missing, unexpected = getattr(self, part).load_state_dict(
                        {k: v for k, v in sub.items() if k not in fresh}, strict=False)
                    if set(missing) - set(fresh) or unexpected:
                        raise RuntimeError(f"missing {sorted(set(missing) - set(fresh))}, unexpected {unexpected}")
                else:
                    getattr(self, part).load_state_dict(sub)
            except RuntimeError as e:
                first = str(e).strip().splitlines()[-1].strip()
                raise ConfigError(f"--init {path}: its {source} backbone does not fit a {self.name} model "
                                  f"({first})") from None
        for m in self.input.modules():
            if hasattr(m, "fitted"):
                m.fitted = True

    def fit(self, train_set: ImageSet, seed: int = 0) -> None:
        """Before training from scratch: fit what the tokenizer learns from data (a colour palette), or load
        the trained VQ-VAE named by ``tokenizer.vq``."""
        inp = getattr(self, "input", None)
        if inp is not None:
            inp.fit(lambda: train_set.images(4096), run="" if self.cfg.init else self.cfg.tokenizer.vq, seed=seed)

    def task_prompt(self, images: Tensor, task_id: int) -> Sequence:
        """The image's tokens and one task token, all a bidirectional prefix (Pix2Seq v2's task prompt): what
        tasks that write tokens after an image decode from."""
        B, dev = images.shape[0], images.device
        img = self.input.encode(images)
        return concat(img, tokens(torch.full((B, 1), task_id, dtype=torch.long, device=dev)),
                      prefix_len=img.ids.shape[1] + 1)

    def prefix_loss(self, seq: Sequence) -> tuple[Tensor, Tensor, Tensor]:
        """Next-token loss of what tasks write after a bidirectional prefix (labels sit only there): the LM
        head runs on the prefix's last position onwards alone. Returns (loss, logits (B, L, V), labels (B, L))."""
        P = seq.prefix_len - 1
        h = self.backbone(seq)[:, P:]                                      # (B, L, C) the prefix's last on
        tail = Sequence(ids=seq.ids[:, P:], labels=seq.labels[:, P:], pos=seq.pos[:, P:],
                        weights=None if seq.weights is None else seq.weights[:, P:])
        logits = self.backbone.logits(h)                                   # (B, L, V)
        return next_token_loss(logits, tail), logits, tail.labels

    # ---- training ------------------------------------------------------------------------------------------

    @abstractmethod
    def sequence(self, batch: dict, rng: RowRNG | None = None) -> Sequence:
        """The batch as the backbone's `Sequence`, with labels; `rng` draws training-time randomness (random
        prefixes, dropped conditions, noise objects), None at evaluation."""

    @abstractmethod
    def forward(self, batch: dict, rng: RowRNG | None = None) -> tuple[Tensor, dict]:
        """(loss, logs): the training loss and scalars to log (``{"loss": ..., ...}``, detached)."""

    def augmentation_note(self, note: str) -> str:
        """The start-up line's augmentation clause, given the generic one (`auto_augmentation`): the task's own
        where its `augment` does something else."""
        return note

    def augment(self, batch: dict, rng: RowRNG) -> dict:
        """Training-time augmentation of a batch (``data.augment``): random shifts and, with ``data.flip``,
        horizontal flips of the pixels, or random resized crops with flips (``data.crop``). Tasks whose targets
        move with the pixels (boxes) override it."""
        d = self.cfg.data
        if not d.augment:
            return batch
        key = input_key(batch)
        return {**batch, key: augment(batch[key], rng, max(0, d.shift), d.flip, max(0.0, d.crop))}

    # ---- inference -----------------------------------------------------------------------------------------

    @abstractmethod
    def predict(self, batch: dict) -> dict:
        """The task's outputs for a batch (tensors, or lists of per-item dicts), documented by each task."""

    @abstractmethod
    def metric(self) -> Metric:
        """A fresh accumulator of the task's validation metric."""

    def report(self, out: Path, val_set: ImageSet, metrics: dict, prefix: str = "", **options: Any) -> dict:
        """Write the task's pictures (and other files) about a finished run into `out`, their names starting
        with `prefix` (``patchgpt eval`` uses ``eval_``); returns further results to report (paths, extra
        scores). `options` come from ``patchgpt eval`` (e.g. a judge)."""
        return {}

    @torch.no_grad()
    def predict_files(self, paths: SequenceOf[str | Path], out: str | Path | None = None,
                      **options: Any) -> list[dict]:
        """The user's files in (read, resized and letterboxed as the training data was), JSON-able results
        out, one dict per file; with `out`, also written there (as the task documents)."""
        raise NotImplementedError(f"{self.name} has no predict_files")

    def ask(self, image: Any, prompt: str | None = None, out: str | Path | None = None) -> dict:
        """Answer `prompt` ("caption", "detect", "how many digits?" ...) about `image` (a path or PIL image)
        with the task it picks: ``{"task", "prompt", "answer", "result", "pictures"}`` (see `prompts.ask`)."""
        from .prompts import ask

        return ask(self, image, prompt, out)

    def ask_file(self, image: str | Path | None, out: Path, **options: Any) -> dict:
        """This task's answer about one file, pictures written into the directory `out` (what ``ask`` calls
        once the prompt picked this task; `options` carry a question or a ``word: text`` argument)."""
        if image is None:
            raise ConfigError(f"{self.name} needs an image")
        return self.predict_files([image], out=out if self.writes_dir else None, **options)[0]

    def read_files(self, paths: SequenceOf[str | Path]) -> dict:
        """A batch from image (or video) files, decoded like the training data, on the task's device."""
        d, C, S = self.cfg.data, self.info.channels, self.info.image_size[0]
        if self.info.frames:
            from ..data.video import read_video

            clips = [read_video(p, self.info.frames, S, C, d.resize, d.frame_stride) for p in paths]
            return to_device({"video": torch.stack(clips)}, self.device)        # (B, F, C, H, W)
        return to_device({"image": torch.stack([load_image(p, C, S, d.resize) for p in paths])}, self.device)

    # ---- bookkeeping ---------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        backbone = self.__dict__.get("backbone")   # a part of a multi-task model holds its backbone unregistered
        return next(iter(backbone.parameters()) if backbone is not None else self.parameters()).device

    def state(self) -> dict:
        """JSON-friendly state saved in config.json beside the weights (classes, vocab, ...)."""
        return {"vocab": self.vocab.entries(), "classes": self.info.classes,
                "channels": self.info.channels, "image_size": list(self.info.image_size),
                "captions": self.info.captions, "frames": self.info.frames}

    def describe(self) -> str:
        """The network, for the start-up line (``GPT micro``)."""
        return f"GPT {self.cfg.size}"

    @property
    def tokens_per_item(self) -> int:
        """Input tokens per image or clip (0 where the task has no token input)."""
        inp = getattr(self, "input", None)
        return inp.length if inp is not None else 0

    def num_params(self) -> int:
        """Trainable and frozen parameters of the whole task."""
        return sum(p.numel() for p in self.parameters())
