"""The `patchgpt` command: train, eval, predict and quickstart (see ``patchgpt --help``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from .checkpoint import CheckpointError
from .config import (
    SEEDS,
    ConfigError,
    DataConfig,
    RunConfig,
    apply_recipe,
    apply_size,
    check,
    check_ranges,
    read_recipe,
    set_override,
)
from .data import DATASETS
from .data.base import DataError
from .dist import DeviceError
from .model import SIZES
from .tasks import PRECISIONS, TASKS, default_config, task_class

COMMON_EXAMPLES = """  patchgpt quickstart --out runs/quickstart
  patchgpt eval RUN --json
  patchgpt predict RUN file.png [more files ...]
  patchgpt shard --data folder:~/photos --out shards --per-shard 1000 --set data.image_size=32"""


def _epilog() -> str:
    """Examples (each task brings its own), the data specs and the config sections, from the registries."""
    examples = "\n".join(f"  {e}" for cls in dict.fromkeys(TASKS.values()) for e in cls.examples)
    specs = "\n".join(f"  {src.usage(name):<28} {src.help}" for name, src in DATASETS.items())
    sections = sorted({cls.section for cls in TASKS.values() if cls.section})
    return (f"examples:\n{COMMON_EXAMPLES}\n{examples}\n\ndata specs (--data):\n{specs}\n\n"
            f"config (--set section.key=value): model, data, tokenizer, train, and the task's own section "
            f"({', '.join(sections)}); a run's config.json lists every key")


def _task_help() -> str:
    return "tasks: " + " | ".join(f"{name} ({(cls.__doc__ or '').strip().splitlines()[0].rstrip('.')})"
                                  for name, cls in TASKS.items())


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``patchgpt: error: ...``, exit 2), as every other bad
    value is, instead of argparse's usage block; ``--help`` still shows the usage."""

    def error(self, message: str):
        command = self.prog.removeprefix("patchgpt").strip()
        raise ConfigError(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")


def _ranged(kind: type, interval: str) -> Callable[[str], int | float]:
    """An argparse ``type=``: `kind` (int or float) parsed from the flag's text, finite and inside `interval`
    (written as in `check_ranges`: ``"[1, inf)"``, ``"(0, 1]"``)."""
    def parse(raw: str) -> int | float:
        try:
            value = kind(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {raw!r}") from None
        try:
            check_ranges({"": (value, interval)})
        except ConfigError as e:
            raise argparse.ArgumentTypeError(f"{str(e).split(': ', 1)[1]}, got {raw}") from None
        return value
    parse.__name__ = kind.__name__
    return parse


PRECISION_HELP = ("how sampling and decoding run: int8 weights on the CPU (fewer bytes per token: faster, "
                  "slightly different numbers; see the README's benchmarks), fp32 (exact), or auto: int8 on the "
                  "CPU, fp32 on a GPU (default: %(default)s)")


def _precision_flags(x: argparse.ArgumentParser, default: str) -> None:
    """``--precision auto|fp32|int8``, and ``--int8`` / ``--fp32`` as its short forms."""
    x.add_argument("--precision", choices=PRECISIONS, default=default, help=PRECISION_HELP)
    x.add_argument("--int8", dest="precision", action="store_const", const="int8", help="same as --precision int8")
    x.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="same as --precision fp32")
POSITIVE = _ranged(int, "[1, inf)")
NON_NEGATIVE = _ranged(int, "[0, inf)")
FINITE = _ranged(float, "[-inf, inf]")
TEMPERATURE = _ranged(float, "[0, inf)")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="patchgpt", description="One GPT over image patch sequences.", epilog=_epilog(),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quickstart", help="the main job on the bundled digits (baseline, pretraining, probes, "
                       "fine-tuning); writes a report")
    q.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    q.add_argument("--smoke", action="store_true", help="a tiny setting that runs in seconds (for tests)")

    t = sub.add_parser("train", help="train a task", epilog=_task_help())
    t.add_argument("task", nargs="?", choices=list(TASKS), help="the task (or the recipe's `task`)")
    t.add_argument("--config", metavar="FILE", help="a recipe file holding a whole run (TOML; YAML with PyYAML; a "
                   "run's own config.json): its `task`, `size`, `out` and [sections]; flags and --set override it")
    t.add_argument("--data", help="data spec (default: digits)")
    t.add_argument("--model", choices=list(SIZES), help="backbone size (default: micro)")
    t.add_argument("--init", help="checkpoint or run directory to start from (backbone and tokenizer)")
    t.add_argument("--out", help="run directory (default: runs/TASK)")
    t.add_argument("--steps", type=POSITIVE, help="optimizer steps (at least 1)")
    t.add_argument("--time", help="a wall-clock budget (300, 90s, 10m, 1.5h): the step count is set from the "
                   "throughput of the first steps, so the schedule ends on time (instead of --steps)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    t.add_argument("--pretrain-steps", type=POSITIVE, metavar="N",
                   help="first pretrain generatively for N steps on the same data (into OUT-pretrain), then train "
                   "this task from it (--init); --set pretrain.KEY=... configures that stage")
    t.add_argument("--pretrain-task", metavar="TASK",
                   help="with --pretrain-steps: the first stage's task instead of generative pretraining, e.g. "
                   "segment (dense labels teach a small model to read objects; its --set SECTION.KEY go there)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--overwrite", action="store_true",
                   help="--out already holds a run: move it aside into OUT/replaced-N/ and start afresh")

    h = sub.add_parser("shard", help="write a data spec as WebDataset-style tar shards (train with shards:DIR)")
    h.add_argument("--data", required=True, help="data spec to write (any spec `train` accepts)")
    h.add_argument("--out", required=True, help="directory for the shards and their meta.json")
    h.add_argument("--per-shard", type=POSITIVE, default=1000, help="items per shard (default: 1000)")
    h.add_argument("--split", choices=["train", "val"], default="train", help="which split to write (default: train)")
    h.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data field, e.g. data.image_size=32")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its validation data (or --data)")
    e.add_argument("ckpt", help="checkpoint or run directory")
    e.add_argument("--data", help="another data spec to evaluate on (its validation split, or all with --all)")
    e.add_argument("--all", action="store_true", help="evaluate on every item of --data, not its validation split")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--out", help="where to write the evaluation's pictures and files (default: CKPT's run directory)")
    e.add_argument("--judge", help="image generators: a classifier checkpoint (same classes) that judges "
                   "class-conditional samples (train one with `patchgpt train` on the same data), or a detector "
                   "(`patchgpt train detect --data digit-scenes`) for the compositional check of a text-conditional "
                   "digit-scenes generator")
    e.add_argument("--per-class", type=POSITIVE, default=20,
                   help="image generators: samples per class (or per held-out caption) to judge")
    e.add_argument("--cfg", type=FINITE, help="image generators: guidance scale for the samples")
    e.add_argument("--temperature", type=TEMPERATURE, help="image generators: temperature for the samples")
    _precision_flags(e, "fp32")   # figures are measured on the exact path unless asked

    r = sub.add_parser("predict", help="run a checkpoint on image (or video) files; prints JSON")
    r.add_argument("ckpt", help="checkpoint or run directory")
    r.add_argument("images", nargs="+", help="image files (video files for a model of clips)")
    r.add_argument("--top", type=POSITIVE, default=5, help="classifiers: probabilities to list per input (default: 5)")
    r.add_argument("--out", help="where to also write results: a JSON file for classifiers, a directory of JSON "
                   "and pictures for the other tasks")
    r.add_argument("--min-score", type=_ranged(float, "[0, 1]"), default=0.0,
                   help="detectors: drop boxes scoring below this (0..1)")
    r.add_argument("--question", help="question answering: the question to ask of every image")
    r.add_argument("--mask", help="inpainting: a PNG the size of the image, white where pixels are missing")
    _precision_flags(r, "auto")
    k = sub.add_parser("ask", help="ask a checkpoint about an image: the prompt picks the task (caption, detect, "
                       "segment, a question ...); prints JSON, pictures in --out")
    k.add_argument("ckpt", help="checkpoint or run directory")
    k.add_argument("image", nargs="?", help="image file (none for 'draw: TEXT' on an image generator)")
    k.add_argument("prompt", nargs="?", help="what to do: a task (caption, detect, segment, classify, denoise ...), "
                   "a question, or 'draw: TEXT' (default: the checkpoint's one task)")
    k.add_argument("--out", help="directory for the answer's pictures (default: a temporary one, kept)")
    _precision_flags(k, "auto")

    v = sub.add_parser("serve", help="a local web page to try a checkpoint: drop an image, pick or type a prompt")
    v.add_argument("ckpt", help="checkpoint or run directory")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    v.add_argument("--port", type=_ranged(int, "[0, 65535]"), default=8000, help="port (default: 8000; 0 = any free)")
    v.add_argument("--max-mb", type=_ranged(float, "(0, inf)"), default=10.0,
                   help="largest upload accepted, in MB (default: 10)")
    u = sub.add_parser("push", help="upload a checkpoint to the Hugging Face hub with a generated model card "
                       "(needs `pip install 'patchgpt[hf]'` and a token: `hf auth login`)")
    u.add_argument("ckpt", help="checkpoint or run directory (RUN/best for the best one)")
    u.add_argument("repo", help="USER/REPO on the hub (created if missing); load it back with hf:USER/REPO")
    u.add_argument("--private", action="store_true", help="create the repository private")
    u.add_argument("--message", help="commit message")
    x = sub.add_parser("export", help="export a checkpoint for deployment: ONNX (a classifier's logits, or the "
                       "backbone's features), dynamic batch")
    x.add_argument("ckpt", help="checkpoint or run directory")
    x.add_argument("--format", choices=["onnx", "hf-imagegpt"], default="onnx",
                   help="onnx (default), or hf-imagegpt: a Hugging Face ImageGPT directory (colour-token generators "
                   "with ImageGPT's options, e.g. an imported one)")
    x.add_argument("--what", choices=["auto", "logits", "features"], default="auto",
                   help="logits (classifiers; their default) or features (the backbone's token features)")
    x.add_argument("--out", help="file to write (default: CKPT's run directory / model.onnx, or / hf-imagegpt)")

    m = sub.add_parser("import-hf", help="convert a Hugging Face ImageGPT directory (ImageGPTForCausalImageModeling "
                       "or ImageGPTForImageClassification, with its preprocessor_config.json) into a patchgpt run")
    m.add_argument("src", help="the directory (save_pretrained's, or a downloaded openai/imagegpt-small)")
    m.add_argument("--out", required=True, help="run directory to write")
    _sampling_commands(sub)
    return p


