"""Tar shards: `patchgpt shard` writes them exactly (any item field, and shards of the earlier format still read),
``shards:PATTERN`` streams them per rank and worker, resumes mid-stream, and trains exactly as the source data
does."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from patchgpt.cli import main
from patchgpt.config import DataConfig
from patchgpt.data import build_datasets, collate, train_batches
from patchgpt.data.base import DataError, DataInfo, ImageSet, Subset
from patchgpt.data.shards import all_items, expand, find_shards, stream_batches, write_shards
from patchgpt.tasks import load

from .test_cli import write_folder


class Numbered(ImageSet):
    """Item i: an 8-bit grey image of value i and label i, so batches show which items they hold."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.info = DataInfo(channels=1, image_size=(4, 4), classes=[str(i) for i in range(n)])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.full((1, 4, 4), float(i % 256)) / 127.5 - 1.0, "label": i}


def relist(d, counts: dict[str, int], sizes: bool = True) -> None:
    """Make ``d/meta.json`` list these shards with these item counts (and their sizes now, unless `sizes` is
    False: the earlier format), as if `patchgpt shard` had written the files as they are."""
    meta = json.loads((d / "meta.json").read_text())
    meta["shards"] = counts
    meta["bytes"] = {n: (d / n).stat().st_size for n in counts}
    if not sizes:
        del meta["bytes"]
        meta.pop("format", None)
    (d / "meta.json").write_text(json.dumps(meta))


def labels(batches, k: int) -> list[list[int]]:
    return [next(batches)["label"].tolist() for _ in range(k)]


