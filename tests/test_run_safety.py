"""No lost work, no wrong model served: run directories, resumes, interruptions and failed evaluations."""

import errno
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image

import patchgpt
from patchgpt import checkpoint
from patchgpt.config import ConfigError
from patchgpt.data.base import DataError
from patchgpt.quickstart import quickstart
from patchgpt.tasks import Classify, default_config
from patchgpt.train import Interrupted, TrainingError, finite, train

from .helpers import tiny_config


def same_run(task, out, steps=None):
    """What a user passes to --resume: the run's settings, and --steps only if given."""
    cfg = tiny_config(task, out)
    cfg.train.steps = steps or default_config(task).train.steps
    return cfg


def test_a_new_run_never_lands_on_an_old_one(tmp_path):
    out = tmp_path / "R"
    old = tiny_config("classify", out, steps=4)
    old.train.ckpt_every, old.train.keep = 2, 5
    train(old, quiet=True)
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--overwrite"):
        train(tiny_config("pretrain", out, steps=3), quiet=True)
    assert patchgpt.load(out).name == "classify"                 # nothing of the old run was touched
    train(tiny_config("pretrain", out, steps=3), quiet=True, overwrite=True)
    assert patchgpt.load(out).name == "pretrain"                 # the new run is what loads
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step_0000003"]
    assert patchgpt.load(out / "replaced-1").name == "classify"  # the old run moved aside, not deleted
    assert len(checkpoint.list_checkpoints(out / "replaced-1")) == 2


def test_pruning_keeps_other_runs_checkpoints(tmp_path):
    cfg = tiny_config("classify", tmp_path / "r", steps=1)
    task = train(cfg, quiet=True) and patchgpt.load(tmp_path / "r")
    checkpoint.save(tmp_path / "p", task, cfg, 50, trainer={"step": 50, "run": "old"})
    for step in (1, 2, 3):
        checkpoint.save(tmp_path / "p", task, cfg, step, trainer={"step": step, "run": "new"}, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "p")] == ["step_0000002", "step_0000003",
                                                                            "step_0000050"]


def test_out_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        train(tiny_config("classify", tmp_path / "f", steps=1), quiet=True)


def _folder(root, n=6, bad=()):
    for c in ("a", "b"):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            p = root / c / f"{i}.png"
            if (c, i) in bad:
                p.write_bytes(b"not a png")
            else:
                Image.fromarray(np.full((8, 8), 30 * i + (100 if c == "b" else 0), dtype=np.uint8)).save(p)


def test_an_evaluation_error_loses_no_training(tmp_path, monkeypatch):
    from patchgpt.tasks.classify import ClassifyMetric

    def broken(self, batch):
        raise DataError("val/b/1.png: cannot read image (truncated)")

    monkeypatch.setattr(ClassifyMetric, "update", broken)   # e.g. a file that decodes badly at evaluation
    cfg = tiny_config("classify", tmp_path / "run", steps=3)
    with pytest.raises(TrainingError, match=r"evaluation at step 3 failed .*1\.png.*saved in .*step_0000003"):
        train(cfg, quiet=True)
    assert [p.name for p in checkpoint.list_checkpoints(cfg.out)] == ["step_0000003"]
    monkeypatch.undo()                                        # the user fixes the data, then resumes
    train(same_run("classify", tmp_path / "run"), resume=True, quiet=True)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n"] == 359


def test_every_file_skipped_is_an_error_not_an_empty_run(tmp_path, monkeypatch):
    from patchgpt.data.images import ImageFolder

    _folder(tmp_path / "d", n=4)
    monkeypatch.setattr(ImageFolder, "__getitem__", lambda self, i: None)   # every file fails at decode time
    cfg = tiny_config("classify", tmp_path / "run", steps=2)
    cfg.data.spec, cfg.data.image_size, cfg.data.on_error = f"folder:{tmp_path / 'd'}", 8, "skip"
    with pytest.raises(DataError, match="skipped as unreadable"):
        train(cfg, quiet=True)


