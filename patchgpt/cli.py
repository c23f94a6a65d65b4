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

EPILOG = """examples:
  patchgpt quickstart --out runs/quickstart
  patchgpt train pretrain --data folder:~/photos --out runs/pre --steps 2000
  patchgpt train classify --data folder:~/photos --init runs/pre --out runs/cls
  patchgpt train classify --init runs/pre --set classify.mode=linear --set classify.layer=2
  patchgpt eval runs/cls --json
  patchgpt predict runs/cls cat.jpg dog.png

data specs: digits | folder:PATH (one subfolder per class, or flat = unlabeled) | idx:PATH (MNIST IDX files)
any config field: --set section.key=value (see a run's config.json for every key)"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="patchgpt", description="One GPT over image patch sequences.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quickstart", help="pretrain, probe and fine-tune on the bundled digits; write a report")
    q.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    q.add_argument("--smoke", action="store_true", help="a tiny setting that runs in seconds (for tests)")

    t = sub.add_parser("train", help="train a task", formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="tasks: pretrain (generative, unlabeled images) | classify (labelled images)")
    t.add_argument("task", choices=["pretrain", "classify"])
    t.add_argument("--data", help="data spec (default: digits)")
    t.add_argument("--model", choices=list(SIZES), help="backbone size (default: micro)")
    t.add_argument("--init", help="checkpoint or run directory to start from (backbone and tokenizer)")
    t.add_argument("--out", help="run directory (default: runs/TASK)")
    t.add_argument("--steps", type=int, help="optimizer steps")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("eval", help="evaluate a checkpoint on its validation data (or --data)")
    e.add_argument("ckpt", help="checkpoint or run directory")
    e.add_argument("--data", help="another data spec to evaluate on")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")

    r = sub.add_parser("predict", help="classify image files; prints JSON")
    r.add_argument("ckpt", help="checkpoint or run directory of a classify run")
    r.add_argument("images", nargs="+", help="image files")
    r.add_argument("--top", type=int, default=5, help="probabilities to list per image (default: 5)")
    r.add_argument("--out", help="also write the JSON to this file")
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
    out = train(cfg, resume=a.resume, quiet=a.quiet)
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else {}
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    print(f"run directory: {out}", file=sys.stderr)


def cmd_eval(a: argparse.Namespace) -> None:
    from .checkpoint import load
    from .data import build_datasets, eval_batches
    from .evaluate import evaluate

    task = load(a.ckpt)
    cfg: RunConfig = task.cfg
    if a.data:
        cfg.data.spec = a.data
    _, val, info = build_datasets(cfg.data)
    if info.classes and task.info.classes and info.classes != task.info.classes:
        raise DataError(f"{cfg.data.spec}: classes {info.classes} differ from the checkpoint's {task.info.classes}")
    metrics = evaluate(task, eval_batches(val, 256))
    if a.json:
        print(json.dumps(metrics))
    else:
        for k, v in metrics.items():
            if isinstance(v, float):
                print(f"{k:>16}: {v:.4f}")
            elif isinstance(v, int):
                print(f"{k:>16}: {v}")


def cmd_predict(a: argparse.Namespace) -> None:
    from .checkpoint import load
    from .data import load_image
    from .tasks import Classify

    task = load(a.ckpt)
    if not isinstance(task, Classify):
        raise ConfigError(f"{a.ckpt}: predict needs a classify checkpoint, this one is {task.name!r}")
    d = task.cfg.data
    C = task.info.channels
    H = task.info.image_size[0]
    images = torch.stack([load_image(p, C, H, d.resize) for p in a.images])
    probs = task.predict({"image": images})["probs"]
    names = task.info.classes
    results = []
    for path, pr in zip(a.images, probs, strict=True):
        vals, idx = pr.topk(min(a.top, len(names)))
        probs_top = {names[i]: round(v, 6) for v, i in zip(vals.tolist(), idx.tolist(), strict=True)}
        results.append({"image": path, "class": names[idx[0]], "score": float(vals[0]), "probs": probs_top})
    text = json.dumps(results, indent=2)
    print(text)
    if a.out:
        from .report import atomic_write_text

        atomic_write_text(a.out, text + "\n")


def cmd_quickstart(a: argparse.Namespace) -> None:
    from .quickstart import quickstart

    quickstart(Path(a.out), smoke=a.smoke)


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "quickstart": cmd_quickstart}[a.command](a)
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
