"""The fine-tuning recipe: an EMA of the weights, layer-wise lr decay, drop-path, and their auto values."""

import torch

import patchgpt
from patchgpt import checkpoint
from patchgpt.config import TrainConfig
from patchgpt.ema import EMA
from patchgpt.model import GPT, GPTConfig, drop_path
from patchgpt.sequence import tokens
from patchgpt.train import auto_steps, ema_decay, layer_id, make_optimizer, train

from .helpers import tiny_config


def weights(task):
    return {k: v.clone() for k, v in task.state_dict().items()}


def test_ema_is_what_a_run_saves_and_resumes_exactly(tmp_path):
    full = tiny_config("classify", tmp_path / "full", steps=6)
    full.train.ema, full.train.ckpt_every, full.train.keep = 0.9, 3, 5
    train(full, quiet=True)
    last = checkpoint.list_checkpoints(tmp_path / "full")[-1]
    saved = weights(patchgpt.load(last))
    trained = checkpoint.read_extra(last, "trained.safetensors")
    # The saved weights are the average, not the last step's weights (which sit beside them for resuming).
    name = "head.weight"
    assert not torch.equal(saved[name], trained[name])

    part = tiny_config("classify", tmp_path / "part", steps=6)
    part.train.ema = 0.9
    train(part, quiet=True, until=2)
    train(part, resume=True, quiet=True)
    again = weights(patchgpt.load(tmp_path / "part"))
    for k in saved:
        torch.testing.assert_close(again[k], saved[k], rtol=0, atol=0)
    resumed = checkpoint.read_extra(checkpoint.resolve(tmp_path / "part"), "trained.safetensors")
    for k in trained:
        torch.testing.assert_close(resumed[k], trained[k], rtol=0, atol=0)


def test_ema_average_and_swap():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, decay=0.5)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(step=100)  # decay min(0.5, 101/110) = 0.5: halfway
    with ema.swapped():
        torch.testing.assert_close(net.weight, start + 0.5)
    torch.testing.assert_close(net.weight, start + 1.0)  # the trained weights are back


def test_layer_decay_scales_lr_by_depth():
    cfg = tiny_config("classify", "x")
    cfg.train.layer_decay = 0.5
    from patchgpt.data import build_datasets
    from patchgpt.tasks import task_class

    _, _, info = build_datasets(cfg.data)
    task = task_class("classify")(cfg, info)
    L = cfg.model.n_layer
    assert layer_id("backbone.patch_proj.weight", L) == 0
    assert layer_id("backbone.blocks.0.attn.qkv.weight", L) == 1
    assert layer_id("backbone.blocks.1.mlp.fc.weight", L) == 2
    assert layer_id("head.weight", L) == L + 1
    opt = make_optimizer(task, cfg, torch.device("cpu"))
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    named = dict(task.named_parameters())
    assert scale[id(named["head.weight"])] == 1.0
    assert scale[id(named["backbone.blocks.1.mlp.fc.weight"])] == 0.5 ** (L - 1)
    assert scale[id(named["backbone.patch_proj.weight"])] == 0.5 ** (L + 1)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in task.parameters())


def test_drop_path_drops_whole_rows_and_keeps_the_mean():
    x = torch.ones(4000, 3, 2)
    y = drop_path(x, 0.25, training=True)
    rows = y.reshape(4000, -1)
    assert len(rows[:, 0].unique()) == 2 and float(rows[:, 0].max()) == float(torch.tensor(1 / 0.75))
    assert (rows == rows[:, :1]).all()                       # a row is dropped or kept whole
    assert abs(float(y.mean()) - 1.0) < 0.05
    assert torch.equal(drop_path(x, 0.25, training=False), x)
    gpt = GPT(GPTConfig(n_layer=3, n_head=2, n_embd=16, vocab_size=8, drop_path=0.2)).eval()
    assert [b.drop_path for b in gpt.blocks] == [0.0, 0.1, 0.2]
    seq = tokens(torch.randint(0, 8, (2, 5)))
    torch.testing.assert_close(gpt(seq), gpt(seq))           # evaluation is deterministic


