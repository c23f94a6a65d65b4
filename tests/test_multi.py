"""One model, many tasks: the mixture's shares, the spec's parsing, one shared backbone, exact resume, and
`ask` picking the task by its prompt (CLI and Python), with one-line errors for prompts a checkpoint lacks."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from patchgpt import checkpoint
from patchgpt.config import ConfigError
from patchgpt.data.base import DataError
from patchgpt.data.mixture import shares
from patchgpt.tasks import Multi, default_config, load
from patchgpt.tasks.multi import plan, weights
from patchgpt.tasks.prompts import route

from .helpers import run_cli

SPEC = "classify=digits,caption=digit-scenes"
COMMON = ["--data", SPEC, "--model", "nano", "--quiet", "--set", "train.batch_size=8", "--set", "data.image_size=32",
          "--set", "train.eval_every=0", "--set", "caption.max_len=24", "--set", "train.log_every=1"]


def test_shares_split_the_rows_by_weight_with_one_row_each_at_least():
    assert shares(16, {"a": 1, "b": 1}) == {"a": 8, "b": 8}
    got = shares(16, {"a": 1, "b": 1, "c": 2})
    assert sum(got.values()) == 16 and got["c"] > got["a"] >= 1
    assert shares(3, {"a": 100, "b": 1, "c": 1}) == {"a": 1, "b": 1, "c": 1}
    with pytest.raises(DataError, match="raise train.batch_size"):
        shares(2, {"a": 1, "b": 1, "c": 1})


def test_the_spec_names_tasks_whose_specs_may_hold_commas():
    cfg = default_config("multi")
    cfg.data.spec = "caption=digit-scenes:holdout=4,canvas=64, classify=digits"
    assert plan(cfg) == {"caption": "digit-scenes:holdout=4,canvas=64", "classify": "digits"}
    cfg.multi.weights = "caption=3"
    assert weights(cfg, ["caption", "classify"]) == {"caption": 3.0, "classify": 1.0}
    for spec, msg in (("digits", "TASK=SPEC"), ("nope=digits", "unknown task"), ("generate=emoji", "cannot share"),
                      ("classify=digits,classify=digits", "named twice")):
        cfg.data.spec = spec
        with pytest.raises(ConfigError, match=msg):
            plan(cfg)
    cfg.data.spec, cfg.multi.weights = SPEC, "1,2,3"
    with pytest.raises(ConfigError, match="one weight per task"):
        weights(cfg, ["classify", "caption"])


@pytest.fixture(scope="module")
def multi_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("multi") / "run"
    from patchgpt.cli import main

    assert main(["train", "multi", "--out", str(run), "--steps", "4", *COMMON]) == 0
    return run


def test_multi_trains_one_backbone_and_reports_every_task(multi_run):
    m = json.loads((multi_run / "metrics.json").read_text())
    assert {"classify/top1", "caption/same_numbers", "val_loss"} <= set(m)
    assert set(m["tasks"]) == {"classify", "caption"}
    assert (multi_run / "classify_confusion.png").exists() and (multi_run / "caption_captions.png").exists()
    rows = [json.loads(x) for x in (multi_run / "log.jsonl").read_text().splitlines()]
    assert all({"loss/classify", "loss/caption"} <= set(r) for r in rows if "loss" in r)
    task = load(multi_run)
    assert isinstance(task, Multi) and all(p.backbone is task.backbone for p in task.parts.values())
    names = list(checkpoint.read_weights(checkpoint.resolve(multi_run)))
    assert not [n for n in names if n.startswith("parts.") and ".backbone." in n]   # stored once


def test_multi_resumes_exactly(tmp_path, multi_run):
    from patchgpt.cli import main

    half = tmp_path / "half"
    assert main(["train", "multi", "--out", str(half), "--steps", "4", *COMMON, "--set", "train.ckpt_every=2"]) == 0
    step2 = checkpoint.list_checkpoints(half)[0]
    assert step2.name.endswith("0000002")
    # a run stopped at step 2, resumed to 4, ends with the weights of the run that went straight through
    again = tmp_path / "again"
    assert main(["train", "multi", "--out", str(again), "--steps", "2", *COMMON]) == 0
    assert main(["train", "multi", "--out", str(again), "--steps", "4", "--resume", *COMMON]) == 0
    a = checkpoint.read_weights(checkpoint.resolve(multi_run))
    b = checkpoint.read_weights(checkpoint.resolve(again))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_ask_picks_the_task_by_prompt(multi_run, tmp_path, capsys):
    img = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50), dtype=np.uint8)).save(img)
    code, out, _ = run_cli(capsys, "ask", str(multi_run), str(img), "caption", "--out", str(tmp_path / "a"))
    got = json.loads(out)
    assert code == 0 and got["task"] == "caption" and isinstance(got["answer"], str)
    assert got["pictures"] and all(p.endswith(".png") for p in got["pictures"])
    task = load(multi_run)
    answer = task.ask(Image.open(img), "What is this")      # a PIL image, a prompt word in other case
    assert answer["task"] == "classify" and answer["result"]["class"] in [str(i) for i in range(10)]
    for prompt, msg in (("segment", "not trained for segment"), ("how many digits?", "not a prompt"),
                        ("", "give a prompt")):
        code, _, err = run_cli(capsys, "ask", str(multi_run), str(img), prompt)
        assert code == 2 and msg in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_cli(capsys, "predict", str(multi_run), str(img))
    assert code == 0 and {"classify", "caption"} <= set(json.loads(out)[0])


def test_prompts_route_questions_and_arguments():
    class Fake:
        parts = None

    from patchgpt.tasks import TASKS

    vqa, gen = object.__new__(TASKS["vqa"]), object.__new__(TASKS["generate"])
    holder = Fake()
    holder.parts = {"vqa": vqa, "generate": gen}
    assert route(holder, "Is there a 5?") == (vqa, {"question": "Is there a 5?"})
    assert route(holder, "draw: a red heart") == (gen, {"text": "a red heart"})
    assert route(holder, "VQA")[0] is vqa
    with pytest.raises(ConfigError, match="give a prompt"):
        route(holder, None)
