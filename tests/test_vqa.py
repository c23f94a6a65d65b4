"""VQA: digit-scenes' answers follow the boxes and leave every other field as it was; the task trains, predicts,
decodes the same with and without the KV cache, runs blind; VQA's soft accuracy."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

import patchgpt.tasks.text as text_module
from patchgpt.config import ConfigError
from patchgpt.data import build_datasets, collate
from patchgpt.data.base import DataError, DataInfo
from patchgpt.data.scenes import QTYPES, describe, digit_scenes
from patchgpt.tasks import AnswerQuestions, config_from_dict, info_from_meta, load
from patchgpt.tasks.vqa import soft_accuracy
from patchgpt.train import prepare, train

from .helpers import tiny_config
from .reference_sampling import uncached


@pytest.fixture(scope="module")
def scenes():
    return digit_scenes(size=64, n_train=50, n_val=50)


def expected_answer(question: str, boxes: list[list[float]], classes: list[int]) -> str:
    """The answer recomputed from the boxes (pixels), independently of `ask`."""
    cx = [(b[0] + b[2]) / 2 for b in boxes]
    area = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    if question == "how many digits?":
        return str(len(classes))
    if m := re.fullmatch(r"is there a (\d)\?", question):
        return "yes" if int(m[1]) in classes else "no"
    if question == "which digit is leftmost?":
        return str(classes[min(range(len(cx)), key=cx.__getitem__)])
    if question == "which digit is largest?":
        top = sorted(range(len(area)), key=lambda j: -area[j])
        assert area[top[1]] < 0.9 * area[top[0]]                        # asked only when clear
        return str(classes[top[0]])
    m = re.fullmatch(r"what is left of the (\d)\?", question)
    assert m, question
    d = int(m[1])
    assert classes.count(d) == 1                                           # the referent is unique
    k = classes.index(d)
    left = [j for j in range(len(cx)) if cx[j] < cx[k]]
    return str(classes[max(left, key=cx.__getitem__)]) if left else "nothing"


def expected_refs(question: str, answer: str, boxes: list[list[float]], classes: list[int]) -> set[int]:
    """The objects an answer is about, recomputed independently of `ask_all`."""
    if question == "how many digits?":
        return set(range(len(classes)))
    if m := re.fullmatch(r"is there a (\d)\?", question):
        return {j for j, c in enumerate(classes) if c == int(m[1])}
    if question == "which digit is leftmost?":
        return {min(range(len(boxes)), key=lambda j: boxes[j][0] + boxes[j][2])}
    if question == "which digit is largest?":
        return {max(range(len(boxes)), key=lambda j: (boxes[j][2] - boxes[j][0]) * (boxes[j][3] - boxes[j][1]))}
    k = classes.index(int(re.fullmatch(r"what is left of the (\d)\?", question)[1]))
    left = [j for j in range(len(boxes)) if boxes[j][0] + boxes[j][2] < boxes[k][0] + boxes[k][2]]
    return {max(left, key=lambda j: boxes[j][0] + boxes[j][2])} if answer != "nothing" else set()


def expected_rationale(question: str, answer: str, boxes: list[list[float]], classes: list[int]) -> str:
    """Presence: each digit, left to right by its box's left edge, checked against the asked one; left of: the
    same up to the asked digit, when the digit read before it is the answer; else none."""
    read = [c for _, _, c in sorted((b[0], b[1], c) for b, c in zip(boxes, classes, strict=True))]
    if m := re.fullmatch(r"is there a (\d)\?", question):
        return ",".join(f"{c}={m[1]}{'y' if str(c) == m[1] else 'n'}" for c in read)
    if m := re.fullmatch(r"what is left of the (\d)\?", question):
        at = read.index(int(m[1]))
        if (str(read[at - 1]) if at else "nothing") == answer:
            return ",".join(f"{c}={m[1]}{'y' if str(c) == m[1] else 'n'}" for c in read[:at + 1])
    return ""


def test_scene_answers_follow_the_boxes(scenes):
    train_set, val_set = scenes
    seen = set()
    for ds in (train_set, val_set):
        for i in range(25):
            it = ds[i]
            boxes = (it["boxes"] * 64).tolist()
            classes = it["classes"].tolist()
            assert it["qtype"] in QTYPES and isinstance(it["answer"], str)
            assert it["answer"] == expected_answer(it["question"], boxes, classes), (i, it)
            seen.add(it["qtype"])
            again = ds[i]                                                   # a pure function of (seed, index)
            assert (again["question"], again["answer"]) == (it["question"], it["answer"])
            assert it["qa"][0] == {k: it[k] for k in ("question", "answer", "qtype", "refs", "rationale")}
            assert again["qa"] == it["qa"]
            assert len({q["qtype"] for q in it["qa"]}) == len(it["qa"])     # every type at most once
            for q in it["qa"]:
                assert q["answer"] == expected_answer(q["question"], boxes, classes), (i, q)
                assert set(q["refs"]) == expected_refs(q["question"], q["answer"], boxes, classes), (i, q)
                assert q["rationale"] == expected_rationale(q["question"], q["answer"], boxes, classes), (i, q)
    assert len(seen) >= 4


# The first scenes as they were before questions came (image checksum, boxes in pixels, classes, caption).
PINNED = {("train", 0): (-3057.7778, [[33, 35, 53, 62], [22, 21, 39, 44], [6, 2, 20, 20]], [2, 2, 4]),
          ("train", 1): (-3024.5343, [[18, 43, 29, 58], [12, 11, 34, 39], [41, 16, 49, 28], [43, 34, 57, 59]],
                         [2, 7, 1, 1]),
          ("val", 1): (-3748.5522, [[16, 23, 34, 45]], [0]),
          ("val", 2): (-3862.4375, [[32, 23, 40, 35], [48, 2, 58, 18]], [4, 9])}


def test_scene_fields_are_unchanged(scenes):
    train_set, val_set = scenes
    assert set(train_set[0]) == {"image", "label", "boxes", "classes", "meta", "text", "question", "answer",
                                 "qtype", "mask", "qa", "refs", "rationale"}
    for (part, i), (checksum, px, classes) in PINNED.items():
        it = (train_set if part == "train" else val_set)[i]
        assert round(float(it["image"].double().sum()), 4) == checksum
        assert (it["boxes"] * 64).tolist() == px and it["classes"].tolist() == classes
        assert it["text"] == describe(px, classes, 64) and it["label"] == -1
        assert [g["bbox"] for g in it["meta"]["gt"]] == [[b[0], b[1], b[2] - b[0], b[3] - b[1]] for b in px]
    assert train_set[0]["text"] == "a 4, a 2 and a 2 from left to right"


def test_presence_answers_are_balanced():
    train_set, _ = digit_scenes(size=32, n_train=400, n_val=1)
    answers = [it["answer"] for it in (train_set[i] for i in range(400)) if it["qtype"] == "presence"]
    assert len(answers) > 40 and 0.35 < answers.count("yes") / len(answers) < 0.65


def test_vqa_trains_predicts_and_loads(tmp_path):
    cfg = tiny_config("vqa", tmp_path / "vqa")
    cfg.data.image_size, cfg.train.batch_size, cfg.train.eval_every = 32, 8, 0
    run = train(cfg, quiet=True)
    m = json.loads((run / "metrics.json").read_text())
    assert {"accuracy", "per_type", "val_loss"} <= set(m) and set(m["per_type"]) <= set(QTYPES)
    assert (run / "answers.png").exists()
    task = load(run)
    assert task.name == "vqa"
    img = tmp_path / "scene.png"
    Image.new("L", (40, 50), 30).save(img)
    out = task.predict_files([str(img)], out=tmp_path / "pred", question="is there a 3?")
    assert out[0]["question"] == "is there a 3?" and isinstance(out[0]["answer"], str)
    assert (tmp_path / "pred" / "answers.png").exists()


def test_cached_decoding_equals_uncached_and_the_sequence(tmp_path):
    cfg = tiny_config("vqa", tmp_path / "v")
    cfg.data.image_size, cfg.vqa.question_len, cfg.vqa.answer_len = 32, 24, 6
    cfg.vqa.ground = "off"   # the plain layout (grounded answers: tests/test_ground.py)
    _, val, info = build_datasets(cfg.data)
    task = AnswerQuestions(cfg, info).eval()
    batch = collate([val[i] for i in range(4)])
    a = task.predict(batch)
    with uncached(text_module):
        b = task.predict(batch)
    assert torch.equal(a["ids"], b["ids"]) and a["answers"] == b["answers"]
    seq = task.sequence(batch)
    assert seq.prefix_len == task.input.length + 1 + 24
    P = seq.prefix_len
    assert (seq.labels[:, :P - 1] == -1).all()                                # no loss on image or question
    for i, ans in enumerate(batch["answer"]):
        n = len(ans.encode())
        assert task.decode(seq.labels[i, P - 1:P - 1 + n + 1].tolist()) == ans
        assert seq.labels[i, P - 1 + n] == task.end and (seq.labels[i, P + n:] == -1).all()
    ids = task.encode_qa(["x" * 30]).ids                                     # cut to question_len
    assert ids.shape == (1, 25)


def test_the_rationale_comes_before_the_answer_and_decodes_the_same_cached(tmp_path):
    cfg = tiny_config("vqa", tmp_path / "r")
    cfg.data.image_size, cfg.vqa.question_len, cfg.vqa.answer_len, cfg.vqa.rationale_len = 32, 24, 8, 40
    cfg.vqa.ground, cfg.vqa.reason = "off", "auto"     # the plain layout: image, question, rationale, answer
    _, val, info = build_datasets(cfg.data)
    task = AnswerQuestions(cfg, info).eval()
    assert task.reason and cfg.vqa.reason == "on"      # auto: digit-scenes' answers carry rationales
    batch = collate([val[i] for i in range(12)])
    assert any(batch["rationale"]) and not all(batch["rationale"])   # presence, left of: steps; others none
    seq = task.sequence(batch)
    P, R = seq.prefix_len, 41
    assert seq.prefix_len == task.input.length + 1 + 24
    for i, (why, ans) in enumerate(zip(batch["rationale"], batch["answer"], strict=True)):
        n = min(len(why.encode()), 40)
        assert torch.equal(seq.labels[i, P - 1:P + n], seq.ids[i, P:P + n + 1])   # the rationale and its end
        assert text_module.read_bytes(seq.ids[i, P:P + R].tolist(), task.bytes, task.reason_end) == why[:n]
        assert seq.ids[i, P + n] == task.reason_end and (seq.labels[i, P + n:P + R - 1] == -1).all()
        assert task.decode(seq.labels[i, P + R - 1:].tolist()) == ans           # the answer after the padding
    a = task.predict(batch)
    with uncached(text_module):
        b = task.predict(batch)
    assert torch.equal(a["ids"], b["ids"]) and a["rationales"] == b["rationales"] and len(a["rationales"]) == 12
    d = tiny_config("vqa", tmp_path / "d").to_dict()
    assert not AnswerQuestions(config_from_dict(d), info).reason      # the default: off
    d["vqa"]["reason"] = "on"                          # a checkpoint that wrote rationales keeps them in its state
    assert AnswerQuestions(config_from_dict(d), info_from_meta({"state": task.state()})).reason
    cfg.vqa.reason = "on"
    with pytest.raises(DataError, match="vqa.reason=on needs data with rationales"):
        AnswerQuestions(cfg, DataInfo(**{**info.__dict__, "rationales": False}))
    cfg.vqa.blind = True                               # the question-only baseline writes none
    assert not AnswerQuestions(cfg, info).reason


def test_several_questions_train_as_turns_and_predict_asks_one(tmp_path):
    cfg = tiny_config("vqa", tmp_path / "t")
    cfg.data.image_size, cfg.vqa.question_len, cfg.vqa.answer_len = 32, 24, 8
    cfg.vqa.ground, cfg.vqa.turns = "off", -1
    _, val, info = build_datasets(cfg.data)
    task = AnswerQuestions(cfg, info)
    assert task.turns == cfg.vqa.turns == len(QTYPES) == info.questions     # -1: as many as the data offers
    batch = collate([val[i] for i in range(6)])
    T, P = task.turn_len, task.input.length + 1 + 24
    seq = task.train().sequence(batch)
    assert seq.ids.shape[1] == task.input.length + len(QTYPES) * T and seq.prefix_len == P
    for i, qa in enumerate(batch["qa"]):
        for t in range(len(QTYPES)):
            start = task.input.length + t * T                                # the turn's task token
            ids = seq.ids[i, start:start + T]
            if t >= len(qa):                                                 # a turn this scene lacks: no loss
                assert (ids == task.end).all() and (seq.labels[i, start - 1:start + T - 1] == -1).all()
                continue
            assert ids[0] == task.task_id and task.decode(ids[1:].tolist()).startswith(qa[t]["question"])
            answer = seq.labels[i, start + 24:start + T].tolist()            # from the last question position
            assert task.decode(answer) == qa[t]["answer"]
            assert (seq.labels[i, start - 1:start + 24] == -1).all()         # no loss on the question
    one = task.eval().sequence(batch)                # validation: the one question, which is the first turn
    L = one.ids.shape[1]
    assert L <= task.input.length + T and torch.equal(one.ids, seq.ids[:, :L])
    cfg.vqa.turns = 1
    assert AnswerQuestions(cfg, info).train().sequence(batch).ids.shape == one.ids.shape


def test_the_blind_baseline_ignores_the_image(tmp_path):
    cfg = tiny_config("vqa", tmp_path / "b")
    cfg.data.image_size, cfg.vqa.blind = 32, True
    _, val, info = build_datasets(cfg.data)
    task = AnswerQuestions(cfg, info).eval()
    batch = collate([val[i] for i in range(4)])
    other = {**batch, "image": torch.rand_like(batch["image"]) * 2 - 1}
    assert torch.equal(task.sequence(batch).patches, task.sequence(other).patches)
    assert torch.equal(task.predict(batch)["ids"], task.predict(other)["ids"])
    loss, _ = task(batch)
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ConfigError, match="needs a question"):
        task.predict_files(["a.png"], question="")


def test_soft_accuracy():
    humans = ["2", "2", "two", "3", "2 ", "2", "1", "2", "2", "2"]
    assert soft_accuracy("2", humans) == 1.0
    assert soft_accuracy("3", humans) == pytest.approx(1 / 3)
    assert soft_accuracy("Two", humans) == pytest.approx(1 / 3)
    assert soft_accuracy("7", humans) == 0.0
    assert soft_accuracy("1", ["1", "1"]) == pytest.approx(2 / 3)


def test_data_without_questions_is_one_line(tmp_path):
    cfg = tiny_config("vqa", tmp_path / "d")
    cfg.data.spec = "digits"
    with pytest.raises(DataError, match="vqa needs items with a question"):
        prepare(cfg)


def test_predict_without_a_question_is_one_line(tmp_path, capsys):
    from patchgpt.cli import main

    run = tmp_path / "vqa"
    assert main(["train", "vqa", "--data", "digit-scenes", "--model", "nano", "--steps", "1", "--quiet", "--out",
                 str(run), "--set", "train.batch_size=4", "--set", "data.image_size=32",
                 "--set", "vqa.reason=on"]) == 0
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(img)
    capsys.readouterr()
    assert main(["predict", str(run), str(img)]) == 2
    assert "vqa needs a question" in capsys.readouterr().err
    assert main(["predict", str(run), str(img), "--question", "is there a 5?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"answer", "rationale"} <= set(out[0])      # the steps it wrote before answering