def same(a, b) -> bool:
    """Items (or any values) equal field by field; tensors in dtype and shape too, tuples stay tuples."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def test_shards_hold_the_items_exactly(tmp_path):
    ds = Numbered(10)
    paths = write_shards(ds, tmp_path / "s", per_shard=4)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert tarfile.open(paths[0]).getnames()[:2] == ["000000000.png", "000000000.cls"]  # 8-bit: PNG
    assert not list((tmp_path / "s").glob(".*"))  # no temporary files left
    train, _, info = build_datasets(DataConfig(spec=f"shards:{tmp_path}/s", val_spec=f"shards:{paths[-1]}"))
    assert len(train) == 10 and info.classes == ds.info.classes
    for item, i in zip(train, range(10), strict=True):
        assert same(item, ds[i])
    # Digits have 17 grey levels, not 8-bit ones: stored as float32 .npy, still exact, captions kept.
    src, _, _ = build_datasets(DataConfig(spec="digits"))
    write_shards(src, tmp_path / "d", per_shard=1000)
    items = iter(build_datasets(DataConfig(spec=f"shards:{tmp_path}/d", val_spec="digits"))[0])
    assert tarfile.open(tmp_path / "d" / "train-000000.tar").getnames()[:3] == [f"000000000.{e}" for e in
                                                                                 ("npy", "cls", "txt")]
    for i in range(20):
        a, b = next(items), src[i]
        assert list(a) == ["image", "label", "text"] and same(a, b)


def test_shard_patterns(tmp_path):
    write_shards(Numbered(6), tmp_path, per_shard=2)
    names = lambda spec: [p.name for p in expand(spec)]  # noqa: E731
    assert names(f"{tmp_path}/train-{{000000..000001}}.tar") == ["train-000000.tar", "train-000001.tar"]
    with pytest.raises(DataError, match="nothing matches"):
        expand(f"{tmp_path}/val-*.tar")
    write_shards(Subset(Numbered(6), [0, 1, 2]), tmp_path, per_shard=2, prefix="val")  # one meta.json: same info
    assert names(f"{tmp_path}/train-*.tar") == names(str(tmp_path)) == [f"train-00000{i}.tar" for i in range(3)]
    assert names(f"{tmp_path}/val-*.tar") == ["val-000000.tar", "val-000001.tar"]
    assert names(f"{tmp_path}/train-000002.tar::{tmp_path}/train-{{000000,000001}}.tar")[0] == "train-000002.tar"
    with pytest.raises(DataError, match="hold out"):
        build_datasets(DataConfig(spec=f"shards:{tmp_path}/train-000000.tar"))


def test_streamed_batches_equal_the_sources_unshuffled_across_epochs(tmp_path):
    src = Numbered(23)
    write_shards(src, tmp_path, per_shard=5)
    train, _, _ = build_datasets(DataConfig(spec=f"shards:{tmp_path}", val_spec=f"shards:{tmp_path}"))
    a = labels(stream_batches(train, 4, seed=0, shuffle=False), 12)  # 5 batches an epoch, tails dropped
    b = labels(train_batches(src, 4, 0, 0, 12, shuffle=False), 12)
    assert a == b


def test_streams_split_over_ranks_and_workers_and_resume(tmp_path):
    write_shards(Numbered(40), tmp_path, per_shard=5)  # 8 shards
    train, _, _ = build_datasets(DataConfig(spec=f"shards:{tmp_path}", val_spec=f"shards:{tmp_path}"))
    per_rank = [sum(labels(stream_batches(train, 4, seed=1, rank=r, world=2, buffer=8), 5), []) for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1])  # one epoch: each rank its own shards
    assert sorted(per_rank[0] + per_rank[1]) == list(range(40))
    # Fewer shards than readers: items are strided instead.
    few, _, _ = build_datasets(DataConfig(spec=f"shards:{tmp_path}/train-000000.tar::{tmp_path}/train-000001.tar",
                                          val_spec=f"shards:{tmp_path}"))
    got = [sum(labels(stream_batches(few, 1, seed=1, rank=r, world=4, shuffle=False), 2), []) for r in range(4)]
    assert got == [[0, 4], [1, 5], [2, 6], [3, 7]]
    got = [set(sum(labels(stream_batches(few, 2, seed=1, rank=r, world=2), 2), [])) for r in range(2)]
    assert not got[0] & got[1] and len(got[0] | got[1]) == 8
    # Resume: starting at micro-step k gives the batches k, k+1, ... of a fresh stream (epochs reshuffled).
    for workers in (0, 2):
        full = labels(stream_batches(train, 4, seed=3, num_workers=workers, buffer=6), 25)
        again = labels(stream_batches(train, 4, seed=3, start=13, num_workers=workers, buffer=6), 12)
        assert again == full[13:]
        assert full[:10] != full[10:20]  # epoch 1 is another order


def test_shards_train_exactly_like_their_source(tmp_path, capsys):
    data = write_folder(tmp_path / "imgs", n_per_class=6, size=8)
    shards = tmp_path / "shards"
    assert main(["shard", "--data", f"folder:{data}", "--out", str(shards), "--per-shard", "5",
                 "--set", "data.image_size=8", "--set", "data.val_fraction=0"]) == 0
    assert "shards:" in capsys.readouterr().out
    assert len(list(shards.glob("train-*.tar"))) == 3
    common = ["--model", "nano", "--steps", "5", "--quiet", "--set", "train.batch_size=4", "--set",
              "train.warmup=1", "--set", "data.shuffle=false", "--set", "data.image_size=8", "--set",
              "train.log_every=1", "--set", f"data.val_spec=folder:{data}", "--set", "train.threads=1"]
    assert main(["train", "classify", "--data", f"folder:{data}", "--out", str(tmp_path / "a"), *common]) == 0
    assert main(["train", "classify", "--data", f"shards:{shards}/train-{{000000..000002}}.tar",
                 "--out", str(tmp_path / "b"), *common]) == 0
    rows = [[json.loads(x) for x in (tmp_path / r / "log.jsonl").read_text().splitlines()] for r in "ab"]
    assert [r["loss"] for r in rows[0] if "loss" in r] == [r["loss"] for r in rows[1] if "loss" in r]
    wa, wb = (load(tmp_path / r).state_dict() for r in "ab")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_detection_shards_hold_targets_exactly_and_train(tmp_path, capsys):
    shards = tmp_path / "det"
    assert main(["shard", "--data", "digit-scenes", "--split", "val", "--out", str(shards),
                 "--per-shard", "100"]) == 0
    _, src, _ = build_datasets(DataConfig(spec="digit-scenes"))
    paths = sorted(shards.glob("val-*.tar"))
    assert len(paths) == 5
    assert tarfile.open(paths[0]).getnames()[:6] == [f"000000000.{e}" for e in
                                                     ("npy", "cls", "mask.npy", "boxes.npy", "classes.npy",
                                                      "meta.json")]
    train, val, info = build_datasets(DataConfig(spec=f"shards:{shards}/val-{{000000..000004}}.tar"))
    assert info.boxes and info.max_objects == src.info.max_objects and info.classes == src.info.classes
    for item, i in zip(train, range(400), strict=True):
        assert same(item, src[i])                     # boxes, classes and meta (its tuples too) exactly
    assert len(val) == 100
    out = tmp_path / "run"
    assert main(["train", "detect", "--data", f"shards:{shards}/val-{{000000..000004}}.tar", "--out", str(out),
                 "--model", "nano", "--steps", "3", "--quiet", "--set", "train.batch_size=8",
                 "--set", "train.warmup=1", "--set", "detect.max_objects=4"]) == 0
    assert "AP50" in json.loads((out / "metrics.json").read_text())
    # A damaged member is one line naming the sample and the member.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text((shards / "meta.json").read_text())
    with tarfile.open(paths[0]) as t, tarfile.open(bad / "val-000000.tar", "w") as w:
        for m in t.getmembers()[:6]:                                 # the first sample's members
            data = t.extractfile(m).read()
            if m.name.endswith(".json"):
                data = b"{not json"
                m.size = len(data)
            w.addfile(m, io.BytesIO(data))
    relist(bad, {"val-000000.tar": 1})
    with pytest.raises(DataError, match=r"val-000000.tar: sample 000000000: unreadable \.meta\.json member"):
        next(iter(build_datasets(DataConfig(spec=f"shards:{bad}/val-000000.tar", val_spec="digit-scenes"))[0]))


def legacy_shard(path, items) -> None:
    """A shard as `patchgpt shard` wrote them before fields were generic: {key}.npy, .cls, and .txt or a .json
    detection target (boxes, classes, meta)."""
    with tarfile.open(path, "w") as tar:
        for i, it in enumerate(items):
            buf = io.BytesIO()
            np.save(buf, it["image"].numpy().astype(np.float32), allow_pickle=False)
            members = {"npy": buf.getvalue(), "cls": str(it["label"]).encode()}
            if "boxes" in it:
                members["json"] = json.dumps({"boxes": it["boxes"].tolist(), "classes": it["classes"].tolist(),
                                              "meta": it["meta"]}).encode()
            if "text" in it:
                members["txt"] = it["text"].encode()
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{i:09d}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))


def test_shards_of_the_earlier_format_still_read_exactly(tmp_path):
    for spec in ("digit-scenes", "digits"):
        src = Subset(build_datasets(DataConfig(spec=spec))[1], list(range(30)))
        out = tmp_path / spec
        write_shards(src, out, per_shard=1000)                           # for its meta.json
        legacy_shard(out / "train-000000.tar", [src[i] for i in range(30)])
        relist(out, {"train-000000.tar": 30}, sizes=False)               # a manifest of counts only, as it was
        got = all_items(*find_shards(str(out)))
        new = ("question", "answer", "qtype", "mask", "qa", "refs", "rationale")   # fields gained after the old format
        assert len(got) == 30 and all(same(got[i], {k: v for k, v in src[i].items() if k not in new})
                                      for i in range(30))
    bad = tmp_path / "bad"
    write_shards(Subset(src, [0]), bad)
    legacy_shard(bad / "train-000000.tar", [src[0]])
    with tarfile.open(bad / "train-000000.tar", "a") as tar:
        ti = tarfile.TarInfo("000000001.json")
        ti.size = 9
        tar.addfile(ti, io.BytesIO(b"{not json"))
    relist(bad, {"train-000000.tar": 2}, sizes=False)
    with pytest.raises(DataError, match="000000001: unreadable detection target"):
        list(build_datasets(DataConfig(spec=f"shards:{bad}", val_spec="digits"))[0])


class Quiz(ImageSet):
    """Items with fields no source has: a question, a variable-length mask, a score, a flag, a nested dict."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.info = DataInfo(channels=3, image_size=(4, 4), classes=None)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(3, 4, 4, generator=g) * 2 - 1, "label": -1, "question": f"what is {i}? é",
                "mask": torch.rand(i % 3, 4, generator=g) > 0.5, "score": 0.1 * i, "flag": i % 2 == 0,
                "extra": {"pair": (i, 0.5), "list": [1, [2, (3,)]], "none": None}}


