"""Detection: box tokens, constrained decoding, COCO loading, mAP, and the detector end to end."""

import json
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

import patchgpt.tasks.detect as detect_module
from patchgpt.coco_eval import coco_map, ground_truth
from patchgpt.config import DataConfig
from patchgpt.data.base import DataError, collate
from patchgpt.data.coco import CocoDetection, letterbox, to_pixels
from patchgpt.data.specs import build_datasets
from patchgpt.rng import RowRNG
from patchgpt.sampling import DecodeHook, SamplingParams, sample
from patchgpt.sequence import Vocab, concat, tokens
from patchgpt.tasks import Detect, Task
from patchgpt.tokenizers.boxes import TOKENS_PER_OBJECT, Boxes

from .helpers import run_cli, tiny_config

# ---- box tokens -------------------------------------------------------------------------------------
from .reference_sampling import uncached


@pytest.mark.parametrize("bins", [2, 17, 64, 1000])
def test_box_tokens_round_trip_within_half_a_bin(bins):
    tok = Boxes(bins, num_classes=5, vocab=Vocab([("patch", 1)]))
    g = torch.Generator().manual_seed(bins)
    lo, hi = torch.rand(20, 2, generator=g) * 0.5, 0.5 + torch.rand(20, 2, generator=g) * 0.5
    boxes = torch.cat([lo, hi], dim=1)                                    # (20, 4) valid xyxy
    classes = torch.randint(0, 5, (20,), generator=g)
    ids = tok.encode(boxes, classes)
    assert ids.shape == (20 * TOKENS_PER_OBJECT + 1,) and ids[-1] == tok.end
    back, cls = tok.decode(ids)
    assert torch.equal(cls, classes)
    assert (back - boxes).abs().max() <= 0.5 / (bins - 1) + 1e-6


def test_box_decode_stops_at_end_and_drops_malformed_tails():
    tok = Boxes(10, num_classes=3, vocab=Vocab())
    ids = tok.encode(torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.0, 0.0, 1.0, 1.0]]), torch.tensor([2, -1]))
    boxes, cls = tok.decode(ids)
    assert cls.tolist() == [2, -1]                                        # the noise class decodes to -1
    boxes, cls = tok.decode(ids[:7])                                      # a truncated second object
    assert cls.tolist() == [2]
    bad = ids.clone()
    bad[1] = tok.classes.start                                            # a class where a coordinate belongs
    assert len(tok.decode(bad)[1]) == 0
    swapped = tok.encode(torch.tensor([[0.9, 0.8, 0.1, 0.2]]), torch.tensor([0]))
    b, _ = tok.decode(swapped)
    assert (b[:, 0] <= b[:, 2]).all() and (b[:, 1] <= b[:, 3]).all()


def _valid(tok: Boxes, row: list[int]) -> bool:
    """True if `row` is objects (4 coordinates + a real class each), then end tokens only."""
    t = 0
    while t < len(row) and row[t] != tok.end:
        obj = row[t:t + TOKENS_PER_OBJECT]
        if len(obj) < TOKENS_PER_OBJECT or not all(c in tok.coords for c in obj[:4]):
            return False
        if not tok.classes.start <= obj[4] < tok.noise:
            return False
        t += TOKENS_PER_OBJECT
    return all(x == tok.end for x in row[t:])


def _tiny_detector(tmp_path, **sets):
    cfg = tiny_config("detect", tmp_path / "run")
    cfg.data.spec = "digit-scenes"
    cfg.data.image_size = 32
    cfg.detect.max_objects = 4
    for k, v in sets.items():
        setattr(cfg.detect, k, v)
    Detect.check(cfg)
    train, val, info = build_datasets(cfg.data)
    return Detect(cfg, info).eval(), train, val


def test_constrained_decoder_never_emits_an_invalid_sequence(tmp_path):
    task, train, _ = _tiny_detector(tmp_path)
    images = torch.stack([train[i]["image"] for i in range(16)])
    img = task.input.encode(images)
    prompt = concat(img, tokens(torch.full((16, 1), task.task_id)), prefix_len=img.ids.shape[1] + 1)
    for seed in range(4):   # an untrained model at temperature 2 tries everything it is allowed to
        stop = DecodeHook()
        stop.stop_token = task.boxes.end
        ids = sample(task.backbone, prompt, TOKENS_PER_OBJECT * 4 + 1, SamplingParams(temperature=2.0),
                     generator=torch.Generator().manual_seed(seed),
                     allowed=partial(task.boxes.allowed, max_objects=4), hook=stop)
        assert all(_valid(task.boxes, row) for row in ids.tolist())
        assert (ids[:, -1] == task.boxes.end).all() or ids.shape[1] < TOKENS_PER_OBJECT * 4 + 1


