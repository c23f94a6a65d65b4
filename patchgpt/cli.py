"""The `patchgpt` command: train, eval, predict and quickstart (see ``patchgpt --help``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import ConfigError, RunConfig, apply_size, default_config, set_override
from .data.base import DataError
from .model import SIZES
from .tasks import TASKS

EPILOG = """examples:
  patchgpt quickstart --out runs/quickstart
  patchgpt train pretrain --data folder:~/photos --out runs/pre --steps 2000
  patchgpt train classify --data folder:~/photos --init runs/pre --out runs/cls
  patchgpt train classify --init runs/pre --set classify.mode=linear --set classify.layer=2
  patchgpt eval runs/cls --json
  patchgpt predict runs/cls cat.jpg dog.png
  patchgpt train generate --data digits --set generate.condition=class --out runs/gen
  patchgpt sample runs/gen --class 7 --n 16 --cfg 1.5 --out sevens.png
  patchgpt complete runs/gen digit.png --class 3 --keep 0.5 --out completion.png
  patchgpt train video-classify --data moving-digits --out runs/vid
  patchgpt train video-classify --data videos:~/clips --out runs/clips
  patchgpt predict runs/clips clip.mp4
  patchgpt shard --data folder:~/photos --out shards --per-shard 1000 --set data.image_size=32
  patchgpt train pretrain --data "shards:shards/train-{000000..000009}.tar" --set data.val_spec=shards:shards/val-*
  torchrun --standalone --nproc_per_node=8 -m patchgpt train pretrain --data digits --set train.batch_size=256

data specs: digits | folder:PATH (one subfolder per class, or flat = unlabeled) | idx:PATH (MNIST IDX files)
            | videos:PATH (clips: mp4, avi, webm, mkv, gif) | moving-digits (bundled digits in motion)
any config field: --set section.key=value (see a run's config.json for every key)"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchgpt", description="One GPT over image patch sequences.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quickstart", help="pretrain, probe and fine-tune on the bundled digits; write a report")
    q.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    q.add_argument("--smoke", action="store_true", help="a tiny setting that runs in seconds (for tests)")

    t = sub.add_parser("train", help="train a task", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="tasks: pretrain (generative, unlabeled images) | classify (labelled images) | "
                       "generate (unconditional, class- or text-conditional images) | vq (learned image tokens) | "
                       "detect (boxes as tokens, Pix2Seq-style) | video-classify (labelled clips) | "
                       "video-pretrain (next-tubelet regression, next frames)")
    t.add_argument("task", choices=list(TASKS))
    t.add_argument("--data", help="data spec (default: digits)")
    t.add_argument("--model", choices=list(SIZES), help="backbone size (default: micro)")
    t.add_argument("--init", help="checkpoint or run directory to start from (backbone and tokenizer)")
    t.add_argument("--out", help="run directory (default: runs/TASK)")
    t.add_argument("--steps", type=int, help="optimizer steps")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    h = sub.add_parser("shard", help="write a data spec as WebDataset-style tar shards (train with shards:DIR)")
    h.add_argument("--data", required=True, help="data spec to write (any spec `train` accepts)")
    h.add_argument("--out", required=True, help="directory for the shards and their meta.json")
    h.add_argument("--per-shard", type=int, default=1000, help="items per shard (default: 1000)")
    h.add_argument("--split", choices=["train", "val"], default="train", help="which split to write (default: train)")
    h.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data field, e.g. data.image_size=32")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its validation data (or --data)")
    e.add_argument("ckpt", help="checkpoint or run directory")
    e.add_argument("--data", help="another data spec to evaluate on (its validation split, or all with --all)")
    e.add_argument("--all", action="store_true", help="evaluate on every item of --data, not its validation split")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--judge", help="generate: a classify checkpoint that judges class-conditional samples")
    e.add_argument("--per-class", type=int, default=20, help="generate: samples per class to judge")
    e.add_argument("--out", help="generate: where to write sample grids (default: CKPT's run directory)")
    e.add_argument("--cfg", type=float, help="generate: guidance scale for the judged samples")
    e.add_argument("--temperature", type=float, help="generate: temperature for the judged samples")

    r = sub.add_parser("predict", help="classify or detect objects in image files, or classify clips; prints JSON")
    r.add_argument("ckpt", help="checkpoint or run directory of a classify, detect or video-classify run")
    r.add_argument("images", nargs="+", help="image files (video files for a video-classify run)")
    r.add_argument("--top", type=int, default=5, help="classify: probabilities to list per input (default: 5)")
    r.add_argument("--out", help="classify: also write the JSON to this file; detect: a directory for one JSON "
                   "and one PNG with the boxes drawn per image")
    r.add_argument("--min-score", type=float, default=0.0, help="detect: drop boxes scoring below this")

    def sampling_flags(x: argparse.ArgumentParser) -> None:
        x.add_argument("--class", dest="cls", action="append", help="class name or index (repeatable)")
        x.add_argument("--prompt", action="append", help="caption for a text-conditional model (repeatable)")
        x.add_argument("--n", type=int, default=8, help="samples per class/prompt (default: 8)")
        x.add_argument("--temperature", type=float, help="softmax temperature (0 = greedy)")
        x.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = all)")
        x.add_argument("--top-p", type=float, help="nucleus sampling mass (1 = all)")
        x.add_argument("--cfg", type=float, help="classifier-free guidance scale (0 = none)")
        x.add_argument("--seed", type=int, default=0)

    s_ = sub.add_parser("sample", help="sample images from a generate checkpoint into a PNG grid")
    s_.add_argument("ckpt")
    sampling_flags(s_)
    s_.add_argument("--out", default="samples.png", help="PNG to write (default: samples.png)")

    c = sub.add_parser("complete", help="complete the rest of an image from its top part")
    c.add_argument("ckpt")
    c.add_argument("image")
    sampling_flags(c)
    c.add_argument("--keep", type=float, default=0.5, help="fraction of the image tokens kept, in raster order")
    c.add_argument("--out", default="completion.png", help="PNG to write (default: completion.png)")
    return p