def _signal_at(monkeypatch, step_to_signal):
    forward, calls = Classify.forward, {"n": 0}

    def signalled(self, batch, rng=None):
        calls["n"] += 1
        if calls["n"] == step_to_signal:
            os.kill(os.getpid(), signal.SIGTERM)
        return forward(self, batch, rng)

    monkeypatch.setattr(Classify, "forward", signalled)


def test_a_signal_stops_with_a_checkpoint_and_says_how_to_resume(tmp_path, monkeypatch):
    cfg = tiny_config("classify", tmp_path / "run", steps=6)
    _signal_at(monkeypatch, 2)
    with pytest.raises(Interrupted, match="stopped at step 2 .*--resume"):
        train(cfg, quiet=True)
    assert [p.name for p in checkpoint.list_checkpoints(cfg.out)] == ["step_0000002"]
    monkeypatch.undo()
    train(same_run("classify", tmp_path / "run"), resume=True, quiet=True)   # no --steps: the saved 6
    assert checkpoint.read_meta(tmp_path / "run")["step"] == 6


def test_a_signal_stops_the_whole_quickstart_and_a_rerun_continues(tmp_path, monkeypatch):
    _signal_at(monkeypatch, 2)                                  # during the first probe (a classify stage)
    with pytest.raises(Interrupted, match="quickstart stopped in stage probe_random.*patchgpt quickstart"):
        quickstart(tmp_path, smoke=True)
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "report.md").exists()
    monkeypatch.undo()
    res = quickstart(tmp_path, smoke=True)
    assert set(res["val_top1"]) >= {"probe_random", "probe_linear", "probe_attentive", "finetune"}
    assert checkpoint.read_meta(tmp_path / "probe_random")["step"] == 4


def test_resume_keeps_the_run_and_refuses_changes(tmp_path):
    out = tmp_path / "run"
    train(tiny_config("classify", out, steps=4), quiet=True)
    train(same_run("classify", out), resume=True, quiet=True)         # a finished run stays finished
    assert checkpoint.read_meta(out)["step"] == 4
    with pytest.raises(ConfigError, match="trains 'classify', not 'pretrain'"):
        train(same_run("pretrain", out), resume=True, quiet=True)
    other = same_run("classify", out)
    other.data.spec = "digit-scenes"
    with pytest.raises(ConfigError, match="data.spec='digit-scenes'"):
        train(other, resume=True, quiet=True)
    with pytest.raises(ConfigError, match="beyond --steps 2"):
        train(same_run("classify", out, steps=2), resume=True, quiet=True)
    train(same_run("classify", out, steps=6), resume=True, quiet=True)   # --steps may extend it
    assert checkpoint.read_meta(out)["step"] == 6


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path, capsys):
    cfg = tiny_config("classify", tmp_path / "run", steps=4)
    cfg.train.ckpt_every, cfg.train.keep = 2, 5
    train(cfg, quiet=True, until=4)
    newest = checkpoint.list_checkpoints(cfg.out)[-1]
    (newest / "trainer.json").write_text("{torn")
    train(tiny_config("classify", cfg.out, steps=6), resume=True, quiet=True)
    assert "skipping damaged checkpoint step_0000004" in capsys.readouterr().err
    assert checkpoint.read_meta(cfg.out)["step"] == 6


def test_a_fine_tuned_run_resumes_after_its_init_run_moved(tmp_path):
    pre = train(tiny_config("pretrain", tmp_path / "pre", steps=2), quiet=True)
    cfg = tiny_config("classify", tmp_path / "cls", steps=4)
    cfg.init = str(pre)
    train(cfg, quiet=True, until=2)
    shutil.move(str(pre), str(tmp_path / "elsewhere"))
    again = tiny_config("classify", tmp_path / "cls", steps=4)
    again.init = cfg.init
    train(again, resume=True, quiet=True)
    assert checkpoint.read_meta(tmp_path / "cls")["step"] == 4