def test_cached_detection_equals_uncached_and_scores_are_probabilities(tmp_path):
    task, _, val = _tiny_detector(tmp_path)
    batch = collate([val[i] for i in range(6)])
    a = task.predict(batch)["detections"]
    with uncached(detect_module):
        b = task.predict(batch)["detections"]
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["classes"], y["classes"]) and torch.allclose(x["boxes"], y["boxes"])
        assert torch.allclose(x["scores"], y["scores"], atol=1e-5)
        assert ((x["scores"] >= 0) & (x["scores"] <= 1)).all()
        assert (x["boxes"][:, 2] > x["boxes"][:, 0]).all()


def test_training_sequence_marks_noise_coordinates_without_loss(tmp_path):
    task, train, _ = _tiny_detector(tmp_path)
    batch = collate([train[i] for i in range(4)])
    seq = task.sequence(batch, RowRNG(torch.Generator().manual_seed(0)))
    P = seq.prefix_len
    n_real = (batch["classes"] >= 0).sum(1)
    for b in range(4):
        labels = seq.labels[b, P - 1:]                                    # from the task token on
        assert (labels == task.boxes.end).sum() == 1                       # one end, after max_objects objects
        n_coord = ((labels >= task.boxes.coords.start) & (labels < task.boxes.coords.stop)).sum()
        assert n_coord == 4 * n_real[b]                                    # noise boxes' coordinates: no loss
        assert (labels == task.boxes.noise).sum() == task.max_objects - n_real[b]


# ---- data -------------------------------------------------------------------------------------------


def test_digit_scenes_are_deterministic_with_tight_boxes():
    train, val, info = build_datasets(DataConfig(spec="digit-scenes"))
    assert info.boxes and info.classes == [str(i) for i in range(10)]
    a, b = train[3], train[3]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["boxes"], b["boxes"])
    for i in range(20):
        t = val[i]
        image = t["image"]
        assert 1 <= len(t["classes"]) <= 4
        ink = image[0] > -0.6                                              # (64, 64) bright pixels
        covered = torch.zeros_like(ink)
        for x0, y0, x1, y1 in (t["boxes"] * 64).round().long().tolist():
            assert x1 > x0 and y1 > y0
            covered[y0:y1, x0:x1] = True
        assert not (ink & ~covered).any()                                 # every inked pixel is in a box


def write_coco(root, annotations, images=None, categories=None):
    root.mkdir(parents=True, exist_ok=True)
    images = images or [{"id": 1, "file_name": "a.png", "width": 40, "height": 20},
                        {"id": 2, "file_name": "b.png", "width": 30, "height": 30}]
    for im in images:
        Image.fromarray(np.zeros((im["height"], im["width"], 3), np.uint8)).save(root / im["file_name"])
    d = {"images": images, "annotations": annotations,
         "categories": categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    (root / "ann.json").write_text(json.dumps(d))
    return root / "ann.json"


GOOD = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 5, 20, 10]},
        {"id": 2, "image_id": 2, "category_id": 3, "bbox": [0, 0, 30, 15]},
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [5, 5, 5, 5], "iscrowd": 1}]


def test_coco_loading_letterboxes_boxes_consistently(tmp_path):
    ann = write_coco(tmp_path / "c", GOOD)
    ds = CocoDetection(ann, size=40, channels=3)
    assert ds.info.classes == ["cat", "dog"] and ds.info.category_ids == [3, 7]
    t = ds[0]                                                             # 40x20 -> scale 1, padded 10 above
    image = t["image"]
    assert image.shape == (3, 40, 40)
    assert torch.allclose(t["boxes"], torch.tensor([[10 / 40, 15 / 40, 30 / 40, 25 / 40]]))
    assert t["classes"].tolist() == [1]
    back = to_pixels(t["boxes"], t["meta"], 40)
    assert torch.allclose(back, torch.tensor([[10.0, 5.0, 30.0, 15.0]]), atol=1e-4)
    t2 = ds[1]                                                            # the crowd box is no target ...
    assert t2["classes"].tolist() == [0]
    assert [a["iscrowd"] for a in t2["meta"]["gt"]] == [0, 1]             # ... but stays in the ground truth
    spec = DataConfig(spec=f"coco:{ann}", image_size=40, val_fraction=0.5, resize="pad")
    train, val, info = build_datasets(spec)
    assert len(train) + len(val) == 2 and info.boxes


