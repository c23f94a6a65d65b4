"""The training loop: checkpoints, exact resume, config overrides, bad input."""

import json

import pytest
import torch

import patchgpt
from patchgpt import checkpoint
from patchgpt.config import ConfigError, set_override
from patchgpt.train import train

from .helpers import tiny_config


def params(task):
    return {k: v.clone() for k, v in task.state_dict().items()}


def test_checkpoint_save_load_equality(tmp_path):
    cfg = tiny_config("pretrain", tmp_path / "run", steps=2)
    out = train(cfg, quiet=True)
    ckpt = checkpoint.resolve(out)
    assert (ckpt / "config.json").exists() and (ckpt / "model.safetensors").exists()
    assert not list((out / "checkpoints").glob(".tmp*"))
    a = patchgpt.load(out)
    b = patchgpt.load(ckpt)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    torch.testing.assert_close(a.predict({"image": x})["pred"], b.predict({"image": x})["pred"])
    for name in ("log.jsonl", "metrics.json", "loss.png", "predictions.png"):
        assert (out / name).exists(), name


def test_colour_palette_is_saved_with_the_model(tmp_path):
    cfg = tiny_config("pretrain", tmp_path / "c", steps=1)
    set_override(cfg, "tokenizer.kind=colors")
    set_override(cfg, "pretrain.target=tokens")
    out = train(cfg, quiet=True)
    task = patchgpt.load(out)
    assert task.input.tok.fitted and task.input.tok.palette.abs().sum() > 0


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    full = tiny_config("classify", tmp_path / "full", steps=6)
    full.train.ckpt_every = 3
    full.train.keep = 5
    train(full, quiet=True)
    final = params(patchgpt.load(checkpoint.list_checkpoints(tmp_path / "full")[-1]))

    part = tiny_config("classify", tmp_path / "part", steps=6)
    train(part, quiet=True, until=2)  # stops with a checkpoint at step 2, as SIGTERM would
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "part")] == ["step_0000002"]
    train(part, resume=True, quiet=True)
    again = params(patchgpt.load(tmp_path / "part"))
    for k in final:
        torch.testing.assert_close(again[k], final[k], rtol=0, atol=0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len([s for s in steps if s == 2]) == 1


def test_fine_tune_from_pretrained_loads_backbone(tmp_path):
    pre = train(tiny_config("pretrain", tmp_path / "pre", steps=2), quiet=True)
    cfg = tiny_config("classify", tmp_path / "cls", steps=1)
    cfg.init = str(pre)
    cfg.classify.mode = "linear"
    out = train(cfg, quiet=True)
    a, b = patchgpt.load(pre), patchgpt.load(out)
    for k, v in a.backbone.state_dict().items():
        assert torch.equal(v, b.backbone.state_dict()[k])


def test_set_override_checks_keys_and_types():
    cfg = tiny_config("classify", "x")
    set_override(cfg, "train.lr=0.01")
    set_override(cfg, "data.augment=false")
    set_override(cfg, "model.n_layer=3")
    assert cfg.train.lr == 0.01 and cfg.data.augment is False and cfg.model.n_layer == 3
    with pytest.raises(ConfigError, match="unknown key 'lrr'"):
        set_override(cfg, "train.lrr=1")
    with pytest.raises(ConfigError, match="expected int"):
        set_override(cfg, "train.steps=ten")
    with pytest.raises(ConfigError, match="section"):
        set_override(cfg, "train=3")
    with pytest.raises(ConfigError, match="key=value"):
        set_override(cfg, "train.lr")


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such"):
        patchgpt.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        patchgpt.load(tmp_path / "empty")


def test_incomplete_checkpoint_is_ignored(tmp_path):
    out = train(tiny_config("pretrain", tmp_path / "r", steps=2), quiet=True)
    good = checkpoint.resolve(out)
    # A write interrupted before its rename leaves only a hidden temp dir; a torn one lacks config.json.
    (out / "checkpoints" / ".tmp_step_0000009_1").mkdir()
    torn = out / "checkpoints" / "step_0000010"
    torn.mkdir()
    (torn / "model.safetensors").write_bytes(b"garbage")
    assert checkpoint.resolve(out) == good
    patchgpt.load(out)


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, monkeypatch):
    from patchgpt.tasks import Classify
    from patchgpt.train import TrainingError

    cfg = tiny_config("classify", tmp_path / "nan", steps=6)
    cfg.train.ckpt_every = 2
    forward = Classify.forward

    def poisoned(self, batch, gen=None):
        loss, logs = forward(self, batch, gen)
        return (loss * float("nan") if self.poison else loss), logs

    monkeypatch.setattr(Classify, "forward", poisoned)
    monkeypatch.setattr(Classify, "poison", False, raising=False)
    train(cfg, quiet=True, until=2)
    monkeypatch.setattr(Classify, "poison", True, raising=False)
    with pytest.raises(TrainingError, match="last good checkpoint is step 2"):
        train(cfg, resume=True, quiet=True)
    patchgpt.load(tmp_path / "nan")  # the good checkpoint is intact


def test_compiled_training_does_not_recompile_per_prefix_or_caption(tmp_path):
    """`train.compile` compiles the backbone only: AIM's random prefix lengths and the digits' captions
    (strings in the batch) must not each cost a recompile (after 8 the compiler falls back to eager)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_config("pretrain", tmp_path / "c", steps=10)
    cfg.train.compile = True
    assert cfg.pretrain.prefix                      # random prefix lengths in [1, 15] over 10 steps
    out = train(cfg, quiet=True)
    # causal, then the prefix length as a symbol, then the no-grad evaluation (the old whole-task compile
    # traced 14 frames here and hit the recompile limit)
    assert counters["frames"]["total"] <= 4 and not counters["unimplemented"], dict(counters["frames"])
    assert not any("_orig_mod" in k for k in patchgpt.load(out).state_dict())  # same checkpoint keys
    assert json.loads((out / "metrics.json").read_text())["val_loss"] < 1.0
    torch._dynamo.reset()