def _sampling_commands(sub) -> None:
    """``sample`` and ``complete``: for checkpoints whose task draws images."""
    def sampling_flags(x: argparse.ArgumentParser) -> None:
        x.add_argument("--class", dest="cls", action="append", help="class name or index (repeatable)")
        x.add_argument("--prompt", action="append", help="caption for a text-conditional model (repeatable)")
        x.add_argument("--n", type=POSITIVE, default=8, help="samples per class/prompt (default: 8)")
        x.add_argument("--temperature", type=TEMPERATURE, help="softmax temperature (0 = greedy)")
        x.add_argument("--top-k", type=NON_NEGATIVE, help="sample among the k most likely tokens (0 = all)")
        x.add_argument("--top-p", type=_ranged(float, "(0, 1]"), help="nucleus sampling mass in (0, 1] (1 = all)")
        x.add_argument("--cfg", type=FINITE, help="classifier-free guidance scale (0 = none)")
        x.add_argument("--seed", type=_ranged(int, SEEDS), default=0, help="sampler seed (default: 0)")
        _precision_flags(x, "auto")

    s_ = sub.add_parser("sample", help="sample images from an image generator into a PNG grid")
    s_.add_argument("ckpt")
    sampling_flags(s_)
    s_.add_argument("--out", default="samples.png", help="PNG to write (default: samples.png)")

    c = sub.add_parser("complete", help="complete the rest of an image from its top part")
    c.add_argument("ckpt")
    c.add_argument("image")
    sampling_flags(c)
    c.add_argument("--keep", type=_ranged(float, "(0, 1)"), default=0.5,
                   help="fraction of the image tokens kept, in raster order, in (0, 1) (default: 0.5)")
    c.add_argument("--out", default="completion.png", help="PNG to write (default: completion.png)")


