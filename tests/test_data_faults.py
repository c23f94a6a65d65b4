"""Issue 12, "no lost work, no silent wrong result", the data layer: bad files and specs walked through
`build_datasets` (every item of both splits read), each one `DataError` of one line naming the file or spec
and the fault; a few through the CLI too (exit 2, one stderr line, no traceback).

Each row of `FAULTS` makes its bad input under tmp_path and returns the `DataConfig` fields that read it.
"""

import gzip
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import IterableDataset

from patchgpt.cli import main
from patchgpt.config import DataConfig
from patchgpt.data import DataError, build_datasets, collate, load_image, train_batches
from patchgpt.data.base import SKIP_WARN_EVERY, SKIPS, DataInfo, ImageSet
from patchgpt.data.coco import CocoDetection
from patchgpt.data.images import ImageFolder, load_pil
from patchgpt.data.shards import write_shards

from .test_shards import relist

# ---------------------------------------------------------------- makers


class Tagged(ImageSet):
    """Item i: a 4x4 grey image of value i and label `offset` + i, among 100 classes."""

    def __init__(self, n: int, offset: int = 0, size: int = 4) -> None:
        self.n, self.offset = n, offset
        self.info = DataInfo(channels=1, image_size=(size, size), classes=[f"c{i}" for i in range(100)])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        s = self.info.image_size[0]
        return {"image": torch.full((1, s, s), float(i)) / 127.5 - 1.0, "label": self.offset + i}


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


GOOD_PNG = _png(Image.new("L", (4, 4), 7))


def shard_with(tmp, samples: list[dict], name: str = "train-000000.tar") -> dict:
    """A shard set in tmp/s (written by `write_shards`, so it has a meta.json), whose shard `name` is then
    replaced by one holding `samples` ({ext: bytes} each, keys 000000000, ...) and listed with their count
    and its size, as if `patchgpt shard` had written it."""
    d = tmp / "s"
    write_shards(Tagged(len(samples)), d, per_shard=1000)
    with tarfile.open(d / name, "w") as tar:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{i:09d}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    relist(d, {name: len(samples)})
    return {"spec": f"shards:{d}", "val_spec": f"shards:{d}"}


def sample(**over) -> dict:
    """One good shard sample's members ({"png": ..., "cls": ...}), with `over` replacing or adding members."""
    return {"png": GOOD_PNG, "cls": b"3", **over}


def good_shards(tmp, n: int = 8, per: int = 4, sub: str = "s", **kw):
    d = tmp / sub
    write_shards(Tagged(n, **kw), d, per_shard=per)
    return d


def changed(tmp, name: str, data: bytes | None) -> dict:
    """A good shard set in tmp/s whose file `name` is then written with `data` (None: deleted)."""
    p = good_shards(tmp) / name
    if data is None:
        p.unlink()
    else:
        p.write_bytes(data)
    return {"spec": f"shards:{tmp / 's'}", "val_spec": f"shards:{tmp / 's'}"}


def truncated_shards(tmp, sizes: bool):
    d = good_shards(tmp)
    p = d / "train-000000.tar"
    with tarfile.open(p) as t:
        cut = t.getmembers()[4].offset       # the end of item 1's members: a clean cut, tar reads 2 items
    p.write_bytes(p.read_bytes()[:cut])
    if not sizes:
        relist(d, {"train-000000.tar": 4, "train-000001.tar": 4}, sizes=False)   # a manifest of the earlier format
    return {"spec": f"shards:{d}", "val_spec": f"shards:{d}"}


def huge_member(tmp):
    ti = tarfile.TarInfo("000000000.png")
    ti.size = 10**12                                      # a header claiming a terabyte, 1 KiB behind it
    d = tmp / "s"
    write_shards(Tagged(1), d)
    (d / "train-000000.tar").write_bytes(ti.tobuf(tarfile.GNU_FORMAT) + b"\0" * 1024)
    relist(d, {"train-000000.tar": 1})
    return {"spec": f"shards:{d}", "val_spec": f"shards:{d}"}


def npy_claiming(shape, descr="<f4", body=b"\0" * 64) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + body