def test_a_new_field_round_trips_through_shards_and_collate_with_no_edit(tmp_path):
    src = Quiz(7)
    write_shards(src, tmp_path, per_shard=4)
    names = tarfile.open(tmp_path / "train-000000.tar").getnames()[:7]
    assert names == [f"000000000.{e}" for e in ("npy", "cls", "question.txt", "mask.npy", "score.json",
                                                 "flag.json", "extra.json")]
    train, _, _ = build_datasets(DataConfig(spec=f"shards:{tmp_path}", val_spec=f"shards:{tmp_path}"))
    got = list(train)
    assert len(got) == 7 and all(same(got[i], src[i]) for i in range(7))
    want = collate([src[i] for i in range(3)])
    assert same(collate(got[:3]), want) and want["mask"].shape == (3, 2, 4) and want["question"][2] == "what is 2? é"
    batch = next(stream_batches(train, 3, seed=0, shuffle=False))   # the DataLoader makes tuples lists
    assert same({k: v for k, v in batch.items() if k != "extra"}, {k: v for k, v in want.items() if k != "extra"})


def test_shard_refuses_bad_args(tmp_path):
    assert main(["shard", "--data", "digits", "--out", str(tmp_path), "--set", "train.lr=1"]) == 2


def test_a_streamed_run_resumes_exactly(tmp_path):
    from patchgpt.train import train

    from .helpers import tiny_config

    src, _, _ = build_datasets(DataConfig(spec="digits"))
    write_shards(src, tmp_path / "s", per_shard=300)
    runs = {}
    for name, until in (("full", None), ("part", 3)):
        cfg = tiny_config("classify", tmp_path / name, steps=6)
        cfg.data.spec, cfg.data.val_spec, cfg.data.shuffle_buffer = f"shards:{tmp_path}/s", "digits", 50
        train(cfg, quiet=True, until=until)
        if until:
            train(cfg, quiet=True, resume=True)
        runs[name] = load(tmp_path / name).state_dict()
    assert all(torch.equal(runs["full"][k], runs["part"][k]) for k in runs["full"])