def test_fine_tuning_recipe_applies_only_from_init_and_set_wins(tmp_path, monkeypatch):
    from patchgpt.tasks.classify import Classify

    monkeypatch.setattr(Classify, "finetune_recipe", classmethod(lambda cls, cfg: Classify.deep_finetune))
    assert Classify.deep_finetune == {"layer_decay": 0.75, "drop_path": 0.1}
    pre = train(tiny_config("pretrain", tmp_path / "pre", steps=1), quiet=True)
    scratch = tiny_config("classify", tmp_path / "scratch", steps=1)
    train(scratch, quiet=True)
    assert (scratch.model.drop_path, scratch.train.layer_decay) == (0.0, 1.0)
    tuned = tiny_config("classify", tmp_path / "tuned", steps=1)
    tuned.init = str(pre)
    train(tuned, quiet=True)
    assert (tuned.model.drop_path, tuned.train.layer_decay) == (0.1, 0.75)
    saved = patchgpt.load(tmp_path / "tuned").cfg
    assert (saved.model.drop_path, saved.train.layer_decay) == (0.1, 0.75)
    mine = tiny_config("classify", tmp_path / "mine", steps=1)
    mine.init, mine.model.drop_path, mine.train.layer_decay = str(pre), 0.0, 1.0
    train(mine, quiet=True)
    assert (mine.model.drop_path, mine.train.layer_decay) == (0.0, 1.0)


def test_auto_steps_and_ema_follow_the_data():
    t = TrainConfig(steps=0, batch_size=128)
    assert "15.0 passes over 60000 images" in auto_steps(t, range(60000), 15) and t.steps == 7032
    t = TrainConfig(steps=0, batch_size=128)
    auto_steps(t, range(1437), 15)
    assert t.steps == 1000                                   # small sets: at least 1000 steps
    t = TrainConfig(steps=0, batch_size=64)
    auto_steps(t, range(10**7), 15)
    assert t.steps == 8000                                   # large sets: at most 8000
    t = TrainConfig(steps=0, time=300.0)
    assert auto_steps(t, range(60000), 15) == "" and t.steps > 0   # --time decides; nothing to announce
    t = TrainConfig(steps=123)
    assert auto_steps(t, range(60000), 15) == "" and t.steps == 123
    assert ema_decay(TrainConfig(steps=7032, ema=-1)) == 1 - 10 / 7032
    assert ema_decay(TrainConfig(steps=100, ema=-1)) == 0.99
    assert ema_decay(TrainConfig(steps=100, ema=0.5)) == 0.5


def test_deep_backbones_get_the_fine_tuning_recipe_shallow_ones_do_not():
    from patchgpt.tasks.classify import Classify

    cfg = tiny_config("classify", "x")
    assert Classify.finetune_recipe(cfg) == {}
    cfg.model.n_layer = 12
    assert Classify.finetune_recipe(cfg) == {"layer_decay": 0.75, "drop_path": 0.1}


def test_probes_leave_the_auto_ema_out(tmp_path):
    cfg = tiny_config("classify", tmp_path / "probe", steps=1)
    cfg.classify.mode, cfg.train.ema = "linear", -1
    train(cfg, quiet=True)
    assert cfg.train.ema == 0.0
    assert not (checkpoint.resolve(tmp_path / "probe") / "trained.safetensors").exists()


def test_init_from_another_tasks_run_transfers_all_but_the_token_tables(tmp_path):
    det = tiny_config("detect", tmp_path / "det", steps=1)
    det.data.spec = "digit-scenes"
    det.data.image_size = 32
    train(det, quiet=True)
    vqa = tiny_config("vqa", tmp_path / "vqa", steps=1)
    vqa.data.spec, vqa.data.image_size, vqa.init = "digit-scenes", 32, str(tmp_path / "det")
    from patchgpt.data import build_datasets
    from patchgpt.tasks import task_class

    _, _, info = build_datasets(vqa.data)
    task = task_class("vqa")(vqa, info)
    task.init_from(tmp_path / "det")
    source = patchgpt.load(tmp_path / "det").backbone.state_dict()
    mine = task.backbone.state_dict()
    assert mine["wte.weight"].shape != source["wte.weight"].shape
    moved = [k for k in source if k not in ("wte.weight", "lm_head.weight")]
    assert moved and all(torch.equal(mine[k], source[k]) for k in moved)
