"""Grounded words: captions and answers written after the objects the model detects (`patchgpt.tasks.ground`)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import patchgpt.tasks.ground as ground_module
import patchgpt.tasks.text as text_module
from patchgpt.cli import main
from patchgpt.config import ConfigError
from patchgpt.data import build_datasets, collate
from patchgpt.data.base import DataError, DataInfo
from patchgpt.sequence import IGNORE
from patchgpt.tasks import AnswerQuestions, Caption, config_from_dict, load
from patchgpt.train import train

from .helpers import tiny_config
from .reference_sampling import uncached

COMMON = ["--data", "digit-scenes", "--model", "nano", "--steps", "3", "--quiet", "--set", "train.batch_size=8",
          "--set", "data.image_size=32", "--set", "train.eval_every=0", "--set", "caption.max_len=24"]


@pytest.fixture(scope="module")
def scenes():
    cfg = tiny_config("caption", "unused")
    cfg.data.image_size = 32
    _, val, info = build_datasets(cfg.data)
    return collate([val[i] for i in range(6)]), info


def caption_task(tmp_path, info) -> Caption:
    cfg = tiny_config("caption", tmp_path / "c")
    cfg.data.image_size, cfg.caption.max_len = 32, 24
    return Caption(cfg, info).eval()


def test_the_object_part_lists_the_true_boxes_left_to_right_with_glimpses(tmp_path, scenes):
    batch, info = scenes
    task = caption_task(tmp_path, info)
    g = task.ground
    assert g is not None and task.cfg.caption.ground == "on"                   # auto on data with boxes
    objs = g.tokens(batch["boxes"], batch["classes"], batch["image"])
    assert objs.ids.shape == objs.labels.shape == (6, g.length)
    P, boxes_tok = g.period, g.det.boxes
    for r in range(6):
        keep = batch["classes"][r] >= 0
        boxes, classes = batch["boxes"][r][keep], batch["classes"][r][keep]
        n = len(classes)
        order = boxes[:, 0].argsort(stable=True)
        got = objs.ids[r, 1:1 + P * n].view(n, P)                               # x0 y0 x1 y1 glimpse class
        assert objs.ids[r, 0] == g.det.task_id
        assert (got[:, 5] - boxes_tok.classes.start).tolist() == classes[order].tolist()
        assert torch.allclose(boxes_tok.dequantize(got[:, :4]), boxes[order], atol=0.5 / (boxes_tok.bins - 1))
        assert (got[:, 4] == g.det.glimpse_id).all() and int(objs.is_patch[r].sum()) == n
        assert objs.labels[r, P * n] == boxes_tok.end and (objs.labels[r, P * n + 1:] == IGNORE).all()
        assert (objs.ids[r, 1 + P * n:] == boxes_tok.end).all()                 # the end, then end padding
    seq = task.sequence(batch)
    T = task.input.length + g.length
    assert seq.prefix_len == task.input.length + 1 and (seq.ids[:, T] == task.task_id).all()
    for r, text in enumerate(batch["text"]):                                   # the caption after the objects
        assert task.decode(seq.labels[r, T:].tolist()) == text[:24]                  # caption.max_len=24


def test_grounded_decoding_with_the_cache_equals_without(tmp_path, scenes):
    batch, info = scenes
    task = caption_task(tmp_path, info)
    a = task.predict(batch)
    with uncached(text_module, ground_module):
        b = task.predict(batch)
    assert torch.equal(a["ids"], b["ids"]) and a["objects"] == b["objects"]
    cfg = tiny_config("vqa", tmp_path / "v")
    cfg.data.image_size, cfg.vqa.question_len, cfg.vqa.answer_len = 32, 24, 6
    vqa = AnswerQuestions(cfg, info).eval()
    assert vqa.ground is not None
    a = vqa.predict(batch)
    with uncached(text_module, ground_module):
        b = vqa.predict(batch)
    assert torch.equal(a["ids"], b["ids"]) and a["objects"] == b["objects"]
    assert vqa.caption_first and len(a["captions"]) == 6                            # digit-scenes have captions
    seq = vqa.sequence(batch)
    T = vqa.input.length + vqa.ground.length
    C = cfg.vqa.caption_len + 2                                                # the caption, then the question
    assert (seq.ids[:, T] == vqa.caption_id).all() and (seq.ids[:, T + C] == vqa.task_id).all()
    for r, text in enumerate(batch["text"]):
        assert vqa.decode(seq.labels[r, T:T + C].tolist()) == text
    assert (seq.labels[:, T + C:T + C + 24] == IGNORE).all()                   # no loss on the question


def test_question_first_puts_the_question_in_the_prefix_before_the_objects(tmp_path, scenes):
    batch, info = scenes
    cfg = tiny_config("vqa", tmp_path / "q")
    cfg.data.image_size, cfg.vqa.question_len, cfg.vqa.answer_len = 32, 24, 6
    cfg.vqa.question_first = True
    vqa = AnswerQuestions(cfg, info).eval()
    assert vqa.question_first and vqa.caption_first
    a = vqa.predict(batch)
    with uncached(text_module, ground_module):
        b = vqa.predict(batch)
    assert torch.equal(a["ids"], b["ids"]) and a["objects"] == b["objects"] and a["captions"] == b["captions"]
    seq = vqa.sequence(batch)
    P0, Q, G, C = vqa.input.length, 1 + 24, vqa.ground.length, cfg.vqa.caption_len + 2
    assert seq.prefix_len == P0 + Q + 1                                          # image, question, grounding token
    assert (seq.ids[:, P0] == vqa.task_id).all() and (seq.ids[:, P0 + Q] == vqa.ground.det.task_id).all()
    assert (seq.labels[:, :P0 + Q] == IGNORE).all()                              # no loss on the question
    A = P0 + Q + G + C                                                           # the answer's task token
    assert (seq.ids[:, P0 + Q + G] == vqa.caption_id).all() and (seq.ids[:, A] == vqa.task_id).all()
    for r, answer in enumerate(batch["answer"]):
        assert vqa.decode(seq.labels[r, A:].tolist()) == answer[:6]
        assert vqa.decode(seq.labels[r, P0 + Q + G:P0 + Q + G + C].tolist()) == batch["text"][r]
    assert seq.ids.shape[1] <= vqa.backbone.cfg.block_size


def test_grounded_caption_trains_predicts_boxes_and_loads(tmp_path, capsys):
    run = tmp_path / "cap"
    assert main(["train", "caption", "--out", str(run), *COMMON]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["caption"]["ground"] == "on" and cfg["detect"]["max_objects"] >= 1
    capsys.readouterr()
    img = tmp_path / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50), dtype=np.uint8)).save(img)
    assert main(["predict", str(run), str(img)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out[0]["caption"], str) and isinstance(out[0]["objects"], list)
    assert all(set(o) == {"box", "label"} for o in out[0]["objects"])
    assert load(run).ground is not None


def test_vqa_grounds_its_answers_but_not_the_blind_baseline(tmp_path):
    cfg = tiny_config("vqa", tmp_path / "vqa")
    cfg.data.image_size, cfg.train.batch_size, cfg.train.eval_every, cfg.vqa.point = 32, 8, 0, "on"
    run = train(cfg, quiet=True)
    task = load(run)
    assert task.point and task.cfg.vqa.point == "on"                           # kept by the checkpoint
    assert task.ground is not None and task.cfg.vqa.ground == "on"
    assert task.describe() == "GPT nano"                                       # the start-up line's method
    img = tmp_path / "scene.png"
    Image.new("L", (40, 50), 30).save(img)
    out = task.predict_files([str(img)], question="how many digits?")
    assert isinstance(out[0]["answer"], str) and isinstance(out[0]["objects"], list)
    assert isinstance(out[0]["caption"], str) and task.cfg.vqa.describe == "on"
    assert all(set(o) == {"box", "label"} for o in out[0]["evidence"])          # what the answer is about
    blind = tiny_config("vqa", tmp_path / "b")
    blind.data.image_size, blind.vqa.blind = 32, True
    _, _, info = build_datasets(blind.data)
    assert AnswerQuestions(blind, info).ground is None and blind.vqa.ground == "off"


def test_grounding_needs_boxes_and_old_checkpoints_stay_plain(tmp_path):
    cfg = tiny_config("caption", tmp_path / "c")
    cfg.caption.ground = "on"
    info = DataInfo(channels=1, image_size=(32, 32), captions=True)
    with pytest.raises(DataError, match="caption.ground=on needs data with boxes"):
        Caption(cfg, info)
    cfg.caption.ground = "auto"                                                # no boxes: plain captions
    assert Caption(cfg, info).ground is None and cfg.caption.ground == "off"
    d = tiny_config("caption", tmp_path / "o").to_dict()
    del d["caption"]["ground"]            # written before grounding: its state has no boxes, so it stays plain
    old = config_from_dict(d)
    assert old.caption.ground == "auto" and Caption(old, info).ground is None


def test_the_start_up_line_says_grounded_tasks_do_not_shift(tmp_path, scenes):
    _, info = scenes
    generic = "augmentation: random shifts of up to 1 px (set data.shift, data.flip, data.crop to choose)"
    task = caption_task(tmp_path, info)
    assert task.augmentation_note(generic).startswith("no augmentation (grounded")
    cfg = tiny_config("caption", tmp_path / "plain")
    cfg.data.image_size, cfg.caption.ground = 32, "off"
    assert Caption(cfg, info).augmentation_note(generic) == generic


def test_vqa_points_at_the_objects_its_answer_is_about(tmp_path, scenes):
    batch, info = scenes
    assert info.refs and "refs" in batch
    cfg = tiny_config("vqa", tmp_path / "p")
    cfg.data.image_size, cfg.vqa.question_len, cfg.vqa.answer_len, cfg.vqa.point = 32, 24, 6, "auto"
    vqa = AnswerQuestions(cfg, info).eval()
    assert vqa.point and cfg.vqa.point == "on"
    boxes_tok, P = vqa.ground.det.boxes, vqa.ground.point_length
    seq = vqa.sequence(batch)
    S = vqa.input.length + vqa.ground.length + cfg.vqa.caption_len + 2 + 1 + 24   # the pointer's first token
    for r, refs in enumerate(batch["refs"]):
        ptr = seq.ids[r, S:S + P]
        got_boxes, got_classes = boxes_tok.decode(ptr)
        want = sorted(refs, key=lambda j: (float(batch["boxes"][r, j, 0]), float(batch["boxes"][r, j, 1])))
        assert got_classes.tolist() == batch["classes"][r, want].tolist()
        assert torch.allclose(got_boxes, batch["boxes"][r, want], atol=0.5 / (boxes_tok.bins - 1) + 1e-6)
        n = 5 * len(refs) + 1                                                    # the objects and the end
        assert seq.labels[r, S - 1:S - 1 + n].tolist() == ptr[:n].tolist()       # each predicted by the one before
        assert (seq.labels[r, S - 1 + n:S + P - 1] == IGNORE).all()              # no loss on the padding
        assert vqa.decode(seq.labels[r, S + P - 1:].tolist()) == batch["answer"][r][:6]   # then the answer
        coords = (ptr >= boxes_tok.coords.start) & (ptr < boxes_tok.coords.stop)
        assert (seq.pos[r, S:S + P][coords].sum(-1) > 0).all()                   # at the cells they name
    a = vqa.predict(batch)
    with uncached(text_module, ground_module):
        b = vqa.predict(batch)
    assert torch.equal(a["ids"], b["ids"]) and a["evidence"] == b["evidence"] and len(a["evidence"]) == 6
    assert all(set(o) == {"box", "label"} for e in a["evidence"] for o in e)
    off = tiny_config("vqa", tmp_path / "o")
    off.data.image_size, off.vqa.question_len, off.vqa.answer_len = 32, 24, 6      # the default: off
    assert AnswerQuestions(off, info).sequence(batch).ids.shape[1] == seq.ids.shape[1] - P


def test_pointing_needs_refs_and_grounding(tmp_path, scenes):
    _, info = scenes
    cfg = tiny_config("vqa", tmp_path / "n")
    cfg.data.image_size, cfg.vqa.point = 32, "on"
    no_refs = DataInfo(**{**info.__dict__, "refs": False})
    with pytest.raises(DataError, match="vqa.point=on needs data with questions that name"):
        AnswerQuestions(cfg, no_refs)
    cfg.vqa.blind = True
    with pytest.raises(ConfigError, match="vqa.point=on .* needs vqa.ground"):
        AnswerQuestions(cfg, info)
    d = tiny_config("vqa", tmp_path / "old").to_dict()
    del d["vqa"]["point"]                   # written before pointing: it answers directly
    old = config_from_dict(d)
    assert not AnswerQuestions(old, info).point and old.vqa.point == "off"
    d["vqa"]["point"] = "on"                # a pointing checkpoint keeps its refs in its state
    assert AnswerQuestions(config_from_dict(d), DataInfo(**{**info.__dict__, "refs": True})).point


def test_pointing_follows_the_question_in_either_order(tmp_path, scenes):
    batch, info = scenes
    cfg = tiny_config("vqa", tmp_path / "qp")
    cfg.data.image_size, cfg.vqa.question_len, cfg.vqa.answer_len = 32, 24, 6
    cfg.vqa.question_first, cfg.vqa.point = True, "on"
    vqa = AnswerQuestions(cfg, info).eval()
    a = vqa.predict(batch)
    with uncached(text_module, ground_module):
        b = vqa.predict(batch)
    assert torch.equal(a["ids"], b["ids"]) and a["evidence"] == b["evidence"]
    seq = vqa.sequence(batch)
    A = vqa.input.length + 1 + 24 + vqa.ground.length + cfg.vqa.caption_len + 2   # the answer's task token
    P = vqa.ground.point_length
    assert (seq.ids[:, A] == vqa.task_id).all()
    for r, refs in enumerate(batch["refs"]):
        assert len(vqa.ground.det.boxes.decode(seq.ids[r, A + 1:A + 1 + P])[1]) == len(refs)
        assert seq.labels[r, A] == seq.ids[r, A + 1]                            # the task token starts the pointer
        assert vqa.decode(seq.labels[r, A + P:].tolist()) == batch["answer"][r][:6]