# ---- one unit: a rewrite replaces only its own shards, and a kill leaves the old set or the new ----------------

class Tagged(ImageSet):
    """Item i: a 4x4 grey image and label `offset` + i among 100 classes; raises `Killed` at item `kill_at`."""

    def __init__(self, n: int, offset: int = 0, size: int = 4, kill_at: int = -1) -> None:
        self.n, self.offset, self.kill_at = n, offset, kill_at
        self.info = DataInfo(channels=1, image_size=(size, size), classes=[f"c{i}" for i in range(100)])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if i == self.kill_at:
            raise Killed
        return {"image": torch.full((1, *self.info.image_size), float(i)) / 127.5 - 1.0, "label": self.offset + i}


class Killed(BaseException):
    """Stands for SIGKILL: no ``except Exception`` sees it."""


def read_labels(spec: str) -> list[int]:
    """The labels of every item of ``shards:PATTERN``, in order."""
    return [item["label"] for item in all_items(*find_shards(spec.removeprefix("shards:")))]


def one_line(capsys, argv: list[str], *needles) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and err.startswith("patchgpt: error: "), err
    assert all(n in err for n in needles), err


def test_a_rewrite_replaces_only_the_shards_it_wrote(tmp_path, capsys):
    d = tmp_path / "s"
    shard = ["shard", "--data", "digits", "--out", str(d), "--per-shard", "400", "--set", "data.val_fraction=0"]
    assert main(shard) == 0 and len(read_labels(f"shards:{d}")) == 1797
    foreign = d / "train-000099.tar"
    foreign.write_bytes(b"someone else's")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    one_line(capsys, shard, "train-000099.tar: not a shard listed in", "nothing was changed")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before            # nothing deleted, nothing written
    foreign.unlink()
    with open(d / "train-000001.tar", "ab") as f:                             # a listed shard, changed since
        f.write(b"\0" * 512)
    one_line(capsys, shard, "train-000001.tar: changed since `patchgpt shard` wrote it")
    bare = tmp_path / "bare"                                                  # shard files, and no meta.json
    bare.mkdir()
    (bare / "train-000000.tar").write_bytes(b"x")
    one_line(capsys, ["shard", "--data", "digits", "--out", str(bare)], "train-000000.tar: not a shard listed in")
    assert (bare / "train-000000.tar").read_bytes() == b"x"


def test_one_meta_json_describes_both_splits_so_they_must_agree(tmp_path):
    d = tmp_path / "s"
    write_shards(Tagged(6), d, per_shard=4)
    with pytest.raises(DataError, match=r"its train shards hold other data \(1x4x4, 100 classes\) than these "
                                         r"\(1x8x8, 100 classes\)"):
        write_shards(Tagged(3, size=8), d, prefix="val")
    write_shards(Tagged(3, offset=20), d, per_shard=2, prefix="val")        # the same data: fine
    with pytest.raises(DataError, match="no items to write"):
        write_shards(Subset(Tagged(3), []), d, prefix="val")
    assert read_labels(f"shards:{d}") == list(range(6)) and read_labels(f"shards:{d}/val-*.tar") == [20, 21, 22]
    assert not list(d.glob(".*"))


