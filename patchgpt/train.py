"""`train(cfg)`: the training loop shared by every task.

AdamW with weight decay on matrices only, linear warm-up then cosine decay, gradient clipping, gradient
accumulation, periodic evaluation, a progress bar, ``log.jsonl``, ``metrics.json``, a loss-curve PNG and
atomic checkpoints. Every random choice of step s (batch order, augmentation, prefix lengths, dropout) is
drawn from generators seeded by (seed, s), so ``resume=True`` continues a stopped run exactly.
Nothing here knows a task by name: the task (``patchgpt.tasks``) supplies its config section, recipe,
augmentation, loss, metric and pictures.
Reference for the optimizer recipe: karpathy/nanoGPT `train.py`.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch.utils.data import IterableDataset
from tqdm import tqdm

from . import checkpoint, dist, rundir
from .budget import TimeBudget
from .config import ConfigError, RunConfig, TrainConfig, check
from .data import eval_batches, train_batches
from .data.base import DataError, DataInfo, ImageSet, auto_augmentation, batch_len, to_device
from .data.shards import stream_batches
from .ema import EMA
from .evaluate import evaluate
from .files import atomic_write_text
from .model import GPTConfig
from .report import save_curves
from .rng import RowRNG
from .tasks import Task, config_from_dict, load, task_class
from .tokenizers.inputs import resolve_runs
from .tracking import TensorBoard, open_tracker


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, say); the message is one line."""


class Interrupted(TrainingError):
    """A signal (Ctrl-C, SIGTERM) stopped the run after it wrote a checkpoint; the message says how to resume.
    Commands that train several models stop as a whole on it."""


def lr_at(step: int, cfg: RunConfig) -> float:
    """Linear warm-up to `lr`, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    t = cfg.train
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    frac = (step - t.warmup) / max(1, t.steps - t.warmup)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


_EMBEDDINGS = ("wte", "wpe", "frame_emb", "row_emb", "col_emb", "patch_proj")


def layer_id(name: str, n_layer: int) -> int:
    """Depth of parameter `name` for layer-wise lr decay: 0 for the input embeddings, i + 1 for block i,
    n_layer + 1 for the rest (final norm, heads)."""
    block = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
    if block:
        return int(block.group(1)) + 1
    if any(f".{e}." in f".{name}" for e in _EMBEDDINGS):
        return 0
    return n_layer + 1


def make_optimizer(task: Task, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices (dim >= 2) decay, vectors (norms, biases) do not. With ``train.layer_decay`` < 1
    (BEiT/MAE fine-tuning), a parameter at depth d (`layer_id`) learns at lr * layer_decay**(n_layer + 1 - d):
    the head at the full rate, the embeddings slowest (each group's ``lr_scale``)."""
    t, L = cfg.train, cfg.model.n_layer
    rate = t.layer_decay if t.layer_decay > 0 else 1.0
    buckets: dict[tuple[int, bool], list] = {}
    for name, p in task.named_parameters():
        if p.requires_grad:
            depth = layer_id(name, L) if rate < 1 else L + 1
            buckets.setdefault((depth, p.dim() >= 2), []).append(p)
    groups = [{"params": ps, "weight_decay": t.weight_decay if decays else 0.0,
               "lr_scale": rate ** (L + 1 - depth)}
              for (depth, decays), ps in sorted(buckets.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), fused=fused)


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 97 + micro)


