"""``shards:`` reads tar shards the `webdataset` library (and so img2dataset) writes: samples grouped by key,
.jpg/.png/.webp images decoded and resized as folder images are, labels from .cls (or a classes.txt), captions
from .txt (or img2dataset's .json), ``pipe:COMMAND`` shards, and bad members under ``data.on_error``."""

import io
import json

import pytest
import torch
import webdataset
from PIL import Image

from patchgpt.cli import main
from patchgpt.config import DataConfig
from patchgpt.data import build_datasets
from patchgpt.data.base import DataError
from patchgpt.data.images import load_image
from patchgpt.data.shards import all_items, find_shards, stream_batches
from patchgpt.data.wds import WdsRead

FORMATS = [("jpg", "RGB"), ("png", "L"), ("webp", "RGB"), ("png", "RGBA"), ("jpg", "L"), ("png", "P")]


def picture(i: int) -> Image.Image:
    """Image i: its own size (wide or tall), mode and colours."""
    w, h = (20 + 3 * i, 14 + 2 * i) if i % 2 else (12 + i, 24 + 2 * i)
    g = torch.Generator().manual_seed(i)
    a = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
    mode = FORMATS[i % len(FORMATS)][1]
    im = Image.fromarray(a)
    return im.convert(mode) if mode != "P" else im.quantize(8)


def encoded(i: int) -> tuple[str, bytes]:
    ext = FORMATS[i % len(FORMATS)][0]
    buf = io.BytesIO()
    picture(i).save(buf, format={"jpg": "JPEG"}.get(ext, ext.upper()))
    return ext, buf.getvalue()


def sample(i: int, **over) -> dict:
    """Sample i: its image, class i % 3, a .txt caption (even i) or img2dataset's .json with a caption (odd
    i), and a member no reader wants."""
    ext, data = encoded(i)
    s = {"__key__": f"{i:09d}", ext: data, "cls": i % 3, "extra.bin": b"\0\1"}
    if i % 2 == 0:
        s["txt"], s["json"] = f"a caption {i}", {"url": f"http://x/{i}.jpg", "width": 64}
    else:
        s["json"] = {"caption": f"json caption {i}", "url": f"http://x/{i}.jpg"}
    return {**s, **over}


def write(d, samples: list[dict], per: int = 6) -> str:
    """Shards d/train-000000.tar, ... of `per` samples, written by `webdataset.ShardWriter`; their pattern."""
    d.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(d / "train-%06d.tar"), maxcount=per, verbose=0) as w:
        for s in samples:
            w.write(s)
    return f"{d}/train-{{000000..{(len(samples) - 1) // per:06d}}}.tar"


def want(i: int, size: int = 16, channels: int = 3) -> dict:
    """The item sample i should read as: decoded and resized exactly as a folder image."""
    return {"image": load_image(io.BytesIO(encoded(i)[1]), channels, size, "crop"), "label": i % 3,
            "text": f"a caption {i}" if i % 2 == 0 else f"json caption {i}"}


def read(spec: str, **kw) -> tuple[list[dict], object]:
    """Every item of the WebDataset shards `spec` at 16 px (other `WdsRead` options in `kw`), and their info."""
    shards, info = find_shards(spec, WdsRead(size=16, **kw))
    return list(all_items(shards, info)), info


def test_webdataset_shards_read_as_items(tmp_path):
    pattern = write(tmp_path / "s", [sample(i) for i in range(12)])
    items, info = read(pattern)
    assert info.classes == ["0", "1", "2"] and info.captions and info.image_size == (16, 16)
    assert len(items) == 12
    for i, item in enumerate(items):
        assert list(item) == ["image", "label", "text"]
        w = want(i)
        assert torch.equal(item["image"], w["image"]) and item["image"].shape == (3, 16, 16)
        assert (item["label"], item["text"]) == (w["label"], w["text"])
    grey, _ = read(pattern, channels=1)
    assert grey[3]["image"].shape == (1, 16, 16) and torch.equal(grey[3]["image"], want(3, channels=1)["image"])
    # Through the data spec: the last shard validates, the first streams, split and resumed as always.
    train, val, info = build_datasets(DataConfig(spec=f"shards:{pattern}", image_size=16))
    assert (len(train), len(val)) == (6, 6) and [v["label"] for v in val] == [i % 3 for i in range(6, 12)]
    full, again = stream_batches(train, 2, seed=3, buffer=4), stream_batches(train, 2, seed=3, start=2, buffer=4)
    labels = [next(full)["label"].tolist() for _ in range(6)]
    assert [next(again)["label"].tolist() for _ in range(4)] == labels[2:]
    ranks = [sum((next(b)["label"].tolist() for _ in range(3)), []) for b in
             (stream_batches(train, 1, seed=0, rank=r, world=2, shuffle=False) for r in (0, 1))]
    assert ranks == [[0, 2, 1], [1, 0, 2]]                       # items strided over ranks: one shard