def cmd_train(a: argparse.Namespace) -> None:
    from . import dist
    from .train import train

    recipe = read_recipe(a.config) if a.config else {}
    task = a.task or recipe.get("task")
    if not task:
        raise ConfigError("train: name the task (patchgpt train TASK), or give a --config recipe with task = ...")
    if a.task and recipe.get("task") and recipe["task"] != a.task:
        raise ConfigError(f"--config {a.config}: its task is {recipe['task']!r}, the command asks for {a.task!r}")
    cfg = default_config(task)
    if recipe:
        apply_recipe(cfg, recipe, where=str(a.config))
    if a.data:
        cfg.data.spec = a.data
    if a.model:
        apply_size(cfg, a.model)
    if a.init:
        cfg.init = a.init
    cfg.out = a.out or cfg.out
    if a.steps is not None:
        cfg.train.steps = a.steps
    if a.time is not None:
        from .budget import parse_duration

        cfg.train.time = parse_duration(a.time)
        if not any(x.strip().startswith("train.eval_every=") for x in a.set):
            cfg.train.eval_every = 0  # the budget is for training: evaluate at the end only, unless asked
    if a.pretrain_task and not a.pretrain_steps:
        raise ConfigError("--pretrain-task names the first stage of --pretrain-steps N: give both")
    stage_keys = _stage_sections(cfg.task, _stage_task(cfg.task, a.pretrain_task)) if a.pretrain_steps else ()
    for s in a.set:
        if not (stage_keys and s.strip().startswith(stage_keys)):
            set_override(cfg, s)
    # Checked here too, before `train` sets threads and picks the device, so that every bad value is one line.
    check(cfg)
    task_class(cfg.task).check(cfg)
    if cfg.init.startswith("hf-imagegpt:"):   # convert once, beside the run, and start from that
        from .imagegpt import import_imagegpt

        cfg.init = str(import_imagegpt(cfg.init.removeprefix("hf-imagegpt:"), f"{str(cfg.out).rstrip('/')}-imagegpt"))
    try:
        if a.pretrain_steps:
            cfg.init = str(_pretrain_stage(cfg, a))
        out = train(cfg, resume=a.resume, quiet=a.quiet, overwrite=a.overwrite)
        main = dist.is_main()
    finally:
        dist.cleanup()
    if not main:
        return
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    print(f"run directory: {out}", file=sys.stderr)