def prepare(cfg: RunConfig, fresh: bool = True) -> tuple[Task, ImageSet, ImageSet, DataInfo]:
    """Datasets and the task; for a fresh run (not a resume, whose checkpoint holds everything) initialised
    from ``cfg.init`` if set (the backbone and tokenizer only) and with its tokenizer fitted or loaded."""
    check(cfg)
    cls = task_class(cfg.task)
    cls.check(cfg)
    init_meta = checkpoint.read_meta(cfg.init) if cfg.init and fresh else None
    if init_meta is not None:
        src = config_from_dict(init_meta["config"])
        # The backbone's shape and the input tokenizer come from the checkpoint being fine-tuned.
        drop = cfg.model.drop_path  # regularisation is this run's choice, not the checkpoint's
        cfg.model, cfg.tokenizer, cfg.size = GPTConfig.from_dict(src.model.to_dict()), src.tokenizer, src.size
        cfg.model.drop_path = drop
        st = init_meta["state"]
        if cfg.data.spec != "digits":  # decode the new data like the data the checkpoint saw
            cfg.data.image_size = cfg.data.image_size or st["image_size"][0]
            cfg.data.channels = cfg.data.channels or st["channels"]
            cfg.data.frames = cfg.data.frames or st.get("frames", 0)  # clips: as many frames as pretraining saw
    if fresh:
        resolve_runs(cfg.tokenizer)
        recipe = cls.finetune_recipe(cfg) if cfg.init else {}
        if cfg.model.drop_path == -1:
            cfg.model.drop_path = recipe.get("drop_path", 0.0)
        if cfg.train.layer_decay == -1:
            cfg.train.layer_decay = recipe.get("layer_decay", 1.0)
    train_set, val_set, info = cls.datasets(cfg)
    if init_meta is not None:
        st = init_meta["state"]
        if (info.channels, tuple(info.image_size)) != (st["channels"], tuple(st["image_size"])):
            raise ConfigError(f"--init {cfg.init} was trained on {st['channels']}x{st['image_size']} images, "
                              f"this data is {info.channels}x{list(info.image_size)}")
    augmentation = auto_augmentation(cfg.data, info.channels, tuple(info.image_size), cls.augment_by_size)
    steps = auto_steps(cfg.train, train_set, cls.epochs)
    task = cls(cfg, info)
    task.notes += [task.augmentation_note(augmentation)] + ([steps] if steps else [])
    if fresh:
        if cfg.init:
            task.init_from(cfg.init)
        task.fit(train_set, seed=cfg.train.seed)
    return task, train_set, val_set, info


MIN_AUTO_STEPS, MAX_AUTO_STEPS = 1000, 8000   # 8000 x 128 images: about 12 minutes at 16 tokens on 2 cores


def auto_steps(t: TrainConfig, train_set: ImageSet, epochs: float) -> str:
    """``train.steps=0``: `epochs` passes over `train_set` at ``train.batch_size``, within [1000, 8000] steps
    (small sets get more passes, large ones fewer); returns the note for the start-up line ('' if set)."""
    if t.steps:
        return ""
    try:
        n = len(train_set)
    except TypeError:  # a stream of unknown length
        n = 0
    want = math.ceil(epochs * n / t.batch_size) if n else MIN_AUTO_STEPS
    t.steps = min(MAX_AUTO_STEPS, max(MIN_AUTO_STEPS, want))
    if t.time:  # provisional: the time budget decides the steps after timing the first ones
        return ""
    return (f"{t.steps} steps: {t.steps * t.batch_size / max(1, n):.1f} passes over {n} images at batch "
            f"{t.batch_size} (set --steps or --time to choose)")


def ema_decay(t: TrainConfig) -> float:
    """``train.ema``, or for -1 (auto) ``1 - 10 / steps`` within [0.99, 0.9999]: an average over about the
    last tenth of the run."""
    return t.ema if t.ema >= 0 else min(0.9999, max(0.99, 1 - 10 / max(1, t.steps)))


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


@dataclass
class Run:
    """What the loop works with: the config, processes, task (and its wrapped form), optimizer, data, log."""

    cfg: RunConfig
    env: dist.Env
    task: Task
    model: torch.nn.Module      # the task, or DDP/FSDP over it
    opt: torch.optim.Optimizer
    train_set: ImageSet
    val_set: ImageSet
    out: Path
    run_id: str | None = None  # names this run's checkpoints (pruning touches no other run's)
    start: int = 0
    log: IO[str] | None = None  # log.jsonl, open on rank 0
    last_ckpt: int = 0
    files: dict[str, Any] = field(default_factory=dict)  # the latest evaluation's large outputs
    ema: EMA | None = None      # with ``train.ema``: the averaged weights, evaluated and saved
    tracker: TensorBoard | None = None   # ``train.log_to=tensorboard`` (rank 0)

    def averaged(self) -> contextlib.AbstractContextManager:
        """A block in which the task holds the weights to evaluate and save (the EMA's, if any)."""
        return self.ema.swapped() if self.ema is not None else contextlib.nullcontext()

    def write_log(self, row: dict) -> None:
        if self.log is not None:
            self.log.write(json.dumps(row) + "\n")
            self.log.flush()
        if self.tracker is not None:
            self.tracker.scalars(row)


