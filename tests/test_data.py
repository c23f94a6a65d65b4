"""Tests for patchgpt.data: digits, IDX files, image folders, augmentation, items and `collate`, the batch order
and the `DATASETS` registry.

Every file is written inside the test (tmp_path); nothing is downloaded.
"""

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from patchgpt.config import DataConfig
from patchgpt.data import (
    DATASETS,
    DataError,
    DataInfo,
    ImageFolder,
    ImageSet,
    Source,
    augment,
    build_datasets,
    collate,
    load_image,
    read_idx,
    train_batches,
)
from patchgpt.data.base import PAD, batch_len
from patchgpt.rng import RowRNG

# ---------------------------------------------------------------- helpers


def _raises(fn, *needles) -> str:
    """Call `fn`, expect a one-line `DataError` containing every needle; return the message."""
    with pytest.raises(DataError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, (needle, msg)
    return msg


def _idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file for a uint8 array: 0x0000, type 0x08, ndim, big-endian int32 sizes, then the data."""
    assert arr.dtype == np.uint8
    head = b"\x00\x00\x08" + bytes([arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.tobytes()


def _write_idx(path, arr: np.ndarray, gz: bool = False):
    data = _idx_bytes(arr)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def _mnist(n: int, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.RandomState(seed)
    return (rng.randint(0, 256, (n, size, size)).astype(np.uint8),
            (np.arange(n) % 10).astype(np.uint8))


def _write_mnist(root, prefix: str, x, y, gz: bool = False):
    _write_idx(root / f"{prefix}-images-idx3-ubyte", x, gz)
    _write_idx(root / f"{prefix}-labels-idx1-ubyte", y, gz)


def _save(path, im: Image.Image, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, **kw)
    return path


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3)).astype(np.uint8))


def _check_images(t: torch.Tensor, shape):
    assert t.dtype == torch.float32
    assert tuple(t.shape) == tuple(shape)
    assert t.min() >= -1.0 and t.max() <= 1.0


# ---------------------------------------------------------------- digits


def test_digits_split_is_deterministic_and_disjoint():
    train, val, info = build_datasets(DataConfig())
    train2, val2, _ = build_datasets(DataConfig())
    assert train.indices == train2.indices and val.indices == val2.indices
    assert not set(train.indices) & set(val.indices)
    assert len(train) + len(val) == 1797
    assert sorted(train.indices + val.indices) == list(range(1797))
    assert info.channels == 1 and info.image_size == (8, 8) and info.num_classes == 10
    item = train[0]
    assert list(item) == ["image", "label", "text"]
    x, y, caption = item["image"], item["label"], item["text"]
    _check_images(x, (1, 8, 8))
    assert caption.startswith("the digit ") and info.captions
    imgs = train.images()
    _check_images(imgs, (len(train), 1, 8, 8))
    assert imgs.min() == -1.0 and imgs.max() == 1.0
    labels = torch.cat([train.labels(), val.labels()])
    assert labels.min() == 0 and labels.max() == 9 and len(labels.unique()) == 10
    assert isinstance(y, int) and 0 <= y <= 9

    other, _, _ = build_datasets(DataConfig(split_seed=1))
    assert other.indices != train.indices
    assert len(other) == len(train)


# ---------------------------------------------------------------- IDX files


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips(tmp_path, gz):
    x, y = _mnist(7, size=5)
    px = _write_idx(tmp_path / "imgs-idx3-ubyte", x, gz)
    py = _write_idx(tmp_path / "labs-idx1-ubyte", y, gz)
    raw = gzip.decompress(px.read_bytes()) if gz else px.read_bytes()
    assert int.from_bytes(raw[:4], "big") == 0x00000803
    raw = gzip.decompress(py.read_bytes()) if gz else py.read_bytes()
    assert int.from_bytes(raw[:4], "big") == 0x00000801
    rx, ry = read_idx(px), read_idx(py)
    assert rx.dtype == np.uint8 and rx.shape == (7, 5, 5) and np.array_equal(rx, x)
    assert ry.dtype == np.uint8 and ry.shape == (7,) and np.array_equal(ry, y)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_without_test_files_splits_by_val_fraction(tmp_path, gz):
    x, y = _mnist(20)
    _write_mnist(tmp_path, "train", x, y, gz)
    train, val, info = build_datasets(DataConfig(spec=f"idx:{tmp_path}", val_fraction=0.25))
    assert len(train) == 15 and len(val) == 5
    assert not set(train.indices) & set(val.indices)
    assert info.channels == 1 and info.image_size == (28, 28)
    assert info.classes == [str(i) for i in range(10)]
    i = train.indices[0]
    item = train[0]
    assert list(item) == ["image", "label"]
    img, label = item["image"], item["label"]
    _check_images(img, (1, 28, 28))
    assert torch.allclose(img[0], torch.from_numpy(x[i]).float() / 255 * 2 - 1)
    assert label == int(y[i])


def test_idx_folder_uses_t10k_files_as_validation(tmp_path):
    x, y = _mnist(12)
    xt, yt = _mnist(4, seed=1)
    yt = np.array([3, 1, 4, 1], dtype=np.uint8)
    _write_mnist(tmp_path, "train", x, y, gz=True)
    _write_mnist(tmp_path, "t10k", xt, yt, gz=True)
    train, val, info = build_datasets(DataConfig(spec=f"idx:{tmp_path}", val_fraction=0.5))
    assert len(train) == 12 and len(val) == 4
    assert val.labels().tolist() == [3, 1, 4, 1]
    assert torch.allclose(val[2]["image"][0], torch.from_numpy(xt[2]).float() / 255 * 2 - 1)
    assert info.classes == [str(i) for i in range(10)]


def test_idx_finds_prefixed_names_and_skips_directories(tmp_path):
    # EMNIST-style names ("emnist-digits-train-images-idx3-ubyte") and a folder that shares a file's
    # name (as in some unpacked archives) next to the real "train-images.idx3-ubyte" file.
    x, y = _mnist(6)
    (tmp_path / "a").mkdir()
    _write_mnist(tmp_path / "a", "emnist-digits-train", x, y, gz=True)
    train, val, _ = build_datasets(DataConfig(spec=f"idx:{tmp_path / 'a'}", val_fraction=0.5))
    assert len(train) + len(val) == 6
    (tmp_path / "b" / "train-images-idx3-ubyte").mkdir(parents=True)
    _write_idx(tmp_path / "b" / "train-images.idx3-ubyte", x)
    _write_idx(tmp_path / "b" / "train-labels.idx1-ubyte", y)
    train, val, _ = build_datasets(DataConfig(spec=f"idx:{tmp_path / 'b'}", val_fraction=0.5))
    assert len(train) + len(val) == 6


def test_idx_truncated_files_raise(tmp_path):
    x, _ = _mnist(3)
    data = _idx_bytes(x)
    p = tmp_path / "cut-idx3-ubyte"
    p.write_bytes(data[: len(data) // 2])
    _raises(lambda: read_idx(p), p, "truncated")
    p.write_bytes(data[:10])                       # inside the header
    _raises(lambda: read_idx(p), p, "truncated")
    pgz = tmp_path / "cut-idx3-ubyte.gz"
    gz = gzip.compress(data)
    pgz.write_bytes(gz[: len(gz) // 2])
    _raises(lambda: read_idx(pgz), pgz)
    pgz.write_bytes(gz[:10] + b"\xff" * 40 + gz[-8:])   # a corrupt deflate stream (zlib.error)
    _raises(lambda: read_idx(pgz), pgz)
    _raises(lambda: read_idx(tmp_path / "missing-idx3-ubyte"), tmp_path / "missing-idx3-ubyte")


def test_idx_bad_magic_raises(tmp_path):
    x, y = _mnist(3)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(b"\x12\x34\x08\x03" + _idx_bytes(x)[4:])
    _raises(lambda: read_idx(p), p, "magic")
    p.write_bytes(b"\x00\x00\x42\x03" + _idx_bytes(x)[4:])    # unknown type byte
    _raises(lambda: read_idx(p), p, "magic")
    _write_idx(tmp_path / "train-labels-idx1-ubyte", y)
    _raises(lambda: build_datasets(DataConfig(spec=f"idx:{tmp_path}")), p)


def test_idx_label_count_mismatch_raises(tmp_path):
    x, y = _mnist(10)
    _write_mnist(tmp_path, "train", x, y[:9])
    _raises(lambda: build_datasets(DataConfig(spec=f"idx:{tmp_path}")), "train-labels-idx1-ubyte", "9", "10")


def test_idx_missing_folder_or_train_files_raise(tmp_path):
    _raises(lambda: build_datasets(DataConfig(spec=f"idx:{tmp_path / 'nope'}")), tmp_path / "nope")
    _raises(lambda: build_datasets(DataConfig(spec=f"idx:{tmp_path}")), tmp_path)


def test_idx_resize_and_channels(tmp_path):
    x, y = _mnist(8)
    x[:] = 255                                      # white images stay white after resizing
    _write_mnist(tmp_path, "train", x, y)
    cfg = DataConfig(spec=f"idx:{tmp_path}", image_size=16, channels=3, val_fraction=0.25)
    train, val, info = build_datasets(cfg)
    assert info.channels == 3 and info.image_size == (16, 16)
    imgs = train.images()
    _check_images(imgs, (6, 3, 16, 16))
    assert torch.allclose(imgs, torch.ones_like(imgs))
    _check_images(val[0]["image"], (3, 16, 16))
    x2, _ = _mnist(8, seed=3)
    _write_mnist(tmp_path, "train", x2, y)
    img = build_datasets(cfg)[0][0]["image"]
    assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])   # gray expanded to 3 channels
    _raises(lambda: build_datasets(DataConfig(spec=f"idx:{tmp_path}", image_size=16, resize="pad")), "pad")


# ---------------------------------------------------------------- image folders


def test_folder_one_subfolder_per_class(tmp_path):
    for k, cls in enumerate(["cat", "ant", "bee"]):
        for j in range(2):
            _save(tmp_path / cls / f"{j}.png", _rgb(10 + j, 12, seed=10 * k + j))
    (tmp_path / ".hidden").mkdir()
    train, val, info = build_datasets(DataConfig(spec=f"folder:{tmp_path}", image_size=8, val_fraction=0.0))
    assert info.classes == ["ant", "bee", "cat"] and info.num_classes == 3
    assert info.channels == 3 and info.image_size == (8, 8)
    assert len(train) == 6 and len(val) == 0
    ds = train.base
    for (path, label), item in zip(ds.files, (train[i] for i in range(len(train))), strict=True):
        assert info.classes[label] == path.parent.name and item["label"] == label
        _check_images(item["image"], (3, 8, 8))
    assert sorted(train.labels().tolist()) == [0, 0, 1, 1, 2, 2]


def test_flat_folder_is_unlabeled(tmp_path):
    for j in range(3):
        _save(tmp_path / f"{j}.png", _rgb(9, 9, seed=j))
    train, val, info = build_datasets(DataConfig(spec=f"folder:{tmp_path}", image_size=9, val_fraction=0.34))
    assert info.classes is None and info.num_classes == 0
    assert len(train) == 2 and len(val) == 1
    assert train.labels().tolist() == [-1, -1] and val.labels().tolist() == [-1]
    assert train[0]["label"] == -1


def _mixed_images(root):
    """One image of each mode, all of different sizes."""
    rgba = np.zeros((15, 21, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :10, 3] = 0                                   # left part fully transparent
    rgba[:, 10:, 3] = 255
    pal = Image.new("P", (13, 9), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal_t = pal.copy()
    return {
        "l.png": (Image.fromarray(np.full((20, 30), 128, np.uint8)), {}),
        "rgb.jpg": (_rgb(17, 40), {"quality": 95}),
        "rgba.png": (Image.fromarray(rgba), {}),
        "p.gif": (pal, {}),
        "pt.png": (pal_t, {"transparency": 1}),
        "g16.png": (Image.fromarray(np.full((11, 7), 65535 // 2, np.uint16)), {}),
        "bw.bmp": (Image.new("1", (5, 8), 1), {}),
    }


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_mixed_modes_and_sizes(tmp_path, channels):
    made = _mixed_images(tmp_path)
    for name, (im, kw) in made.items():
        _save(tmp_path / name, im, **kw)
    train, _, info = build_datasets(DataConfig(spec=f"folder:{tmp_path}", image_size=12, channels=channels,
                                               val_fraction=0.0))
    assert len(train) == len(made) and info.skipped == []
    for i in range(len(train)):
        item = train[i]
        _check_images(item["image"], (channels, 12, 12))
        assert item["label"] == -1
    _check_images(train.images(), (len(made), channels, 12, 12))


def test_load_image_modes_values(tmp_path):
    made = _mixed_images(tmp_path)
    paths = {name: _save(tmp_path / name, im, **kw) for name, (im, kw) in made.items()}
    # RGBA: transparent pixels are composited on white, opaque red stays red
    rgba = load_image(paths["rgba.png"], 3, 21, "pad")             # 21x15 -> 21x21, rows 3..17 the image
    assert torch.allclose(rgba[:, 10, 2], torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(rgba[:, 10, 18], torch.tensor([1.0, -1.0, -1.0]))
    four = load_image(paths["rgba.png"], 4, 21, "pad")
    assert four.shape == (4, 21, 21) and four[3, 10, 2] == -1.0 and four[3, 10, 18] == 1.0
    # palette with a transparent index -> white; without -> the palette colour (green)
    pt = load_image(paths["pt.png"], 3, 9, "crop")
    assert torch.allclose(pt, torch.ones_like(pt))
    p = load_image(paths["p.gif"], 3, 9, "crop")
    assert torch.allclose(p[:, 4, 4], torch.tensor([-1.0, 1.0, -1.0]))
    # grayscale with a transparent value (tRNS) is composited on white too
    lt = _save(tmp_path / "lt.png", Image.fromarray(np.array([[0, 200]], np.uint8)), transparency=0)
    assert torch.allclose(load_image(lt, 1, 2, "stretch")[0, 0, 0], torch.tensor(1.0))
    # 16-bit grayscale at half range is mid-gray, not clipped to white
    g = load_image(paths["g16.png"], 1, 11, "crop")
    assert g.shape == (1, 11, 11) and g.abs().max() < 0.02
    # bilevel white, and plain gray
    assert torch.allclose(load_image(paths["bw.bmp"], 1, 8, "pad")[:, :, 3], torch.ones(1, 8))
    gray = load_image(paths["l.png"], 3, 20, "crop")
    assert torch.allclose(gray, torch.full_like(gray, 128 / 127.5 - 1), atol=1e-6)


def _blocks() -> Image.Image:
    """A 60x20 image: red, green, blue 20x20 blocks from left to right."""
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, :20, 0] = a[:, 20:40, 1] = a[:, 40:, 2] = 255
    return Image.fromarray(a)


def test_resize_policies(tmp_path):
    p = _save(tmp_path / "wide.png", _blocks())
    red, green, blue = (torch.tensor(c, dtype=torch.float32) for c in ([1, -1, -1], [-1, 1, -1], [-1, -1, 1]))
    for policy in ("crop", "stretch", "pad"):
        _check_images(load_image(p, 3, 10, policy), (3, 10, 10))
    crop = load_image(p, 3, 10, "crop")               # 60x20 -> 30x10, centre 10x10: the green block
    inner = crop[:, :, 2:8]                           # (bicubic rings a little at the block edges)
    assert torch.allclose(inner, green[:, None, None].expand_as(inner), atol=0.05)
    assert crop[0].max() < 0 and crop[2].max() < 0    # no red or blue block survives the crop
    stretch = load_image(p, 3, 12, "stretch")                   # 60x20 -> 12x12, all three blocks kept
    assert torch.allclose(stretch[:, 6, 0], red, atol=0.05)
    assert torch.allclose(stretch[:, 6, 6], green, atol=0.05)
    assert torch.allclose(stretch[:, 6, 11], blue, atol=0.05)
    pad = load_image(p, 3, 12, "pad")                           # 60x20 -> 12x4 pasted at rows 4..7
    assert torch.equal(pad[:, :4], torch.full((3, 4, 12), -1.0))
    assert torch.equal(pad[:, 8:], torch.full((3, 4, 12), -1.0))
    assert torch.allclose(pad[:, 5, 0], red, atol=0.1)
    assert torch.allclose(pad[:, 5, 6], green, atol=0.1)
    assert torch.allclose(pad[:, 5, 11], blue, atol=0.1)
    tall = _save(tmp_path / "tall.png", _blocks().transpose(Image.Transpose.ROTATE_90))
    padt = load_image(tall, 1, 12, "pad")                       # bars left and right
    assert torch.equal(padt[:, :, :4], torch.full((1, 12, 4), -1.0))
    assert torch.equal(padt[:, :, 8:], torch.full((1, 12, 4), -1.0))
    _raises(lambda: load_image(p, 3, 10, "squash"), "squash")


def test_folder_empty_or_without_images_raises(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _raises(lambda: build_datasets(DataConfig(spec=f"folder:{empty}")), empty)
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "notes.txt").write_text("hello")
    (docs / "sub" / "data.csv").write_text("1,2")
    _raises(lambda: build_datasets(DataConfig(spec=f"folder:{docs}")), docs)
    _raises(lambda: build_datasets(DataConfig(spec=f"folder:{tmp_path / 'nope'}")), tmp_path / "nope")


def _write_corrupt(path, kind: str):
    if kind == "random":
        path.write_bytes(np.random.RandomState(0).bytes(300))
    else:
        fmt = "PNG" if path.suffix == ".png" else "JPEG"
        _save(path, _rgb(40, 40), format=fmt)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("kind", ["random", "truncated"])
def test_folder_corrupt_file_stop_and_skip(tmp_path, kind):
    for j in range(3):
        _save(tmp_path / "a" / f"{j}.png", _rgb(8, 8, seed=j))
    _save(tmp_path / "b" / "ok.png", _rgb(8, 8, seed=9))
    bad = tmp_path / "b" / "x.png"
    _write_corrupt(bad, kind)
    msg = _raises(lambda: build_datasets(DataConfig(spec=f"folder:{tmp_path}", image_size=8)), bad)
    assert "on_error" in msg
    train, val, info = build_datasets(DataConfig(spec=f"folder:{tmp_path}", image_size=8, on_error="skip",
                                                 val_fraction=0.0))
    assert len(info.skipped) == 1 and str(bad) in info.skipped[0] and "\n" not in info.skipped[0]
    assert len(train) == 4 and info.classes == ["a", "b"]
    assert all(p != bad for p, _ in train.base.files)
    _check_images(train.images(), (4, 3, 8, 8))


def test_folder_file_failing_at_decode_time(tmp_path):
    # A truncated JPEG passes Pillow's scan-time verify() and only fails when decoded.
    for j in range(3):
        _save(tmp_path / f"{j}.png", _rgb(8, 8, seed=j))
    bad = tmp_path / "z.jpg"
    _write_corrupt(bad, "truncated")
    ds = ImageFolder(tmp_path, channels=3, size=8, on_error="stop")
    assert len(ds) == 4
    _raises(lambda: ds[3], bad)
    ds = ImageFolder(tmp_path, channels=3, size=8, on_error="skip")
    assert ds[3] is None
    assert len(ds.info.skipped) == 1 and str(bad) in ds.info.skipped[0]
    _check_images(ds.images(), (3, 3, 8, 8))
    batches = list(train_batches(ds, 4, seed=0, start=0, steps=1))
    _check_images(batches[0]["image"], (3, 3, 8, 8))
    assert len(ds.info.skipped) == 1


def test_load_image_missing_or_corrupt_raises(tmp_path):
    missing = tmp_path / "missing.png"
    _raises(lambda: load_image(missing, 3, 8), missing)
    bad = tmp_path / "bad.png"
    _write_corrupt(bad, "random")
    _raises(lambda: load_image(bad, 3, 8), bad)
    half = tmp_path / "half.png"
    _write_corrupt(half, "truncated")
    _raises(lambda: load_image(half, 3, 8), half)
    _raises(lambda: load_image(tmp_path, 3, 8), tmp_path)      # a directory


# ---------------------------------------------------------------- augmentation


def test_augment():
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for shift, flip in ((1, False), (2, True), (0, True)):
        a = augment(x, RowRNG(torch.Generator().manual_seed(7)), shift=shift, flip=flip)
        b = augment(x, RowRNG(torch.Generator().manual_seed(7)), shift=shift, flip=flip)
        assert a.shape == x.shape and torch.equal(a, b)
    assert torch.equal(augment(x, RowRNG(torch.Generator().manual_seed(7)), shift=0, flip=False), x)
    f = augment(x, RowRNG(torch.Generator().manual_seed(3)), shift=0, flip=True)
    for i in range(len(x)):
        assert torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(-1))
    s = augment(x, RowRNG(torch.Generator().manual_seed(3)), shift=2, flip=False)
    assert not torch.equal(s, x)
    assert s.min() >= x.min() and s.max() <= x.max()       # edge replication invents no values
    # two processes holding halves of the global batch get exactly the whole batch's augmentation
    whole = augment(x, RowRNG(torch.Generator().manual_seed(5), 0, 6), shift=2, flip=True)
    halves = [augment(x[i:i + 3], RowRNG(torch.Generator().manual_seed(5), i, 6), shift=2, flip=True) for i in (0, 3)]
    assert torch.equal(torch.cat(halves), whole)


# ---------------------------------------------------------------- items and collate


def _same(a, b) -> bool:
    """Equal values, tensors equal in dtype and shape too."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def test_collate_stacks_pads_and_lists_by_key():
    boxes = [torch.rand(2, 4), torch.rand(0, 4), torch.rand(3, 4)]
    items = [{"image": torch.full((1, 2, 2), float(i)), "label": i, "text": f"t{i}", "boxes": b,
              "classes": torch.arange(len(b)), "meta": {"i": i}} for i, b in enumerate(boxes)]
    batch = collate([items[0], None, items[1], items[2]])           # None: a file skipped as unreadable
    assert list(batch) == ["image", "label", "text", "boxes", "classes", "meta"]
    assert _same(batch["image"], torch.stack([it["image"] for it in items]))
    assert _same(batch["label"], torch.tensor([0, 1, 2])) and batch_len(batch) == 3
    assert batch["text"] == ["t0", "t1", "t2"] and batch["meta"] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert batch["boxes"].shape == (3, 3, 4) and batch["classes"].shape == (3, 3) and PAD["classes"] == -1
    assert _same(batch["classes"], torch.tensor([[0, 1, -1], [-1, -1, -1], [0, 1, 2]]))
    for b, bx in enumerate(boxes):
        assert torch.equal(batch["boxes"][b, :len(bx)], bx) and not batch["boxes"][b, len(bx):].any()
    # Images without objects still get one (padding) slot, as equal-length boxes are simply stacked.
    empty = collate([items[1], items[1]])
    assert empty["boxes"].shape == (2, 1, 4) and empty["classes"].tolist() == [[-1], [-1]]
    assert collate([items[0], items[0]])["classes"].tolist() == [[0, 1], [0, 1]]
    clips = collate([{"video": torch.zeros(3, 1, 2, 2), "label": 4}])
    assert clips["video"].shape == (1, 3, 1, 2, 2) and clips["label"].dtype == torch.long
    assert collate([None, None]) == {} and batch_len(collate([None])) == 0
    with pytest.raises(DataError, match="different fields"):
        collate([items[0], {"image": items[0]["image"], "label": 0}])


def test_a_new_field_flows_through_collate_with_no_edit():
    items = [{"image": torch.zeros(1, 2, 2), "label": -1, "question": f"how many {i}?", "score": 0.5 * i,
              "mask": torch.ones(i + 1, 2, dtype=torch.bool), "flag": i == 1} for i in range(3)]
    batch = collate(items)
    assert batch["question"] == ["how many 0?", "how many 1?", "how many 2?"]
    assert _same(batch["score"], torch.tensor([0.0, 0.5, 1.0]))
    assert _same(batch["flag"], torch.tensor([False, True, False]))
    assert batch["mask"].shape == (3, 3, 2) and batch["mask"].dtype == torch.bool
    assert batch["mask"].sum(dim=(1, 2)).tolist() == [2, 4, 6]           # padded with False (0) past each length
    with pytest.raises(DataError, match="'grid'"):
        collate([{"grid": torch.zeros(2, 3)}, {"grid": torch.zeros(2, 4)}])


# ---------------------------------------------------------------- batch order


class _Indexed(ImageSet):
    """Image i is filled with the value i and labelled i, so batches reveal their indices."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.info = DataInfo(channels=1, image_size=(2, 2), classes=None)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((1, 2, 2), float(i)), "label": i}


def _order(ds, bs, seed, start, steps) -> list[list[int]]:
    out = []
    for b in train_batches(ds, bs, seed=seed, start=start, steps=steps):
        assert torch.equal(b["image"][:, 0, 0, 0].long(), b["label"])
        out.append(b["label"].tolist())
    return out


def test_train_batches_depend_only_on_seed_and_step():
    ds = _Indexed(12)
    full = _order(ds, 4, seed=5, start=0, steps=9)               # three epochs of three batches
    assert len(full) == 9 and all(len(b) == 4 for b in full)
    assert _order(ds, 4, seed=5, start=4, steps=5) == full[4:]
    assert _order(ds, 4, seed=5, start=7, steps=1) == full[7:8]
    assert _order(ds, 4, seed=5, start=0, steps=9) == full
    for e in range(3):
        epoch = sum(full[3 * e:3 * e + 3], [])
        assert sorted(epoch) == list(range(12))                    # every index once per epoch
    assert full[0:3] != full[3:6]                                  # a fresh permutation each epoch
    assert _order(ds, 4, seed=6, start=0, steps=9) != full
    odd = _order(_Indexed(10), 4, seed=1, start=0, steps=4)        # 2 batches/epoch, 2 dropped
    for e in range(2):
        epoch = sum(odd[2 * e:2 * e + 2], [])
        assert len(set(epoch)) == len(epoch) == 8


def test_train_batches_empty_set_raises():
    _raises(lambda: train_batches(_Indexed(0), 4, seed=0, start=0, steps=1), "empty")


# ---------------------------------------------------------------- specs


@pytest.mark.parametrize("spec", ["foo:bar", "folder:", "idx:", "digits:extra", "mnist"])
def test_unknown_spec_lists_known_specs(spec):
    usages = [s.usage(name) for name, s in DATASETS.items()]
    assert "folder:PATH" in usages and "coco:ANN.json[:IMAGES_DIR]" in usages and "digits" in usages
    msg = _raises(lambda: build_datasets(DataConfig(spec=spec)), repr(spec), *usages)
    assert msg.startswith("unknown data spec")


def test_datasets_registry_builds_through_its_records(monkeypatch):
    import patchgpt

    assert patchgpt.DATASETS is DATASETS
    assert all(isinstance(s, Source) and callable(s.build) and s.help and "\n" not in s.help for s in DATASETS.values())
    assert {n for n, s in DATASETS.items() if s.takes_arg} == {"folder", "idx", "coco", "coco-captions", "vqa",
                                                                "videos", "shards", "masks"}
    calls = []
    fake = Source(lambda cfg, arg, classes: calls.append((arg, classes)) or ("t", "v", "i"), "made up", "WHAT")
    monkeypatch.setitem(DATASETS, "made-up", fake)
    assert build_datasets(DataConfig(spec=" made-up:a:b "), classes=["x"]) == ("t", "v", "i")
    assert calls == [("a:b", ["x"])]
    _raises(lambda: build_datasets(DataConfig(spec="made-up")), "made-up:WHAT (made up)")


def test_error_messages_name_paths_even_with_spaces(tmp_path):
    d = tmp_path / "my photos"
    d.mkdir()
    _raises(lambda: build_datasets(DataConfig(spec=f"folder:{d}")), d)