_SHARED = ("train.seed=", "train.compile=")


def _stage_task(task: str, asked: str | None) -> str:
    """The first stage's task of ``--pretrain-steps``: `asked` (``--pretrain-task``) or `task`'s pretrainer; a
    one-line error where there is none or it trains no backbone."""
    name = asked or task_class(task).pretrainer
    if name is None:
        raise ConfigError(f"--pretrain-steps: {task} does not start from a pretrained backbone")
    if task_class(name).pretrainer is None or name == task:   # no pretrainer: it trains no backbone (vq)
        raise ConfigError(f"--pretrain-task {name}: choose a task that trains a backbone for {task}, e.g. "
                          "pretrain or segment")
    return name


def _stage_sections(task: str, stage: str) -> tuple[str, ...]:
    """The ``--set`` prefixes that configure the first stage (the stage task's section, and that of `task`'s
    usual pretrainer), not the task itself."""
    usual = task_class(task).pretrainer
    sections = {task_class(stage).section, task_class(usual).section if usual else None}
    return tuple(sorted(f"{x}." for x in sections - {None, task_class(task).section}))


def _pretrain_stage(cfg: RunConfig, a: argparse.Namespace) -> Path:
    """``train TASK --pretrain-steps N``: generative pretraining on the task's own data, in ``OUT-pretrain``
    (continued if an earlier call left it unfinished, reused if it finished, unless --overwrite); returns that
    run directory."""
    from . import checkpoint
    from .train import train

    if cfg.init:
        raise ConfigError("--pretrain-steps starts from a fresh pretraining: drop --init, or drop --pretrain-steps")
    name = _stage_task(cfg.task, a.pretrain_task)
    pre = default_config(name)
    pre.out = f"{str(cfg.out).rstrip('/')}-pretrain"
    pre.size, pre.model = cfg.size, dataclasses.replace(cfg.model)
    own = {f.name: getattr(pre.data, f.name) for f in dataclasses.fields(DataConfig) if f.name != "spec"
           and getattr(pre.data, f.name) != getattr(DataConfig(), f.name)}   # what the stage's recipe needs
    pre.data, pre.tokenizer = dataclasses.replace(cfg.data, **own), dataclasses.replace(cfg.tokenizer)
    pre.train.steps, pre.train.batch_size = a.pretrain_steps, cfg.train.batch_size
    pre.train.log_every, pre.train.threads, pre.train.device = cfg.train.log_every, cfg.train.threads, cfg.train.device
    for s in a.set:
        if s.strip().startswith(_SHARED + _stage_sections(cfg.task, name)):
            set_override(pre, s)
    check(pre)
    task_class(name).check(pre)
    stage = Path(pre.out)
    done = [c for c in checkpoint.list_checkpoints(stage) if c.name == f"step_{a.pretrain_steps:07d}"]
    if done and not a.overwrite:
        print(f"patchgpt: reusing the pretraining in {stage}", file=sys.stderr)
        return stage
    resume = bool(checkpoint.list_checkpoints(stage)) and not a.overwrite
    train(pre, resume=resume, quiet=a.quiet, overwrite=a.overwrite)
    return stage