@pytest.mark.parametrize("bad, why", [
    ({"id": 9, "image_id": 1, "bbox": [0, 0, 5, 5]}, "missing key 'category_id'"),
    ({"id": 9, "image_id": 1, "category_id": 3, "bbox": [38, 0, 10, 5]}, "outside its 40x20 image"),
    ({"id": 9, "image_id": 1, "category_id": 3, "bbox": [1, 1, 0, 5]}, "zero or negative area"),
    ({"id": 9, "image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]}, "unknown category_id 99"),
    ({"id": 9, "image_id": 42, "category_id": 3, "bbox": [1, 1, 5, 5]}, "unknown image_id 42"),
    ({"id": 9, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5]}, "is not [x, y, width, height]"),
])
def test_malformed_annotations_stop_or_skip_with_one_line(tmp_path, bad, why):
    ann = write_coco(tmp_path / "c", GOOD + [bad])
    with pytest.raises(DataError) as e:
        CocoDetection(ann, size=32)
    msg = str(e.value)
    assert why in msg and "ann.json" in msg and "annotation #3" in msg and "\n" not in msg
    ds = CocoDetection(ann, size=32, on_error="skip")
    assert len(ds.info.skipped) == 1 and why in ds.info.skipped[0]
    assert sum(len(ds[i]["classes"]) for i in range(len(ds))) == 2   # the good ones are all there


def test_coco_file_errors_are_one_line(tmp_path):
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        CocoDetection(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="not a COCO instances file"):
        CocoDetection(tmp_path / "y.json")
    with pytest.raises(DataError, match="no such annotation file"):
        CocoDetection(tmp_path / "missing.json")


# ---- mAP --------------------------------------------------------------------------------------------


def _gt():
    metas = [{"image_id": i, "width": 100, "height": 100,
              "gt": [{"bbox": [10 + i, 10, 30, 40], "category_id": 1, "iscrowd": 0},
                     {"bbox": [50, 50, 20, 20], "category_id": 2, "iscrowd": 0}]} for i in range(5)]
    return ground_truth(metas, [1, 2], ["a", "b"]), metas


def test_map_is_one_for_perfect_predictions_and_drops_for_shifted_boxes():
    gt, metas = _gt()
    perfect = [{"image_id": m["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for m in metas for a in m["gt"]]
    m = coco_map(gt, perfect)
    assert m["AP"] == pytest.approx(1.0) and m["AP50"] == pytest.approx(1.0)
    assert m["per_class_AP"] == {"a": pytest.approx(1.0), "b": pytest.approx(1.0)}
    shifted = [{**d, "bbox": [d["bbox"][0] + 0.15 * d["bbox"][2], *d["bbox"][1:]]} for d in perfect]
    s = coco_map(gt, shifted)
    assert s["AP"] < 0.6 and s["AP50"] == pytest.approx(1.0)             # IoU 0.74: only high thresholds fail
    assert coco_map(gt, [])["AP"] == 0.0


def test_map_matches_the_iou_threshold_arithmetic():
    gt = ground_truth([{"image_id": 1, "width": 100, "height": 100,
                        "gt": [{"bbox": [0, 0, 10, 10], "category_id": 1, "iscrowd": 0}]}], [1], ["a"])
    # a 10x10 box shifted 2.5 px: IoU = 75 / 125 = 0.6, a hit at thresholds .50, .55, .60 of ten
    det = [{"image_id": 1, "category_id": 1, "bbox": [2.5, 0, 10, 10], "score": 1.0}]
    m = coco_map(gt, det)
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(0.0)
    assert m["AP"] == pytest.approx(0.3)


# ---- end to end -------------------------------------------------------------------------------------




def test_detector_trains_evaluates_and_predicts_through_the_cli(tmp_path, capsys):
    run_dir = tmp_path / "det"
    code, out, err = run_cli(capsys, "train", "detect", "--data", "digit-scenes", "--model", "nano", "--out",
                         str(run_dir), "--steps", "6", "--quiet", "--set", "data.image_size=32",
                         "--set", "train.batch_size=8", "--set", "detect.max_objects=4")
    assert code == 0, err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"AP", "AP50", "AP75", "per_class_AP"} <= metrics.keys()
    dets = json.loads((run_dir / "detections.json").read_text())
    assert all({"image_id", "category_id", "bbox", "score"} <= d.keys() for d in dets)
    assert (run_dir / "detections.png").stat().st_size > 0

    code, out, err = run_cli(capsys, "eval", str(run_dir), "--json")
    assert code == 0, err
    assert json.loads(out)["AP50"] == pytest.approx(metrics["AP50"])

    imgs = []
    for i, (w, h) in enumerate([(32, 32), (50, 20)]):                    # any size: letterboxed, mapped back
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (h, w), np.uint8)).save(p)
        imgs.append(str(p))
    out_dir = tmp_path / "pred"
    code, out, err = run_cli(capsys, "predict", str(run_dir), *imgs, "--out", str(out_dir))
    assert code == 0, err
    res = json.loads(out)
    assert [r["width"] for r in res] == [32, 50]
    for i, r in enumerate(res):
        saved = json.loads((out_dir / f"img{i}.json").read_text())
        assert saved == r
        for o in r["objects"]:
            x0, y0, x1, y1 = o["box"]
            assert 0 <= x0 <= x1 <= r["width"] and 0 <= y0 <= y1 <= r["height"]
            assert o["class"] in [str(k) for k in range(10)] and 0 <= o["score"] <= 1
        assert Image.open(out_dir / f"img{i}.png").size == (r["width"], r["height"])


def test_detector_trains_on_a_users_coco_file(tmp_path, capsys):
    anns = [{"id": k, "image_id": 1 + k % 2, "category_id": 3 + 4 * (k % 2), "bbox": [2, 2, 10, 8]}
            for k in range(2)]
    ann = write_coco(tmp_path / "c", anns)
    code, out, err = run_cli(capsys, "train", "detect", "--data", f"coco:{ann}:{tmp_path / 'c'}", "--model", "nano",
                         "--out", str(tmp_path / "run"), "--steps", "3", "--quiet", "--set", "data.image_size=16",
                         "--set", "tokenizer.patch_size=4", "--set", "train.batch_size=2",
                         "--set", "data.val_fraction=0.5", "--set", "data.flip=true")
    assert code == 0, err
    assert (tmp_path / "run" / "metrics.json").exists()
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "run"), "--data", f"coco:{ann}", "--all", "--json")
    assert code == 0, err
    assert json.loads(out)["images"] == 2


