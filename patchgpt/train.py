"""`train(cfg)`: the training loop shared by every task.

AdamW with weight decay on matrices only, linear warm-up then cosine decay, gradient clipping, gradient
accumulation, periodic evaluation, a progress bar, ``log.jsonl``, ``metrics.json``, a loss-curve PNG and
atomic checkpoints. Every random choice of step s (batch order, augmentation, prefix lengths, dropout) is
drawn from generators seeded by (seed, s), so ``resume=True`` continues a stopped run exactly.
Reference for the optimizer recipe: karpathy/nanoGPT `train.py`.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoint
from .config import ConfigError, RunConfig, check
from .data import augment, build_datasets, eval_batches, train_batches
from .data.base import DataError, DataInfo, ImageSet, batch_len, input_key, to_device
from .evaluate import evaluate
from .model import GPTConfig
from .pictures import task_pictures
from .report import atomic_write_text, save_curves
from .tasks import TASKS, Task


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, say); the message is one line."""


def pick_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    t = cfg.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    frac = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def make_optimizer(task: Task, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices (dim >= 2) decay, vectors (norms, biases) do not."""
    params = [p for p in task.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), fused=fused)


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 97 + micro)


def prepare(cfg: RunConfig) -> tuple[Task, ImageSet, ImageSet, DataInfo]:
    """Datasets and the task, initialised from ``cfg.init`` if set (the backbone and tokenizer only)."""
    check(cfg)
    if cfg.task not in TASKS:
        raise ConfigError(f"unknown task {cfg.task!r}; choose one of {', '.join(TASKS)}")
    init_meta = None
    if cfg.init:
        init_meta = checkpoint.read_meta(cfg.init)
        src = RunConfig.from_dict(init_meta["config"])
        # The backbone's shape and the input tokenizer come from the checkpoint being fine-tuned.
        cfg.model, cfg.tokenizer, cfg.size = GPTConfig.from_dict(src.model.to_dict()), src.tokenizer, src.size
        st = init_meta["state"]
        if cfg.data.spec != "digits":  # decode the new data like the data the checkpoint saw
            cfg.data.image_size = cfg.data.image_size or st["image_size"][0]
            cfg.data.channels = cfg.data.channels or st["channels"]
            cfg.data.frames = cfg.data.frames or st.get("frames", 0)  # clips: as many frames as pretraining saw
    vq_ckpt = None
    if cfg.tokenizer.kind == "vq" and cfg.tokenizer.vq:
        vq_ckpt = checkpoint.resolve(cfg.tokenizer.vq)
        vq_meta = checkpoint.read_meta(vq_ckpt)
        if vq_meta["task"] != "vq":
            raise ConfigError(f"tokenizer.vq={cfg.tokenizer.vq}: not a `patchgpt train vq` run")
        cfg.tokenizer.vq_config = json.dumps(vq_meta["state"]["vq"])
    train_set, val_set, info = build_datasets(cfg.data)
    if init_meta is not None:
        st = init_meta["state"]
        if (info.channels, tuple(info.image_size)) != (st["channels"], tuple(st["image_size"])):
            raise ConfigError(f"--init {cfg.init} was trained on {st['channels']}x{st['image_size']} images, "
                              f"this data is {info.channels}x{list(info.image_size)}")
    task = TASKS[cfg.task](cfg, info)
    if init_meta is not None:
        src_task = checkpoint.load(cfg.init)
        try:
            task.backbone.load_state_dict(src_task.backbone.state_dict())
            task.input.load_state_dict(src_task.input.state_dict())
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()
            raise ConfigError(f"--init {cfg.init}: its {src_task.name} backbone does not fit a {cfg.task} model "
                              f"({first})") from None
        for m in task.input.modules():
            if hasattr(m, "fitted"):
                m.fitted = True
    if vq_ckpt is not None and init_meta is None:
        vq_task = checkpoint.load(vq_ckpt)
        if tuple(vq_task.info.image_size) != tuple(info.image_size) or vq_task.info.channels != info.channels:
            raise ConfigError(f"tokenizer.vq={cfg.tokenizer.vq} was trained on {vq_task.info.channels}x"
                              f"{list(vq_task.info.image_size)} images, this data is {info.channels}x"
                              f"{list(info.image_size)}")
        task.input.tok.vq.load_state_dict(vq_task.vq.state_dict())
    if task.needs_fit():
        task.fit_tokenizer(train_set.images(4096), seed=cfg.train.seed)
    return task, train_set, val_set, info


class _Stop:
    """Turns SIGTERM/SIGINT into a flag, so the loop can checkpoint and exit cleanly."""

    def __init__(self) -> None:
        self.flag = False
        self.old = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.flag:  # a second signal: stop now
            raise KeyboardInterrupt
        self.flag = True

    def __exit__(self, *exc) -> None:
        for sig, h in self.old.items():
            signal.signal(sig, h)


def _read_log(path: Path, upto: int) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a killed run
        if row.get("step", 0) <= upto:
            rows.append(row)
    return rows


def train(cfg: RunConfig, resume: bool = False, quiet: bool = False, until: int | None = None) -> Path:
    """Train ``cfg.task`` and return the run directory (its newest checkpoint loads with `patchgpt.load`).

    Args:
        cfg: the run's configuration (``cfg.out`` is the run directory).
        resume: continue from the newest checkpoint in ``cfg.out`` (its saved config wins, except
            ``train.steps``).
        quiet: no progress bar or start-up line.
        until: stop after this step with a checkpoint, exactly as a SIGTERM would (for staged runs).
    """
    out = Path(cfg.out)
    start = 0
    if resume:
        found = checkpoint.list_checkpoints(out)
        if not found:
            raise ConfigError(f"--resume: no checkpoint in {out}")
        saved = RunConfig.from_dict(checkpoint.read_meta(found[-1])["config"])
        saved.train.steps = cfg.train.steps  # the one thing a resume may change: run longer
        cfg = saved
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    task, train_set, val_set, info = prepare(cfg)
    task.to(device)
    opt = make_optimizer(task, cfg, device)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    if resume:
        ckpt = checkpoint.list_checkpoints(out)[-1]
        checkpoint.load_weights(task, ckpt)
        state = checkpoint.load_training_state(ckpt, opt)
        start = state["step"]
        atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in _read_log(log_path, start)))
    else:
        log_path.write_text("")
    atomic_write_text(out / "config.json", cfg.dumps())
    model = torch.compile(task) if cfg.train.compile else task

    t = cfg.train
    micro_bs = t.batch_size // t.accum
    n_params = task.num_params()
    tokens_per_image = task.input.length if hasattr(task, "input") else 0
    model_name = "VQ-VAE" if cfg.task == "vq" else f"GPT {cfg.size}"
    if not quiet:
        print(f"patchgpt: {cfg.task} on {cfg.data.spec}: {len(train_set)} train / {len(val_set)} val images "
              f"{info.channels}x{info.image_size[0]}x{info.image_size[1]}, {model_name} "
              f"({n_params / 1e6:.2f}M params), {tokens_per_image} tokens/image, batch {t.batch_size} "
              f"= {t.accum} x {micro_bs}, {t.steps} steps on {device}", file=sys.stderr)
    batches = train_batches(train_set, micro_bs, t.seed, start * t.accum, (t.steps - start) * t.accum,
                            cfg.data.num_workers)
    use_amp = device.type == "cuda"
    log_f = open(log_path, "a")
    metrics: dict = {}
    last_ckpt = start
    bar = tqdm(total=t.steps, initial=start, disable=quiet, desc=cfg.task, file=sys.stderr, dynamic_ncols=True,
                mininterval=1.0)
    step = start
    try:
        with _Stop() as stop:
            task.train()
            while step < t.steps:
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                torch.manual_seed(t.seed * 1_000_003 + step)  # dropout and any other global-RNG use
                total, logs, n_img = 0.0, {}, 0
                for micro in range(t.accum):
                    batch = next(batches)
                    if batch_len(batch) == 0:
                        continue
                    gen = step_generator(t.seed, step, micro)
                    key = input_key(batch)  # "image", or "video" for clips
                    if cfg.data.augment:
                        batch[key] = augment(batch[key], gen, cfg.data.shift, cfg.data.flip)
                    batch = to_device(batch, device)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        loss, logs = model(batch, gen)
                    (loss / t.accum).backward()
                    total += float(loss.detach()) / t.accum
                    n_img += batch_len(batch)
                if not math.isfinite(total):
                    raise TrainingError(f"loss became {total} at step {step}; the last good checkpoint is "
                                        f"step {last_ckpt} in {out}. Lower train.lr or check the data.")
                gnorm = torch.nn.utils.clip_grad_norm_(task.parameters(), t.grad_clip) if t.grad_clip > 0 else None
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}", img_s=f"{n_img / dt:.0f}")
                if step % t.log_every == 0 or step == t.steps:
                    row = {"step": step, "loss": total, "lr": lr, "img_s": n_img / dt}
                    row.update({k: float(v) for k, v in logs.items() if k != "loss"})
                    if gnorm is not None:
                        row["grad_norm"] = float(gnorm)
                    log_f.write(json.dumps(row) + "\n")
                    log_f.flush()
                if until is not None and until <= step < t.steps:
                    stop.flag = True
                do_eval = step == t.steps or (t.eval_every and step % t.eval_every == 0)
                if do_eval:
                    metrics = evaluate(task, eval_batches(val_set, 256, cfg.data.num_workers), device)
                    task.train()
                    log_f.write(json.dumps({"step": step, **_scalars(metrics, "val/")}) + "\n")
                    log_f.flush()
                if do_eval or (t.ckpt_every and step % t.ckpt_every == 0) or stop.flag:
                    checkpoint.save(out, task, cfg, step, opt, {"step": step}, keep=t.keep)
                    last_ckpt = step
                if stop.flag:
                    print(f"patchgpt: stopped at step {step}; resume with --resume --out {out}", file=sys.stderr)
                    break
    finally:
        bar.close()
        log_f.close()
    if step == t.steps:
        if not metrics:  # resumed a run that had already finished: evaluate its final checkpoint again
            metrics = evaluate(task, eval_batches(val_set, 256, cfg.data.num_workers), device)
        finish(task, cfg, out, metrics, val_set, device)
    return out


def _scalars(metrics: dict, prefix: str = "") -> dict:
    return {prefix + k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def finish(task: Task, cfg: RunConfig, out: Path, metrics: dict, val_set: ImageSet, device) -> None:
    """metrics.json, the loss curve and the task's pictures (and detections.json for detection)."""
    if "_detections" in metrics:
        atomic_write_text(out / "detections.json", json.dumps(metrics.pop("_detections")))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    rows = _read_log(out / "log.jsonl", cfg.train.steps)
    series = {"train loss": [(r["step"], r["loss"]) for r in rows if "loss" in r],
              "val loss": [(r["step"], r["val/val_loss"]) for r in rows if "val/val_loss" in r]}
    save_curves(out / "loss.png", series, title=f"{cfg.task} ({cfg.size}, {cfg.data.spec})")
    try:
        task_pictures(task, out, metrics, val_set, device)
    except DataError as e:
        print(f"patchgpt: no pictures: {e}", file=sys.stderr)
