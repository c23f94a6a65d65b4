"""`train(cfg)`: the training loop shared by every task.

AdamW with weight decay on matrices only, linear warm-up then cosine decay, gradient clipping, gradient
accumulation, periodic evaluation, a progress bar, ``log.jsonl``, ``metrics.json``, a loss-curve PNG and
atomic checkpoints. Every random choice of step s (batch order, augmentation, prefix lengths, dropout) is
drawn from generators seeded by (seed, s), so ``resume=True`` continues a stopped run exactly.
Reference for the optimizer recipe: karpathy/nanoGPT `train.py`.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import IterableDataset
from tqdm import tqdm

from . import checkpoint, dist
from .config import ConfigError, RunConfig, check
from .data import augment, build_datasets, eval_batches, train_batches
from .data.base import DataError, DataInfo, ImageSet, batch_len, input_key, to_device
from .data.shards import stream_batches
from .evaluate import evaluate
from .model import GPTConfig
from .pictures import task_pictures
from .report import atomic_write_text, save_curves
from .tasks import TASKS, Task


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, say); the message is one line."""


def pick_device(name: str) -> torch.device:
    return dist.pick_device(name)


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

    Under torchrun every process calls this: the task is wrapped in DistributedDataParallel (or FSDP2 with
    ``train.fsdp``), ``train.batch_size`` stays the global batch per optimizer step, each rank takes its
    slice of every (seed, step) batch, and rank 0 alone logs, evaluates and writes checkpoints.

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
    t = cfg.train
    env = dist.init(t.device)
    device = env.device
    if t.batch_size % (env.world * t.accum):
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by {env.world} processes x "
                          f"train.accum={t.accum}")
    if t.fsdp and not env.distributed:
        raise ConfigError("train.fsdp=true shards over processes: start the run with torchrun")
    micro_bs = t.batch_size // (env.world * t.accum)  # per rank and micro-step
    torch.manual_seed(t.seed)
    task, train_set, val_set, info = prepare(cfg)
    task.to(device)
    ckpt = checkpoint.list_checkpoints(out)[-1] if resume else None
    if ckpt is not None:
        checkpoint.load_weights(task, ckpt)  # before wrapping, so every rank starts from the same weights
    ddp = wrap(task, env, t.fsdp)
    opt = make_optimizer(task, cfg, device)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    if ckpt is not None:
        state = checkpoint.load_training_state(ckpt, opt, fsdp_model=task if t.fsdp else None)
        start = state["step"]
        if env.main:
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in _read_log(log_path, start)))
    elif env.main:
        log_path.write_text("")
    if env.main:
        atomic_write_text(out / "config.json", cfg.dumps())
    if t.compile:
        compile_networks(task)
    model = ddp

    n_params = task.num_params() if not t.fsdp else sum(p.numel() for p in task.parameters())
    tokens_per_image = task.input.length if hasattr(task, "input") else 0
    model_name = "VQ-VAE" if cfg.task == "vq" else f"GPT {cfg.size}"
    streaming = isinstance(train_set, IterableDataset)
    quiet = quiet or not env.main
    if not quiet:
        wrapper = " (FSDP)" if t.fsdp else " (DDP)" if env.distributed else ""
        print(f"patchgpt: {cfg.task} on {cfg.data.spec}: {len(train_set)} train / {len(val_set)} val images "
              f"{info.channels}x{info.image_size[0]}x{info.image_size[1]}{' (streamed)' if streaming else ''}, "
              f"{model_name} ({n_params / 1e6:.2f}M params), {tokens_per_image} tokens/image, global batch "
              f"{t.batch_size} = {env.world} processes x {t.accum} accum x {micro_bs} per micro-batch, "
              f"{t.steps} steps on {device}{wrapper}", file=sys.stderr)
    pin = device.type == "cuda"
    if streaming:
        batches = stream_batches(train_set, micro_bs, t.seed, start * t.accum, cfg.data.num_workers,
                                 env.rank, env.world, cfg.data.shuffle, cfg.data.shuffle_buffer, pin)
    else:
        batches = train_batches(train_set, micro_bs * env.world, t.seed, start * t.accum,
                                (t.steps - start) * t.accum, cfg.data.num_workers, env.rank, env.world,
                                cfg.data.shuffle, pin)
    use_amp = device.type == "cuda"
    log_f = open(log_path, "a") if env.main else None
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
                        if env.distributed:  # the other ranks would wait for this one's gradients for ever
                            raise DataError(f"every file of rank {env.rank}'s micro-batch at step {step} was "
                                            "skipped as unreadable; clean the data or use larger batches")
                        continue
                    gen = step_generator(t.seed, step, micro)
                    key = input_key(batch)  # "image", or "video" for clips
                    n = batch_len(batch)
                    batch["rows"] = (env.rank * n, env.world * n)  # this rank's slice of the global batch
                    if cfg.data.augment and not task.own_augment:
                        batch[key] = augment(batch[key], gen, cfg.data.shift, cfg.data.flip, batch["rows"])
                    batch = to_device(batch, device)
                    # Gradients are all-reduced once per optimizer step: not on the earlier micro-steps.
                    with _no_sync(ddp, micro < t.accum - 1), \
                            torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        loss, logs = model(batch, gen)
                    (loss / t.accum).backward()
                    total += float(loss.detach()) / t.accum
                    n_img += n
                logs = {k: float(v) for k, v in logs.items() if k != "loss"}
                # Whether to stop after this step is read once here: a signal landing later in the step
                # counts from the next one, so every rank stops (and checkpoints) at the same step.
                stopping = stop.flag
                if env.distributed:  # one all-reduce: mean loss and logs, images summed, any rank stopping
                    vals = dist.all_reduce([total, *logs.values(), n_img, float(stopping)], device, op="sum")
                    total, n_img = vals[0] / env.world, int(vals[-2])
                    logs = {k: v / env.world for k, v in zip(logs, vals[1:-2], strict=True)}
                    stopping = vals[-1] > 0
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
                if log_f is not None and (step % t.log_every == 0 or step == t.steps):
                    row = {"step": step, "loss": total, "lr": lr, "img_s": n_img / dt}
                    row.update(logs)
                    if gnorm is not None:
                        row["grad_norm"] = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
                    log_f.write(json.dumps(row) + "\n")
                    log_f.flush()
                if until is not None and until <= step < t.steps:
                    stopping = True
                do_eval = step == t.steps or bool(t.eval_every and step % t.eval_every == 0)
                if do_eval and not t.fsdp and env.main:
                    metrics = evaluate(task, eval_batches(val_set, 256, cfg.data.num_workers), device)
                    task.train()
                if do_eval or (t.ckpt_every and step % t.ckpt_every == 0) or stopping:
                    saved_at = _save(out, task, cfg, step, opt, env)
                    last_ckpt = step
                    if do_eval and t.fsdp and env.main:  # evaluate the gathered weights, unsharded
                        metrics = evaluate(checkpoint.load(saved_at, device), eval_batches(val_set, 256), device)
                if do_eval and log_f is not None:
                    log_f.write(json.dumps({"step": step, **_scalars(metrics, "val/")}) + "\n")
                    log_f.flush()
                if stopping:
                    dist.print0(f"patchgpt: stopped at step {step}; resume with --resume --out {out}")
                    break
    finally:
        bar.close()
        if log_f is not None:
            log_f.close()
    if step == t.steps and env.main:
        final = checkpoint.load(checkpoint.resolve(out), device) if t.fsdp else task
        if not metrics:  # resumed a run that had already finished: evaluate its final checkpoint again
            metrics = evaluate(final, eval_batches(val_set, 256, cfg.data.num_workers), device)
        finish(final, cfg, out, metrics, val_set, device)
    dist.barrier()
    return out


