"""The task contract, checked for every task in the registry: a new task is covered by its `TASKS` line.

On each task's tiny demo data: forward is finite; backward reaches the trainable parameters; `predict`
returns the documented keys; `metric().compute()` returns its documented keys; save -> load gives the same
weights and predictions; the saved state is JSON; `predict_files` works on real PNG/JPEG (or GIF) files;
the config section round-trips through JSON.
"""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from patchgpt import checkpoint
from patchgpt.config import apply_size
from patchgpt.data import eval_batches
from patchgpt.evaluate import evaluate
from patchgpt.rng import RowRNG
from patchgpt.tasks import TASKS, Task, config_from_dict, default_config, load
from patchgpt.train import prepare


def tiny(name: str, tmp_path):
    cfg = default_config(name)
    apply_size(cfg, "nano")
    cfg.data.spec = TASKS[name].demo_data
    cfg.out = str(tmp_path / name)
    task, train_set, val_set, _ = prepare(cfg)
    batch = next(eval_batches(val_set, 4))
    return task, batch, val_set


def write_files(task: Task, tmp_path) -> list[str]:
    """Real files a user would bring: a PNG and a JPEG (an animated GIF for tasks over clips)."""
    rng = np.random.default_rng(0)
    if task.reads_clips:
        frames = [Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)) for _ in range(6)]
        path = tmp_path / "clip.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=40, loop=0)
        return [str(path)]
    paths = []
    for ext, mode in (("png", "RGB"), ("jpg", "L")):
        im = Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).convert(mode)
        im.save(tmp_path / f"user.{ext}")
        paths.append(str(tmp_path / f"user.{ext}"))
    return paths


@pytest.mark.parametrize("name", list(TASKS))
def test_task_contract(name, tmp_path):
    task, batch, val_set = tiny(name, tmp_path)
    cls = TASKS[name]
    assert isinstance(task, Task) and task.name == name

    # forward is finite, and backward reaches the trainable parameters (two steps: a zero-initialised head
    # passes no gradient to the backbone before its first update)
    task.train()
    trainable = {n: p for n, p in task.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(trainable.values(), lr=0.1)
    reached = set()
    for step in range(2):
        loss, logs = task(task.augment(dict(batch), RowRNG(torch.Generator().manual_seed(step))),
                          RowRNG(torch.Generator().manual_seed(10 + step)))
        assert loss.dim() == 0 and torch.isfinite(loss) and "loss" in logs
        loss.backward()
        reached |= {n for n, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0}
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in trainable.values())
        opt.step()
        opt.zero_grad()
    assert reached, "the loss reaches no parameter"
    missed = set(trainable) - reached - set(task.unused_parameters())
    assert not missed, f"no gradient reaches {sorted(missed)}"

    # predict and the metric return their documented keys
    task.eval()
    out = task.predict(batch)
    assert set(cls.output_keys) <= set(out), f"predict misses {set(cls.output_keys) - set(out)}"
    metrics, files = evaluate(task, eval_batches(val_set, 8))
    assert {"val_loss", *cls.metric_keys} <= set(metrics)
    json.dumps(metrics), json.dumps(files)

    # save -> load: the same weights and predictions; the saved state and config are JSON
    cfg = task.cfg
    path = checkpoint.save(cfg.out, task, cfg, 1)
    meta = json.loads((path / "config.json").read_text())
    assert meta["task"] == name and meta["state"] == json.loads(json.dumps(task.state()))
    assert config_from_dict(meta["config"]).to_dict() == cfg.to_dict()
    again = load(path, precision="fp32")   # the exact path (int8, the CPU default, is bounded in test_quantize)
    for k, v in task.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    torch.manual_seed(0)
    a = task.predict(batch)
    torch.manual_seed(0)
    b = again.predict(batch)
    for k in cls.output_keys:
        assert repr(a[k]) == repr(b[k]), k

    # the user's own files
    results = task.predict_files(write_files(task, tmp_path), out=tmp_path / "predicted", **cls.demo_options)
    assert results and all(isinstance(r, dict) for r in results)
    json.dumps(results)
    report = task.report(tmp_path / "report", val_set, metrics)
    json.dumps(report)


def test_every_task_documents_its_outputs():
    for name, cls in TASKS.items():
        assert cls.__doc__ and cls.output_keys and cls.demo_data, name
        assert cls.section is None or cls.Config is not None, name
        key, mode = cls.best_metric   # what checkpoints/best follows is a number the metric reports
        assert key in ("val_loss", *cls.metric_keys) and mode in ("max", "min"), name
