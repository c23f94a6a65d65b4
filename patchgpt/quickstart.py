"""`patchgpt quickstart`: the main job, end to end on the bundled digits in a few minutes on 2 CPU cores.

1. a raw-pixel logistic-regression baseline (scikit-learn);
2. generative pretraining of a small GPT (next-patch regression, AIM-style);
3. a linear probe on a randomly initialised GPT (what the architecture gives for free);
4. a linear probe and an attentive probe on the pretrained GPT (what pretraining learned);
5. fine-tuning the pretrained GPT.
The same validation split serves every row. Results: ``report.md``, ``metrics.json`` and PNGs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from . import checkpoint, rundir
from .config import RunConfig, apply_size
from .data import build_datasets
from .files import atomic_write_text
from .report import save_curves
from .tasks import default_config
from .train import Interrupted, train


def recipes(out: Path, smoke: bool = False) -> dict[str, RunConfig]:
    """The five runs of the quickstart (``smoke``: a few steps each, for tests)."""
    def base(task: str, name: str, steps: int, lr: float) -> RunConfig:
        cfg = default_config(task)
        apply_size(cfg, "nano" if smoke else "micro")
        cfg.out = str(out / name)
        cfg.train.steps = 4 if smoke else steps
        cfg.train.warmup = 2 if smoke else max(10, steps // 20)
        cfg.train.lr = lr
        cfg.train.batch_size = 64
        cfg.train.log_every = 1 if smoke else 10
        cfg.train.keep = 1
        cfg.train.eval_every = 0 if smoke else max(1, steps // 5)  # a few points on the val-loss curve
        return cfg

    pre = base("pretrain", "pretrain", 2500, 1e-3)
    pre.tokenizer.patch_size = 2
    # A 2x2 grey patch has 4 values: normalising each patch (AIM's default) would erase most of what it holds.
    pre.pretrain.norm_pix = False
    runs = {"pretrain": pre}
    for name, mode, init, steps, lr in [("probe_random", "linear", "", 300, 3e-3),
                                        ("probe_linear", "linear", "pretrain", 300, 3e-3),
                                        ("probe_attentive", "attentive", "pretrain", 300, 1e-3),
                                        ("finetune", "finetune", "pretrain", 2000, 5e-4)]:
        cfg = base("classify", name, steps, lr)
        cfg.classify.mode = mode
        cfg.tokenizer = pre.tokenizer
        if init:
            cfg.init = str(out / init)
        else:
            cfg.model = type(pre.model)(**pre.model.to_dict())
        if mode != "finetune":
            cfg.classify.label_smoothing = 0.0
            cfg.train.weight_decay = 0.0
            # Probes read the second-to-last block: the last one specialises in predicting pixels.
            cfg.classify.layer = max(1, pre.model.n_layer - 1)
        runs[name] = cfg
    return runs


def run_stage(cfg: RunConfig, out: Path) -> None:
    """Train one stage; a stage an earlier quickstart left in `out` is continued (or, if it finished, evaluated
    again), so rerunning an interrupted quickstart picks up where it stopped. A signal stops the whole
    quickstart (no figures of a stage that did not finish) with a line saying how to continue."""
    stage = Path(cfg.out)
    resume = bool(checkpoint.list_checkpoints(stage))
    try:
        train(cfg, quiet=True, resume=resume, overwrite=rundir.holds_run(stage) and not resume)
    except Interrupted:
        raise Interrupted(f"quickstart stopped in stage {stage.name}; run `patchgpt quickstart --out {out}` "
                          "again to continue where it stopped") from None


def pixel_baseline(cfg: RunConfig) -> float:
    """Top-1 of multinomial logistic regression on raw pixels, on the same split."""
    from sklearn.linear_model import LogisticRegression

    train_set, val_set, _ = build_datasets(cfg.data)
    xt, yt = train_set.images().flatten(1).numpy(), train_set.labels().numpy()
    xv, yv = val_set.images().flatten(1).numpy(), val_set.labels().numpy()
    clf = LogisticRegression(max_iter=2000).fit(xt, yt)
    return float((clf.predict(xv) == yv).mean())


ROWS = [("pixels_logreg", "logistic regression on raw pixels (baseline)"),
        ("probe_random", "linear probe, randomly initialised GPT"),
        ("probe_linear", "linear probe, pretrained GPT"),
        ("probe_attentive", "attentive probe, pretrained GPT"),
        ("finetune", "fine-tuned pretrained GPT")]


def quickstart(out: Path, smoke: bool = False) -> dict:
    """Run every step, write ``report.md`` and ``metrics.json`` into `out`, and return the metrics."""
    out.mkdir(parents=True, exist_ok=True)
    runs = recipes(out, smoke)
    t0 = time.time()
    results: dict = {"val_top1": {}, "seconds": {}}
    results["val_top1"]["pixels_logreg"] = pixel_baseline(runs["pretrain"])
    for name, cfg in runs.items():
        print(f"patchgpt quickstart: {name} ...", file=sys.stderr)
        t = time.time()
        run_stage(cfg, out)
        results["seconds"][name] = round(time.time() - t, 1)
        m = json.loads((Path(cfg.out) / "metrics.json").read_text())
        if name == "pretrain":
            results["pretrain_val_loss"] = m["val_loss"]
        else:
            results["val_top1"][name] = m["top1"]
            if name == "finetune":
                results["finetune_per_class"] = m["per_class"]
    results["total_seconds"] = round(time.time() - t0, 1)
    curves = {}
    for name in ("pretrain", "finetune"):
        rows = [json.loads(x) for x in (out / name / "log.jsonl").read_text().splitlines() if x.strip()]
        curves[f"{name} train loss"] = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    save_curves(out / "loss_curves.png", curves, title="quickstart: training loss")
    atomic_write_text(out / "metrics.json", json.dumps(results, indent=2))
    atomic_write_text(out / "report.md", render_report(results, runs))
    print(render_table(results))
    print(f"\nreport:   {out / 'report.md'}\nmetrics:  {out / 'metrics.json'}\npictures: "
          f"{out / 'loss_curves.png'}, {out / 'finetune' / 'confusion.png'}, "
          f"{out / 'pretrain' / 'predictions.png'}\nmodels:   {', '.join(str(out / n) for n in runs)}")
    return results


def render_table(results: dict) -> str:
    lines = ["| method | val top-1 |", "|---|---|"]
    for key, label in ROWS:
        if key in results["val_top1"]:
            lines.append(f"| {label} | {100 * results['val_top1'][key]:.1f}% |")
    return "\n".join(lines)


def render_report(results: dict, runs: dict[str, RunConfig]) -> str:
    pre = runs["pretrain"]
    secs = ", ".join(f"{k} {v:.0f}s" for k, v in results["seconds"].items())
    return f"""# patchgpt quickstart report

Data: scikit-learn's bundled 8x8 digits, a fixed split (seed {pre.data.split_seed}, \
{int(100 * pre.data.val_fraction)}% validation). Model: GPT `{pre.size}` ({pre.model.n_layer} layers, \
{pre.model.n_embd} wide), {pre.tokenizer.patch_size}x{pre.tokenizer.patch_size} patches, pretrained for \
{pre.train.steps} steps by next-patch regression (validation MSE {results['pretrain_val_loss']:.3f} on \
normalized patches).

{render_table(results)}

Time: {results['total_seconds']:.0f}s in all ({secs}).

Pictures: `loss_curves.png` (training losses), `finetune/confusion.png` (confusion matrix of the fine-tuned \
model), `pretrain/predictions.png` (validation digits above the pretrained model's next-patch predictions).
Each run's directory holds its checkpoint (`checkpoints/`), `log.jsonl`, `metrics.json` and `loss.png`; \
load one in Python with `patchgpt.load("{Path(runs['finetune'].out)}")`.
"""