def two_dirs(tmp, size_b: int, how: str):
    a = good_shards(tmp, sub="a")
    b = good_shards(tmp, sub="b", size=size_b)
    if how == "join":
        return {"spec": f"shards:{a}::{b}", "val_spec": f"shards:{a}"}
    return {"spec": f"shards:{a}", "val_spec": f"shards:{b}"}


def coco(tmp, mutate=None, text: str | None = None):
    """A COCO file with two 10x10 images and one box, `mutate`d (a function of the JSON dict) or replaced."""
    for name in ("a.png", "b.png"):
        Image.new("RGB", (10, 10), (200, 10, 10)).save(tmp / name)
    d = {"images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10},
                    {"id": 2, "file_name": "b.png", "width": 10, "height": 10}],
         "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "iscrowd": 0}],
         "categories": [{"id": 1, "name": "thing"}]}
    if mutate:
        mutate(d)
    (tmp / "ann.json").write_text(text if text is not None else json.dumps(d))
    return {"spec": f"coco:{tmp / 'ann.json'}", "val_fraction": 0.5, "resize": "pad"}


def bbox(v):
    return lambda d: d["annotations"][0].update(bbox=v)


def ann(**kv):
    return lambda d: d["annotations"][0].update(kv)


IDX_TYPES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def idx_bytes(a: np.ndarray, shape=None) -> bytes:
    shape = a.shape if shape is None else shape
    return bytes([0, 0, IDX_TYPES[a.dtype], len(shape)]) + b"".join(int(d).to_bytes(4, "big") for d in shape) \
        + a.tobytes()