def test_detect_on_data_without_boxes_is_a_one_line_error(tmp_path, capsys):
    code, out, err = run_cli(capsys, "train", "detect", "--data", "digits", "--out", str(tmp_path / "r"),
                         "--steps", "1", "--quiet")
    assert code == 2 and "detection needs boxes" in err and err.count("\n") == 1


def test_letterbox_then_to_pixels_inverts():
    im = Image.new("RGB", (80, 20))
    out, meta = letterbox(im, 40)
    assert out.size == (40, 40)
    box = torch.tensor([[0.0, 15 / 40, 1.0, 25 / 40]])                    # the whole letterboxed content
    assert torch.allclose(to_pixels(box, meta, 40), torch.tensor([[0.0, 0.0, 80.0, 20.0]]), atol=1e-4)


def test_coordinate_tokens_point_at_their_grid_cell():
    tok = Boxes(64, num_classes=3, vocab=Vocab())
    ids = tok.encode(torch.tensor([[0.0, 0.5, 0.99, 1.0]]), torch.tensor([1]))[:5]   # x0 y0 x1 y1 class
    pos = tok.grid_pos(ids[None], grid=(8, 4))[0]
    assert pos[:, 0].tolist() == [0] * 5                                  # no frame
    assert pos[:, 2].tolist() == [1, 1, 4, 2, 0]                          # columns (1-based) of 4
    assert pos[:, 1].tolist() == [0, 5, 5, 7, 0]                          # rows (1-based) of 8
    two = torch.cat([ids, ids])                                           # a second object: same positions
    assert torch.equal(tok.grid_pos(two[None], grid=(8, 4))[0, 5:], pos)


