"""Restoration: each corruption is a pure function of (seed, step) and of the row, not of the process; PSNR and
SSIM agree with scikit-image on known pairs; the baselines run; the task trains per kind through the CLI and
restores the user's own file at its own size (tiled)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from patchgpt.data.corrupt import KINDS, box_holes, corrupt, free_holes, luminance
from patchgpt.rng import RowRNG
from patchgpt.tasks import load
from patchgpt.tasks.restore import baseline, psnr_ssim

from .helpers import run_cli

skimage = pytest.importorskip("skimage")


def rng(seed: int, first: int = 0, total: int | None = None) -> RowRNG:
    return RowRNG(torch.Generator().manual_seed(seed), first, total)


@pytest.mark.parametrize("kind", KINDS)
def test_corruptions_are_deterministic_per_step_and_row(kind):
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    a, ha = corrupt(x, kind, rng(5), holes="free")
    b, hb = corrupt(x, kind, rng(5), holes="free")
    assert torch.equal(a, b) and (ha is None or torch.equal(ha, hb))
    # two processes holding rows 0-2 and 3-5 of the same global batch draw what one process draws
    top, _ = corrupt(x[:3], kind, rng(5, 0, 6), holes="free")
    bottom, _ = corrupt(x[3:], kind, rng(5, 3, 6), holes="free")
    assert torch.equal(torch.cat([top, bottom]), a)
    if kind in ("denoise", "inpaint"):
        assert not torch.equal(corrupt(x, kind, rng(6), holes="free")[0], a)     # another step, other draws


def test_what_each_corruption_does():
    x = torch.rand(64, 3, 32, 32) * 2 - 1
    noisy, _ = corrupt(x, "denoise", rng(0), sigma=0.05)
    assert abs(float((noisy - x).std()) - 0.1) < 0.01                         # 2 * sigma in [-1, 1]
    holes = box_holes(64, 32, 32, rng(0))[:, 0]
    rows, cols = holes.any(2).sum(1), holes.any(1).sum(1)
    assert rows.min() >= 8 and rows.max() <= 16 and cols.min() >= 8 and cols.max() <= 16
    assert torch.equal(holes.sum((1, 2)), rows * cols)                       # rectangles
    free = free_holes(8, 32, 32, rng(0))
    assert free.any((1, 2, 3)).all() and free.float().mean() < 0.6
    filled, h = corrupt(x, "inpaint", rng(1))
    assert (filled.masked_select(h) == 0).all() and torch.equal(filled.masked_select(~h), x.masked_select(~h))
    sr, _ = corrupt(x, "superres", rng(0), factor=4)
    small = F.interpolate(x, size=(8, 8), mode="area")
    assert torch.allclose(sr, F.interpolate(small, size=(32, 32), mode="bicubic").clamp(-1, 1))
    grey = luminance(x)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])


def test_psnr_and_ssim_agree_with_scikit_image_on_known_pairs():
    from skimage.metrics import structural_similarity

    a = np.full((16, 16, 1), 0.5)
    assert psnr_ssim(a + 0.1, a)[0] == pytest.approx(20.0)                   # MSE 0.01 -> 20 dB
    assert psnr_ssim(a + 0.01, a)[0] == pytest.approx(40.0)
    x = np.random.default_rng(0).random((20, 24, 3))
    y = np.clip(x + np.random.default_rng(1).normal(0, 0.1, x.shape), 0, 1)
    p, s = psnr_ssim(y, x)
    assert p == pytest.approx(10 * np.log10(1 / np.mean((x - y) ** 2)))
    assert s == pytest.approx(structural_similarity(x, y, data_range=1.0, channel_axis=-1))
    assert psnr_ssim(x, x)[1] == pytest.approx(1.0)
    assert 0 < psnr_ssim(np.zeros((5, 5, 1)) + 0.2, np.zeros((5, 5, 1)))[1] <= 1     # tiny images: smaller window


def test_the_classical_baselines_improve_on_the_corruption():
    x = torch.zeros(2, 1, 32, 32) - 1
    x[:, :, 8:24, 8:24] = 1                                                  # a white square on black
    noisy, _ = corrupt(x, "denoise", rng(0), sigma=0.1)
    holes = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    holes[:, :, 4:12, 4:12] = True
    clean = ((x + 1) / 2).permute(0, 2, 3, 1).numpy()
    for kind, bad, h in (("denoise", noisy, None), ("inpaint", x.masked_fill(holes, 0), holes)):
        fixed = baseline(kind, bad, h, 0.1)
        to_np = lambda t: ((t + 1) / 2).permute(0, 2, 3, 1).numpy()            # noqa: E731
        assert psnr_ssim(to_np(fixed)[0], clean[0])[0] > psnr_ssim(to_np(bad)[0], clean[0])[0], kind


def colour_folder(root):
    root.mkdir()
    g = np.random.default_rng(0)
    for i in range(12):
        a = np.zeros((16, 16, 3), dtype=np.uint8)
        a[..., i % 3] = 200
        a[g.integers(0, 8):, :8] = g.integers(0, 255, 3)
        Image.fromarray(a).save(root / f"im{i}.png")
    return root


@pytest.mark.parametrize("kind", KINDS)
def test_restore_trains_and_restores_a_users_file_at_its_size(tmp_path, capsys, kind):
    data = "digit-scenes" if kind != "colorize" else f"folder:{colour_folder(tmp_path / 'photos')}"
    size = "32" if kind != "colorize" else "16"
    code, _, err = run_cli(capsys, "train", "restore", "--data", data, "--model", "nano", "--steps", "2", "--quiet",
                           "--out", str(tmp_path / "run"), "--set", f"restore.kind={kind}", "--set",
                           f"data.image_size={size}", "--set", "tokenizer.patch_size=4", "--set",
                           "train.batch_size=4", "--set", "restore.holes=free")
    assert code == 0, err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"psnr", "ssim", "psnr_input", "psnr_baseline", "ssim_baseline"} <= set(m)
    assert (tmp_path / "run" / "restored.png").exists()
    user = tmp_path / "user.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 50, 3), dtype=np.uint8)).save(user)
    args = ["predict", str(tmp_path / "run"), str(user), "--out", str(tmp_path / "clean.png")]
    if kind == "inpaint":
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and "--mask" in err and "\n" not in err.strip()
        hole = np.zeros((37, 50), dtype=np.uint8)
        hole[10:20, 10:30] = 255
        Image.fromarray(hole).save(tmp_path / "hole.png")
        args += ["--mask", str(tmp_path / "hole.png")]
    code, out, err = run_cli(capsys, *args)
    assert code == 0, err
    factor = 2 if kind == "superres" else 1
    assert Image.open(tmp_path / "clean.png").size == (50 * factor, 37 * factor)
    assert json.loads(out)[0]["size"] == [50 * factor, 37 * factor]
    assert load(tmp_path / "run").name == "restore"


def test_colourising_grey_data_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "train", "restore", "--data", "digits", "--model", "nano", "--steps", "1",
                           "--quiet", "--out", str(tmp_path / "r"), "--set", "restore.kind=colorize")
    assert code == 2 and "needs colour images" in err
    code, _, err = run_cli(capsys, "train", "restore", "--model", "nano", "--steps", "1", "--quiet", "--out",
                           str(tmp_path / "s"), "--set", "restore.kind=sharpen")
    assert code == 2 and "restore.kind" in err