def idx(tmp, x=None, y=None, tx=None, ty=None, raw_x: bytes | None = None, gz: bool = False):
    """An idx: folder: train images `x` (default 6 of 8x8) and labels `y` (default 0..5), and t10k files if
    given (`ty` False: no t10k labels file)."""
    x = np.zeros((6, 8, 8), np.uint8) if x is None else x
    y = np.arange(len(x), dtype=np.uint8) if y is None else y
    files = {"train-images-idx3-ubyte": raw_x if raw_x is not None else idx_bytes(x),
             "train-labels-idx1-ubyte": idx_bytes(y)}
    if tx is not None:
        files["t10k-images-idx3-ubyte"] = idx_bytes(tx)
        if ty is not False:
            files["t10k-labels-idx1-ubyte"] = idx_bytes(np.arange(len(tx), dtype=np.uint8) if ty is None else ty)
    for name, data in files.items():
        if gz:
            (tmp / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (tmp / name).write_bytes(data)
    return {"spec": f"idx:{tmp}"}


def folder_with(tmp, im: Image.Image, name: str = "x.png", **save):
    (tmp / "f" / "a").mkdir(parents=True)
    (tmp / "f" / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp / "f" / "b" / "ok.png")
    im.save(tmp / "f" / "a" / name, **save)
    return {"spec": f"folder:{tmp / 'f'}", "image_size": 8}


def bomb(tmp, mp, side: int):
    mp.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the test's stand-in for Pillow's 89M pixels
    return folder_with(tmp, Image.new("RGB", (side, side)))


# (id, maker(tmp, monkeypatch) -> DataConfig fields, needles of the one line, CLI task or None)
FAULTS = [
    # ---- shards as one unit
    ("shard-truncated", lambda t, m: truncated_shards(t, sizes=True), ["train-000000.tar", "bytes, but the meta.json"],
     "classify"),
    ("shard-truncated-earlier-format", lambda t, m: truncated_shards(t, sizes=False),
     ["train-000000.tar: 2 items, but the meta.json beside it records 4"], None),
    ("shard-unlisted", lambda t, m: changed(t, "train-000007.tar", b""), ["train-000007.tar: not listed in"],
     "classify"),
    ("shard-meta-not-json", lambda t, m: changed(t, "meta.json", b"{"), ["meta.json: unreadable"], None),
    ("shard-meta-hostile-name", lambda t, m: changed(t, "meta.json", json.dumps(
        {"info": {"channels": 1, "image_size": [4, 4], "classes": None}, "shards": {"../../x.tar": 1}}).encode()),
     ["meta.json: 'shards' is not an object"], None),
    ("shard-meta-bad-info", lambda t, m: changed(t, "meta.json", json.dumps(
        {"info": {"channels": "1", "image_size": [4, 4], "classes": None}, "shards": {}}).encode()),
     ["info.channels is '1'"], None),
    ("shard-billion-names", lambda t, m: good_shards(t) and
     {"spec": f"shards:{t}/s/train-{{000000000..999999999}}.tar"},
     ["names 1,000,000,000 shards, more than 100,000"], "classify"),
    ("shard-names-product", lambda t, m: good_shards(t) and {"spec": f"shards:{t}/s/x{{0..999}}-{{0..999}}.tar"},
     ["more than 100,000 shards"], None),
    ("shard-range-down", lambda t, m: good_shards(t) and {"spec": f"shards:{t}/s/train-{{000001..000000}}.tar"},
     ["counts down"], None),
    ("shard-named-twice", lambda t, m: good_shards(t) and {"spec": f"shards:{t}/s::{t}/s/train-000000.tar",
                                                            "val_spec": f"shards:{t}/s"}, ["named twice"], None),
    ("shard-dirs-differ", lambda t, m: two_dirs(t, 8, "join"), ["describe different data"], None),
    ("val-spec-shape-differs", lambda t, m: two_dirs(t, 8, "val"), ["data.val_spec=shards:", "its items are 1x8x8"],
     "classify"),
    # ---- corrupt or hostile shard members
    ("member-corrupt-png", lambda t, m: shard_with(t, [sample(png=GOOD_PNG[:40])]),
     ["train-000000.tar: sample 000000000: unreadable .png member"], None),
    ("member-png-wrong-size", lambda t, m: shard_with(t, [sample(png=_png(Image.new("L", (8, 8))))]),
     ["sample 000000000", "a 8x8 image where the shards are 4x4"], None),
    ("member-png-wrong-mode", lambda t, m: shard_with(t, [sample(png=_png(Image.new("RGB", (4, 4))))]),
     ["sample 000000000: the image is torch.float32 (3, 4, 4), the meta.json says float32 (1, 4, 4)"], None),
    ("member-png-16-bit", lambda t, m: shard_with(t, [sample(png=_png(Image.new("I;16", (4, 4))))]),
     ["mode I;16"], None),
    ("member-png-is-jpeg", lambda t, m: shard_with(
        t, [sample(png=(lambda b: Image.new("L", (4, 4)).save(b, format="JPEG") or b.getvalue())(io.BytesIO()))]),
     ["a JPEG image, not a PNG"], None),
    ("member-label-out-of-range", lambda t, m: shard_with(t, [sample(cls=b"100")]),
     ["sample 000000000: label 100 is not -1 or a class index 0..99"], "classify"),
    ("member-label-negative", lambda t, m: shard_with(t, [sample(cls=b"-7")]), ["label -7"], None),
    ("member-label-not-a-number", lambda t, m: shard_with(t, [sample(cls=b"three")]), ["unreadable .cls member"],
     None),
    ("member-npy-terabytes", lambda t, m: shard_with(t, [{"npy": npy_claiming((1, 4, 10**12)), "cls": b"1"}]),
     ["unreadable .npy member", "claims shape (1, 4, 1000000000000)", "64 bytes follow"], None),
    ("member-npy-object", lambda t, m: shard_with(t, [{"npy": npy_claiming((1,), "|O"), "cls": b"1"}]),
     ["unreadable .npy member"], None),
    ("member-npy-nan", lambda t, m: shard_with(t, [{"npy": _npy(np.full((1, 4, 4), np.nan, np.float32)),
                                                    "cls": b"1"}]), ["values outside [-1, 1]"], None),
    ("member-npy-float64", lambda t, m: shard_with(t, [{"npy": _npy(np.zeros((1, 4, 4))), "cls": b"1"}]),
     ["the image is torch.float64"], None),
    ("member-tar-size-terabyte", lambda t, m: huge_member(t), ["member 000000000.png claims 1,000,000,000,000 bytes"],
     None),
    ("member-twice", lambda t, m: shard_with(t, [sample()]) and _append_member(t / "s" / "train-000000.tar"),
     ["member 000000000.cls appears twice"], None),
    ("member-no-pixels", lambda t, m: shard_with(t, [{"cls": b"1"}]), ["no .png or .npy member"], None),
    ("member-json-deep", lambda t, m: shard_with(t, [sample(**{"x.json": b"[" * 100_000})]),
     ["unreadable .x.json member (RecursionError"], None),
    # ---- COCO
    ("coco-bbox-nan", lambda t, m: coco(t, bbox([1, 1, float("nan"), 4])), ["annotation #0 (id 7)", "4 finite numbers"],
     "detect"),
    ("coco-bbox-inf", lambda t, m: coco(t, bbox([1, 1, float("inf"), 4])), ["annotation #0 (id 7)", "finite"], None),
    ("coco-bbox-bool", lambda t, m: coco(t, bbox([True, 1, 4, 4])), ["annotation #0 (id 7): bbox [True, 1, 4, 4]"],
     None),
    ("coco-bbox-string", lambda t, m: coco(t, bbox(["1", 1, 4, 4])), ["annotation #0 (id 7): bbox ['1', 1, 4, 4]"],
     None),
    ("coco-bbox-out-of-json-image", lambda t, m: coco(t, bbox([8, 8, 5, 5])), ["lies outside its 10x10 image"], None),
    ("coco-image-id-list", lambda t, m: coco(t, ann(image_id=[1])), ["image_id [1] is not an integer"], "detect"),
    ("coco-iscrowd-string", lambda t, m: coco(t, ann(iscrowd="yes")), ["iscrowd 'yes' is not 0 or 1"], None),
    ("coco-area-string", lambda t, m: coco(t, ann(area="big")), ["area 'big'"], None),
    ("coco-annotations-not-list", lambda t, m: coco(t, lambda d: d.update(annotations={"a": 1})),
     ["not a COCO instances file"], None),
    ("coco-width-string", lambda t, m: coco(t, lambda d: d["images"][0].update(width="10")),
     ["image entry", "width '10' is not a positive number"], None),
    ("coco-file-name-number", lambda t, m: coco(t, lambda d: d["images"][0].update(file_name=3)),
     ["file_name 3 is not a file name"], None),
    ("coco-image-id-twice", lambda t, m: coco(t, lambda d: d["images"][1].update(id=1)),
     ["a second image with id 1"], None),
    ("coco-category-id-string", lambda t, m: coco(t, lambda d: d["categories"][0].update(id="1")),
     ["'id' must be an integer"], None),
    ("coco-category-twice", lambda t, m: coco(t, lambda d: d["categories"].append({"id": 2, "name": "thing"})),
     ["a second category"], None),
    ("coco-json-deep", lambda t, m: coco(t, text="[" * 100_000), ["not valid JSON (RecursionError"], None),
    ("coco-file-smaller-than-json", lambda t, m: coco(t, lambda d: (d["images"][0].update(width=20, height=20),
                                                                    d["annotations"][0].update(bbox=[12, 12, 5, 5]))),
     ["annotation #0 (id 7): bbox [12, 12, 5, 5] lies outside its 10x10 image", "a.png"], None),
    # ---- IDX
    ("idx-negative-label", lambda t, m: idx(t, y=np.array([0, 1, -1, 2, 0, 1], np.int8)),
     ["train-labels-idx1-ubyte: negative label -1"], "classify"),
    ("idx-no-images", lambda t, m: idx(t, x=np.zeros((0, 8, 8), np.uint8)), ["holds no images"], None),
    ("idx-zero-size", lambda t, m: idx(t, x=np.zeros((6, 0, 8), np.uint8)), ["images of zero size"], None),
    ("idx-header-overflow", lambda t, m: idx(t, raw_x=idx_bytes(np.zeros(8, np.uint8), shape=(2**31 - 1,) * 3)),
     ["train-images-idx3-ubyte: truncated IDX data", "needs 9,903,520,300,447,984,150,353,281,023 bytes"], "classify"),
    ("idx-gzip-claims-too-much", lambda t, m: idx(t, raw_x=idx_bytes(np.zeros(8, np.uint8), shape=(10**6, 99, 99)),
                                                  gz=True), ["more than a", "gzip can hold"], None),
    ("idx-trailing-bytes", lambda t, m: idx(t, raw_x=idx_bytes(np.zeros((6, 8, 8), np.uint8)) + b"x" * 10),
     ["10 bytes follow the data its header describes"], None),
    ("idx-two-billion-classes", lambda t, m: idx(t, y=np.array([0, 1, 2, 3, 4, 2_000_000_000], ">i4")),
     ["label 2000000000: at most 100,000 classes"], "classify"),
    ("idx-label-not-whole", lambda t, m: idx(t, y=np.array([0, 1, 2, 3, 4, 1.5], ">f4")), ["label 1.5"], None),
    ("idx-pixels-nan", lambda t, m: idx(t, x=np.full((6, 8, 8), np.nan, ">f4")), ["NaN or infinite"], None),
    ("idx-test-label-beyond-train", lambda t, m: idx(t, tx=np.zeros((2, 8, 8), np.uint8),
                                                     ty=np.array([0, 9], np.uint8)),
     ["t10k-labels-idx1-ubyte: label 9, but the training labels have 6 classes"], "classify"),
    ("idx-test-size-differs", lambda t, m: idx(t, tx=np.zeros((2, 5, 5), np.uint8)),
     ["t10k-images-idx3-ubyte: images are 1x5x5, the training images 1x8x8"], None),
    ("idx-test-without-labels", lambda t, m: idx(t, tx=np.zeros((2, 8, 8), np.uint8), ty=False),
     ["have a labels file and", "do not"], None),
    # ---- images
    ("image-bomb-error", lambda t, m: bomb(t, m, 25), ["x.png", "DecompressionBombError"], "classify"),
    ("image-bomb-warning", lambda t, m: bomb(t, m, 12), ["x.png", "DecompressionBombWarning"], None),
    ("image-lab-mode", lambda t, m: {**folder_with(t, Image.new("LAB", (8, 8)), "x.tif"), "channels": 1},
     ["x.tif: cannot convert the LAB image"], None),
]


def _append_member(path):
    with tarfile.open(path, "a") as tar:
        ti = tarfile.TarInfo("000000000.cls")
        ti.size = 1
        tar.addfile(ti, io.BytesIO(b"4"))
    relist(path.parent, {path.name: 1})
    return {"spec": f"shards:{path.parent}", "val_spec": f"shards:{path.parent}"}


def read_all(fields: dict) -> None:
    """Build the sets and read every item of both."""
    train, val, _ = build_datasets(DataConfig(**fields))
    for ds in (train, val):
        if isinstance(ds, IterableDataset):
            for _ in ds:
                pass
        else:
            for i in range(len(ds)):
                ds[i]


def one_line_error(fn, *needles) -> str:
    with pytest.raises(DataError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


@pytest.mark.parametrize("make,needles", [(m, n) for _, m, n, _ in FAULTS], ids=[r[0] for r in FAULTS])
def test_a_bad_input_is_one_line(tmp_path, monkeypatch, make, needles):
    fields = make(tmp_path, monkeypatch)
    one_line_error(lambda: read_all(fields), *needles)


CLI = [(m, n, task) for _, m, n, task in FAULTS if task]


@pytest.mark.parametrize("make,needles,task", CLI, ids=[r[0] for r in FAULTS if r[3]])
def test_the_cli_says_it_in_one_line(tmp_path, monkeypatch, capsys, make, needles, task):
    fields = make(tmp_path, monkeypatch)
    argv = ["train", task, "--data", fields.pop("spec"), "--steps", "1", "--out", str(tmp_path / "run")]
    for k, v in fields.items():
        argv += ["--set", f"data.{k}={v}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("patchgpt: error: "), err
    assert all(n in lines[0] for n in needles), (needles, lines[0])


# ---------------------------------------------------------------- beyond one line


def test_coco_trusts_the_image_files_size_and_warns_once_per_file(tmp_path, capsys):
    # The JSON says 20x20, the file is 10x10: the box [6, 6, 8, 8] fits the JSON's image but sticks out of
    # the file's by 4 pixels (an error naming the annotation); [2, 2, 8.5, 8.5] sticks out by 0.5 (clipped).
    coco(tmp_path, lambda d: (d["images"][0].update(width=20, height=20),
                              d["annotations"].append({"id": 8, "image_id": 1, "category_id": 1,
                                                       "bbox": [2, 2, 8.5, 8.5]}),
                              d["annotations"][0].update(bbox=[6, 6, 8, 8])))
    ds = CocoDetection(tmp_path / "ann.json", on_error="skip")
    for _ in range(2):
        item = ds[0]
    err = capsys.readouterr().err
    assert err.count("a.png is 10x10, but image id 1") == 1                 # warned once per file
    assert err.count("annotation #0 (id 7)") == 1 and len(ds.info.skipped) == 1   # the bad box: one line, counted
    assert item["meta"]["gt"] == [{"bbox": [2.0, 2.0, 8.0, 8.0], "category_id": 1, "iscrowd": 0, "area": 64.0}]
    assert item["meta"]["width"] == 10 and (item["boxes"] >= 0).all() and (item["boxes"] <= 1).all()


def test_coco_categories_outside_the_checkpoint_are_counted(tmp_path, capsys):
    extra = {"id": 9, "image_id": 2, "category_id": 2, "bbox": [1, 1, 2, 2]}
    coco(tmp_path, lambda d: (d["categories"].append({"id": 2, "name": "other"}), d["annotations"].append(extra)))
    ds = CocoDetection(tmp_path / "ann.json", classes=["thing"])
    assert "ignoring 1 annotation(s) of categories outside the checkpoint's 1 classes" in capsys.readouterr().err
    assert ds.info.classes == ["thing"]


def test_load_pil_refuses_bombs_at_pillows_limit(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("L", (30, 30)).save(p)
    assert load_pil(p).size == (30, 30)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)    # 900 pixels: over the limit (Pillow warns)
    one_line_error(lambda: load_pil(p), "big.png: refused as a possible decompression bomb", "MAX_IMAGE_PIXELS")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400)    # over twice the limit (Pillow raises)
    one_line_error(lambda: load_image(p, 1, 8), "big.png", "DecompressionBombError")


def test_float_images_in_0_1_are_not_turned_black(tmp_path):
    p = tmp_path / "f.tif"
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(p)
    x = load_image(p, 1, 8)
    assert torch.allclose(x, torch.full_like(x, 128 / 127.5 - 1), atol=1e-6)


def test_a_mostly_skipped_batch_is_reported_at_most_once_per_n_batches(capsys):
    SKIPS.reset()
    item = {"image": torch.zeros(1, 2, 2), "label": 0}
    assert collate([item, item, None]) and "warning" not in capsys.readouterr().err   # a third: quiet
    batch = collate([item, None, None])
    assert len(batch["label"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "2 of the 3 items of a batch were skipped as unreadable" in err
    for _ in range(SKIP_WARN_EVERY - 1):
        collate([None, None, item])
    assert capsys.readouterr().err == ""
    assert collate([None, None]) == {}
    assert "2 of the 2 items" in capsys.readouterr().err                 # the next one, N batches later
    SKIPS.reset()


def test_skipping_prints_each_file_once(tmp_path, capsys):
    fields = folder_with(tmp_path, Image.new("RGB", (8, 8)))
    ds = ImageFolder(fields["spec"][len("folder:"):], size=8, on_error="skip")
    (tmp_path / "f" / "a" / "x.png").write_bytes(b"not a png any more")
    for _ in range(3):
        assert ds[0] is None
    err = capsys.readouterr().err
    assert err.count("patchgpt: skipping") == 1 and len(ds.info.skipped) == 1


def test_an_error_in_a_loader_worker_is_still_one_line(tmp_path):
    fields = folder_with(tmp_path, Image.new("RGB", (8, 8)))
    ds = ImageFolder(fields["spec"][len("folder:"):], size=8)
    (tmp_path / "f" / "a" / "x.png").write_bytes(b"not a png any more")   # after the scan: fails in the worker
    msg = one_line_error(lambda: list(train_batches(ds, 2, seed=0, start=0, steps=1, num_workers=1)), "x.png")
    assert msg.startswith(str(tmp_path / "f" / "a" / "x.png")) and "Traceback" not in msg


def test_folder_layouts_that_change_meaning_are_warned(tmp_path, capsys):
    root = tmp_path / "f"
    for cls in ("a", "b", "empty"):
        (root / cls).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "a" / "1.png")
    Image.new("RGB", (8, 8)).save(root / "b" / "1.png")
    ImageFolder(root, size=8)
    assert "class folder(s) empty hold no images" in capsys.readouterr().err
    Image.new("RGB", (8, 8)).save(root / "stray.png")
    ds = ImageFolder(root, size=8)
    assert ds.info.classes is None and "read as unlabeled" in capsys.readouterr().err
