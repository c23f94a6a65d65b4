"""One model, many tasks: a multi-task model trained on a mix of data (Pix2Seq v2's task prompts).

``patchgpt train multi --data "classify=digits,detect=digit-scenes,caption=digit-scenes,vqa=digit-scenes"``
builds each named task as it would be built alone (its recipe's data settings, its own config section), on
one vocabulary, then gives them one GPT backbone and one input tokenizer: every task's sequence starts with
the image and the task's own token (and, for VQA, the question), so the prompt picks the task. The heads that
remain (a classifier, the segmenter's pixel head) hang off the shared backbone.

Every step holds rows of every task (``multi.weights`` sets the shares), the loss is their row-weighted mean,
and each task's loss is logged (``loss/caption``...); evaluation runs each task's own metric on its own
validation split (``caption/exact``, ``detect/map50``...). Nothing here names a task: the parts come from the
registry by the names in the data spec.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import ConfigError, RunConfig
from ..data.base import DataError, DataInfo, ImageSet, auto_augmentation
from ..data.mixture import Mixture
from ..rng import RowRNG
from ..sequence import Sequence
from .base import Metric, Task, build_backbone, metric_files, scene_recipe

DEMO = "classify=digits,caption=digit-scenes"
# The data settings each part takes from the multi-task run (the rest come from the part's own recipe).
SHARED_DATA = ("image_size", "channels", "val_fraction", "split_seed", "on_error", "num_workers", "shuffle")


@dataclass
class MultiConfig:
    weights: str = ""   # each task's share of a step's rows: "detect=2,caption=1" or "2,1,1" in --data order; equal


def _registry() -> dict[str, type[Task]]:
    from . import TASKS

    return TASKS


def plan(cfg: RunConfig) -> dict[str, str]:
    """``data.spec`` ("classify=digits,caption=digit-scenes:holdout=4") -> {task: its data spec}, in order."""
    tasks = _registry()
    names = "|".join(re.escape(n) for n in sorted(tasks, key=len, reverse=True))
    spec = cfg.data.spec.strip()
    pieces = re.split(rf",\s*(?=(?:{names})\s*=)", spec)
    out: dict[str, str] = {}
    for piece in pieces:
        name, eq, source = (x.strip() for x in piece.partition("="))
        if not eq or not source:
            raise ConfigError(f"multi --data {spec!r}: write TASK=SPEC pairs separated by commas, e.g. "
                              f"'{DEMO}'")
        if name not in tasks:
            raise ConfigError(f"multi --data: unknown task {name!r}; choose from {', '.join(tasks)}")
        cls = tasks[name]
        if not cls.shares_backbone:
            raise ConfigError(f"multi --data: {name} cannot share the backbone (choose tasks that read the image "
                              "as a prefix: classify, detect, caption, vqa, segment, restore)")
        if name in out:
            raise ConfigError(f"multi --data: {name} is named twice")
        out[name] = source
    return out


def weights(cfg: RunConfig, names: list[str]) -> dict[str, float]:
    """``multi.weights`` -> {task: weight} (equal by default); one-line errors for a bad list."""
    raw = cfg.multi.weights.strip()
    if not raw:
        return {n: 1.0 for n in names}
    items = [x.strip() for x in raw.split(",") if x.strip()]
    pairs = all("=" in x for x in items)
    if not pairs and len(items) != len(names):
        raise ConfigError(f"multi.weights={raw!r}: give one weight per task ({', '.join(names)}) or TASK=WEIGHT pairs")
    try:
        got = {k.strip(): float(v) for k, v in (x.split("=", 1) for x in items)} if pairs else \
            dict(zip(names, (float(x) for x in items), strict=True))
    except ValueError:
        raise ConfigError(f"multi.weights={raw!r}: weights are numbers, e.g. 'detect=2,caption=1'") from None
    unknown = set(got) - set(names)
    if unknown:
        raise ConfigError(f"multi.weights: {sorted(unknown)} not in --data ({', '.join(names)})")
    w = {n: got.get(n, 1.0) for n in names}
    if any(v <= 0 for v in w.values()):
        raise ConfigError(f"multi.weights={raw!r}: every weight must be positive")
    return w


def part_config(cfg: RunConfig, name: str, spec: str) -> RunConfig:
    """The config task `name` would have alone (its recipe), with this run's backbone, tokenizer, training
    settings and sections (shared objects) and its own data spec."""
    from . import default_config

    sub = default_config(name)
    sub.size, sub.model, sub.tokenizer, sub.train, sub.init = cfg.size, cfg.model, cfg.tokenizer, cfg.train, ""
    shared = {k: getattr(cfg.data, k) for k in SHARED_DATA}
    sub.data = dataclasses.replace(sub.data, spec=spec, **shared)
    sub.sections = {k: cfg.sections[k] for k in sub.sections}
    sub.out = cfg.out
    return sub


class Multi(Task):
    """Several tasks on one backbone, picked by their task prompt (train on a mix, ask any of them)."""

    name = "multi"
    section = "multi"
    Config = MultiConfig
    output_keys = ("outputs",)
    metric_keys = ("tasks",)
    demo_data = DEMO
    pretrainer = None   # --pretrain-steps: pretrain a single task's run, then --init from it (the data differ)
    examples = ['patchgpt train multi --data "classify=digits,detect=digit-scenes,caption=digit-scenes,'
                'vqa=digit-scenes" --out runs/multi --time 30m',
                'patchgpt ask runs/multi scene.png "how many digits?"',
                'patchgpt serve runs/multi']

    @classmethod
    def defaults(cls, cfg: RunConfig) -> None:
        """The scenes' recipe (8x8 patches, lr 1e-3), 64 px inputs for every part, batches of 64 rows shared
        by the tasks, 4,000 steps."""
        scene_recipe(cfg)
        cfg.data.spec = "classify=digits,detect=digit-scenes,caption=digit-scenes,vqa=digit-scenes"
        cfg.data.image_size = 64
        cfg.train.batch_size, cfg.train.steps = 64, 4000

    @classmethod
    def config_sections(cls) -> dict[str, type]:
        """Its own section and every task's (``--set caption.max_len=...`` reaches the caption part)."""
        out: dict[str, type] = {}
        for t in _registry().values():
            if t is not cls:
                out.update(t.config_sections())
        return {**out, cls.section: cls.Config}

    @classmethod
    def check(cls, cfg: RunConfig) -> None:
        p = plan(cfg)
        weights(cfg, list(p))
        for name, spec in p.items():
            _registry()[name].check(part_config(cfg, name, spec))

    @classmethod
    def datasets(cls, cfg: RunConfig, classes: list[str] | None = None) -> tuple[ImageSet, ImageSet, DataInfo]:
        """Each part's sets, as the part alone would build them, in a `Mixture`; the parts must agree on the
        image shape (one input tokenizer reads them all)."""
        p = plan(cfg)
        trains, vals, infos = {}, {}, {}
        for name, spec in p.items():
            sub = part_config(cfg, name, spec)
            trains[name], vals[name], infos[name] = _registry()[name].datasets(sub)
        shapes = {n: (i.channels, tuple(i.image_size), i.frames) for n, i in infos.items()}
        if len(set(shapes.values())) > 1:
            raise DataError("multi: the tasks' data differ in shape ("
                            + ", ".join(f"{n}: {c}x{s[0]}x{s[1]}" for n, (c, s, _) in shapes.items())
                            + "); set data.image_size and data.channels for all")
        first = next(iter(infos.values()))
        info = DataInfo(channels=first.channels, image_size=tuple(first.image_size), parts=infos)
        w = weights(cfg, list(p))
        return Mixture(trains, info, w), Mixture(vals, info, w), info

    def __init__(self, cfg: RunConfig, info: DataInfo, vocab: Any = None) -> None:
        super().__init__(cfg, info, vocab)
        if not info.parts:
            raise DataError("multi: the data names no tasks (--data 'classify=digits,caption=digit-scenes')")
        p = plan(cfg)
        if list(p) != list(info.parts):
            raise DataError(f"multi: the data's tasks {list(info.parts)} differ from --data's {list(p)}")
        built: dict[str, Task] = {}
        for name, spec in p.items():
            sub = part_config(cfg, name, spec)
            cls = _registry()[name]
            auto_augmentation(sub.data, info.channels, tuple(info.image_size), cls.augment_by_size)
            built[name] = cls(sub, info.parts[name], vocab=self.vocab)   # one vocabulary: ids never collide
        first = next(iter(built.values()))
        for name, part in built.items():
            if (part.input.patch_dim, part.input.length, part.input.grid) != \
                    (first.input.patch_dim, first.input.length, first.input.grid):
                raise ConfigError(f"multi: {name} tokenizes the images differently from {next(iter(built))}")
        self.input = first.input
        # cfg.model is shared by the parts, so it already holds the longest sequence and largest grid.
        self.backbone = build_backbone(cfg, self.vocab, self.input.patch_dim, cfg.model.block_size,
                                       self.input.grid)
        for part in built.values():   # each part keeps using the shared modules, unregistered (saved once)
            for attr, shared in (("backbone", self.backbone), ("input", self.input)):
                part._modules.pop(attr, None)
                part.__dict__[attr] = shared
        self.parts = nn.ModuleDict(built)
        self.rows = weights(cfg, list(p))

    def describe(self) -> str:
        return f"GPT {self.cfg.size} shared by {', '.join(self.parts)}"

    def state(self) -> dict:
        return {**super().state(), "parts": {name: part.state() for name, part in self.parts.items()}}

    def fit(self, train_set: ImageSet, seed: int = 0) -> None:
        """Each part's checks and fitting on its own training set."""
        for name, part in self.parts.items():
            part.fit(train_set.parts[name] if isinstance(train_set, Mixture) else train_set, seed)

    def unused_parameters(self) -> list[str]:
        out = []
        for name, part in self.parts.items():
            out += [n if n.startswith(("backbone.", "input.")) else f"parts.{name}.{n}"
                    for n in part.unused_parameters()]
        return out

    # ---- training ------------------------------------------------------------------------------------------

    @staticmethod
    def _split(rng: RowRNG | None, batch: dict) -> dict[str, RowRNG | None]:
        """One row generator per part: seeded from batch-wide draws (the same on every rank), each part's rows
        placed in its own global batch."""
        if rng is None:
            return {name: None for name in batch}
        n = sum(len(next(iter(v.values()))) for v in batch.values())
        total = rng.total if rng.total is not None else n
        rank, world = rng.first // max(n, 1), max(1, total // max(n, 1))
        out = {}
        for name, sub in batch.items():
            k = len(next(iter(sub.values())))
            out[name] = RowRNG(torch.Generator().manual_seed(rng.batch_randint(0, 2**62)), rank * k, world * k)
        return out

    def augment(self, batch: dict, rng: RowRNG) -> dict:
        rngs = self._split(rng, batch)
        return {name: self.parts[name].augment(sub, rngs[name]) for name, sub in batch.items()}

    def sequence(self, batch: dict, rng: RowRNG | None = None) -> Sequence:
        """The first part's sequence (the parts' sequences differ in length; `forward` runs each)."""
        name = next(iter(batch))
        return self.parts[name].sequence(batch[name], rng)

    def forward(self, batch: dict, rng: RowRNG | None = None) -> tuple[Tensor, dict]:
        """The row-weighted mean of the parts' losses; logs ``loss/NAME`` and each part's logs as ``NAME/key``."""
        rngs = self._split(rng, batch)
        sizes = {name: len(next(iter(sub.values()))) for name, sub in batch.items()}
        n = sum(sizes.values())
        total: Tensor | float = 0.0
        logs: dict[str, Tensor] = {}
        for name, sub in batch.items():
            loss, part_logs = self.parts[name](sub, rngs[name])
            total = total + loss * (sizes[name] / n)
            logs[f"loss/{name}"] = loss.detach()
            logs.update({f"{name}/{k}": v for k, v in part_logs.items() if k != "loss"})
        assert isinstance(total, Tensor)
        return total, {"loss": total.detach(), **logs}

    # ---- inference -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, batch: dict) -> dict:
        """``{"outputs": {name: that part's predict}}`` for the parts present in the batch."""
        return {"outputs": {name: self.parts[name].predict(sub) for name, sub in batch.items()}}

    def metric(self) -> Metric:
        return MultiMetric(self)

    @torch.no_grad()
    def predict_files(self, paths: SequenceOf[str | Path], out: str | Path | None = None,
                      **options: Any) -> list[dict]:
        """Every part that needs nothing more than the image (a question: ``question=``) on each file: per file
        ``{"image": path, NAME: that part's result, ...}``; with `out`, each part writes into ``out/NAME``."""
        results: list[dict] = [{"image": str(p)} for p in paths]
        for name, part in self.parts.items():
            if part.answers_questions and not options.get("question"):
                continue
            where = None if out is None else Path(out) / name if part.writes_dir else Path(out) / f"{name}.json"
            try:
                got = part.predict_files(paths, out=where, **options)
            except ConfigError:   # a part that needs an option not given (inpainting's mask)
                continue
            for r, g in zip(results, got, strict=True):
                r[name] = {k: v for k, v in g.items() if k != "image"}
        return results

    def report(self, out: Path, val_set: ImageSet, metrics: dict, prefix: str = "", **options: Any) -> dict:
        """Each part's pictures, named ``{prefix}NAME_...``."""
        files: dict = {}
        per_task = metrics.get("tasks", {})
        for name, part in self.parts.items():
            sub_val = val_set.parts[name] if isinstance(val_set, Mixture) else val_set
            got = part.report(out, sub_val, per_task.get(name, {}), prefix=f"{prefix}{name}_", **options)
            files.update({f"{name}/{k}": v for k, v in got.items()})
        return files


class MultiMetric:
    """Each part's own metric over its own validation batches. ``compute``: ``val_loss`` (the mean of the
    parts'), ``tasks`` ({name: that part's results}) and every scalar again as ``NAME/key``."""

    def __init__(self, task: Multi) -> None:
        self.metrics = {name: part.metric() for name, part in task.parts.items()}
        self.seen: set[str] = set()

    def update(self, batch: dict) -> None:
        for name, sub in batch.items():
            self.metrics[name].update(sub)
            self.seen.add(name)

    def compute(self) -> dict:
        per = {name: m.compute() for name, m in self.metrics.items() if name in self.seen}
        losses = [r["val_loss"] for r in per.values() if isinstance(r.get("val_loss"), (int, float))]
        flat = {f"{name}/{k}": v for name, r in per.items() for k, v in r.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return {"val_loss": sum(losses) / max(1, len(losses)), "tasks": per, **flat}

    def files(self) -> dict[str, Any]:
        return {f"{name}_{k}": v for name, m in self.metrics.items() for k, v in metric_files(m).items()}