def test_a_separate_validation_set_takes_the_training_classes(tmp_path):
    train_pattern = write(tmp_path / "a", [sample(i) for i in range(6)])
    val_pattern = write(tmp_path / "b", [sample(i) for i in (0, 1, 3, 4)])    # classes 0 and 1 only
    train, val, info = build_datasets(DataConfig(spec=f"shards:{train_pattern}", image_size=16,
                                                 val_spec=f"shards:pipe:cat {val_pattern}"))
    assert info.classes == val.info.classes == ["0", "1", "2"] and len(train) == 6
    assert [x["label"] for x in val] == [0, 1, 0, 1] and val[0]["image"].shape == (3, 16, 16)


def test_unlabelled_uncaptioned_shards(tmp_path):
    pattern = write(tmp_path / "s", [{"__key__": f"k{i}", "png": encoded(1)[1]} for i in range(3)])
    items, info = read(pattern)
    assert info.classes is None and not info.captions and [list(x) for x in items] == [["image", "label"]] * 3
    assert {x["label"] for x in items} == {-1}


def test_training_on_webdataset_shards_through_the_cli(tmp_path):
    pattern = write(tmp_path / "s", [sample(i) for i in range(12)])
    common = ["--model", "nano", "--steps", "2", "--set", "data.image_size=16", "--quiet", "--set",
              "train.batch_size=4", "--set", "train.warmup=1", "--set", "train.threads=1"]
    assert main(["train", "classify", "--data", f"shards:{pattern}", "--out", str(tmp_path / "c"), *common]) == 0
    assert main(["train", "caption", "--data", f"shards:{pattern}", "--out", str(tmp_path / "t"), *common]) == 0
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())


def test_pipe_shards(tmp_path, capsys):
    write(tmp_path / "s", [sample(i) for i in range(12)])
    files, _ = read(f"{tmp_path}/s/train-{{000000..000001}}.tar")
    piped, info = read(f"pipe:cat {tmp_path}/s/train-{{000000..000001}}.tar")
    assert info.classes == ["0", "1", "2"] and len(piped) == 12
    assert all(torch.equal(a["image"], b["image"]) and a["label"] == b["label"] for a, b in zip(files, piped,
                                                                                                  strict=True))
    with pytest.raises(DataError, match=r"pipe:cat .*nope.tar: the command failed \(exit status 1: cat: "):
        read(f"pipe:cat {tmp_path}/nope.tar")
    with pytest.raises(DataError, match="pipe:echo hello: the command's output is not a tar"):
        read("pipe:echo hello")
    code = main(["train", "classify", "--data", "shards:pipe:exit 3", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip().count("\n") == 0 and "pipe:exit 3: the command failed (exit status 3)" in err


def test_bad_samples_follow_on_error_and_classes_txt_wins(tmp_path, capsys):
    samples = [sample(i) for i in range(6)]
    samples[4] = sample(4, jpg=b"not a jpeg")                          # a corrupt image member
    pattern = write(tmp_path / "s", samples)
    with pytest.raises(DataError) as e:
        read(pattern)
    msg = str(e.value)
    assert "\n" not in msg and "train-000000.tar: member 000000004.jpg: cannot read image" in msg, msg
    items, info = read(pattern, on_error="skip")
    assert [x["label"] for x in items] == [0, 1, 2, 0, 2] and len(info.skipped) == 1
    assert "skipping" in capsys.readouterr().err
    # A sample without an image: an error at opening under stop, left out (not counted) under skip.
    pattern = write(tmp_path / "n", [sample(0), {"__key__": "lonely", "cls": 1, "txt": "no image"}, sample(1)])
    with pytest.raises(DataError, match=r"train-000000.tar: sample lonely: no image member .*data.on_error=skip"):
        read(pattern)
    shards, info = find_shards(pattern, WdsRead(size=16, on_error="skip"))
    assert sum(s.items for s in shards) == 2 and len(all_items(shards, info)) == 2
    # classes.txt beside the shards names the classes (more than the .cls values reach); a value past it errs.
    (tmp_path / "s" / "classes.txt").write_text("cat\ndog\nemu\nfox\n")
    _, info = read(f"{tmp_path}/s/train-000000.tar", on_error="skip")
    assert info.classes == ["cat", "dog", "emu", "fox"]
    (tmp_path / "s" / "classes.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match=r"sample 000000002: .cls '2' is not a class index 0..1"):
        read(f"{tmp_path}/s/train-000000.tar")
