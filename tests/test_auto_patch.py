"""Defaults from the data: the patch size follows the image size unless the user sets it."""

import json

import numpy as np
import pytest
from PIL import Image

from patchgpt import checkpoint
from patchgpt.tokenizers.patches import auto_patch_size
from patchgpt.train import train

from .helpers import tiny_config


@pytest.mark.parametrize("size, patch, tokens", [((8, 8), 2, 16), ((16, 16), 2, 64), ((28, 28), 4, 49),
                                                 ((32, 32), 4, 64), ((64, 64), 8, 64), ((96, 96), 12, 64),
                                                 ((224, 224), 28, 64), ((24, 32), 4, 48), ((29, 29), 1, 841)])
def test_the_patch_size_follows_the_image_size(size, patch, tokens):
    p, why = auto_patch_size(*size)
    assert (p, (size[0] // p) * (size[1] // p)) == (patch, tokens) and f"{tokens} tokens" in why


def test_a_folder_run_records_the_chosen_patch_size_and_set_wins(tmp_path, capsys):
    for c in "ab":
        (tmp_path / "d" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((32, 32, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "d" / c / f"{i}.png")
    cfg = tiny_config("classify", tmp_path / "auto", steps=1)
    cfg.data.spec = f"folder:{tmp_path / 'd'}"
    train(cfg)
    assert "4x4 patches chosen for 32x32 images: 64 tokens" in capsys.readouterr().err
    assert checkpoint.read_meta(tmp_path / "auto")["config"]["tokenizer"]["patch_size"] == 4
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["tokenizer"]["patch_size"] == 4
    cfg = tiny_config("classify", tmp_path / "set", steps=1)
    cfg.data.spec, cfg.tokenizer.patch_size = f"folder:{tmp_path / 'd'}", 8
    train(cfg)
    assert "chosen" not in capsys.readouterr().err
    assert checkpoint.read_meta(tmp_path / "set")["config"]["tokenizer"]["patch_size"] == 8