def test_a_rewrite_killed_at_any_step_leaves_the_old_set_or_the_new(tmp_path, monkeypatch):
    """Kill (an exception no cleanup sees) at every file operation of a rewrite, and while it writes items: the
    set then reads as the old one or the new one, whole, by directory or glob; the next write completes."""
    import os
    import shutil

    real = {"replace": os.replace, "unlink": os.unlink}
    old = list(range(10))
    for new, per in (((50, 7), 2), ((80, 3), 4)):            # more shards than the old set, then fewer
        want_new = list(range(new[0], new[0] + new[1]))
        outcomes = set()
        for k in range(1, 40):
            d = tmp_path / f"s{new[0]}-{k}"
            write_shards(Tagged(10), d, per_shard=4)
            write_shards(Tagged(4, offset=90), d, per_shard=4, prefix="val")   # the other split: untouched
            ops = [0]

            def op(name, *a, _k=k, _ops=ops, **kw):
                _ops[0] += 1
                if _ops[0] == _k:
                    raise Killed
                return real[name](*a, **kw)

            monkeypatch.setattr(os, "replace", lambda *a, **kw: op("replace", *a, **kw))
            monkeypatch.setattr(os, "unlink", lambda *a, **kw: op("unlink", *a, **kw))
            try:
                write_shards(Tagged(new[1], offset=new[0], kill_at=k if k < new[1] else -1), d, per_shard=per)
                done = True
            except Killed:
                done = False
            monkeypatch.setattr(os, "replace", real["replace"])
            monkeypatch.setattr(os, "unlink", real["unlink"])
            got = {read_labels(f"shards:{d}") == read_labels(f"shards:{d}/train-*.tar")}
            labels = read_labels(f"shards:{d}")
            assert got == {True} and labels in (old, want_new), (k, labels)
            assert read_labels(f"shards:{d}/val-*.tar") == [90, 91, 92, 93]
            outcomes.add(tuple(labels))
            write_shards(Tagged(new[1], offset=new[0]), d, per_shard=per)     # the next write finishes the job
            assert read_labels(f"shards:{d}") == want_new and not list(d.glob(".*"))
            shutil.rmtree(d)
            if done:
                break
        assert done and outcomes == {tuple(old), tuple(want_new)}


KILL_SCRIPT = """
import os, signal, sys
import torch
from patchgpt.data.base import DataInfo, ImageSet
from patchgpt.data.shards import write_shards

class Tagged(ImageSet):
    def __init__(self, n, offset, kill_at):
        self.n, self.offset, self.kill_at = n, offset, kill_at
        self.info = DataInfo(channels=1, image_size=(4, 4), classes=[f"c{i}" for i in range(100)])
    def __len__(self):
        return self.n
    def __getitem__(self, i):
        if i == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return {"image": torch.full((1, 4, 4), float(i)) / 127.5 - 1.0, "label": self.offset + i}

out, where, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if where == "replace":   # SIGKILL at the n-th rename: 1 is the commit of meta.json, 2 the first shard's rename
    real, calls = os.replace, [0]
    def replace(*a, **kw):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **kw)
    os.replace = replace
write_shards(Tagged(7, 50, n if where == "item" else -1), out, per_shard=2)
"""


@pytest.mark.parametrize("where,n,outcome", [("item", 5, "old"), ("replace", 3, "new")])
def test_a_sigkilled_rewrite_leaves_the_old_set_or_the_new(tmp_path, where, n, outcome):
    import subprocess
    import sys

    d = tmp_path / "s"
    write_shards(Tagged(10), d, per_shard=4)
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(d), where, str(n)], capture_output=True, text=True)
    assert r.returncode == -9, r.stderr
    assert list(d.glob(".train-*.tar.new"))                          # killed mid-write: staged shards left over
    want = {"old": list(range(10)), "new": list(range(50, 57))}[outcome]
    assert read_labels(f"shards:{d}") == read_labels(f"shards:{d}/train-*.tar") == want
    write_shards(Tagged(7, offset=50), d, per_shard=2)
    assert read_labels(f"shards:{d}") == list(range(50, 57)) and not list(d.glob(".*"))
