"""Judging class-conditional samples with an independently trained classifier.

A generator that draws "a seven" when asked for a seven is what users want; the judge accuracy is the share of
samples that a separately trained patchgpt classifier assigns to the requested class (a classifier-based
proxy in the spirit of the Inception Score's conditional term, with a classifier trained on the same data).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .checkpoint import load
from .config import RunConfig, apply_size, default_config
from .tasks import Classify, Generate


def train_judge(gen_cfg: RunConfig, out: Path, steps: int = 1000) -> Classify:
    """Fine-tune a fresh `micro` classifier on the generator's data (from scratch; it never sees samples)."""
    from .train import train

    cfg = default_config("classify")
    apply_size(cfg, "micro")
    cfg.data = type(gen_cfg.data)(**vars(gen_cfg.data))
    cfg.data.augment = True
    cfg.out, cfg.train.steps = str(out), steps
    cfg.tokenizer.patch_size = 1 if max(gen_cfg.data.image_size or 8, 8) <= 8 else 2
    print(f"patchgpt: no --judge given: training a judge classifier in {out} ({steps} steps)", file=sys.stderr)
    train(cfg, quiet=True)
    return load(out)


@torch.no_grad()
def judge_accuracy(task: Generate, judge: Classify, per_class: int = 20, seed: int = 0,
                   cfg_scale: float | None = None, temperature: float | None = None) -> dict:
    """Sample `per_class` images of every class and report how often the judge agrees with the request."""
    if task.condition != "class":
        raise ValueError("judge accuracy needs a class-conditional model")
    if judge.info.classes != task.info.classes:
        raise ValueError(f"the judge's classes {judge.info.classes} differ from {task.info.classes}")
    K = len(task.info.classes)
    want = torch.arange(K).repeat_interleave(per_class)                       # (K * per_class,)
    images = task.generate(len(want), classes=want, seed=seed, cfg_scale=cfg_scale, temperature=temperature)
    pred = judge.predict({"image": images.to(next(judge.parameters()).device)})["pred"].cpu()
    per = [(pred[want == k] == k).float().mean().item() for k in range(K)]
    return {"judge_accuracy": float((pred == want).float().mean()), "judge_per_class":
            dict(zip(task.info.classes, per, strict=True)), "samples": images.cpu(), "requested": want}
