"""The `patchgpt` command end to end: train, eval, predict, quickstart, and one-line errors."""

import json

import numpy as np
import pytest
from PIL import Image

from patchgpt.cli import main

from .helpers import run_cli


def write_folder(root, n_per_class=6, size=12):
    """Two visibly different classes: bright squares top-left vs bottom-right."""
    rng = np.random.default_rng(0)
    for ci, name in enumerate(["left", "right"]):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            a = rng.integers(0, 40, (size, size, 3), dtype=np.uint8)
            if ci == 0:
                a[:6, :6] = 255
            else:
                a[6:, 6:] = 255
            Image.fromarray(a).save(root / name / f"{i}.png")
    return root


def test_train_eval_predict_on_a_folder(tmp_path, capsys):
    data = write_folder(tmp_path / "imgs")
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "classify", "--data", f"folder:{data}", "--model", "nano",
                         "--out", str(run_dir), "--steps", "30", "--quiet", "--set", "data.image_size=8",
                         "--set", "train.batch_size=8", "--set", "train.lr=3e-3", "--set", "train.warmup=2",
                         "--set", "data.val_fraction=0.25")
    assert code == 0, err
    assert "top1" in json.loads(out.strip().splitlines()[-1])
    code, out, err = run_cli(capsys, "eval", str(run_dir), "--json")
    assert code == 0, err
    metrics = json.loads(out)
    assert set(metrics) >= {"top1", "per_class", "confusion", "val_loss"} and metrics["n"] == 3
    imgs = sorted((data / "left").glob("*.png"))[:2] + sorted((data / "right").glob("*.png"))[:1]
    code, out, err = run_cli(capsys, "predict", str(run_dir), *map(str, imgs), "--out", str(tmp_path / "p.json"))
    assert code == 0, err
    preds = json.loads(out)
    assert [p["image"] for p in preds] == list(map(str, imgs))
    for p in preds:
        assert set(p["probs"]) == {"left", "right"} and abs(sum(p["probs"].values()) - 1) < 1e-4
    assert json.loads((tmp_path / "p.json").read_text()) == preds
    # 12 training images at 8x8 are easy: the model has learnt the two classes.
    assert [p["class"] for p in preds] == ["left", "left", "right"]


def test_pretrain_then_linear_probe_via_cli(tmp_path, capsys):
    pre = tmp_path / "pre"
    assert run_cli(capsys, "train", "pretrain", "--model", "nano", "--out", str(pre), "--steps", "3", "--quiet")[0] == 0
    code, out, err = run_cli(capsys, "train", "classify", "--init", str(pre), "--out", str(tmp_path / "probe"),
                         "--steps", "3", "--quiet", "--set", "classify.mode=attentive")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", str(pre))
    assert code == 0 and "val_loss" in out


def test_resume_flag(tmp_path, capsys):
    out_dir = tmp_path / "r"
    args = ["train", "pretrain", "--model", "nano", "--out", str(out_dir), "--quiet"]
    assert run_cli(capsys, *args, "--steps", "2")[0] == 0
    assert run_cli(capsys, *args, "--steps", "4", "--resume")[0] == 0
    assert (out_dir / "checkpoints" / "step_0000004").is_dir()


