"""Recipe files: ``train --config recipe.toml`` holds a whole run, flags and --set override it, a run's own
config.json is itself a recipe, and bad files or keys are one line."""

import json

import pytest

from patchgpt.config import ConfigError, apply_recipe, read_recipe
from patchgpt.tasks import default_config

from .helpers import run_cli

RECIPE = """
task = "classify"
size = "nano"

[data]
spec = "digits"
augment = false

[train]
steps = 2
batch_size = 16
lr = 3e-4
eval_every = 0

[classify]
mode = "attentive"
"""


def test_a_toml_recipe_trains_and_its_config_json_is_a_recipe_too(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--config", str(recipe), "--out", str(run), "--quiet",
                           "--set", "train.seed=3")
    assert code == 0, err
    saved = json.loads((run / "config.json").read_text())
    assert saved["task"] == "classify" and saved["size"] == "nano" and saved["train"]["lr"] == 3e-4
    assert saved["classify"]["mode"] == "attentive" and saved["data"]["augment"] is False
    assert saved["train"]["seed"] == 3                                  # --set overrides the file
    again = tmp_path / "again"
    code, _, err = run_cli(capsys, "train", "--config", str(run / "config.json"), "--out", str(again), "--quiet")
    assert code == 0, err
    redo = json.loads((again / "config.json").read_text())
    assert {k: v for k, v in redo.items() if k != "out"} == {k: v for k, v in saved.items() if k != "out"}


@pytest.mark.parametrize("text, msg", [
    ('[train]\nstepz = 3\n', "unknown key 'stepz'"),
    ('[train]\nsteps = "many"\n', "expected int"),
    ('[nosuch]\nx = 1\n', "unknown key 'nosuch'"),
    ('colour = "red"\n', "unknown top-level key"),
    ('[train\nsteps = 1', "not valid TOML"),
])
def test_bad_recipes_are_one_line(tmp_path, capsys, text, msg):
    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    code, _, err = run_cli(capsys, "train", "classify", "--config", str(recipe), "--out", str(tmp_path / "o"))
    assert code == 2 and msg in err and str(recipe) in err and len(err.strip().splitlines()) == 1


def test_recipe_errors_name_the_file_and_the_task_must_agree(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text('task = "detect"\n')
    code, _, err = run_cli(capsys, "train", "classify", "--config", str(recipe))
    assert code == 2 and "its task is 'detect'" in err
    code, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "missing.toml"))
    assert code == 2 and "no such file" in err
    (tmp_path / "r.ini").write_text("x")
    with pytest.raises(ConfigError, match=".toml, .json or .yaml"):
        read_recipe(tmp_path / "r.ini")
    cfg = default_config("classify")
    apply_recipe(cfg, {"size": "nano", "train": {"grad_clip": 0.5}})
    assert cfg.size == "nano" and cfg.model.n_layer == 2 and cfg.train.grad_clip == 0.5