def test_glimpse_is_the_box_region_resampled_like_a_patch():
    from patchgpt.tasks.detect import glimpse

    img = torch.rand(2, 3, 16, 16)
    whole = glimpse(img, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 2), 8)                 # (2, 8*8*3)
    expect = torch.nn.functional.avg_pool2d(img, 2).permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.allclose(whole, expect, atol=1e-5)
    img = torch.zeros(1, 1, 16, 16)
    img[:, :, :8, 8:] = 1.0                                                             # the top-right 8x8
    assert glimpse(img, torch.tensor([[0.5, 0.0, 1.0, 0.5]]), 4).mean() > 0.9
    assert glimpse(img, torch.tensor([[0.0, 0.5, 0.5, 1.0]]), 4).max() < 1e-6        # bottom-left: empty


def test_flip_augmentation_moves_boxes_with_pixels(tmp_path):
    task, train, _ = _tiny_detector(tmp_path)
    assert type(task).augment is not Task.augment                         # not the generic pixel-only shift
    batch = collate([train[i] for i in range(8)])
    out = task._flip(batch, RowRNG(torch.Generator().manual_seed(0)))
    flipped = ~torch.isclose(out["image"], batch["image"]).flatten(1).all(1)
    assert 0 < int(flipped.sum()) < 8
    S = out["image"].shape[-1]
    for b in range(8):
        ink = out["image"][b, 0] > -0.6
        covered = torch.zeros_like(ink)
        for (x0, y0, x1, y1), c in zip((out["boxes"][b] * S).tolist(), out["classes"][b].tolist(), strict=True):
            if c >= 0:
                covered[round(y0):round(y1), round(x0):round(x1)] = True
        assert not (ink & ~covered).any()


def test_scale_jitter_moves_boxes_with_pixels_and_splits_over_processes(tmp_path):
    task, train, _ = _tiny_detector(tmp_path, scale_jitter=0.5)
    batch = collate([train[i] for i in range(8)])
    out = task._zoom(batch, RowRNG(torch.Generator().manual_seed(0), 0, 8))
    assert out["image"].shape == batch["image"].shape and out["image"].min() >= -1 - 1e-6
    S = out["image"].shape[-1]
    widths = []
    for b in range(8):
        ink = out["image"][b, 0] > 0.0
        covered = torch.zeros_like(ink)
        for (x0, y0, x1, y1), c in zip((out["boxes"][b] * S).tolist(), batch["classes"][b].tolist(), strict=True):
            if c >= 0:   # every real object, kept or dropped for being mostly outside: its ink is in its box
                covered[max(int(y0) - 1, 0):int(y1) + 2, max(int(x0) - 1, 0):int(x1) + 2] = True
        assert not (ink & ~covered).any(), b
        kept = out["classes"][b] >= 0
        assert torch.equal(kept, kept & (batch["classes"][b] >= 0))        # nothing appears from padding
        ratio = ((out["boxes"][b, :, 2] - out["boxes"][b, :, 0]) / (batch["boxes"][b, :, 2] - batch["boxes"][b, :, 0]))
        widths += ratio[kept & (out["boxes"][b, :, 0] > 0) & (out["boxes"][b, :, 2] < 1)].tolist()
    assert 0.5 - 1e-4 <= min(widths) and max(widths) <= 1.5 + 1e-4 and max(widths) - min(widths) > 0.1
    # Under DDP each rank zooms its rows exactly as one process zooms the global batch.
    halves = []
    for first in (0, 4):
        part = {k: (v[first:first + 4] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
        halves.append(task._zoom(part, RowRNG(torch.Generator().manual_seed(0), first, 8)))
    for key in ("image", "boxes", "classes"):
        assert torch.allclose(torch.cat([h[key] for h in halves]).float(), out[key].float()), key
    with pytest.raises(ValueError, match="scale_jitter"):
        _tiny_detector(tmp_path, scale_jitter=1.0)


def test_training_sequences_split_over_processes_equal_one_process(tmp_path):
    """Each row's object order and noise boxes come from a per-row seed drawn for the global batch."""
    task, train, _ = _tiny_detector(tmp_path)
    batch = collate([train[i] for i in range(8)])
    whole = task.sequence(batch, RowRNG(torch.Generator().manual_seed(5), 0, 8))
    halves = []
    for first in (0, 4):
        part = {k: (v[first:first + 4] if torch.is_tensor(v) or isinstance(v, list) else v) for k, v in batch.items()}
        halves.append(task.sequence(part, RowRNG(torch.Generator().manual_seed(5), first, 8)))
    assert torch.equal(torch.cat([h.ids for h in halves]), whole.ids)
    assert torch.equal(torch.cat([h.labels for h in halves]), whole.labels)
    assert torch.allclose(torch.cat([h.patches for h in halves]), whole.patches)
