"""Layout-first text-to-image (`patchgpt.tasks.layout`): the objects and their class map come before the image,
are labelled and dropped as the data says, sampling draws them from the caption (cached == uncached), and
the whole thing trains, samples and loads back through the CLI."""

import dataclasses
import json

import pytest
import torch

import patchgpt.tasks.generate_image as generate_module
import patchgpt.tasks.layout as layout_module
from patchgpt.cli import main
from patchgpt.config import ConfigError
from patchgpt.data import build_datasets, collate
from patchgpt.data.base import DataError
from patchgpt.sequence import IGNORE
from patchgpt.tasks import Generate, load

from .helpers import tiny_config
from .reference_sampling import uncached


def layout_config(tmp_path, **sets):
    cfg = tiny_config("generate", tmp_path / "g")
    cfg.data.spec, cfg.data.image_size = "digit-scenes", 16
    cfg.tokenizer.n_colors, cfg.generate.text_len, cfg.generate.layout = 4, 40, "auto"
    for k, v in sets.items():
        setattr(cfg.generate, k, v)
    return cfg


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    cfg = layout_config(tmp_path_factory.mktemp("s"))
    train_set, val, info = build_datasets(cfg.data)
    return train_set, collate([val[i] for i in range(6)]), info


def fitted(cfg, scenes) -> Generate:
    train_set, _, info = scenes
    task = Generate(cfg, info)
    task.fit(train_set)
    return task.eval()


def test_the_class_map_names_the_smallest_box_over_each_cell(tmp_path, scenes):
    task = fitted(layout_config(tmp_path), scenes)
    lay = task.layout
    assert lay is not None and task.cfg.generate.layout == "on"           # auto: captions and boxes
    assert lay.grid == (16, 16)
    boxes = [torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.45, 0.45]]), torch.zeros(0, 4)]
    classes = [torch.tensor([3, 7]), torch.zeros(0, dtype=torch.long)]
    m = lay.class_map(boxes, classes, torch.device("cpu")).view(2, 16, 16) - lay.boxes.classes.start
    bg = lay.background - lay.boxes.classes.start
    assert (m[0, :4, :8] == 3).all() and (m[0, 4:7, 4:7] == 7).all()     # the small 7 inside the big 3
    assert (m[0, 8:, :] == bg).all() and (m[0, :, 8:] == bg).all() and (m[1] == bg).all()


def test_the_sequence_is_caption_objects_map_image_and_dropped_rows_have_no_layout(tmp_path, scenes):
    task = fitted(layout_config(tmp_path), scenes)
    _, batch, _ = scenes
    lay, T = task.layout, task.prefix_len
    seq = task.sequence(batch)
    K, N = lay.objects.length, 16 * 16
    assert seq.ids.shape[1] == T + K + N + 1 + N and seq.prefix_len == T
    for r in range(6):
        objs = seq.labels[r, T:T + K]
        boxes, classes = lay.boxes.decode(objs[objs != IGNORE])          # what the objects' labels spell
        keep = batch["classes"][r] >= 0
        assert sorted(classes.tolist()) == sorted(batch["classes"][r][keep].tolist())
        assert (seq.labels[r, T + K:T + K + N] == IGNORE).all()         # the map: input only
        image_pos = seq.pos[r, T + K + N:]                                   # bos, then the N image tokens
        assert torch.equal(seq.pos[r, T + K:T + K + N], image_pos[:-1])      # each cell's class where it is predicted
    cells = seq.ids[:, T + K:T + K + N]
    assert (cells != lay.background).any(1).all()                       # every scene covers some cells
    dropped = task.sequence(batch, drop_all(task))
    assert (dropped.labels[:, T:T + K + N] == IGNORE).all()
    assert (dropped.ids[:, T + K:T + K + N] == lay.background).all()
    assert (dropped.labels[:, T + K + N:] != IGNORE).any()              # the image is still trained


def drop_all(task):
    task.cfg.generate.p_uncond = 1.0
    from patchgpt.rng import RowRNG

    return RowRNG(torch.Generator().manual_seed(0))


def test_sampling_draws_objects_first_and_cached_equals_uncached(tmp_path, scenes):
    task = fitted(layout_config(tmp_path), scenes)
    kw = {"texts": ["a 6 left of a 7", "a 3"], "seed": 3, "cfg_scale": 2.0}
    a = task.sample_images(2, **kw)
    objects = task.last_objects
    assert a.shape == (2, 1, 16, 16) and len(objects) == 2
    assert all(set(o) == {"box", "label"} for row in objects for o in row)
    with uncached(generate_module, layout_module):
        b = task.sample_images(2, **kw)
    assert torch.equal(a, b) and task.last_objects == objects
    with pytest.raises(ValueError, match="prompts"):
        task.sample_images(2)


def test_layout_settings(tmp_path, scenes):
    _, _, info = scenes
    cfg = layout_config(tmp_path, layout="off")
    assert Generate(cfg, info).layout is None and cfg.generate.layout == "off"
    cfg = layout_config(tmp_path, layout="on")
    with pytest.raises(DataError, match="generate.layout=on"):               # captions without boxes
        Generate(cfg, dataclasses.replace(info, boxes=False))
    cfg = layout_config(tmp_path)
    assert Generate(cfg, dataclasses.replace(info, boxes=False)).layout is None and cfg.generate.layout == "off"
    cfg = layout_config(tmp_path, layout="sometimes")
    with pytest.raises(ConfigError, match="generate.layout"):
        Generate(cfg, info)


def test_layout_first_trains_samples_and_loads_through_the_cli(tmp_path):
    run = tmp_path / "t2i"
    assert main(["train", "generate", "--data", "digit-scenes", "--model", "nano", "--steps", "3", "--quiet",
                 "--out", str(run), "--set", "data.image_size=16", "--set", "tokenizer.n_colors=4",
                 "--set", "train.batch_size=8", "--set", "train.eval_every=0", "--set", "generate.text_len=40",
                 "--set", "generate.layout=on"]) == 0
    task = load(run, precision="fp32")
    assert task.layout is not None and task.cfg.generate.layout == "on"      # saved as trained
    assert json.loads((run / "metrics.json").read_text())["bits_per_dim"] > 0
    png = tmp_path / "s.png"
    assert main(["sample", str(run), "--prompt", "a 6 left of a 7", "--n", "2", "--out", str(png)]) == 0
    assert png.exists()