def train(cfg: RunConfig, resume: bool = False, quiet: bool = False, until: int | None = None,
          overwrite: bool = False) -> Path:
    """Train ``cfg.task`` and return the run directory (its newest checkpoint loads with `patchgpt.load`).

    Under torchrun every process calls this: the task is wrapped in DistributedDataParallel (or FSDP2 with
    ``train.fsdp``), ``train.batch_size`` stays the global batch per optimizer step, each rank takes its
    slice of every (seed, step) batch, and rank 0 alone logs, evaluates and writes checkpoints.

    Args:
        cfg: the run's configuration (``cfg.out`` is the run directory).
        resume: continue from the newest readable checkpoint in ``cfg.out``: the saved config wins;
            ``train.steps`` may be raised; other settings that differ from the saved run are an error.
        quiet: no progress bar or start-up line.
        until: stop after this step with a checkpoint (for staged runs); returns normally.
        overwrite: a fresh run into an ``out`` that holds a run moves that run aside (else an error).
    Raises:
        Interrupted: a signal stopped the run; its checkpoint is written and ``--resume`` continues it.
    """
    run = setup(cfg, resume, quiet, overwrite)
    cfg, t, env = run.cfg, run.cfg.train, run.env
    budget = TimeBudget(t, run.start)
    batches = _batches(run, endless=budget.active)
    metrics: dict = {}
    quiet = quiet or not env.main
    bar = tqdm(total=t.steps, initial=run.start, disable=quiet, desc=cfg.task, file=sys.stderr,
               dynamic_ncols=True, mininterval=1.0)
    step = run.start
    try:
        with _Stop() as stop:
            run.task.train()
            while step < t.steps:
                budget.step_started()
                t0 = time.perf_counter()
                lr = lr_at(step, cfg)
                for g in run.opt.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
                total, logs, n_img, stopping, gnorm = train_step(run, batches, step, stop)
                step += 1
                dt = time.perf_counter() - t0
                if _decide_steps(run, budget, step):
                    bar.total = t.steps
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}", img_s=f"{n_img / dt:.0f}")
                if step % t.log_every == 0 or step == t.steps:
                    row = {"step": step, "loss": total, "lr": lr, "img_s": n_img / dt, **logs}
                    run.write_log(row if gnorm is None else {**row, "grad_norm": _float(gnorm)})
                signalled = stopping
                stopping = stopping or (until is not None and until <= step < t.steps)
                metrics = evaluate_and_save(run, step, stopping) or metrics
                if signalled:
                    raise Interrupted(f"stopped at step {step} with a checkpoint; resume with --resume --out "
                                      f"{run.out}")
                if stopping:
                    break
    finally:
        bar.close()
        if run.log is not None:
            run.log.close()
    if step == t.steps and env.main:
        final = load(checkpoint.resolve(run.out), env.device, "fp32") if t.fsdp else run.task
        with run.averaged() if final is run.task else contextlib.nullcontext():
            if not metrics:  # resumed a run that had already finished: evaluate its final checkpoint again
                metrics, run.files = evaluate(final, eval_batches(run.val_set, 256, cfg.data.num_workers),
                                              env.device)
            pictures = finish(final, cfg, run.out, metrics, run.val_set, run.files)
            if run.tracker is not None:
                run.tracker.pictures(pictures, step)
    if run.tracker is not None:
        run.tracker.close()
    dist.barrier()
    return run.out


def _decide_steps(run: Run, budget: TimeBudget, step: int) -> bool:
    """At the time budget's probe step, fix ``train.steps`` (rank 0's decision on every rank); True if so."""
    decided = budget.decide(step)
    if decided is None:
        return False
    env = run.env
    if env.distributed:
        decided = int(dist.all_reduce([float(decided if env.main else 0)], env.device, op="sum")[0])
    budget.apply(decided, announce=env.main)
    if env.main:
        atomic_write_text(run.out / "config.json", run.cfg.dumps())
    return True


