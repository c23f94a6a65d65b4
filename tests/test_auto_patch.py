"""Defaults from the data: the patch size follows the image size unless the user sets it."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from patchgpt import checkpoint
from patchgpt.config import DataConfig
from patchgpt.data.base import auto_augmentation, resized_crop
from patchgpt.rng import RowRNG
from patchgpt.tasks import task_class
from patchgpt.tokenizers.patches import RECOGNITION_TARGET, TOKEN_TARGET, auto_patch_size
from patchgpt.train import train

from .helpers import tiny_config


@pytest.mark.parametrize("size, patch, tokens", [((8, 8), 2, 16), ((16, 16), 2, 64), ((28, 28), 4, 49),
                                                 ((32, 32), 4, 64), ((64, 64), 8, 64), ((96, 96), 12, 64),
                                                 ((224, 224), 28, 64), ((24, 32), 4, 48), ((29, 29), 1, 841)])
def test_the_patch_size_follows_the_image_size(size, patch, tokens):
    p, why = auto_patch_size(*size)
    assert (p, (size[0] // p) * (size[1] // p)) == (patch, tokens) and f"{tokens} tokens" in why


@pytest.mark.parametrize("size, patch", [((8, 8), 2), ((28, 28), 7), ((32, 32), 8), ((64, 64), 16),
                                         ((96, 96), 16), ((224, 224), 56)])
def test_recognition_on_a_cpu_aims_at_fewer_tokens(size, patch):
    assert auto_patch_size(*size, target=RECOGNITION_TARGET["cpu"])[0] == patch
    cfg = tiny_config("classify", "x")
    cfg.train.device = "cpu"
    assert task_class("classify").token_target(cfg) == RECOGNITION_TARGET["cpu"]
    assert task_class("generate").token_target(cfg) == TOKEN_TARGET
    cfg.train.device = "cuda"
    assert task_class("classify").token_target(cfg) == RECOGNITION_TARGET["gpu"] == 256


def test_a_folder_run_records_the_chosen_patch_size_and_set_wins(tmp_path, capsys):
    for c in "ab":
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "d" / c / f"{i}.png")
    cfg = tiny_config("classify", tmp_path / "auto", steps=1)
    cfg.data.spec = f"folder:{tmp_path / 'd'}"
    train(cfg)
    err = capsys.readouterr().err
    assert "8x8 patches chosen for 32x32 images: 16 tokens" in err
    assert "random resized crops (area >= 0.5) and flips" in err
    meta = checkpoint.read_meta(tmp_path / "auto")["config"]
    assert (meta["tokenizer"]["patch_size"], meta["data"]["crop"], meta["data"]["shift"]) == (8, 0.5, 2)
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["tokenizer"]["patch_size"] == 8
    cfg = tiny_config("classify", tmp_path / "set", steps=1)
    cfg.data.spec, cfg.tokenizer.patch_size = f"folder:{tmp_path / 'd'}", 8
    train(cfg)
    assert "chosen" not in capsys.readouterr().err
    assert checkpoint.read_meta(tmp_path / "set")["config"]["tokenizer"]["patch_size"] == 8


@pytest.mark.parametrize("channels, size, by_size, shift, crop", [
    (1, (8, 8), True, 1, 0.0), (1, (28, 28), True, 2, 0.0), (3, (32, 32), True, 2, 0.5),
    (3, (96, 96), True, 7, 0.5), (3, (16, 16), True, 1, 0.0), (3, (64, 64), False, 1, 0.0)])
def test_augmentation_follows_the_images_and_the_task(channels, size, by_size, shift, crop):
    d = DataConfig()
    note = auto_augmentation(d, channels, size, by_size)
    assert (d.shift, d.crop, d.flip) == (shift, crop, False)
    assert ("crops" in note) == (crop > 0)
    d = DataConfig(shift=0, crop=0.0)
    auto_augmentation(d, channels, size, by_size)     # what the user set stays
    assert (d.shift, d.crop) == (0, 0.0)


def test_resized_crop_keeps_shape_and_flips_half():
    img = torch.arange(8.0).repeat(64, 1, 8, 1)                     # (64, 1, 8, 8): columns 0..7, left to right
    out = resized_crop(img, RowRNG(torch.Generator().manual_seed(0)), min_area=1.0, max_ratio=1.0)
    assert out.shape == img.shape
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, -1]                  # full-area crops: identity or a mirror image
    assert 16 < int(flipped.sum()) < 48
    torch.testing.assert_close(out[~flipped], img[~flipped])
    torch.testing.assert_close(out[flipped], img[flipped].flip(-1))
    small = resized_crop(img, RowRNG(torch.Generator().manual_seed(1)), min_area=0.25)
    assert small.shape == img.shape and float((small - img).abs().max()) > 0