@pytest.mark.parametrize("argv,needle", [
    (["train", "classify", "--set", "train.lrr=1"], "unknown key 'lrr'"),
    (["train", "classify", "--set", "train.steps=many"], "expected int"),
    (["train", "classify", "--data", "nowhere:x"], "unknown data spec"),
    (["train", "classify", "--data", "folder:/does/not/exist"], "no such directory"),
    (["eval", "/does/not/exist"], "no such checkpoint"),
    (["train", "classify", "--set", "classify.mode=psychic"], "classify.mode"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, needle):
    code, out, err = run_cli(capsys, *argv, *(["--out", str(tmp_path / "x")] if argv[0] == "train" else []))
    assert code == 2
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("patchgpt: error:")


def test_predict_reports_an_unreadable_image(tmp_path, capsys):
    data = write_folder(tmp_path / "imgs", n_per_class=3)
    run_dir = tmp_path / "run"
    assert run_cli(capsys, "train", "classify", "--data", f"folder:{data}", "--model", "nano", "--out",
               str(run_dir), "--steps", "1", "--quiet", "--set", "data.image_size=8")[0] == 0
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, out, err = run_cli(capsys, "predict", str(run_dir), str(bad))
    assert code == 2 and str(bad) in err


def test_quickstart_smoke(tmp_path, capsys):
    code, out, err = run_cli(capsys, "quickstart", "--out", str(tmp_path / "qs"), "--smoke")
    assert code == 0, err
    qs = tmp_path / "qs"
    metrics = json.loads((qs / "metrics.json").read_text())
    assert set(metrics["val_top1"]) == {"pixels_logreg", "probe_random", "probe_linear", "probe_attentive",
                                        "finetune"}
    report = (qs / "report.md").read_text()
    assert "fine-tuned pretrained GPT" in report and "linear probe" in report
    for png in ("loss_curves.png", "finetune/confusion.png", "pretrain/predictions.png"):
        assert (qs / png).stat().st_size > 0
    assert "report.md" in out


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("quickstart", "train", "eval", "predict", "folder:PATH", "--set"):
        assert word in out


def test_pretrain_steps_then_fine_tune_in_one_command(tmp_path, capsys):
    data = write_folder(tmp_path / "imgs")
    run_dir = tmp_path / "cls"
    argv = ["train", "classify", "--data", f"folder:{data}", "--model", "nano", "--out", str(run_dir),
            "--steps", "3", "--pretrain-steps", "2", "--quiet", "--set", "data.image_size=8",
            "--set", "train.batch_size=8", "--set", "pretrain.norm_pix=false", "--set", "train.warmup=1"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    pre = tmp_path / "cls-pretrain"
    pre_cfg = json.loads((pre / "config.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    assert pre_cfg["task"] == "pretrain" and pre_cfg["train"]["steps"] == 2 and not pre_cfg["pretrain"]["norm_pix"]
    assert pre_cfg["data"]["spec"] == cfg["data"]["spec"] and pre_cfg["train"]["batch_size"] == 8
    assert cfg["init"] == str(pre) and cfg["train"]["layer_decay"] == 1.0 and cfg["model"]["drop_path"] == 0.0
    # Called again, it reuses the finished pretraining.
    code, out, err = run_cli(capsys, *[x for x in argv if x != "--quiet"], "--resume")
    assert code == 0 and "reusing the pretraining" in err, err


def test_pretrain_task_segment_then_caption(tmp_path, capsys):
    run_dir = tmp_path / "cap"
    argv = ["train", "caption", "--data", "digit-scenes", "--model", "nano", "--out", str(run_dir), "--steps", "2",
            "--pretrain-steps", "2", "--pretrain-task", "segment", "--quiet", "--set", "data.image_size=32",
            "--set", "train.batch_size=4", "--set", "segment.pixel_weight=0.5", "--set", "caption.max_len=20"]
    code, out, err = run_cli(capsys, *argv)
    assert code == 0, err
    pre_cfg = json.loads((tmp_path / "cap-pretrain" / "config.json").read_text())
    cfg = json.loads((run_dir / "config.json").read_text())
    assert pre_cfg["task"] == "segment" and pre_cfg["segment"]["pixel_weight"] == 0.5
    assert pre_cfg["data"]["augment"] is False and pre_cfg["data"]["image_size"] == 32   # the stage's recipe + yours
    assert cfg["init"] == str(tmp_path / "cap-pretrain") and cfg["caption"]["max_len"] == 20
    for bad, message in ((["--pretrain-task", "vq"], "choose a task that trains a backbone"),
                         (["--pretrain-task", "caption"], "choose a task that trains a backbone"),
                         (["--pretrain-task", "nope"], "unknown task")):
        code, _, err = run_cli(capsys, "train", "caption", "--model", "nano", "--steps", "1", "--quiet", "--out",
                               str(tmp_path / "x"), "--pretrain-steps", "1", *bad)
        assert code == 2 and message in err, err
    code, _, err = run_cli(capsys, "train", "caption", "--model", "nano", "--steps", "1", "--out", str(tmp_path / "y"),
                           "--pretrain-task", "segment")
    assert code == 2 and "give both" in err