def setup(cfg: RunConfig, resume: bool, quiet: bool, overwrite: bool = False) -> Run:
    """Processes, data, the task (resumed weights and optimizer state), its wrapping, the log files."""
    out = Path(cfg.out)
    ckpt, run_id = None, None
    if resume:
        ckpt, saved, trainer = rundir.resume_point(out)
        cfg, run_id = rundir.resume_config(cfg, saved), trainer.get("run")
    check(cfg)
    task_class(cfg.task).check(cfg)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    env = dist.init(t.device)
    if not resume:
        if rundir.holds_run(out) and not overwrite:
            rundir.claim(out)  # raises on every rank alike
        run_id = rundir.claim(out, overwrite) if env.main else None
        dist.barrier()
    if t.batch_size % (env.world * t.accum):
        raise ConfigError(f"train.batch_size={t.batch_size} is not divisible by {env.world} processes x "
                          f"train.accum={t.accum}")
    if t.fsdp and not env.distributed:
        raise ConfigError("train.fsdp=true shards over processes: start the run with torchrun")
    if t.fsdp and t.ema > 0:
        raise ConfigError("train.ema with train.fsdp is not supported: the average would need sharding too")
    if t.fsdp:
        t.ema = 0.0  # the auto EMA (-1) is left out under FSDP
    torch.manual_seed(t.seed)
    task, train_set, val_set, info = prepare(cfg, fresh=not resume)
    task.to(env.device)
    if ckpt is not None:
        checkpoint.load_weights(task, ckpt)  # before wrapping, so every rank starts from the same weights
    blocks = [b for net in task.networks() for b in getattr(net, "blocks", [])]
    model = dist.wrap(task, env, blocks, t.fsdp)
    run = Run(cfg, env, task, model, make_optimizer(task, cfg, env.device), train_set, val_set, out, run_id)
    if t.ema != 0:
        run.ema = EMA(task, ema_decay(t))  # resumed: model.safetensors holds the average, trained.safetensors
        #                                    the weights the optimizer steps
        if ckpt is not None:
            trained = checkpoint.read_extra(ckpt, "trained.safetensors")
            with torch.no_grad():
                for name, p in task.named_parameters():
                    if name in trained:
                        p.copy_(trained[name])
    log_path = out / "log.jsonl"
    if ckpt is not None:
        run.start = run.last_ckpt = checkpoint.load_training_state(ckpt, run.opt,
                                                                   fsdp_model=task if t.fsdp else None)["step"]
        if run.start > t.steps:
            raise ConfigError(f"--resume: the run in {out} is at step {run.start}, beyond --steps {t.steps}")
        if env.main:
            atomic_write_text(log_path, "".join(json.dumps(r) + "\n" for r in _read_log(log_path, run.start)))
    elif env.main:
        log_path.write_text("")
    if env.main:
        atomic_write_text(out / "config.json", cfg.dumps())
        run.log = open(log_path, "a")
        run.tracker = open_tracker(t.log_to, out, run.start)
    if t.compile:
        compile_networks(task)
    if not (quiet or not env.main):
        _print_start(run, info)
    return run


def _print_start(run: Run, info: DataInfo) -> None:
    cfg, t, env = run.cfg, run.cfg.train, run.env
    micro_bs = t.batch_size // (env.world * t.accum)
    steps = f"steps for --time {t.time:.0f}s" if t.time else f"{t.steps} steps"
    streaming = isinstance(run.train_set, IterableDataset)
    wrapper = " (FSDP)" if t.fsdp else " (DDP)" if env.distributed else ""
    print(f"patchgpt: {cfg.task} on {cfg.data.spec}: {len(run.train_set)} train / {len(run.val_set)} val images "
          f"{info.channels}x{info.image_size[0]}x{info.image_size[1]}{' (streamed)' if streaming else ''}, "
          f"{run.task.describe()} ({run.task.num_params() / 1e6:.2f}M params), {run.task.tokens_per_item} "
          f"tokens/image, global batch {t.batch_size} = {env.world} processes x {t.accum} accum x {micro_bs} per "
          f"micro-batch, {steps} on {env.device}{wrapper}", file=sys.stderr)
    note = getattr(getattr(run.task, "input", None), "note", "")
    for line in ([note] if note else []) + run.task.notes:
        print(f"patchgpt: {line}", file=sys.stderr)


def _batches(run: Run, endless: bool = False) -> Iterator[dict]:
    """This rank's micro-batches from the run's start step on, in the (seed, step) order (``endless``: not
    bounded by ``train.steps``, which a time budget sets later)."""
    cfg, t, env = run.cfg, run.cfg.train, run.env
    micro_bs = t.batch_size // (env.world * t.accum)
    pin = env.device.type == "cuda"
    if isinstance(run.train_set, IterableDataset):
        return stream_batches(run.train_set, micro_bs, t.seed, run.start * t.accum, cfg.data.num_workers,
                              env.rank, env.world, cfg.data.shuffle, cfg.data.shuffle_buffer, pin)
    return train_batches(run.train_set, micro_bs * env.world, t.seed, run.start * t.accum,
                         None if endless else (t.steps - run.start) * t.accum, cfg.data.num_workers, env.rank,
                         env.world, cfg.data.shuffle, pin)


