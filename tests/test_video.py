"""Video: tubelet round trips, reading clips written with PyAV, moving-digits, the video tasks end to end."""

import json

import numpy as np
import pytest
import torch

from patchgpt.cli import main
from patchgpt.config import DataConfig
from patchgpt.data.base import DataError, collate
from patchgpt.data.moving import DIRECTIONS, STEPS, MovingDigits
from patchgpt.data.specs import build_datasets
from patchgpt.sequence import Vocab
from patchgpt.tokenizers import Tubelets

from .helpers import run_cli, tiny_config

av = pytest.importorskip("av")

# (file name, codec, pixel format): the containers and codecs that PyAV's wheels ship.
FORMATS = [("clip.mp4", "libx264", "yuv420p"), ("clip_mpeg4.mp4", "mpeg4", "yuv420p"),
           ("clip.avi", "mpeg4", "yuv420p"), ("clip.webm", "libvpx", "yuv420p"),
           ("clip.mkv", "libvpx-vp9", "yuv420p"), ("clip.gif", "gif", "rgb8")]


def write_clip(path, codec="libx264", pix_fmt="yuv420p", n=12, size=32, direction=1):
    """A bright vertical bar moving right (direction=1) or left (-1) by 2 px per frame over n frames."""
    c = av.open(str(path), "w")
    s = c.add_stream(codec, rate=10)
    s.width, s.height, s.pix_fmt = size, size, pix_fmt
    for i in range(n):
        a = np.zeros((size, size, 3), np.uint8)
        x = 2 + 2 * i if direction > 0 else size - 6 - 2 * i
        a[:, x:x + 4] = 255
        for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


# ---- tubelets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("F,C,H,W,T,P", [(8, 1, 16, 16, 2, 4), (4, 3, 8, 12, 1, 4), (6, 2, 6, 6, 3, 3),
                                         (2, 3, 4, 4, 2, 1)])
def test_tubelet_roundtrip_exact(F, C, H, W, T, P):
    tok = Tubelets(T, P, C, F, (H, W))
    x = torch.randn(3, F, C, H, W)
    p = tok.patchify(x)
    assert p.shape == (3, (F // T) * (H // P) * (W // P), T * P * P * C)
    assert torch.equal(tok.unpatchify(p), x)
    assert torch.equal(tok.decode(tok.encode(x)), x)


def test_tubelet_layout_and_positions():
    v = Vocab()
    tok = Tubelets(2, 2, 1, 4, (4, 4), v)
    x = torch.arange(4 * 16, dtype=torch.float).reshape(1, 4, 1, 4, 4)
    p = tok.patchify(x)
    # Tubelet 1: time slice 0, row 0, col 1; its vector is (frame, row, col): frame 0's 2x2 then frame 1's.
    assert p[0, 1].tolist() == [2, 3, 6, 7, 18, 19, 22, 23]
    assert p[0, 4, 0] == x[0, 2, 0, 0, 0]  # tubelet 4 opens the second time slice (frames 2-3)
    s = tok.encode(x)
    assert (s.ids == v["patch"].start).all() and s.is_patch.all()
    assert s.pos[0, :, 0].tolist() == [1] * 4 + [2] * 4
    assert s.pos[0, :4, 1:].tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]


def test_tubelet_bad_sizes():
    with pytest.raises(ValueError, match="tubelet"):
        Tubelets(3, 2, 1, 8, (4, 4))
    with pytest.raises(ValueError, match="patch_size"):
        Tubelets(2, 3, 1, 8, (4, 4))


# ---- reading videos -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,codec,pix_fmt", FORMATS)
def test_read_video_formats(tmp_path, name, codec, pix_fmt):
    from patchgpt.data.video import frame_count, read_video

    path = write_clip(tmp_path / name, codec, pix_fmt)
    assert frame_count(path) == 12
    clip = read_video(path, frames=4, size=16, channels=3)
    assert clip.shape == (4, 3, 16, 16) and clip.min() >= -1 and clip.max() <= 1
    # Uniform sampling keeps time order: the bar's column moves right.
    cols = clip.mean(dim=(1, 2)).argmax(dim=-1).tolist()                  # (F,)
    assert cols == sorted(cols) and cols[-1] - cols[0] >= 6, cols
    gray = read_video(path, frames=3, size=8, channels=1, stride=2)
    assert gray.shape == (3, 1, 8, 8)


def test_sample_indices():
    from patchgpt.data.video import sample_indices

    assert sample_indices(12, 4) == [1, 4, 7, 10]
    assert sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]
    assert sample_indices(12, 4, stride=3) == [0, 3, 6, 9]
    assert sample_indices(5, 4, stride=2) == [0, 2, 4, 4]