def cmd_shard(a: argparse.Namespace) -> None:
    from .data import build_datasets
    from .data.shards import write_shards

    cfg = RunConfig()
    cfg.data.spec = a.data
    for s in a.set:
        if not s.startswith("data."):
            raise ConfigError(f"--set {s}: shard takes data.* keys only")
        set_override(cfg, s)
    train_set, val_set, _ = build_datasets(cfg.data)
    paths = write_shards(train_set if a.split == "train" else val_set, a.out, a.per_shard, prefix=a.split)
    pattern = Path(a.out) / f"{a.split}-{{000000..{len(paths) - 1:06d}}}.tar"
    print(f"wrote {len(paths)} shard(s); train with --data 'shards:{pattern}'")


def _load(path: str, precision: str = "auto"):
    """The checkpoint at `path`, decoding at `precision` (``--precision``)."""
    from .tasks import load

    return load(path, precision=precision)


def _capable(path: str, method: str, what: str, precision: str = "auto"):
    """Load the checkpoint at `path`; a one-line error unless its task can do `what` (has `method`)."""
    task = _load(path, precision)
    if not callable(getattr(task, method, None)):
        raise ConfigError(f"{path}: a {task.name!r} checkpoint cannot {what}")
    return task


def _sampling_kwargs(a: argparse.Namespace) -> dict:
    return {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "cfg_scale": a.cfg, "seed": a.seed}


def cmd_sample(a: argparse.Namespace) -> None:
    task = _capable(a.ckpt, "sample_png", "sample images", a.precision)
    print(task.sample_png(a.out, classes=a.cls, prompts=a.prompt, n=a.n, **_sampling_kwargs(a)))


def cmd_complete(a: argparse.Namespace) -> None:
    task = _capable(a.ckpt, "complete_png", "complete images", a.precision)
    print(task.complete_png(a.image, a.out, keep=a.keep, classes=a.cls, prompts=a.prompt, n=a.n,
                            **_sampling_kwargs(a)))


def cmd_eval(a: argparse.Namespace) -> None:
    from .checkpoint import run_dir as checkpoint_run_dir
    from .data import eval_batches
    from .evaluate import evaluate
    from .files import atomic_write_text
    from .tasks import load

    task = _load(a.ckpt, a.precision)
    cfg: RunConfig = task.cfg
    if a.data:  # decode the other data as the checkpoint's own: its size, channels and frames
        cfg.data.spec, cfg.data.val_spec = a.data, ""
        cfg.data.image_size, cfg.data.channels = task.info.image_size[0], task.info.channels
        cfg.data.frames = task.info.frames
    if a.all:
        from .data.specs import whole_dataset

        val = whole_dataset(cfg.data, cfg.data.spec, task.info.classes)
        info = val.info
    else:
        _, val, info = type(task).datasets(cfg, classes=task.info.classes)
    if (info.channels, tuple(info.image_size)) != (task.info.channels, tuple(task.info.image_size)):
        raise DataError(f"{cfg.data.spec}: {info.channels}x{list(info.image_size)} images, the checkpoint reads "
                        f"{task.info.channels}x{list(task.info.image_size)}")
    if info.classes and task.info.classes and info.classes != task.info.classes:
        raise DataError(f"{cfg.data.spec}: classes {info.classes} differ from the checkpoint's {task.info.classes}")
    metrics, files = evaluate(task, eval_batches(val, 256))
    run_dir = Path(a.out) if a.out else checkpoint_run_dir(a.ckpt)
    for name, content in files.items():
        path = atomic_write_text(run_dir / f"eval_{name}", json.dumps(content))
        metrics[name.replace(".", "_")] = str(path)
    judge = load(a.judge, precision="fp32") if a.judge else None     # the judge reads exactly, whatever is judged
    options = {"judge": judge, "per_class": a.per_class, "cfg_scale": a.cfg, "temperature": a.temperature}
    metrics.update(task.report(run_dir, val, metrics, prefix="eval_", **options))
    if a.json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            if isinstance(v, float):
                print(f"{k:>16}: {v:.4f}")
            elif isinstance(v, (int, str)):
                print(f"{k:>16}: {v}")


