"""Segmentation: mask tokens round-trip; digit-scenes masks follow the ink; `masks:PATH` reads real label-map
PNGs and rejects malformed ones with one line; IoU from a confusion matrix; cached decoding equals uncached and
the teacher-forced sequence; the task trains, predicts (mask PNG at the file's size) and loads."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import patchgpt.tasks.segment as segment_module
from patchgpt.data import build_datasets, collate
from patchgpt.data.base import DataError
from patchgpt.data.images import resize, unresize
from patchgpt.data.masks import MaskFolder
from patchgpt.data.scenes import digit_scenes
from patchgpt.sequence import IGNORE
from patchgpt.tasks import Segment, load
from patchgpt.tasks.segment import confusion, iou_per_class, palette
from patchgpt.tokenizers.masks import CellMasks
from patchgpt.train import train

from .helpers import run_cli, tiny_config
from .reference_sampling import uncached


def one_class_per_cell(B: int, K: int, P: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Random (B, h*P, w*P) label maps in which each cell holds background and at most one other class."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, K, (B, h, w, 1, 1), generator=g)
    on = torch.rand(B, h, w, P, P, generator=g) < 0.4
    cells = torch.where(on, cls, 0)                                       # (B, h, w, P, P)
    return cells.permute(0, 1, 3, 2, 4).reshape(B, h * P, w * P)


@pytest.mark.parametrize("P", [1, 2, 4, 8])
def test_mask_tokens_round_trip_exactly(P):
    masks = one_class_per_cell(3, 11, P, 5, 4)
    cm = CellMasks(P, 11, (5 * P, 4 * P))
    classes, bits, valid = cm.encode(masks)
    assert classes.shape == (3, 20) and bits.shape == (3, 20, P * P) and valid.all()
    assert torch.equal(cm.decode(classes, bits), masks.long())
    assert torch.equal(cm.decode(classes, bits.bool()), masks.long())


def test_mask_tokens_ignore_and_a_second_class():
    cm = CellMasks(2, 5, (2, 6))
    m = torch.tensor([[[255, 255, 3, 3, 1, 0],
                       [255, 255, 3, 2, 0, 0]]])
    classes, bits, valid = cm.encode(m)
    assert classes.tolist() == [[IGNORE, 3, 1]]                           # all ignored: no class; majority 3
    assert valid[0, 0].tolist() == [False] * 4 and bits[0, 1].tolist() == [1, 1, 1, 0]
    assert cm.decode(classes, bits).tolist() == [[[0, 0, 3, 3, 1, 0], [0, 0, 3, 0, 0, 0]]]   # the 2 is lost


def test_digit_scene_masks_follow_the_ink():
    train_set, val_set = digit_scenes(size=64, n_train=20, n_val=20)
    for it in [train_set[i] for i in range(20)] + [val_set[i] for i in range(20)]:
        m, ink = it["mask"], (it["image"][0] + 1) / 2 > 0.2
        assert m.shape == (64, 64) and m.dtype == torch.uint8
        assert torch.equal(m > 0, ink)                                     # labelled exactly where there is ink
        assert set(m.unique().tolist()) - {0} <= {c + 1 for c in it["classes"].tolist()}
    small, _ = digit_scenes(size=32, n_train=5, n_val=1, canvas=64)
    assert small[0]["mask"].shape == (32, 32)
    assert train_set.info.masks == ["background"] + [str(d) for d in range(10)]


def write_pair(root, stem, size=(20, 16), mode="L", labels=None, image_size=None):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    w, h = image_size or size
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        root / "images" / f"{stem}.jpg")
    a = labels if labels is not None else np.zeros((size[1], size[0]), dtype=np.uint8)
    im = Image.fromarray(a, "L")
    if mode == "P":
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
        im = Image.fromarray(a, "P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, 0)])
    elif mode == "RGB":
        im = im.convert("RGB")
    im.save(root / "masks" / f"{stem}.png")


def test_masks_folder_reads_grey_and_palette_pngs(tmp_path):
    a = np.zeros((16, 20), dtype=np.uint8)
    a[2:6, 3:9], a[10:, 15:] = 2, 255
    write_pair(tmp_path, "one", labels=a)
    write_pair(tmp_path, "two", mode="P", labels=np.where(a == 2, 1, a).astype(np.uint8))
    ds = MaskFolder(tmp_path, size=16, resize="stretch")
    assert ds.info.masks == ["0", "1", "2"] and len(ds) == 2
    m = ds[0]["mask"]
    assert m.shape == (16, 16) and set(m.unique().tolist()) == {0, 2, 255}
    assert set(ds[1]["mask"].unique().tolist()) == {0, 1, 255}            # palette indices, not colours
    (tmp_path / "classes.txt").write_text("sky\ncat\ndog\nhat\n")
    assert MaskFolder(tmp_path, size=16).info.masks == ["sky", "cat", "dog", "hat"]
    padded = MaskFolder(tmp_path, size=40, resize="pad")[0]["mask"]
    assert (padded[:4] == 255).all()                                       # the letterbox is ignored


@pytest.mark.parametrize("fault, message", [
    ("no_masks_dir", "no masks/ folder"),
    ("missing", "no mask for it"),
    ("size", "mask is 10x16, its image"),
    ("rgb", "is not a label map"),
    ("label", "label 7 but only 3 classes"),
])
def test_malformed_mask_data_is_one_line(tmp_path, fault, message):
    a = np.zeros((16, 20), dtype=np.uint8)
    if fault == "no_masks_dir":
        (tmp_path / "images").mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.png")
    elif fault == "missing":
        write_pair(tmp_path, "a")
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / "b.png")
    elif fault == "size":
        write_pair(tmp_path, "a", size=(10, 16), image_size=(20, 16))
    elif fault == "rgb":
        write_pair(tmp_path, "a", mode="RGB")
        (tmp_path / "classes.txt").write_text("a\nb\n")
    else:
        a[0, 0] = 7
        write_pair(tmp_path, "a", labels=a)
        (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    with pytest.raises(DataError) as e:
        ds = MaskFolder(tmp_path, size=16)
        ds[0]
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unresize_inverts_resize_for_label_maps():
    a = np.zeros((30, 50), dtype=np.uint8)
    a[5:25, 10:40] = 3
    for policy in ("stretch", "pad", "crop"):
        small = resize(Image.fromarray(a, "L"), 20, policy, Image.NEAREST, fill=255)
        back = np.asarray(unresize(small, 50, 30, policy))
        assert back.shape == (30, 50)
        inner = back[8:22, 14:36]                                          # away from the edges of the region
        assert (inner == 3).all(), policy


def test_iou_from_the_confusion_matrix():
    true = np.array([0, 0, 1, 1, 2, 255])
    pred = np.array([0, 1, 1, 1, 0, 2])
    c = confusion(true, pred, 4)
    assert c.sum() == 5 and c[1, 1] == 2 and c[0, 1] == 1
    iou = iou_per_class(c)
    assert iou[0] == pytest.approx(1 / 3) and iou[1] == pytest.approx(2 / 3) and iou[2] == 0 and np.isnan(iou[3])
    assert palette(3).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]   # PASCAL VOC's colours


def test_cached_decoding_equals_uncached_and_the_teacher_forced_sequence(tmp_path):
    cfg = tiny_config("segment", tmp_path / "s")
    cfg.data.image_size = 32
    _, val, info = build_datasets(cfg.data)
    torch.manual_seed(0)
    task = Segment(cfg, info).eval()
    batch = collate([val[i] for i in range(3)])
    a = task.write_cells(batch["image"])
    with uncached(segment_module):
        b = task.write_cells(batch["image"])
    assert torch.equal(a, b) and a.shape == (3, 16) and a.min() >= 0 and a.max() < 11
    seq = task._with_cells(batch["image"], a)                              # greedy: each cell is the argmax
    h = task.backbone(seq)[:, seq.prefix_len - 1:-1]
    logits = task.backbone.logits(h)[..., task.class_ids.start:task.class_ids.stop]
    assert torch.equal(logits.argmax(-1), a)
    assert task.predict(batch)["masks"].shape == (3, 32, 32)


def test_segment_trains_predicts_and_loads(tmp_path):
    cfg = tiny_config("segment", tmp_path / "seg")
    cfg.data.image_size, cfg.train.batch_size = 32, 8
    run = train(cfg, quiet=True)
    m = json.loads((run / "metrics.json").read_text())
    assert {"miou", "pixel_accuracy", "per_class_iou", "val_loss"} <= set(m) and 0 <= m["miou"] <= 1
    assert (run / "segments.png").exists()
    task = load(run)
    img = tmp_path / "photo.png"
    Image.new("L", (45, 30), 40).save(img)
    out = task.predict_files([str(img)], out=tmp_path / "pred")
    assert out[0]["size"] == [45, 30] and abs(sum(out[0]["classes"].values()) - 1) < 1e-3
    mask = Image.open(tmp_path / "pred" / "photo_mask.png")
    assert mask.mode == "P" and mask.size == (45, 30)
    assert Image.open(tmp_path / "pred" / "photo_overlay.png").size == (45, 30)
    assert json.loads((tmp_path / "pred" / "photo.json").read_text())["mask"].endswith("photo_mask.png")


def test_segment_on_a_masks_folder_through_the_cli(tmp_path, capsys):
    for i in range(6):
        a = np.zeros((24, 24), dtype=np.uint8)
        a[4 + i:12 + i, 6:14] = 1 + i % 2
        write_pair(tmp_path / "data", f"im{i}", size=(24, 24), labels=a)
    code, _, err = run_cli(capsys, "train", "segment", "--data", f"masks:{tmp_path / 'data'}", "--model", "nano",
                           "--steps", "2", "--quiet", "--out", str(tmp_path / "run"), "--set", "data.image_size=16",
                           "--set", "tokenizer.patch_size=4", "--set", "train.batch_size=4")
    assert code == 0, err
    code, out, err = run_cli(capsys, "predict", str(tmp_path / "run"), str(tmp_path / "data/images/im0.jpg"))
    assert code == 0, err
    assert json.loads(out)[0]["size"] == [24, 24]
    code, _, err = run_cli(capsys, "train", "segment", "--data", "digits", "--model", "nano", "--steps", "1",
                           "--quiet", "--out", str(tmp_path / "bad"))
    assert code != 0 and "segmentation needs masks" in err
    code, _, err = run_cli(capsys, "train", "segment", "--model", "nano", "--steps", "1", "--quiet", "--out",
                           str(tmp_path / "aug"), "--set", "data.augment=true")
    assert code == 2 and "does not augment" in err


def coco_file(tmp_path, segmentation):
    """A one-image COCO instances file with a polygon object, the object under test and a crowd region."""
    from pycocotools import mask as mask_api

    Image.new("RGB", (40, 30), (90, 90, 90)).save(tmp_path / "a.jpg")
    crowd = mask_api.encode(np.asfortranarray(np.pad(np.ones((5, 5), np.uint8), ((25, 0), (35, 0)))))
    crowd["counts"] = crowd["counts"].decode()
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 2, 10, 10], "area": 100,
             "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]},
            {"id": 2, "image_id": 1, "category_id": 9, "bbox": [20, 5, 10, 10], "area": 50,
             "segmentation": segmentation},
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [35, 25, 5, 5], "area": 25, "iscrowd": 1,
             "segmentation": crowd}]
    d = {"images": [{"id": 1, "file_name": "a.jpg", "width": 40, "height": 30}], "annotations": anns,
         "categories": [{"id": 7, "name": "cat"}, {"id": 9, "name": "dog"}]}
    (tmp_path / "ann.json").write_text(json.dumps(d))
    return tmp_path / "ann.json"


@pytest.mark.parametrize("kind", ["polygon", "rle", "uncompressed"])
def test_coco_segmentations_become_label_maps(tmp_path, kind):
    from pycocotools import mask as mask_api

    from patchgpt.data.coco import CocoDetection

    block = np.zeros((30, 40), np.uint8)
    block[5:15, 20:30] = 1
    if kind == "polygon":
        seg = [[20, 5, 30, 5, 30, 15, 20, 15]]
    elif kind == "rle":
        seg = mask_api.encode(np.asfortranarray(block))
        seg["counts"] = seg["counts"].decode()
    else:
        flat = block.reshape(-1, order="F")
        runs, value, n = [], 0, 0
        for v in flat:
            if v != value:
                runs, value, n = runs + [n], v, 0
            n += 1
        seg = {"counts": runs + [n], "size": [30, 40]}
    ds = CocoDetection(coco_file(tmp_path, seg), size=40, resize="stretch", masks=True)
    assert ds.info.masks == ["background", "cat", "dog"]
    m = ds[0]["mask"].numpy()                                                # 40 x 40, stretched from 40 x 30
    assert m.shape == (40, 40)
    assert (m[5:14, 4:10] == 1).all() and (m[10:18, 22:28] == 2).all()       # cat polygon, dog object
    assert (m[36:, 37:] == 255).all() and m[25, 15] == 0                     # crowd ignored, background


def test_a_bad_coco_segmentation_is_one_line(tmp_path):
    from patchgpt.data.coco import CocoDetection

    ds = CocoDetection(coco_file(tmp_path, [[20, 5, 30]]), size=32, masks=True)
    with pytest.raises(DataError) as e:
        ds[0]
    assert "annotation" in str(e.value) and "bad segmentation" in str(e.value) and "\n" not in str(e.value)


def test_masks_are_scored_at_their_files_size(tmp_path):
    from patchgpt.tasks.segment import SegmentMetric

    a = np.zeros((30, 45), dtype=np.uint8)
    a[5:20, 10:30] = 1
    for i in range(3):
        write_pair(tmp_path / "d", f"im{i}", size=(45, 30), labels=a)
    cfg = tiny_config("segment", tmp_path / "s")
    cfg.data.spec, cfg.data.image_size, cfg.tokenizer.patch_size = f"masks:{tmp_path / 'd'}", 16, 4
    cfg.data.val_fraction = 0.5
    train_set, val, info = build_datasets(cfg.data)
    task = Segment(cfg, info).eval()
    metric = SegmentMetric(task)
    metric.update(collate([val[i] for i in range(len(val))]))
    assert metric.original == len(val) and metric.confusion.sum() == len(val) * 30 * 45