def bad_videos(root):
    """A truncated mp4, a truncated avi, a zero-frame avi, an empty file and a non-video."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("cut.mp4", "cut.avi"):
        data = write_clip(root / f"full_{name}", "mpeg4").read_bytes()
        (root / f"full_{name}").unlink()
        (root / name).write_bytes(data[: len(data) // 2])
    c = av.open(str(root / "zero.avi"), "w")
    s = c.add_stream("mpeg4", rate=10)
    s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    c.start_encoding()  # writes the header; no frame follows
    c.close()
    (root / "empty.mkv").write_bytes(b"")
    (root / "junk.webm").write_bytes(b"not a video" * 10)
    bad = [root / n for n in ("cut.mp4", "cut.avi", "zero.avi", "empty.mkv", "junk.webm")]
    assert all(p.is_file() for p in bad)
    return bad


def test_bad_videos_are_one_line_naming_the_file(tmp_path):
    from patchgpt.data.video import read_video

    for path in bad_videos(tmp_path):
        with pytest.raises(DataError) as e:
            read_video(path, frames=4, size=16)
        msg = str(e.value)
        assert str(path) in msg and "\n" not in msg, msg


def test_video_folder_labels_stop_and_skip(tmp_path, capsys):
    root = tmp_path / "clips"
    for label, d in (("left", -1), ("right", 1)):
        (root / label).mkdir(parents=True)
        for i, (name, codec, fmt) in enumerate(FORMATS[:3]):
            write_clip(root / label / f"{i}_{name}", codec, fmt, n=8, direction=d)
    cfg = DataConfig(spec=f"videos:{root}", image_size=16, frames=4, val_fraction=0.34)
    train, val, info = build_datasets(cfg)
    assert info.classes == ["left", "right"] and info.frames == 4 and (len(train), len(val)) == (4, 2)
    batch = collate([train[i] for i in range(len(train))])
    assert batch["video"].shape == (4, 4, 3, 16, 16) and batch["label"].tolist() == sorted(batch["label"].tolist())
    bad = bad_videos(root / "right")
    with pytest.raises(DataError, match="on_error=skip"):
        build_datasets(cfg)
    cfg.on_error = "skip"
    train, val, info = build_datasets(cfg)
    assert len(train) + len(val) == 6 and len(info.skipped) == len(bad)
    assert "skipped 5 unreadable video(s)" in capsys.readouterr().err


def test_missing_pyav_is_a_one_line_hint(monkeypatch):
    import builtins

    from patchgpt.data.video import import_av

    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "av":
            raise ImportError("no av")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(DataError, match=r"pip install 'patchgpt\[video\]'"):
        import_av()


# ---- moving digits --------------------------------------------------------------------------------------
def test_moving_digits_deterministic_and_first_move_shows_the_label():
    ds = MovingDigits(n=64, frames=6, size=16)
    assert ds.info.classes == DIRECTIONS and ds.info.frames == 6
    x, y = ds[5]["video"], ds[5]["label"]
    assert x.shape == (6, 1, 16, 16) and torch.equal(MovingDigits(n=64, frames=6, size=16)[5]["video"], x)
    grid = torch.arange(16, dtype=torch.float)
    for i in range(64):
        x, y = ds[i]["video"], ds[i]["label"]
        ink = (x[:2, 0] + 1)                                              # (2, S, S) frames 0 and 1
        cy = (ink.sum(2) * grid).sum(1) / ink.sum((1, 2))                 # (2,) centroid rows
        cx = (ink.sum(1) * grid).sum(1) / ink.sum((1, 2))
        assert (torch.sign(cy[1] - cy[0]), torch.sign(cx[1] - cx[0])) == STEPS[y]
    labels = ds.labels()
    assert len(set(labels.tolist())) == 8


@pytest.mark.parametrize("task", ["classify", "pretrain", "generate", "vq"])
def test_image_tasks_refuse_clips(tmp_path, capsys, task):
    code = main(["train", task, "--data", "moving-digits", "--out", str(tmp_path / "a"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "holds clips" in err and len(err.strip().splitlines()) == 1, err


def test_video_tasks_refuse_images(tmp_path, capsys):
    code = main(["train", "video-classify", "--data", "digits", "--out", str(tmp_path / "b"), "--quiet"])
    assert code == 2 and "needs clips" in capsys.readouterr().err


# ---- tasks ----------------------------------------------------------------------------------------------
def test_next_frame_rollout_with_cache_matches_recomputing(tmp_path):
    from patchgpt.sequence import Sequence
    from patchgpt.tasks import VideoPretrain

    cfg = tiny_config("video-pretrain", tmp_path)
    ds = MovingDigits(n=4, frames=6, size=16)
    task = VideoPretrain(cfg, ds.info).eval()
    video = torch.stack([ds[i]["video"] for i in range(2)])
    out = task.predict_frames(video, context=1)                            # (B, F, C, H, W)
    assert out.shape == video.shape and torch.equal(out[:, :2], video[:, :2])
    seq = task.input.encode(video)
    n_ctx, N = task.input.tok.per_slice, seq.ids.shape[1]
    patches = seq.patches[:, :n_ctx]
    with torch.no_grad():
        for j in range(n_ctx, N):
            s = Sequence(ids=seq.ids[:, :j], labels=seq.labels[:, :j], pos=seq.pos[:, :j], patches=patches,
                         is_patch=seq.is_patch[:, :j], prefix_len=n_ctx)
            nxt = task.head(task.backbone(s)[:, -1]).clamp(-1, 1)
            patches = torch.cat([patches, nxt[:, None]], dim=1)
    torch.testing.assert_close(out, task.input.tok.unpatchify(patches), atol=1e-5, rtol=1e-4)




def test_video_classifier_trains_and_predicts_through_the_cli(tmp_path, capsys):
    root = tmp_path / "clips"
    for label, d in (("left", -1), ("right", 1)):
        (root / label).mkdir(parents=True)
        for i in range(6):
            name, codec, fmt = FORMATS[i % 3]
            write_clip(root / label / f"{i}_{name}", codec, fmt, n=8, direction=d)
    run_dir = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "video-classify", "--data", f"videos:{root}", "--model", "nano",
                         "--out", str(run_dir), "--steps", "40", "--quiet", "--set", "data.image_size=16",
                         "--set", "data.frames=4", "--set", "train.batch_size=8", "--set", "train.lr=3e-3",
                         "--set", "train.warmup=2", "--set", "data.val_fraction=0.25", "--set", "data.shift=0")
    assert code == 0, err
    assert "top1" in json.loads(out.strip().splitlines()[-1])
    assert (run_dir / "confusion.png").stat().st_size > 0
    code, out, err = run_cli(capsys, "eval", str(run_dir), "--json")
    assert code == 0, err and json.loads(out)["n"] == 3
    clips = [sorted((root / "left").iterdir())[0], sorted((root / "right").iterdir())[1]]
    code, out, err = run_cli(capsys, "predict", str(run_dir), *map(str, clips))
    assert code == 0, err
    preds = json.loads(out)
    assert [p["video"] for p in preds] == list(map(str, clips))
    assert all(set(p["probs"]) == {"left", "right"} and abs(sum(p["probs"].values()) - 1) < 1e-4 for p in preds)
    assert [p["class"] for p in preds] == ["left", "right"]  # the direction of motion is learnt
    bad = bad_videos(tmp_path / "bad")[0]
    code, out, err = run_cli(capsys, "predict", str(run_dir), str(bad))
    assert code == 2 and str(bad) in err


def test_next_frame_predictor_trains_through_the_cli(tmp_path, capsys):
    pre = tmp_path / "pre"
    code, out, err = run_cli(capsys, "train", "video-pretrain", "--data", "moving-digits", "--model", "nano",
                         "--out", str(pre), "--steps", "6", "--quiet", "--set", "train.batch_size=8",
                         "--set", "data.frames=4")
    assert code == 0, err
    metrics = json.loads((pre / "metrics.json").read_text())
    assert {"val_loss", "next_frames_mse", "repeat_last_frame_mse"} <= set(metrics)
    assert (pre / "next_frames.png").stat().st_size > 0
    code, out, err = run_cli(capsys, "eval", str(pre), "--json")
    assert code == 0 and json.loads(out)["next_frames_mse"] == pytest.approx(metrics["next_frames_mse"]), err
    # The pretrained backbone initialises a video classifier (an attentive probe here).
    code, out, err = run_cli(capsys, "train", "video-classify", "--init", str(pre), "--out", str(tmp_path / "probe"),
                         "--steps", "3", "--quiet", "--set", "classify.mode=attentive", "--set", "data.frames=4",
                         "--set", "train.batch_size=8")
    assert code == 0, err