def cmd_train(a: argparse.Namespace) -> None:
    from .train import train

    cfg = default_config(a.task)
    if a.data:
        cfg.data.spec = a.data
    if a.model:
        apply_size(cfg, a.model)
    if a.init:
        cfg.init = a.init
    cfg.out = a.out or cfg.out
    if a.steps:
        cfg.train.steps = a.steps
    for s in a.set:
        set_override(cfg, s)
    from . import dist

    try:
        out = train(cfg, resume=a.resume, quiet=a.quiet)
        main = dist.is_main()
    finally:
        dist.cleanup()
    if not main:
        return
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    print(f"run directory: {out}", file=sys.stderr)


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
    if not paths:
        raise ConfigError(f"--split {a.split}: no items to write")
    pattern = Path(a.out) / f"{a.split}-{{000000..{len(paths) - 1:06d}}}.tar"
    print(f"wrote {len(paths)} shard(s); train with --data 'shards:{pattern}'")


def _load_generator(path: str):
    from .checkpoint import load
    from .tasks import Generate

    task = load(path)
    if not isinstance(task, Generate):
        raise ConfigError(f"{path}: needs a generate checkpoint, this one is {task.name!r}")
    return task


def _classes(task, names: list[str] | None) -> list[int]:
    known = task.info.classes
    if not names:
        return list(range(len(known)))
    out = []
    for n in names:
        if n in known:
            out.append(known.index(n))
        elif n.isdigit() and int(n) < len(known):
            out.append(int(n))
        else:
            raise ConfigError(f"--class {n}: unknown; the classes are {', '.join(known)}")
    return out


