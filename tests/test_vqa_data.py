"""The VQA v2 files as a data source, vqa:QUESTIONS.json:ANNOTATIONS.json[:IMAGES_DIR]: questions with their
ten human answers and COCO images found by id; malformed files are one-line errors; a vqa run trains on them
through the CLI and scores by VQA's soft accuracy."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from patchgpt.config import DataConfig
from patchgpt.data import collate
from patchgpt.data.base import DataError
from patchgpt.data.specs import build_datasets, whole_dataset
from patchgpt.tasks import AnswerQuestions
from patchgpt.tasks.vqa import soft_accuracy

from .helpers import run_cli, tiny_config

# image id -> file name, in the three namings the source accepts (a JPEG among them)
FILES = {1: "COCO_train2014_000000000001.jpg", 2: "000000000002.png", 3: "kitchen-3.png",
         42: "COCO_val2014_000000000042.png"}

# (question_id, image_id, question, answer_type, the ten human answers); the most common one is the answer
QUESTIONS = [
    (10, 1, "what colour is the wall?", "other", ["red"] * 6 + ["dark red"] * 3 + ["pink"]),
    (11, 1, "is it sunny?", "yes/no", ["yes"] * 9 + ["no"]),
    (20, 2, "how many cats are there?", "number", ["2"] * 5 + ["3"] * 4 + ["two"]),
    (30, 3, "what is on the table?", "other", ["cup"] * 4 + ["mug"] * 4 + ["coffee", "tea"]),
    (31, 3, "¿qué hay en la mesa?", "other", ["una taza"] * 10),
    (420, 42, "is this a kitchen?", "yes/no", ["no"] * 10),
]


def _image(path, seed, size=(20, 14)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, **({"quality": 95} if path.suffix == ".jpg" else {}))


def _most_common(answers):
    return max(answers, key=answers.count)


def vqa_files(root, questions=QUESTIONS, images="imgs", q_edit=None, a_edit=None):
    """VQA v2 files under `root` (questions, annotations) and the images in root/`images`; `q_edit`/`a_edit`
    change the loaded JSON objects before they are written. Returns the spec."""
    root.mkdir(parents=True, exist_ok=True)
    for i, name in FILES.items():
        _image(root / images / name, i)
    q = {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "train2014",
         "questions": [{"image_id": im, "question": text, "question_id": qid} for qid, im, text, _, _ in questions]}
    a = {"info": {}, "data_subtype": "train2014",
         "annotations": [{"question_id": qid, "image_id": im, "question_type": " ".join(text.split()[:2]),
                          "answer_type": at, "multiple_choice_answer": _most_common(hs),
                          "answers": [{"answer": h, "answer_confidence": "yes", "answer_id": k + 1}
                                      for k, h in enumerate(hs)]}
                         for qid, im, text, at, hs in questions]}
    if q_edit:
        q_edit(q)
    if a_edit:
        a_edit(a)
    (root / "questions.json").write_text(json.dumps(q, ensure_ascii=False), encoding="utf-8")
    (root / "annotations.json").write_text(json.dumps(a, ensure_ascii=False), encoding="utf-8")
    return f"vqa:{root / 'questions.json'}:{root / 'annotations.json'}:{root / images}"


def _all(ds):
    return [ds[i] for i in range(len(ds))]


def test_items_carry_question_answer_humans_and_answer_type(tmp_path):
    spec = vqa_files(tmp_path / "v")
    ds = whole_dataset(DataConfig(spec="", image_size=16), spec)
    items = _all(ds)
    assert len(items) == len(QUESTIONS) and ds.info.classes is None and not ds.info.captions
    for it, (_, _, text, at, hs) in zip(items, QUESTIONS, strict=True):   # the questions file's order
        assert set(it) == {"image", "label", "question", "answer", "answers", "qtype"}
        assert it["question"] == text and it["answers"] == hs and it["answer"] == _most_common(hs)
        assert it["qtype"] == at and it["label"] == -1 and it["image"].shape == (3, 16, 16)
    assert torch.equal(items[0]["image"], items[1]["image"])                # two questions, one image
    assert not torch.equal(items[0]["image"], items[2]["image"])
    batch = collate(items)
    assert batch["answers"] == [hs for *_, hs in QUESTIONS] and batch["qtype"][2] == "number"

    # The default images folder: the questions file's folder, then its images/ folder.
    spec = vqa_files(tmp_path / "w", images="images")
    assert len(whole_dataset(DataConfig(spec="", image_size=8), spec.rsplit(":", 1)[0])) == len(QUESTIONS)
    spec = vqa_files(tmp_path / "x", images=".")
    assert len(whole_dataset(DataConfig(spec="", image_size=8), spec.rsplit(":", 1)[0])) == len(QUESTIONS)


def test_validation_holds_out_whole_images(tmp_path):
    spec = vqa_files(tmp_path / "v")
    train, val, info = build_datasets(DataConfig(spec=spec, image_size=8, val_fraction=0.25))
    base = train.base
    ids = base.image_ids()
    train_images, val_images = {ids[i] for i in train.indices}, {ids[i] for i in val.indices}
    assert len(val_images) == 1 and not train_images & val_images and len(train) + len(val) == len(QUESTIONS)
    again = build_datasets(DataConfig(spec=spec, image_size=8, val_fraction=0.25))[1]
    assert again.indices == val.indices                                     # seeded: the same every run


def test_skip_drops_the_questions_concerned(tmp_path, capsys):
    spec = vqa_files(tmp_path / "v")
    (tmp_path / "v" / "imgs" / FILES[3]).unlink()
    ds = whole_dataset(DataConfig(spec="", image_size=8, on_error="skip"), spec)
    assert [it["question"] for it in _all(ds)] == [q[2] for q in QUESTIONS if q[1] != 3]
    assert len(ds.info.skipped) == 2 and "image_id 3: no image file" in ds.info.skipped[0]
    assert "skipped 2 malformed entries" in capsys.readouterr().err


def test_annotations_of_other_questions_are_left_out_with_a_warning(tmp_path, capsys):
    spec = vqa_files(tmp_path / "v", q_edit=lambda q: q["questions"].pop())
    ds = whole_dataset(DataConfig(spec="", image_size=8), spec)
    assert len(ds) == len(QUESTIONS) - 1
    assert "1 annotation(s) of questions not in" in capsys.readouterr().err


def _drop(key):
    return lambda d: d[next(iter(k for k in d if k in ("questions", "annotations")))][0].pop(key)


def _set(key, value, n=0):
    return lambda d: d[next(iter(k for k in d if k in ("questions", "annotations")))][n].__setitem__(key, value)


def _write(name, text):
    return lambda root: (root / name).write_text(text)


# (fault id, what to do to good files: ("q" | "a", edit of the JSON) or a function of the folder,
#  the file the message names, what it says)
FAULTS = [
    ("questions-missing", lambda r: (r / "questions.json").unlink(), "questions.json", "no such questions file"),
    ("annotations-missing", lambda r: (r / "annotations.json").unlink(), "annotations.json",
     "no such annotations file"),
    ("questions-not-json", _write("questions.json", "{oops"), "questions.json", "not valid JSON"),
    ("annotations-not-json", _write("annotations.json", "[1, 2"), "annotations.json", "not valid JSON"),
    ("questions-no-list", _write("questions.json", '{"questions": {}}'), "questions.json",
     "not a VQA questions file (needs a list 'questions')"),
    ("annotations-no-list", _write("annotations.json", "[]"), "annotations.json",
     "not a VQA annotations file (needs a list 'annotations')"),
    ("question-no-id", ("q", _drop("question_id")), "questions.json", "question #0: missing key 'question_id'"),
    ("question-no-image-id", ("q", _drop("image_id")), "questions.json", "missing key 'image_id'"),
    ("question-id-string", ("q", _set("question_id", "10")), "questions.json", "question_id '10' is not an integer"),
    ("question-not-object", ("q", lambda d: d["questions"].append("why?")), "questions.json",
     "question #6: not an object (a str)"),
    ("question-empty", ("q", _set("question", "  ")), "questions.json", "question #0 (question_id 10): empty question"),
    ("question-twice", ("q", _set("question_id", 10, 1)), "questions.json",
     "question #1 (question_id 10): a second question with this question_id (the first is #0)"),
    ("annotation-no-answers", ("a", _drop("answers")), "annotations.json",
     "annotation #0 (question_id 10): missing key 'answers'"),
    ("annotation-no-answer-type", ("a", _drop("answer_type")), "annotations.json", "missing key 'answer_type'"),
    ("annotation-no-mc-answer", ("a", _drop("multiple_choice_answer")), "annotations.json",
     "missing key 'multiple_choice_answer'"),
    ("annotation-empty-answer", ("a", _set("multiple_choice_answer", "")), "annotations.json",
     "empty multiple_choice_answer"),
    ("annotation-empty-human-answer", ("a", lambda d: d["annotations"][1]["answers"][3].update(answer=" ")),
     "annotations.json", "annotation #1 (question_id 11): answers[3]: empty answer"),
    ("annotation-answers-not-list", ("a", _set("answers", "red")), "annotations.json",
     "answers 'red' is not a non-empty list"),
    ("annotation-answers-empty", ("a", _set("answers", [])), "annotations.json", "answers [] is not a non-empty list"),
    ("annotation-answer-number", ("a", lambda d: d["annotations"][2]["answers"][0].update(answer=2)),
     "annotations.json", "annotation #2 (question_id 20): answers[0]: answer 2 is not a string"),
    ("annotation-answer-no-key", ("a", lambda d: d["annotations"][2]["answers"][1].pop("answer")),
     "annotations.json", "answers[1]: missing key 'answer'"),
    ("annotation-answer-string", ("a", lambda d: d["annotations"][2]["answers"].append("2")),
     "annotations.json", "answers[10] is not an object (a str)"),
    ("annotation-twice", ("a", _set("question_id", 10, 1)), "annotations.json",
     "annotation #1 (question_id 10): a second annotation of this question_id"),
    ("annotation-other-image", ("a", _set("image_id", 2)), "annotations.json",
     "annotation #0 (question_id 10): image_id 2 differs from its question's (1)"),
    ("question-unanswered", ("a", lambda d: d["annotations"].pop(2)), "questions.json",
     "question #2 (question_id 20): no annotation in"),
    ("image-missing", lambda r: (r / "imgs" / FILES[2]).unlink(), "questions.json",
     "question #2 (question_id 20): image_id 2: no image file in"),
    ("image-twice", lambda r: _image(r / "imgs" / "2.png", 0), "questions.json",
     "image_id 2: 2 image files (000000000002.png, 2.png): which one is meant?"),
]


@pytest.mark.parametrize("fault, make, file, says", FAULTS, ids=[f[0] for f in FAULTS])
def test_malformed_files_are_one_line(tmp_path, fault, make, file, says):
    root = tmp_path / "v"
    if isinstance(make, tuple):
        which, edit = make
        spec = vqa_files(root, **{f"{which}_edit": edit})
    else:
        spec = vqa_files(root)
        make(root)
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(spec=spec, image_size=8))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(root / file)) and says in msg, msg


def test_bad_specs_are_one_line(tmp_path):
    spec = vqa_files(tmp_path / "v")
    q = tmp_path / "v" / "questions.json"
    for bad, says in [(f"vqa:{q}", "give both files"), (f"{spec}-gone", "no such images directory")]:
        with pytest.raises(DataError, match=says) as e:
            build_datasets(DataConfig(spec=bad, image_size=8))
        assert "\n" not in str(e.value)


def test_the_metric_scores_by_soft_accuracy(tmp_path):
    spec = vqa_files(tmp_path / "v")
    cfg = tiny_config("vqa", tmp_path / "run")
    cfg.data.spec, cfg.data.image_size = spec, 16
    ds = whole_dataset(cfg.data, spec)
    task = AnswerQuestions(cfg, ds.info).eval()
    batch = collate(_all(ds))
    said = ["red", "no", "3", "mug", "una taza", "yes"]             # 1, 1/3, 1, 1, 1, 0 by soft accuracy
    task.predict = lambda b: {"answers": said}
    m = task.metric()
    with torch.no_grad():
        m.update(batch)
    out = m.compute()
    want = [soft_accuracy(p, hs) for p, (*_, hs) in zip(said, QUESTIONS, strict=True)]
    assert want == [1.0, pytest.approx(1 / 3), 1.0, 1.0, 1.0, 0.0]
    assert out["accuracy"] == pytest.approx(sum(want) / 6)
    assert out["per_type"] == pytest.approx({"number": 1.0, "other": 1.0, "yes/no": (1 / 3 + 0) / 2})
    assert [r["score"] for r in m.files()["answers.json"]] == pytest.approx(want)


def test_vqa_trains_on_vqa_files_through_the_cli(tmp_path, capsys):
    spec = vqa_files(tmp_path / "v")
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "vqa", "--data", spec, "--model", "nano", "--steps", "2", "--quiet",
                             "--out", str(run), "--set", "train.batch_size=4", "--set", "data.image_size=16")
    assert code == 0, err
    m = json.loads((run / "metrics.json").read_text())
    assert 0 <= m["accuracy"] <= 1 and set(m["per_type"]) <= {"yes/no", "number", "other"} and m["n"] >= 1
    humans = {text: hs for _, _, text, _, hs in QUESTIONS}
    rows = json.loads((run / "answers.json").read_text())
    assert rows and all(r["score"] == pytest.approx(soft_accuracy(r["predicted"], humans[r["question"]]))
                        for r in rows)
    code, out, err = run_cli(capsys, "eval", str(run), "--all", "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == len(QUESTIONS)                            # eval reads every question
