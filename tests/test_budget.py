"""--time: the step count follows the measured throughput and the run ends with its checkpoint and metrics."""

import json
import time

import pytest

from patchgpt import checkpoint
from patchgpt.budget import parse_duration
from patchgpt.cli import main
from patchgpt.config import ConfigError
from patchgpt.train import train

from .helpers import tiny_config


def test_parse_duration():
    assert [parse_duration(x) for x in ("300", "90s", "10m", "1.5h")] == [300, 90, 600, 5400]
    for bad in ("", "ten", "-5m", "0", "5d"):
        with pytest.raises(ConfigError, match="--time"):
            parse_duration(bad)


def test_a_time_budget_sets_the_steps_and_ends_with_checkpoint_and_metrics(tmp_path, capsys):
    cfg = tiny_config("classify", tmp_path / "run", steps=5)
    cfg.train.time, cfg.train.warmup, cfg.train.log_every = 4.0, 30, 10
    t0 = time.monotonic()
    out = train(cfg, quiet=True)
    elapsed = time.monotonic() - t0
    meta = checkpoint.read_meta(out)
    decided = meta["config"]["train"]["steps"]
    assert meta["step"] == decided > 20 and meta["config"]["train"]["time"] == 0.0   # saved: a resume repeats it
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == decided
    assert "top1" in json.loads((out / "metrics.json").read_text())
    assert "steps timed" in capsys.readouterr().err
    assert elapsed < 4.0 + 30                              # generous: the machine may be busy with other tests


def test_time_flag_through_the_cli(tmp_path, capsys):
    code = main(["train", "pretrain", "--model", "nano", "--time", "2s", "--quiet", "--out", str(tmp_path / "r"),
                 "--set", "train.batch_size=8"])
    assert code == 0
    assert checkpoint.read_meta(tmp_path / "r")["config"]["train"]["time"] == 0.0
    assert main(["train", "pretrain", "--time", "soon", "--out", str(tmp_path / "x")]) == 2
