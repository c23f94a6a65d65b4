"""Captions for the user's own images: folder:PATH with a metadata.jsonl (Hugging Face imagefolder) and
coco-captions:CAPTIONS.json[:DIR]; malformed files are one-line errors; a caption run trains end to end."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from patchgpt.cli import main
from patchgpt.config import DataConfig
from patchgpt.data import collate
from patchgpt.data.base import DataError
from patchgpt.data.specs import build_datasets, whole_dataset


def _png(path, seed=0, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")


def _cfg(spec, **kw):
    return DataConfig(spec=spec, image_size=8, **kw)


def _all(ds):
    return [ds[i] for i in range(len(ds))]


def test_folder_metadata_captions_questions_and_labels(tmp_path, capsys):
    flat = tmp_path / "flat"
    for k in range(4):
        _png(flat / "sub" / f"{k}.png", k)
    _png(flat / "extra.png", 9)                                  # not in the metadata: left out, one warning
    texts = ["un chat noir", "猫が寝ている", "a 🐈 on a mat", "Zoë's café — naïve"]
    _jsonl(flat / "metadata.jsonl", [{"file_name": f"sub/{k}.png", "text": t, "question": f"q{k}?",
                                      "answer": f"a{k}", "other": 1} for k, t in enumerate(texts)])
    train, val, info = build_datasets(_cfg(f"folder:{flat}", val_fraction=0.25))
    assert info.captions and info.classes is None and len(train) + len(val) == 4
    assert "1 image(s) not in metadata.jsonl are left out" in capsys.readouterr().err
    items = sorted(_all(train) + _all(val), key=lambda it: it["question"])
    assert [it["text"] for it in items] == texts                 # non-ASCII round-trips exactly
    assert [it["answer"] for it in items] == ["a0", "a1", "a2", "a3"]
    assert {it["label"] for it in items} == {-1} and items[0]["image"].shape == (3, 8, 8)
    batch = collate(_all(train))
    assert batch["text"] == [it["text"] for it in _all(train)] and batch["image"].shape == (3, 3, 8, 8)

    labelled = tmp_path / "classes"
    for c in ("cats", "dogs"):
        for k in range(2):
            _png(labelled / c / f"{k}.png", k)
    _jsonl(labelled / "metadata.jsonl", [{"file_name": f"{c}/{k}.png", "text": f"{c} {k}"}
                                         for c in ("dogs", "cats") for k in range(2)])
    ds = whole_dataset(_cfg(""), f"folder:{labelled}")
    assert ds.info.classes == ["cats", "dogs"] and ds.info.captions
    assert {(it["text"], it["label"]) for it in _all(ds)} == {("cats 0", 0), ("cats 1", 0), ("dogs 0", 1),
                                                              ("dogs 1", 1)}
    assert "question" not in ds[0]


def test_folder_rationales_are_optional_per_line(tmp_path):
    root = tmp_path / "why"
    for k in range(3):
        _png(root / f"{k}.png", k)
    _jsonl(root / "metadata.jsonl", [
        {"file_name": "0.png", "text": "a cat", "question": "is it a cat?", "answer": "yes",
         "rationale": "whiskers, pointed ears: a cat"},
        {"file_name": "1.png", "text": "a dog", "question": "is it a cat?", "answer": "no", "rationale": ""},
        {"file_name": "2.png", "text": "a fox", "question": "what is it?", "answer": "fox"}])
    ds = whole_dataset(_cfg(""), f"folder:{root}")
    assert ds.info.rationales
    assert [it["rationale"] for it in _all(ds)] == ["whiskers, pointed ears: a cat", "", ""]   # none: answer at once
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "x", "question": "q",
                                                     "answer": "a"}) + "\n")
    ds = whole_dataset(_cfg(""), f"folder:{root}")
    assert not ds.info.rationales and "rationale" not in ds[0]


def test_folder_without_metadata_is_unchanged(tmp_path):
    for k in range(3):
        _png(tmp_path / f"{k}.png", k)
    ds = whole_dataset(_cfg(""), f"folder:{tmp_path}")
    assert not ds.info.captions and set(ds[0]) == {"image", "label"}


@pytest.mark.parametrize("line, fault", [
    ('["sub/0.png", "x"]', "line 2: not a JSON object"),
    ("{not json", "line 2: not valid JSON"),
    ({"file_name": "sub/9.png", "text": "x"}, "line 2: sub/9.png: no such file"),
    ({"file_name": "../outside.png", "text": "x"}, "line 2: file_name '../outside.png' is outside the folder"),
    ({"file_name": "/etc/x.png", "text": "x"}, "line 2: file_name '/etc/x.png' is outside the folder"),
    ({"file_name": "sub/1.png"}, "line 2: no 'text'"),
    ({"file_name": "sub/1.png", "text": "  "}, "line 2: empty 'text'"),
    ({"file_name": "sub/1.png", "text": 3}, "line 2: 'text' must be a string"),
    ({"file_name": 5, "text": "x"}, "line 2: needs 'file_name'"),
    ({"file_name": "sub/1.png", "text": "x", "question": "why?"}, "line 2: 'question' and 'answer' go together"),
    ({"file_name": "sub/1.png", "text": "x", "question": "q", "answer": "a"}, "line 2: has 'question'/'answer'"),
    ({"file_name": "sub/1.png", "text": "x", "rationale": "r"}, "line 2: 'rationale' explains an answer"),
    ({"file_name": "sub/1.png", "text": "x", "question": "q", "answer": "a", "rationale": 3},
     "line 2: 'rationale' must be a string"),
])
def test_malformed_metadata_is_one_line(tmp_path, line, fault):
    _png(tmp_path / "outside.png")
    root = tmp_path / "imgs"
    for k in range(2):
        _png(root / "sub" / f"{k}.png", k)
    _jsonl(root / "metadata.jsonl", [{"file_name": "sub/0.png", "text": "ok"}, line])
    with pytest.raises(DataError) as e:
        build_datasets(_cfg(f"folder:{root}"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{root / 'metadata.jsonl'}: ") and fault in msg, msg


def _coco(tmp_path, images, annotations, name="captions.json"):
    (tmp_path / name).write_text(json.dumps({"images": images, "annotations": annotations}, ensure_ascii=False),
                                 encoding="utf-8")
    return tmp_path / name


def test_coco_captions_items_choice_and_collate(tmp_path, capsys):
    imgs = [{"id": i, "file_name": f"{i}.png", "width": 12, "height": 10} for i in range(1, 6)]
    for im in imgs:
        _png(tmp_path / "pics" / im["file_name"], im["id"])
    caps = {1: ["one a", "one b", "one c"], 2: ["deux é"], 3: ["three a", "three b"], 4: ["four"]}   # 5: none
    anns = [{"id": 10 * i + j, "image_id": i, "caption": c} for i, cs in caps.items() for j, c in enumerate(cs)]
    ann = _coco(tmp_path, imgs, anns)
    train, val, info = build_datasets(_cfg(f"coco-captions:{ann}:{tmp_path / 'pics'}", val_fraction=0.5))
    assert "1 image(s) with no caption are left out" in capsys.readouterr().err
    assert info.captions and info.classes is None and len(train) == 2 and len(val) == 2
    for it in _all(val):                                         # validation: the first caption
        assert it["text"] == it["captions"][0] and it["label"] == -1
    base = train.base
    for i in range(len(base)):                                   # training: caption i % k, a function of i
        assert base[i]["text"] == base[i]["captions"][i % len(base[i]["captions"])] == base[i]["text"]
    assert base[0]["captions"] == ["one a", "one b", "one c"] and base[1]["text"] == "deux é"
    batch = collate(_all(train) + _all(val))
    assert isinstance(batch["captions"], list) and all(isinstance(c, list) for c in batch["captions"])
    assert [c[0] for c in batch["captions"]] == [it["captions"][0] for it in _all(train) + _all(val)]
    whole = whole_dataset(_cfg(""), f"coco-captions:{ann}:{tmp_path / 'pics'}")
    assert [it["text"] for it in _all(whole)] == ["one a", "deux é", "three a", "four"]
    assert torch.equal(whole[0]["image"], base[0]["image"])


@pytest.mark.parametrize("data, fault", [
    ({"images": [{"id": 1, "file_name": "1.png"}], "annotations": [{"image_id": 2, "caption": "x"}]},
     "annotation #0 (id ?): unknown image_id 2"),
    ({"images": [{"id": 1, "file_name": "1.png"}], "annotations": [{"image_id": 1, "caption": " "}]},
     "empty caption"),
    ({"images": [{"id": 1, "file_name": "1.png"}], "annotations": [{"image_id": 1, "caption": 7}]},
     "caption 7 is not a string"),
    ({"images": [{"id": 1, "file_name": "1.png"}], "annotations": [{"image_id": "1", "caption": "x"}]},
     "image_id '1' is not an integer"),
    ({"images": [{"id": 1, "file_name": "1.png"}], "annotations": ["x"]}, "not an object"),
    ({"images": [{"id": "a", "file_name": "1.png"}], "annotations": []}, "id 'a' is not an integer"),
    ({"images": [{"id": 1, "file_name": "9.png"}], "annotations": [{"image_id": 1, "caption": "x"}]},
     "9.png: no such file"),
    ({"images": {}, "annotations": []}, "not a COCO captions file"),
    ("{oops", "not valid JSON"),
])
def test_malformed_coco_captions_are_one_line(tmp_path, data, fault):
    _png(tmp_path / "1.png")
    ann = tmp_path / "c.json"
    ann.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(DataError) as e:
        build_datasets(_cfg(f"coco-captions:{ann}"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(ann)) and fault in msg, msg
    with pytest.raises(DataError, match="no such caption file"):
        build_datasets(_cfg(f"coco-captions:{tmp_path / 'missing.json'}"))


def test_caption_training_on_a_folder_with_metadata(tmp_path, capsys):
    data = tmp_path / "data"
    words = ["red", "green", "blue", "grey"]
    for k in range(8):
        _png(data / f"{k}.png", k, size=(16, 16))
    _jsonl(data / "metadata.jsonl", [{"file_name": f"{k}.png", "text": f"a {words[k % 4]} square"}
                                     for k in range(8)])
    run = tmp_path / "run"
    assert main(["train", "caption", "--data", f"folder:{data}", "--model", "nano", "--steps", "2",
                 "--set", "train.batch_size=4", "--set", "data.image_size=16", "--out", str(run), "--quiet"]) == 0
    assert (run / "metrics.json").exists() and "cider" in json.loads((run / "metrics.json").read_text())