def train_step(run: Run, batches: Iterator[dict], step: int, stop: _Stop
               ) -> tuple[float, dict, int, bool, torch.Tensor | None]:
    """One optimizer step over ``train.accum`` micro-batches: (mean loss, mean logs, images, whether any rank
    is stopping, gradient norm as a tensor: read only when logged, so no host sync per step). Losses and logs
    are averaged over processes with one all-reduce.

    The losses and logs are read to the host once per optimizer step, after every micro-batch is queued (a
    single device-to-host copy on CUDA). That read stays every step: the non-finite check must see the loss
    before the optimizer applies its gradients, so the run stops at the step that failed with its weights and
    checkpoints intact."""
    t, env, device = run.cfg.train, run.env, run.env.device
    torch.manual_seed(t.seed * 1_000_003 + step)  # dropout and any other global-RNG use
    total, logs, n_img = 0.0, {}, 0
    losses: list[torch.Tensor] = []
    for micro in range(t.accum):
        batch = next(batches)
        n = batch_len(batch)
        if n == 0:
            if env.distributed:  # the other ranks would wait for this one's gradients for ever
                raise DataError(f"every file of rank {env.rank}'s micro-batch at step {step} was "
                                "skipped as unreadable; clean the data or use larger batches")
            continue
        rng = RowRNG(step_generator(t.seed, step, micro), env.rank * n, env.world * n)
        batch = run.task.augment(to_device(batch, device), rng)
        # Gradients are all-reduced once per optimizer step: not on the earlier micro-steps.
        with dist.no_sync(run.model, micro < t.accum - 1), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, logs = run.model(batch, rng)
        (loss / t.accum).backward()
        losses.append(loss.detach())  # read after the loop: no host sync between micro-batches
        n_img += n
    if n_img == 0:
        raise DataError(f"every file of step {step}'s batch was skipped as unreadable (data.on_error=skip): "
                        f"{run.cfg.data.spec} has too few readable files")
    logs = {k: v for k, v in logs.items() if k != "loss"}
    values = _host_floats([*losses, *logs.values()])
    for v in values[:len(losses)]:  # the same sum, in the same order, as reading each loss as it came
        total += v / t.accum
    logs = dict(zip(logs, values[len(losses):], strict=True))
    # Whether to stop after this step is read once here: a signal landing later in the step
    # counts from the next one, so every rank stops (and checkpoints) at the same step.
    stopping = stop.flag
    if env.distributed:  # one all-reduce: mean loss and logs, images summed, any rank stopping
        vals = dist.all_reduce([total, *logs.values(), n_img, float(stopping)], device, op="sum")
        total, n_img = vals[0] / env.world, int(vals[-2])
        logs = {k: v / env.world for k, v in zip(logs, vals[1:-2], strict=True)}
        stopping = vals[-1] > 0
    if not math.isfinite(total):
        last = (f"the last good checkpoint is step {run.last_ckpt} in {run.out}" if run.last_ckpt else
                "no checkpoint was written yet")
        raise TrainingError(f"loss became {total} at step {step}; {last}. Lower train.lr or check the data.")
    gnorm = torch.nn.utils.clip_grad_norm_(run.task.parameters(), t.grad_clip) if t.grad_clip > 0 else None
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.decay = ema_decay(t)  # a time budget may have set the step count since
        run.ema.update(step)
    return total, logs, n_img, stopping, gnorm


def evaluate_and_save(run: Run, step: int, stopping: bool) -> dict | None:
    """Evaluate when due (``train.eval_every`` and the last step) and checkpoint when due (evaluations,
    ``train.ckpt_every``, a stop); returns the new metrics, or None when there was no evaluation."""
    t = run.cfg.train
    do_eval = step == t.steps or bool(t.eval_every and step % t.eval_every == 0)
    if not (do_eval or (t.ckpt_every and step % t.ckpt_every == 0) or stopping):
        return None
    with run.averaged():
        return _save_and_evaluate(run, step, do_eval)


