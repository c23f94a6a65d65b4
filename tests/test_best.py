"""checkpoints/best follows the task's main validation metric; RUN, RUN/best and RUN/STEP all resolve."""

import json

import pytest

from patchgpt import checkpoint
from patchgpt.checkpoint import CheckpointError

from .helpers import run_cli


def test_best_follows_the_metric_and_resolves(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "classify", "--model", "nano", "--steps", "3", "--out", str(run),
                           "--quiet", "--set", "train.eval_every=1", "--set", "train.keep=5",
                           "--set", "train.batch_size=16")
    assert code == 0, err
    rec = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    tops = {r["step"]: r["val/top1"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
            if "val/top1" in r}
    assert rec["metric"] == "top1" and rec["mode"] == "max" and rec["value"] == max(tops.values())
    assert rec["step"] == min(s for s, v in tops.items() if v == rec["value"])   # the first to reach it
    assert checkpoint.resolve(run / "best") == run / "checkpoints" / "best"
    assert checkpoint.resolve(run / "2").name == "step_0000002"
    assert checkpoint.resolve(run).name == "step_0000003"
    assert checkpoint.list_checkpoints(run)[-1].name == "step_0000003"   # best is not a step
    code, out, _ = run_cli(capsys, "eval", str(run / "best"), "--json")
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["top1"] == pytest.approx(rec["value"])
    code, _, err = run_cli(capsys, "eval", str(run / "99"))
    assert code == 2 and "no checkpoint of step 99" in err and "1, 2, 3" in err


def test_update_best_keeps_the_better_one(tmp_path):
    ckpt = tmp_path / "checkpoints" / "step_0000001"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"x")
    assert checkpoint.update_best(tmp_path, ckpt, "val_loss", "min", 2.0, 1)
    assert not checkpoint.update_best(tmp_path, ckpt, "val_loss", "min", 2.5, 2)
    assert checkpoint.update_best(tmp_path, ckpt, "val_loss", "min", 1.5, 3)
    assert checkpoint.best_record(tmp_path)["step"] == 3
    assert not list((tmp_path / "checkpoints").glob(".*"))   # nothing staged is left behind
    fresh = tmp_path / "fresh"
    (fresh / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no best checkpoint"):
        checkpoint.resolve(fresh / "best")
