"""Issue 12, "no silent wrong result": every bad setting or flag is one line (``patchgpt: error: ...``, exit 2),
never a traceback nor a run that quietly does something else; a one-class classification set is a warning."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import patchgpt.model
from patchgpt.config import ConfigError, check
from patchgpt.data.base import DataInfo
from patchgpt.dist import DeviceError, pick_device
from patchgpt.tasks import Detect, default_config
from patchgpt.tasks.detect import unique_stems
from patchgpt.train import train

from .helpers import run_cli, tiny_config

TINY = ["--model", "nano", "--steps", "1", "--quiet", "--set", "train.batch_size=8"]
NO_CUDA = not torch.cuda.is_available()


def lines(err: str) -> list[str]:
    return [x for x in err.splitlines() if x.strip()]


def assert_one_error(code: int, err: str, needle: str) -> None:
    assert "Traceback" not in err, err
    assert code == 2, err
    got = lines(err)
    assert len(got) == 1 and got[0].startswith("patchgpt: error:"), err
    assert needle in got[0], got[0]


# ---- 1. config values that cannot work (train, through `--set`) --------------------------------------------

SETTINGS = [  # (task, --set values, what the one line must say)
    ("pretrain", ["tokenizer.patch_size=-1"], "tokenizer.patch_size=-1: must be >= 0"),
    ("pretrain", ["tokenizer.patch_size=3"], "tokenizer.patch_size=3 does not divide the 8x8 images"),
    ("classify", ["model.n_head=0"], "model.n_head=0"),
    ("pretrain", ["model.n_layer=0"], "model.n_layer=0"),
    ("pretrain", ["model.n_embd=0"], "model.n_embd=0"),
    ("pretrain", ["model.n_embd=4000000", "model.n_head=1"], "lower --model, model.n_embd or model.n_layer"),
    ("pretrain", ["train.log_every=0"], "train.log_every=0"),
    ("pretrain", ["train.threads=-1"], "train.threads=-1"),
    ("pretrain", ["train.device=cuda" if NO_CUDA else "train.device=cuda:99"], "train.device=cuda"),
    ("pretrain", ["train.device=gpu"], "train.device='gpu': choose auto, cpu, cuda"),
    ("detect", ["detect.bins=1"], "detect.bins=1"),
    ("generate", ["tokenizer.n_colors=0"], "tokenizer.n_colors=0"),
    ("generate", ["tokenizer.n_colors=1"], "tokenizer.n_colors=1"),
    ("pretrain", ["data.image_size=-4"], "data.image_size=-4"),
    ("pretrain", ["train.lr=0"], "train.lr=0.0: must be > 0"),
    ("pretrain", ["train.lr=-1e-3"], "train.lr=-0.001"),
    ("pretrain", ["train.lr=nan"], "train.lr=nan: expected a finite number"),
    ("pretrain", ["data.val_fraction=nan"], "data.val_fraction=nan"),
    ("pretrain", ["train.keep=0"], "train.keep=0"),
    ("pretrain", ["train.steps=-1"], "train.steps=-1"),
    ("pretrain", ["data.shift=-2"], "data.shift=-2"),
    ("classify", ["train.ema=1"], "train.ema=1"),
    ("classify", ["train.layer_decay=0"], "train.layer_decay=0"),
    ("classify", ["data.crop=1.5"], "data.crop=1.5"),
    ("classify", ["model.drop_path=1"], "model.drop_path=1"),
    ("vq", ["vq.downsample=3"], "vq.downsample=3"),
    ("generate", ["generate.top_p=0"], "generate.top_p=0.0"),
    ("classify", ["classify.layer=0"], "classify.layer=0"),
]


@pytest.mark.parametrize("task,sets,needle", SETTINGS, ids=[" ".join(s) for _, s, _ in SETTINGS])
def test_bad_setting_is_one_line(tmp_path, capsys, task, sets, needle):
    argv = ["train", task, *TINY, "--out", str(tmp_path / "run")]
    for s in sets:
        argv += ["--set", s]
    code, _, err = run_cli(capsys, *argv)
    assert_one_error(code, err, needle)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_steps_zero_is_an_error_not_the_default(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "pretrain", *TINY, "--steps", "0", "--out", str(tmp_path / "r"))
    assert_one_error(code, err, "argument --steps: must be >= 1, got 0")


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 192000000000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
])
def test_allocation_failure_at_model_build_is_one_line(tmp_path, capsys, monkeypatch, error):
    def fail(self, cfg):
        raise error

    monkeypatch.setattr(patchgpt.model.GPT, "__init__", fail)
    code, _, err = run_cli(capsys, "train", "pretrain", *TINY, "--out", str(tmp_path / "r"))
    assert_one_error(code, err, "out of memory")
    assert "model.n_embd" in err


def test_api_checks_what_the_command_line_cannot_pass():
    """NaN never gets past `--set`; through the Python API, `check` still names it."""
    for section, key in (("train", "lr"), ("data", "val_fraction")):
        cfg = default_config("pretrain")
        setattr(getattr(cfg, section), key, math.nan)
        with pytest.raises(ConfigError, match=f"{section}.{key}=nan"):
            check(cfg)
    with pytest.raises(DeviceError, match="choose auto, cpu"):
        pick_device("tpu")
    assert pick_device("cpu") == torch.device("cpu")


# ---- 2. command-line values ---------------------------------------------------------------------------------

FLAGS = [  # argv (the checkpoint need not exist: flags are checked first), what the one line must say
    (["predict", "RUN", "x.png", "--top", "0"], "--top: must be >= 1, got 0"),
    (["sample", "RUN", "--n", "-2"], "--n: must be >= 1, got -2"),
    (["sample", "RUN", "--n", "0"], "--n: must be >= 1"),
    (["complete", "RUN", "x.png", "--n", "0"], "--n: must be >= 1"),
    (["sample", "RUN", "--temperature", "-1"], "--temperature: must be >= 0"),
    (["sample", "RUN", "--temperature", "nan"], "--temperature: must be a finite number"),
    (["complete", "RUN", "x.png", "--temperature", "nan"], "--temperature: must be a finite number"),
    (["sample", "RUN", "--top-k", "-1"], "--top-k: must be >= 0"),
    (["sample", "RUN", "--top-p", "0"], "--top-p: must be in (0, 1]"),
    (["sample", "RUN", "--top-p", "1.5"], "--top-p: must be in (0, 1]"),
    (["sample", "RUN", "--cfg", "inf"], "--cfg: must be a finite number"),
    (["complete", "RUN", "x.png", "--keep", "0"], "--keep: must be in (0, 1)"),
    (["complete", "RUN", "x.png", "--keep", "1"], "--keep: must be in (0, 1)"),
    (["eval", "RUN", "--per-class", "0"], "--per-class: must be >= 1"),
    (["eval", "RUN", "--temperature", "-0.5"], "--temperature: must be >= 0"),
    (["shard", "--data", "digits", "--out", "OUT", "--per-shard", "0"], "--per-shard: must be >= 1"),
    (["predict", "RUN", "x.png", "--min-score", "2"], "--min-score: must be in [0, 1]"),
    (["sample", "RUN", "--n", "many"], "--n: expected an integer, got 'many'"),
    (["train"], "train: name the task (patchgpt train TASK), or give a --config recipe"),
]


@pytest.mark.parametrize("argv,needle", FLAGS, ids=[" ".join(a) for a, _ in FLAGS])
def test_bad_flag_is_one_line(tmp_path, capsys, argv, needle):
    argv = [str(tmp_path / a) if a in ("RUN", "OUT") else a for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert_one_error(code, err, needle)
    assert "usage:" not in err


@pytest.fixture(scope="module")
def generators(tmp_path_factory):
    """A class-conditional and a text-conditional generator (one step each, no final evaluation), and a digit."""
    root = tmp_path_factory.mktemp("gen")
    runs = {}
    for condition in ("class", "text"):
        cfg = tiny_config("generate", root / condition, steps=2)
        cfg.generate.condition, cfg.tokenizer.n_colors, cfg.train.batch_size = condition, 4, 8
        runs[condition] = str(train(cfg, quiet=True, until=1))
    Image.fromarray(np.full((8, 8), 128, dtype=np.uint8)).save(root / "digit.png")
    runs["image"] = str(root / "digit.png")
    return runs


CONDITIONS = [  # (command, model, flags, what the one line must say)
    ("sample", "class", ["--prompt", "a seven"], "class-conditional: give --class NAME, not --prompt"),
    ("sample", "text", ["--class", "7"], "text-conditional: give --prompt TEXT, not --class"),
    ("complete", "class", ["--prompt", "a three"], "class-conditional"),
    ("complete", "text", ["--class", "3"], "text-conditional"),
    ("complete", "class", ["--class", "1", "--class", "2"], "give one --class or --prompt"),
    ("sample", "class", ["--class", "eleven"], "--class eleven: unknown"),
]


@pytest.mark.parametrize("command,model,flags,needle", CONDITIONS,
                         ids=[f"{c} {m} {' '.join(f)}" for c, m, f, _ in CONDITIONS])
def test_condition_the_model_cannot_read_is_one_line(tmp_path, capsys, generators, command, model, flags, needle):
    inputs = [generators[model]] + ([generators["image"]] if command == "complete" else [])
    code, _, err = run_cli(capsys, command, *inputs, *flags, "--n", "1", "--out", str(tmp_path / "o.png"))
    assert_one_error(code, err, needle)
    assert not (tmp_path / "o.png").exists()


# ---- 3. a one-class classification set -------------------------------------------------------------------------

def test_one_class_classification_warns(tmp_path, capsys):
    (tmp_path / "data" / "cats").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "data" / "cats" / f"{i}.png")
    code, out, err = run_cli(capsys, "train", "classify", "--data", f"folder:{tmp_path / 'data'}", *TINY,
                             "--set", "data.image_size=8", "--set", "data.val_fraction=0.34",
                             "--out", str(tmp_path / "run"))
    assert code == 0 and "Traceback" not in err, err
    warnings = [x for x in lines(err) if x.startswith("patchgpt: warning:")]
    assert len(warnings) == 1 and "one class ('cats')" in warnings[0] and "top-1 is trivially 1.0" in warnings[0]
    assert json.loads(out.strip().splitlines()[-1])["top1"] == 1.0


# ---- 4. per-file outputs never overwrite each other -----------------------------------------------------------

def test_unique_stems():
    assert unique_stems(["a/x.png", "b/x.png", "c/x.jpg"]) == ["x", "x-1", "x-2"]
    # A suffixed name never takes the stem of another input, nor differs from one by case only.
    assert unique_stems(["a/x.png", "b/x.png", "x-1.png"]) == ["x", "x-2", "x-1"]
    assert unique_stems(["A/Scene.png", "b/scene.png", "y.png"]) == ["Scene", "scene-1", "y"]


def test_detect_predict_out_keeps_every_file(tmp_path):
    cfg = default_config("detect")
    cfg.size = "nano"
    for k, v in patchgpt.model.SIZES["nano"].items():
        setattr(cfg.model, k, v)
    cfg.tokenizer.patch_size, cfg.detect.bins = 8, 16
    info = DataInfo(channels=1, image_size=(16, 16), classes=["a", "b"], boxes=True, max_objects=1)
    task = Detect(cfg, info).eval()
    paths = []
    for i, folder in enumerate(["one", "two", "three"]):
        (tmp_path / folder).mkdir()
        p = tmp_path / folder / "scene.png"
        Image.fromarray(np.full((16, 16), 40 * i, dtype=np.uint8)).save(p)
        paths.append(str(p))
    results = task.predict_files(paths, out=tmp_path / "out")
    written = {f.name for f in (tmp_path / "out").iterdir()}
    assert written == {f"scene{s}.{ext}" for s in ("", "-1", "-2") for ext in ("json", "png")}
    for stem, p, r in zip(["scene", "scene-1", "scene-2"], paths, results, strict=True):
        assert json.loads((tmp_path / "out" / f"{stem}.json").read_text()) == r and r["image"] == p
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is a file"):
        task.predict_files(paths[:1], out=tmp_path / "file")
