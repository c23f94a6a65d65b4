"""Captioning: trains, evaluates and predicts through the CLI; cached decoding equals uncached; bytes round-trip."""

import json

import numpy as np
import torch
from PIL import Image

import patchgpt.tasks.text as text_module
from patchgpt.cli import main
from patchgpt.data import build_datasets, collate
from patchgpt.data.scenes import describe
from patchgpt.tasks import Caption, load
from patchgpt.tasks.caption import cider, numbers

from .helpers import tiny_config
from .reference_sampling import uncached

COMMON = ["--data", "digit-scenes", "--model", "nano", "--steps", "3", "--quiet", "--set", "train.batch_size=8",
          "--set", "data.image_size=32", "--set", "train.eval_every=0", "--set", "caption.max_len=24"]


def test_caption_trains_evaluates_and_predicts_through_the_cli(tmp_path, capsys):
    run = tmp_path / "cap"
    assert main(["train", "caption", "--out", str(run), *COMMON]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert {"bleu4", "cider", "exact_match", "same_numbers", "val_loss"} <= set(m) and m["n"] == 500
    assert (run / "captions.png").exists() and (run / "captions.json").exists()
    capsys.readouterr()
    img = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50), dtype=np.uint8)).save(img)
    assert main(["predict", str(run), str(img)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out[0]["image"] == str(img) and isinstance(out[0]["caption"], str)
    assert main(["eval", str(run), "--json"]) == 0
    assert "cider" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_cached_caption_decoding_equals_uncached_and_bytes_round_trip(tmp_path):
    cfg = tiny_config("caption", tmp_path / "c")
    cfg.data.image_size, cfg.caption.max_len = 32, 24
    cfg.caption.ground = "off"   # the plain layout (grounded captions: tests/test_ground.py)
    _, val, info = build_datasets(cfg.data)
    task = Caption(cfg, info).eval()
    batch = collate([val[i] for i in range(4)])
    a = task.predict(batch)
    with uncached(text_module):
        b = task.predict(batch)
    assert torch.equal(a["ids"], b["ids"]) and a["captions"] == b["captions"]
    for text in ("a 3 left of a 7", "ein Würfel über 🙂", ""):
        ids, labels = task.encode_text([text])
        assert ids[0, 0] == task.task_id and task.decode(ids[0, 1:].tolist()) == text
        assert labels[0, len(text.encode())] == task.end              # the last byte predicts the end token
    ids, _ = task.encode_text(["x" * 23 + "ü"])                          # 25 bytes: the ü does not fit whole
    assert task.decode(ids[0, 1:].tolist()) == "x" * 23
    seq = task.sequence(batch)
    assert seq.prefix_len == task.input.length + 1
    assert (seq.labels[:, :seq.prefix_len - 1] == -1).all()            # no loss on the image


def test_scene_captions_follow_the_boxes():
    assert describe([[2, 2, 10, 10]], [3], 64) == "a small 3"
    assert describe([[40, 5, 60, 30], [2, 8, 20, 30]], [7, 3], 64) == "a 3 left of a large 7"
    assert describe([[5, 40, 20, 60], [8, 2, 22, 20]], [2, 7], 64) == "a 7 above a 2"
    assert describe([[30, 0, 40, 10], [0, 0, 10, 10], [50, 0, 60, 10]], [1, 2, 3], 64) == \
        "a 2, a 1 and a 3 from left to right"


def test_cider_rewards_the_right_caption():
    refs = [["a 3 left of a 7"], ["a 2 above a 5"], ["a 1"]]
    good = cider(["a 3 left of a 7", "a 2 above a 5", "a 1"], refs)
    bad = cider(["a 5 left of a 1", "a 7 above a 3", "a 4"], refs)
    assert good > 5 * max(bad, 0.1) and bad >= 0


def test_a_caption_checkpoint_loads_alone(tmp_path):
    run = tmp_path / "cap"
    assert main(["train", "caption", "--out", str(run), *COMMON, "--set", "train.steps=1"]) == 0
    task = load(run)
    assert task.name == "caption" and task.cfg.caption.max_len == 24


def test_images_with_several_captions_draw_one_per_step(tmp_path):
    from patchgpt.rng import RowRNG

    cfg = tiny_config("caption", tmp_path / "c")
    cfg.data.image_size = 32
    _, val, info = build_datasets(cfg.data)
    task = Caption(cfg, info)
    batch = collate([val[i] for i in range(4)])
    batch["captions"] = [["one", "two", "three"]] * 4
    drawn = set()
    for s in range(12):
        seq = task.sequence(batch, RowRNG(torch.Generator().manual_seed(s)))
        drawn |= {task.decode(row[task.input.length + 1:].tolist()) for row in seq.ids}
    assert drawn == {"one", "two", "three"}
    assert task.decode(task.sequence(batch).ids[0, task.input.length + 1:].tolist()) == batch["text"][0]


def test_same_numbers_compares_the_digits_a_caption_names():
    assert numbers("a small 3 left of a large 7") == numbers("a 7 above a 3")
    assert numbers("a 3, a 3 and a 1 from left to right") != numbers("a 3 left of a 1")
    assert numbers("nothing") == numbers("") and numbers("12 cats") != numbers("1 2 cats")