def _sampling_kwargs(a: argparse.Namespace) -> dict:
    return {"temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "cfg_scale": a.cfg, "seed": a.seed}


def cmd_sample(a: argparse.Namespace) -> None:
    from .pictures import _scale, prompts_png
    from .report import save_grid, save_rows

    task = _load_generator(a.ckpt)
    kw = _sampling_kwargs(a)
    if task.condition == "text":
        if not a.prompt:
            raise ConfigError("this model is text-conditional: give --prompt TEXT")
        path = prompts_png(task, Path(a.out), a.prompt, a.n, **kw)
    elif task.condition == "class":
        ks = _classes(task, a.cls)
        images = task.generate(len(ks) * a.n, classes=torch.tensor(ks).repeat_interleave(a.n), **kw).cpu()
        rows = [(task.info.classes[k], images[i * a.n:(i + 1) * a.n]) for i, k in enumerate(ks)]
        path = save_rows(a.out, rows, scale=_scale(task))
    else:
        if a.cls or a.prompt:
            raise ConfigError("this model is unconditional: drop --class/--prompt")
        path = save_grid(a.out, task.generate(a.n, **kw).cpu(), nrow=min(a.n, 8), scale=_scale(task))
    print(path)


def cmd_complete(a: argparse.Namespace) -> None:
    from .data import load_image
    from .pictures import _scale
    from .report import save_rows

    task = _load_generator(a.ckpt)
    C, (H, W) = task.info.channels, task.info.image_size
    image = load_image(a.image, C, H, task.cfg.data.resize)[None]                   # (1, C, H, W)
    tok = task.input.tok
    ids = task.input.encode(image).ids[:, 1:]                                       # (1, N) without bos
    N = ids.shape[1]
    k = max(1, min(N - 1, round(a.keep * N)))
    cond = {}
    if task.condition == "class":
        cond["classes"] = torch.tensor(_classes(task, a.cls)[:1] * a.n) if a.cls else None
        if cond["classes"] is None:
            raise ConfigError("this model is class-conditional: give --class")
    elif task.condition == "text":
        if not a.prompt:
            raise ConfigError("this model is text-conditional: give --prompt")
        cond["texts"] = [a.prompt[0]] * a.n
    out = task.generate(a.n, keep=ids[:, :k].expand(a.n, k), **cond, **_sampling_kwargs(a)).cpu()
    # The kept tokens' pixels are pasted back from the original, so the given part is exact.
    h, w = tok.grid
    keep_mask = (torch.arange(h * w) < k).float().reshape(1, 1, h, w)
    keep_mask = torch.nn.functional.interpolate(keep_mask, size=(H, W), mode="nearest")  # (1, 1, H, W)
    out = out * (1 - keep_mask) + image * keep_mask
    given = image * keep_mask + (1 - keep_mask) * 0.0
    path = save_rows(a.out, [("given", given), ("completions", out), ("original", image)], scale=_scale(task))
    print(path)


def cmd_eval(a: argparse.Namespace) -> None:
    from .checkpoint import load
    from .data import build_datasets, eval_batches
    from .evaluate import evaluate

    task = load(a.ckpt)
    cfg: RunConfig = task.cfg
    if a.data:
        cfg.data.spec = a.data
    if a.all:
        from .data.specs import whole_dataset

        val = whole_dataset(cfg.data, cfg.data.spec, task.info.classes)
        info = val.info
    else:
        _, val, info = build_datasets(cfg.data, classes=task.info.classes)
    if info.classes and task.info.classes and info.classes != task.info.classes:
        raise DataError(f"{cfg.data.spec}: classes {info.classes} differ from the checkpoint's {task.info.classes}")
    metrics = evaluate(task, eval_batches(val, 256))
    from .tasks import Generate

    if "_detections" in metrics:
        from .report import atomic_write_text

        run_dir = _run_dir(a)
        path = atomic_write_text(run_dir / "eval_detections.json", json.dumps(metrics.pop("_detections")))
        metrics["detections_json"] = str(path)

    if isinstance(task, Generate):
        metrics.update(_eval_generator(task, a))
    if a.json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            if isinstance(v, float):
                print(f"{k:>16}: {v:.4f}")
            elif isinstance(v, (int, str)):
                print(f"{k:>16}: {v}")


def _run_dir(a: argparse.Namespace) -> Path:
    """Where eval writes its files: --out, else the checkpoint's run directory."""
    from .checkpoint import resolve

    return Path(a.out) if a.out else resolve(a.ckpt).parent.parent


def _eval_generator(task, a: argparse.Namespace) -> dict:
    """Sample grids, and for class-conditional models the judge's accuracy on requested classes."""
    from .checkpoint import load
    from .judge import judge_accuracy, train_judge
    from .pictures import _scale, samples_png
    from .report import save_rows

    run_dir = _run_dir(a)
    out: dict = {"samples_png": str(samples_png(task, run_dir / "eval_samples.png", cfg_scale=a.cfg,
                                                temperature=a.temperature))}
    if task.condition == "class":
        judge = load(a.judge) if a.judge else train_judge(task.cfg, run_dir / "judge")
        r = judge_accuracy(task, judge, per_class=a.per_class, cfg_scale=a.cfg, temperature=a.temperature)
        K = len(task.info.classes)
        rows = [(task.info.classes[k], r["samples"][r["requested"] == k][:10]) for k in range(K)]
        out["judged_png"] = str(save_rows(run_dir / "judged_samples.png", rows, scale=_scale(task)))
        out.update({k: v for k, v in r.items() if k.startswith("judge")})
        out["judge"] = a.judge or str(run_dir / "judge") + " (trained by eval)"
    return out


def cmd_predict(a: argparse.Namespace) -> None:
    from .checkpoint import load
    from .data import load_image
    from .tasks import Classify, VideoClassify

    task = load(a.ckpt)
    from .tasks import Detect

    if isinstance(task, Detect):
        return _predict_boxes(task, a)
    if not isinstance(task, Classify):
        raise ConfigError(f"{a.ckpt}: predict needs a classify or detect checkpoint, this one is {task.name!r}")
    d = task.cfg.data
    C = task.info.channels
    H = task.info.image_size[0]
    if isinstance(task, VideoClassify):
        from .data.video import read_video

        clips = torch.stack([read_video(p, task.info.frames, H, C, d.resize, d.frame_stride) for p in a.images])
        probs = task.predict({"video": clips})["probs"]                   # clips (B, F, C, H, W)
    else:
        images = torch.stack([load_image(p, C, H, d.resize) for p in a.images])
        probs = task.predict({"image": images})["probs"]
    names = task.info.classes
    results = []
    for path, pr in zip(a.images, probs, strict=True):
        vals, idx = pr.topk(min(a.top, len(names)))
        probs_top = {names[i]: round(v, 6) for v, i in zip(vals.tolist(), idx.tolist(), strict=True)}
        results.append({task.key: path, "class": names[idx[0]], "score": float(vals[0]), "probs": probs_top})
    text = json.dumps(results, indent=2)
    print(text)
    if a.out:
        from .report import atomic_write_text

        atomic_write_text(a.out, text + "\n")


def _predict_boxes(task, a: argparse.Namespace) -> None:
    """Detect objects in each image: JSON per image (pixels of the original image) and a PNG with boxes."""
    from .data.coco import letterbox, to_pixels
    from .data.images import load_pil, to_mode, to_tensor
    from .report import atomic_write_text, save_boxes

    S, C = task.info.image_size[0], task.info.channels
    out = Path(a.out) if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    names = task.info.classes
    results = []
    for i in range(0, len(a.images), 32):
        paths = a.images[i:i + 32]
        originals, metas, inputs = [], [], []
        for p in paths:
            im = to_mode(load_pil(p), C)
            boxed, meta = letterbox(im, S, task.cfg.data.resize)
            originals.append(im)
            metas.append(meta)
            inputs.append(to_tensor(boxed))
        dets = task.predict({"image": torch.stack(inputs)})["detections"]
        for p, im, meta, det in zip(paths, originals, metas, dets, strict=True):
            keep = det["scores"] >= a.min_score
            px = to_pixels(det["boxes"][keep], meta, S).tolist()
            cls, scores = det["classes"][keep].tolist(), det["scores"][keep].tolist()
            objs = [{"box": [round(v, 1) for v in b], "class": names[c], "score": round(s, 4)}
                    for b, c, s in zip(px, cls, scores, strict=True)]
            r = {"image": p, "width": meta["width"], "height": meta["height"], "objects": objs}
            results.append(r)
            if out:
                stem = Path(p).stem
                atomic_write_text(out / f"{stem}.json", json.dumps(r, indent=2) + "\n")
                shown = [o for o in objs if o["score"] >= task.cfg.detect.draw_score]
                save_boxes(out / f"{stem}.png", im.convert("RGB"), [o["box"] for o in shown],
                           [f"{o['class']} {o['score']:.2f}" for o in shown], [names.index(o["class"]) for o in shown])
    print(json.dumps(results, indent=2))


def cmd_quickstart(a: argparse.Namespace) -> None:
    from .quickstart import quickstart

    quickstart(Path(a.out), smoke=a.smoke)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "quickstart": cmd_quickstart,
         "sample": cmd_sample, "complete": cmd_complete, "shard": cmd_shard}[a.command](a)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"patchgpt: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("patchgpt: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from .train import TrainingError

        if isinstance(e, TrainingError):
            print(f"patchgpt: error: {e}", file=sys.stderr)
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