def _save_and_evaluate(run: Run, step: int, do_eval: bool) -> dict | None:
    cfg, t, env = run.cfg, run.cfg.train, run.env
    metrics = None
    saved_at = _save(run, step)  # first: an evaluation that fails loses no training
    run.last_ckpt = step
    if do_eval and env.main:
        try:  # FSDP evaluates the gathered weights, unsharded
            task = load(saved_at, env.device) if t.fsdp else run.task
            metrics, run.files = evaluate(task, eval_batches(run.val_set, 256, cfg.data.num_workers), env.device)
        except (DataError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(f"evaluation at step {step} failed ({first}); the checkpoint is saved in "
                                f"{saved_at}: fix the validation data, then --resume --out {run.out}") from None
        run.task.train()
        run.write_log({"step": step, **_scalars(metrics, "val/")})
        key, mode = run.task.best_metric
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            checkpoint.update_best(run.out, saved_at, key, mode, float(value), step)
    return metrics


def compile_networks(task: Task) -> None:
    """`torch.compile` the task's networks in place (its GPT backbone, or the VQ-VAE), not the task itself.

    The task's own Python (random prefix lengths, captions and other strings in the batch, box sequences)
    stays eager: compiled, every new prefix length or caption would be a guard failure and a recompile, and
    after a few the compiler gives up and runs the step eagerly. ``nn.Module.compile`` keeps the parameter
    names, so checkpoints are the same with or without it.
    """
    for net in task.networks():
        net.compile()


def _save(run: Run, step: int) -> Path:
    """Rank 0 writes the checkpoint (FSDP: every rank helps gather it first); all ranks wait for it."""
    full = None
    if run.cfg.train.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = {"model": get_model_state_dict(run.task, options=opts),
                "optimizer": get_optimizer_state_dict(run.task, run.opt, options=opts)}
    path = checkpoint.step_dir(run.out, step)
    extra = None
    if run.ema is not None:  # saved inside `run.averaged()`: the EMA holds the trained weights meanwhile
        extra = {"trained.safetensors": run.ema.state_dict()}
    if run.env.main:
        path = checkpoint.save(run.out, run.task, run.cfg, step, run.opt, {"step": step, "run": run.run_id},
                               keep=run.cfg.train.keep, full=full, extra=extra)
    dist.barrier()
    return path


def finite(x: Any) -> Any:
    """`x` with every non-finite float replaced by None, so its JSON is valid (no bare NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def _host_floats(xs: list) -> list[float]:
    """``[float(x) for x in xs]`` with one device-to-host copy (one host sync) for all the single-value
    floating-point CUDA tensors among them, instead of one each. They are widened to float64 on the device
    first, which is exact, so the values are the ones `float` gives."""
    on_gpu = [type(x) is torch.Tensor and x.is_cuda and x.is_floating_point() and x.numel() == 1 for x in xs]
    if sum(on_gpu) < 2:
        return [float(x) for x in xs]
    read = iter(torch.stack([x.detach().reshape(()).double() for x, g in zip(xs, on_gpu, strict=True) if g]).tolist())
    return [next(read) if g else float(x) for x, g in zip(xs, on_gpu, strict=True)]


def _float(x: torch.Tensor) -> float:
    return float(x.full_tensor() if hasattr(x, "full_tensor") else x)  # FSDP: a DTensor


def _scalars(metrics: dict, prefix: str = "") -> dict:
    return {prefix + k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def finish(task: Task, cfg: RunConfig, out: Path, metrics: dict, val_set: ImageSet,
           files: dict[str, Any] | None = None) -> dict[str, str]:
    """metrics.json, the metric's files (e.g. detections.json), the loss curve and the task's pictures; returns
    the pictures written (name -> PNG path)."""
    for name, content in (files or {}).items():
        atomic_write_text(out / name, json.dumps(content))
    atomic_write_text(out / "metrics.json", json.dumps(finite(metrics), indent=2))
    rows = _read_log(out / "log.jsonl", cfg.train.steps)
    series = {"train loss": [(r["step"], r["loss"]) for r in rows if "loss" in r],
              "val loss": [(r["step"], r["val/val_loss"]) for r in rows if "val/val_loss" in r]}
    save_curves(out / "loss.png", series, title=f"{cfg.task} ({cfg.size}, {cfg.data.spec})")
    pictures = {"loss": str(out / "loss.png")}
    try:
        made = task.report(out, val_set, metrics)
    except DataError as e:
        print(f"patchgpt: no pictures: {e}", file=sys.stderr)
        made = {}
    pictures.update({k.removesuffix("_png"): v for k, v in made.items() if isinstance(v, str) and v.endswith(".png")})
    return pictures
