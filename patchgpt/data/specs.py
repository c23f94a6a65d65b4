"""Parse data specs (``digits``, ``folder:PATH``, ``idx:PATH``, ``emoji``, ``coco:ANN.json[:DIR]``,
``coco-captions:CAPTIONS.json[:DIR]``, ``vqa:QUESTIONS.json:ANNOTATIONS.json[:DIR]``, ``digit-scenes[:OPTIONS]``,
``masks:PATH``, ``videos:PATH``, ``moving-digits``, ``shards:PATTERN``) into train and validation sets.

`DATASETS` maps each spec's name (the part before ``:``) to a `Source`: its builder and one line of help.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ..config import DataConfig
from .base import ConcatSet, DataError, DataInfo, ImageSet, Subset, split
from .digits import Digits
from .idx import IdxImages, find_idx
from .images import ImageFolder

Built = tuple[ImageSet, ImageSet, DataInfo]   # (train, validation, info); shards: train is a stream


@dataclasses.dataclass(frozen=True)
class Source:
    """One data source: ``build(cfg, arg, classes) -> (train, val, info)``, one line of help, and the
    placeholder of the argument after ``name:`` ("" for a spec that takes none; with `optional`, options that
    may be left out)."""

    build: Callable[[DataConfig, str, list[str] | None], Built]
    help: str
    arg: str = ""
    whole: Callable[[ImageSet, ImageSet], ImageSet] | None = None   # (train, val) of a build with no held-out
    # fraction -> every item for evaluation; None = train then val. Sources whose items differ by split say how.
    optional: bool = False

    @property
    def takes_arg(self) -> bool:
        """Whether the spec needs an argument (``name:ARG``)."""
        return bool(self.arg) and not self.optional

    def usage(self, name: str) -> str:
        """How the spec is written: ``name``, ``name:ARG`` or ``name[:ARG]``."""
        if not self.arg:
            return name
        return f"{name}[:{self.arg}]" if self.optional else f"{name}:{self.arg}"


def _split(cfg: DataConfig, ds: ImageSet) -> Built:
    """A source without its own validation split: `cfg.val_fraction` of it held out by a seeded permutation."""
    train, val = split(ds, cfg.val_fraction, cfg.split_seed)
    return train, val, ds.info


def _digits(cfg: DataConfig, arg: str, classes: list[str] | None) -> Built:
    if cfg.channels not in (0, 1) or cfg.image_size not in range(8, 1025) and cfg.image_size != 0:
        raise DataError("digits are 8x8 grayscale: data.image_size may upsample them (8..1024), data.channels "
                        "applies to other sources")
    return _split(cfg, Digits(cfg.image_size or 8))


def _folder(cfg: DataConfig, arg: str, classes: list[str] | None) -> Built:
    return _split(cfg, ImageFolder(arg, channels=cfg.channels or 3, size=cfg.image_size or 32, resize=cfg.resize,
                                   on_error=cfg.on_error))


def _masks(cfg: DataConfig, arg: str, classes: list[str] | None) -> Built:
    from .masks import MaskFolder

    return _split(cfg, MaskFolder(arg, channels=cfg.channels or 3, size=cfg.image_size or 64, resize=cfg.resize,
                                  on_error=cfg.on_error))


def _idx(cfg: DataConfig, arg: str, classes: list[str] | None) -> Built:
    found = find_idx(arg)
    kw = dict(channels=cfg.channels, size=cfg.image_size, resize=cfg.resize)
    train = IdxImages(*found["train"], **kw)
    if "test" in found:
        return train, IdxImages(*found["test"], classes=train.info.classes, like=train, **kw), train.info
    return _split(cfg, train)


def _emoji(cfg: DataConfig, arg: str, classes: list[str] | None) -> Built:
    from .emoji import Emoji

    return _split(cfg, Emoji(size=cfg.image_size or 16))


def _coco_args(arg: str) -> tuple[str, str | None]:
    """``ANN.json[:IMAGES_DIR]`` -> (annotation file, images dir or None)."""
    i = arg.lower().find(".json:")
    return (arg[:i + 5], arg[i + 6:]) if i >= 0 else (arg, None)


def _coco(cfg: DataConfig, arg: str, classes: list[str] | None) -> Built:
    from .coco import CocoDetection

    ann, images_dir = _coco_args(arg)
    return _split(cfg, CocoDetection(ann, images_dir, channels=cfg.channels or 3, size=cfg.image_size or 64,
                                     resize=cfg.resize, on_error=cfg.on_error, classes=classes, masks=cfg.masks))


def _coco_captions(cfg: DataConfig, arg: str, classes: list[str] | None) -> Built:
    from .captions import CocoCaptions

    ann, images_dir = _coco_args(arg)
    ds = CocoCaptions(ann, images_dir, channels=cfg.channels or 3, size=cfg.image_size or 64, resize=cfg.resize,
                      on_error=cfg.on_error, pick="cycle")
    train, val = split(ds, cfg.val_fraction, cfg.split_seed)   # Subsets; validation reads first captions
    return train, Subset(ds.with_pick("first"), val.indices), ds.info


def _coco_captions_whole(train: ImageSet, val: ImageSet) -> ImageSet:
    """Every image for evaluation, each with its first caption as ``"text"`` (the reference)."""
    first = Subset(train.base.with_pick("first"), train.indices)   # train: a Subset of the CocoCaptions set
    return ConcatSet(first, val) if len(val) else first


def _vqa_files(cfg: DataConfig, arg: str, classes: list[str] | None) -> Built:
    from .vqa import VQAQuestions, split_by_image

    i = arg.lower().find(".json:")
    if i < 0:
        raise DataError(f"vqa:{arg}: give both files, vqa:QUESTIONS.json:ANNOTATIONS.json[:IMAGES_DIR]")
    answers, images_dir = _coco_args(arg[i + 6:])
    ds = VQAQuestions(arg[:i + 5], answers, images_dir, channels=cfg.channels or 3, size=cfg.image_size or 64,
                      resize=cfg.resize, on_error=cfg.on_error)
    train, val = split_by_image(ds, cfg.val_fraction, cfg.split_seed)   # no image in both splits
    return train, val, ds.info


def _digit_scenes(cfg: DataConfig, arg: str, classes: list[str] | None) -> Built:
    from .scenes import digit_scenes, scene_options

    if cfg.channels not in (0, 1):
        raise DataError("digit-scenes are grayscale; data.channels does not apply")
    opts = scene_options(arg)
    more = {"n_train": opts["scenes"]} if opts["scenes"] else {}
    train, val = digit_scenes(size=cfg.image_size or opts["canvas"] or 64, split_seed=cfg.split_seed,
                              holdout=opts["holdout"], canvas=opts["canvas"] or 0, **more)
    return train, val, train.info


def _videos(cfg: DataConfig, arg: str, classes: list[str] | None) -> Built:
    from .video import VideoFolder

    return _split(cfg, VideoFolder(arg, frames=cfg.frames or 8, size=cfg.image_size or 32,
                                   channels=cfg.channels or 3, resize=cfg.resize, stride=cfg.frame_stride,
                                   on_error=cfg.on_error))


def _moving_digits(cfg: DataConfig, arg: str, classes: list[str] | None) -> Built:
    from .moving import MovingDigits

    if cfg.channels not in (0, 1):
        raise DataError("moving-digits are grayscale; data.channels applies to other sources")
    return _split(cfg, MovingDigits(frames=cfg.frames or 4, size=cfg.image_size or 16))


def _shards(cfg: DataConfig, arg: str, classes: list[str] | None) -> Built:
    """``shards:PATTERN``: `patchgpt shard`'s shards as their meta.json describes them; WebDataset ones (no
    meta.json; ``pipe:COMMAND``) decoded by the data settings, as folders are."""
    from .shards import shard_sets
    from .wds import WdsRead

    return shard_sets(arg, cfg.val_fraction, WdsRead.of(cfg), classes)


DATASETS: dict[str, Source] = {
    "digits": Source(_digits, "scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes)"),
    "folder": Source(_folder, "your images: one subfolder per class, or a flat folder of unlabeled images; a "
                              "metadata.jsonl adds captions (text, question, answer)", "PATH"),
    "masks": Source(_masks, "your segmentation data: images/ and masks/ with the same file stems, masks as 8-bit "
                            "or palette PNG label maps (0 background, 255 ignore), optional classes.txt", "PATH"),
    "idx": Source(_idx, "a folder of MNIST-format IDX files (train-images-idx3-ubyte[.gz], ...)", "PATH"),
    "emoji": Source(_emoji, "colour emoji rendered from the Noto Color Emoji font, captioned with their Unicode "
                            "names"),
    "coco": Source(_coco, "COCO instance annotations (detection); images next to the JSON by default",
                   "ANN.json[:IMAGES_DIR]"),
    "coco-captions": Source(_coco_captions, "COCO caption annotations (captioning): each image with one of its "
                                            "captions; images next to the JSON by default",
                            "CAPTIONS.json[:IMAGES_DIR]", whole=_coco_captions_whole),
    "vqa": Source(_vqa_files, "VQA v2 questions and annotations (visual question answering, soft accuracy); "
                              "COCO images found by id, next to the questions file by default",
                  "QUESTIONS.json:ANNOTATIONS.json[:IMAGES_DIR]"),
    "digit-scenes": Source(_digit_scenes, "detection scenes: 1-4 real handwritten digits pasted on 64x64 "
                                          "canvases, exact boxes, captions; holdout=N keeps 10 digit pair/"
                                          "relation combinations out of training, canvas=PX draws at PX then "
                                          "resizes to data.image_size, scenes=N sets how many training scenes "
                                          "(16000)", "holdout=N,canvas=PX,scenes=N",
                           whole=lambda train, val: val, optional=True),  # generated:
    # the validation scenes (disjoint handwriting) are the evaluation set
    "videos": Source(_videos, "your video clips (mp4, avi, webm, mkv, gif): one subfolder per class, or a flat "
                              "folder", "PATH"),
    "moving-digits": Source(_moving_digits, "bundled digits moving and bouncing on a canvas, labelled by direction "
                                            "(8 classes)"),
    "shards": Source(_shards, "streamed tar shards: `patchgpt shard`'s, or WebDataset/img2dataset ones (.jpg/"
                              ".png/.webp with .cls, .txt, .json; a classes.txt beside them names classes) from a "
                              "dir, glob, train-{000000..000009}.tar, or pipe:COMMAND", "PATTERN"),
}


def build_datasets(cfg: DataConfig, classes: list[str] | None = None) -> tuple[ImageSet, ImageSet, DataInfo]:
    """The (train, val, info) sets for `cfg.spec`; a `DataError` explains a bad spec in one line.

    With ``cfg.val_spec`` set, the whole of `cfg.spec` trains and the whole of `cfg.val_spec` validates.
    `classes` (a checkpoint's) fixes the class order of sources that can follow it (COCO files).
    """
    if cfg.val_spec:
        train, _, info = _build(cfg, cfg.spec, classes, val_fraction=0.0)
        val_full = whole_dataset(cfg, cfg.val_spec, info.classes)
        if val_full.info.classes != info.classes:
            raise DataError(f"data.val_spec={cfg.val_spec}: classes {val_full.info.classes} differ from "
                            f"{cfg.spec}'s {info.classes}")
        v = val_full.info
        if (v.channels, tuple(v.image_size), v.frames) != (info.channels, tuple(info.image_size), info.frames):
            raise DataError(f"data.val_spec={cfg.val_spec}: its items are {_shape(v)}, {cfg.spec}'s are "
                            f"{_shape(info)}")
        return train, val_full, info
    return _build(cfg, cfg.spec, classes)


def _shape(info: DataInfo) -> str:
    frames = f"{info.frames} frames of " if info.frames else ""
    return f"{frames}{info.channels}x{info.image_size[0]}x{info.image_size[1]}"


def whole_dataset(cfg: DataConfig, spec: str, classes: list[str] | None = None) -> ImageSet:
    """Every item of `spec` (no train/validation split): for evaluating on a separate file or folder."""
    if spec.strip().startswith("shards:"):
        from .shards import all_items, find_shards
        from .wds import WdsRead

        return all_items(*find_shards(spec.strip()[len("shards:"):], WdsRead.of(cfg), classes))
    train, val, _ = _build(cfg, spec, classes, val_fraction=0.0)
    src = DATASETS.get(spec.strip().partition(":")[0])
    if src is not None and src.whole is not None:
        return src.whole(train, val)
    return ConcatSet(train, val) if len(val) else train


def _build(cfg: DataConfig, spec: str, classes: list[str] | None = None,
           val_fraction: float | None = None) -> Built:
    spec = spec.strip()
    if val_fraction is not None:
        cfg = dataclasses.replace(cfg, val_fraction=val_fraction)
    name, _, arg = spec.partition(":")
    source = DATASETS.get(name)
    if source is None or (arg and not source.arg) or (not arg and source.takes_arg):
        known = "; ".join(f"{s.usage(n)} ({s.help})" for n, s in DATASETS.items())
        raise DataError(f"unknown data spec {spec!r}; use one of: {known}")
    return source.build(cfg, arg, classes)