def compile_networks(task: Task) -> None:
    """`torch.compile` the task's network in place (its GPT backbone, or the VQ-VAE), not the task itself.

    The task's own Python (random prefix lengths, captions and other strings in the batch, box sequences)
    stays eager: compiled, every new prefix length or caption would be a guard failure and a recompile, and
    after a few the compiler gives up and runs the step eagerly. ``nn.Module.compile`` keeps the parameter
    names, so checkpoints are the same with or without it.
    """
    for name in ("backbone", "vq"):
        net = getattr(task, name, None)
        if isinstance(net, torch.nn.Module):
            net.compile()


def wrap(task: Task, env: dist.Env, fsdp: bool = False) -> torch.nn.Module:
    """The module the loop calls: `task` itself in a world of one, else DDP (or FSDP2) over all of it.

    DDP skips parameters with ``requires_grad=False`` (frozen backbones of probes); FSDP2 shards every
    block of the backbone and then the rest of the task (``fully_shard`` works in place)."""
    if not env.distributed:
        return task
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in getattr(getattr(task, "backbone", None), "blocks", []):
            fully_shard(block)
        return fully_shard(task)
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    # Tasks leave some backbone parameters out of their loss (the unused LM head of a classifier, say):
    # DDP must look for them each step rather than wait for their gradients for ever.
    return DistributedDataParallel(task, device_ids=ids, find_unused_parameters=True)


def _no_sync(model: torch.nn.Module, skip: bool):
    """A context in which backward does not all-reduce gradients (DDP's ``no_sync``, FSDP2's switch)."""
    if not skip:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def off():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return off()
    return contextlib.nullcontext()


def _save(out: Path, task: Task, cfg: RunConfig, step: int, opt: torch.optim.Optimizer, env: dist.Env) -> Path:
    """Rank 0 writes the checkpoint (FSDP: every rank helps gather it first); all ranks wait for it."""
    full = None
    if cfg.train.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = {"model": get_model_state_dict(task, options=opts),
                "optimizer": get_optimizer_state_dict(task, opt, options=opts)}
    path = checkpoint.step_dir(out, step)
    if env.main:
        path = checkpoint.save(out, task, cfg, step, opt, {"step": step}, keep=cfg.train.keep, full=full)
    dist.barrier()
    return path


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
