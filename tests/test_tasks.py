"""Tasks: the loss at initialisation and overfitting one small batch, for every task and mode."""

import math

import pytest
import torch

from patchgpt.data import Digits
from patchgpt.tasks import Classify, Pretrain
from patchgpt.train import make_optimizer

from .helpers import tiny_config


def one_batch(n=16):
    ds = Digits()
    return {"image": ds.x[:n].clone(), "label": ds.y[:n].clone()}, ds.info


def colors_pretrain(tmp_path):
    cfg = tiny_config("pretrain", tmp_path)
    cfg.tokenizer.kind, cfg.pretrain.target, cfg.tokenizer.n_colors = "colors", "tokens", 8
    batch, info = one_batch()
    task = Pretrain(cfg, info)
    task.input.tok.fit(batch["image"])
    return task, batch


def test_token_loss_at_init_is_near_log_vocab(tmp_path):
    task, batch = colors_pretrain(tmp_path)
    loss, _ = task(batch)
    V = task.vocab.size
    assert abs(loss.item() - math.log(V)) < 0.05 * math.log(V)


def overfit(task, batch, steps=150, lr=3e-3):
    cfg = task.cfg
    cfg.train.lr, cfg.train.weight_decay = lr, 0.0
    opt = make_optimizer(task, cfg, torch.device("cpu"))
    task.train()
    first = None
    for _ in range(steps):
        loss, logs = task(batch)
        first = first if first is not None else float(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return first, float(loss)


def test_pretrain_patches_overfits(tmp_path):
    cfg = tiny_config("pretrain", tmp_path)
    cfg.pretrain.prefix = False
    batch, info = one_batch(8)
    first, last = overfit(Pretrain(cfg, info), batch)
    assert last < 0.3 * first


def test_pretrain_tokens_overfits(tmp_path):
    task, batch = colors_pretrain(tmp_path)
    task.cfg.pretrain.prefix = False
    first, last = overfit(task, {k: v[:8] for k, v in batch.items()})
    assert last < 0.6 * first


@pytest.mark.parametrize("mode", ["finetune", "linear", "attentive"])
def test_classify_overfits(tmp_path, mode):
    cfg = tiny_config("classify", tmp_path)
    cfg.classify.mode, cfg.classify.label_smoothing = mode, 0.0
    batch, info = one_batch(16)
    task = Classify(cfg, info)
    before = {k: v.clone() for k, v in task.backbone.state_dict().items()}
    first, last = overfit(task, batch, steps=200, lr=1e-2 if mode == "linear" else 3e-3)
    assert last < 0.2 * first
    assert (task.predict(batch)["pred"] == batch["label"]).float().mean() == 1.0
    unchanged = all(torch.equal(before[k], v) for k, v in task.backbone.state_dict().items())
    assert unchanged == (mode != "finetune")  # probes never touch the backbone


def test_classify_probe_layer_choice(tmp_path):
    cfg = tiny_config("classify", tmp_path)
    cfg.classify.mode, cfg.classify.layer = "linear", 1
    batch, info = one_batch(4)
    task = Classify(cfg, info).eval()
    assert task.features(batch["image"]).shape == (4, 16, cfg.model.n_embd)
    torch.testing.assert_close(task.features(batch["image"]),
                               task.backbone(task.sequence(batch), upto=1))


def test_classify_needs_labels(tmp_path):
    from patchgpt.data.base import DataError, DataInfo

    with pytest.raises(DataError, match="labelled"):
        Classify(tiny_config("classify", tmp_path), DataInfo(channels=1, image_size=(8, 8), classes=None))