def test_a_full_disk_leaves_the_previous_checkpoints_and_no_temp(tmp_path, monkeypatch):
    cfg = tiny_config("classify", tmp_path / "run", steps=4)
    cfg.train.ckpt_every = 2
    train(cfg, quiet=True, until=2)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(checkpoint.CheckpointError, match="No space left.*previous checkpoints are intact"):
        train(tiny_config("classify", cfg.out, steps=4), resume=True, quiet=True)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step_0000002"]


def test_nan_loss_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    forward = Classify.forward
    monkeypatch.setattr(Classify, "forward", lambda self, b, rng=None: (forward(self, b, rng)[0] * float("nan"), {}))
    with pytest.raises(TrainingError, match="no checkpoint was written yet"):
        train(tiny_config("classify", tmp_path / "nan", steps=2), quiet=True)


def test_metrics_json_is_always_valid_json():
    assert json.loads(json.dumps(finite({"AP": float("nan"), "x": [1.0, float("inf")], "n": 3}))) == \
        {"AP": None, "x": [1.0, None], "n": 3}
    assert torch.isfinite(torch.tensor(0.0))


def test_eval_of_a_checkpoint_copied_alone_writes_beside_it(tmp_path, capsys):
    from patchgpt.cli import main

    run = train(tiny_config("classify", tmp_path / "run", steps=1), quiet=True)
    alone = tmp_path / "copies" / "my_model"
    shutil.copytree(checkpoint.resolve(run), alone)
    assert checkpoint.run_dir(alone) == alone and checkpoint.run_dir(run) == run
    assert main(["eval", str(alone), "--json"]) == 0
    assert (alone / "eval_confusion.png").exists() and not (tmp_path / "eval_confusion.png").exists()


def test_edited_checkpoints_are_one_line(tmp_path, capsys):
    from patchgpt.cli import main

    run = train(tiny_config("classify", tmp_path / "run", steps=1), quiet=True)
    ckpt = checkpoint.resolve(run)
    meta = json.loads((ckpt / "config.json").read_text())
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(img)
    for edit, needle in [(lambda m: m.pop("state"), "incomplete or edited"),
                         (lambda m: m["config"]["model"].update(n_embd=48), "do not fit"),
                         (lambda m: m.update(task="segment-everything"), "unknown task")]:
        bad = json.loads(json.dumps(meta))
        edit(bad)
        (ckpt / "config.json").write_text(json.dumps(bad))
        assert main(["predict", str(run), str(img)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    (ckpt / "config.json").write_text(json.dumps(meta))
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    assert main(["predict", str(run), str(img)]) == 2
    assert "unreadable" in capsys.readouterr().err


def test_eval_on_other_data_decodes_it_at_the_checkpoints_size(tmp_path, capsys):
    from patchgpt.cli import main

    for k in range(10):                                   # 20x20 RGB files, one per digit class
        (tmp_path / "mine" / str(k)).mkdir(parents=True)
        Image.fromarray(np.full((20, 20, 3), 25 * k, dtype=np.uint8)).save(tmp_path / "mine" / str(k) / "a.png")
    train(tiny_config("classify", tmp_path / "run", steps=1), quiet=True)       # on the 8x8 grey digits
    assert main(["eval", str(tmp_path / "run"), "--data", f"folder:{tmp_path / 'mine'}", "--all", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 10


def test_a_kill_during_evaluation_loses_no_training(tmp_path, monkeypatch):
    from patchgpt.tasks.classify import ClassifyMetric

    def killed(self, batch):
        raise KeyboardInterrupt   # a second Ctrl-C (or the process dying) in the middle of the evaluation

    monkeypatch.setattr(ClassifyMetric, "update", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config("classify", tmp_path / "run", steps=3), quiet=True)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")] == ["step_0000003"]
    assert not (tmp_path / "run" / "metrics.json").exists()
    monkeypatch.undo()
    train(same_run("classify", tmp_path / "run"), resume=True, quiet=True)   # evaluates the saved step 3
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["n"] == 359