def cmd_predict(a: argparse.Namespace) -> None:
    task = _load(a.ckpt, a.precision)
    results = task.predict_files(a.images, out=a.out, top=a.top, min_score=a.min_score, question=a.question,
                                 mask=a.mask)
    print(json.dumps(results, indent=2))


def cmd_ask(a: argparse.Namespace) -> None:
    if a.image is not None and a.prompt is None and not Path(a.image).exists() and Path(a.ckpt).exists():
        a.image, a.prompt = None, a.image   # `ask CKPT "draw: a heart"`: a prompt, no image
    if a.image is not None and not Path(a.image).is_file():
        raise DataError(f"{a.image}: no such image file")
    print(json.dumps(_load(a.ckpt, a.precision).ask(a.image, a.prompt, out=a.out), indent=2))


def cmd_serve(a: argparse.Namespace) -> None:
    from .serve import serve

    serve(a.ckpt, host=a.host, port=a.port, max_bytes=int(a.max_mb * 1e6))


def cmd_push(a: argparse.Namespace) -> None:
    from .push import push

    print(push(a.ckpt, a.repo, private=a.private, message=a.message))


def cmd_export(a: argparse.Namespace) -> None:
    from .checkpoint import run_dir

    if a.format == "hf-imagegpt":
        from .imagegpt import export_imagegpt

        print(json.dumps({"hf-imagegpt": str(export_imagegpt(a.ckpt, a.out or run_dir(a.ckpt) / "hf-imagegpt"))}))
        return
    from .export import export_onnx

    out = a.out or str(run_dir(a.ckpt) / "model.onnx")
    print(json.dumps(export_onnx(a.ckpt, out, a.what)))


def cmd_import_hf(a: argparse.Namespace) -> None:
    from .imagegpt import import_imagegpt

    print(f"patchgpt: imported {a.src} into {import_imagegpt(a.src, a.out)}", file=sys.stderr)


def cmd_quickstart(a: argparse.Namespace) -> None:
    from .quickstart import quickstart

    quickstart(Path(a.out), smoke=a.smoke)


def _out_of_memory(e: BaseException) -> bool:
    """Whether `e` is an allocation failure (host or device memory), not another runtime error."""
    if isinstance(e, MemoryError):
        return True
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    text = str(e).lower()
    return isinstance(e, oom) or "out of memory" in text or "can't allocate memory" in text


def _memory_message(command: str, e: BaseException) -> str:
    asked = re.search(r"tried to allocate ([0-9.]+ ?(?:bytes|[kmgtp]i?b))", str(e), re.IGNORECASE)
    size = asked.group(1) if asked else ""
    if size.endswith("bytes"):
        n, units = float(size.split()[0]), ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"]
        while n >= 1024 and len(units) > 1:
            n, units = n / 1024, units[1:]
        size = f"{n:.1f} {units[0]}"
    what = f"out of memory{f' (tried to allocate {size})' if size else ''}"
    if command == "train":
        return (f"{what}: lower train.batch_size (or raise train.accum), or the model (--model, model.n_embd, "
                "model.n_layer)")
    return f"{what}: give fewer inputs at once (--n, fewer files) or use a machine with more memory"


def main(argv: list[str] | None = None) -> int:
    command = ""
    try:
        a = _parser().parse_args(argv)
        command = a.command
        {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "quickstart": cmd_quickstart,
         "sample": cmd_sample, "complete": cmd_complete, "shard": cmd_shard, "ask": cmd_ask,
         "serve": cmd_serve, "push": cmd_push,
         "export": cmd_export, "import-hf": cmd_import_hf}[a.command](a)
    except (ConfigError, DataError, CheckpointError, DeviceError) as e:
        print(f"patchgpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("patchgpt: interrupted", file=sys.stderr)
        return 130
    except MemoryError as e:
        print(f"patchgpt: error: {_memory_message(command, e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .train import TrainingError

        if isinstance(e, TrainingError):
            print(f"patchgpt: error: {e}", file=sys.stderr)
            return 1
        if _out_of_memory(e):
            print(f"patchgpt: error: {_memory_message(command, e)}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
