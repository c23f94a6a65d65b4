"""Image generation end to end: class/text/unconditional training, sampling, completion, VQ tokens, eval."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import patchgpt
import patchgpt.tasks.generate_image as generate_module
from patchgpt.cli import main
from patchgpt.config import ConfigError
from patchgpt.data import Digits
from patchgpt.tasks import Generate
from patchgpt.train import train

from .helpers import tiny_config
from .reference_sampling import uncached


def gen_config(out, condition="class", steps=3, **kw):
    cfg = tiny_config("generate", out, steps=steps)
    cfg.generate.condition = condition
    cfg.tokenizer.n_colors = 4
    return cfg


def test_generate_sequence_layout(tmp_path):
    ds = Digits()
    task = Generate(gen_config(tmp_path), ds.info)
    task.input.tok.fit(ds.x[:64])
    batch = {"image": ds.x[:2], "label": ds.y[:2]}
    seq = task.sequence(batch)
    # [class] [bos] 64 pixel tokens; labels: the bos and every pixel but the last predict the next pixel.
    assert seq.ids.shape == (2, 66) and seq.prefix_len == 1
    assert (seq.labels[:, :1] == -1).all() and (seq.labels[:, -1] == -1).all()
    assert torch.equal(seq.labels[:, 1:-1], seq.ids[:, 2:])
    assert seq.ids[0, 0] == task.labels.ids.start + int(ds.y[0])


def test_condition_follows_the_data(tmp_path):
    ds = Digits()
    assert Generate(gen_config(tmp_path, "auto"), ds.info).condition == "text"  # digits carry captions
    info = type(ds.info)(channels=1, image_size=(8, 8), classes=None)
    assert Generate(gen_config(tmp_path, "auto"), info).condition == "none"
    with pytest.raises(ConfigError, match="needs labels"):
        Generate(gen_config(tmp_path, "class"), info)


@pytest.mark.parametrize("condition", ["class", "text", "none"])
def test_generate_trains_and_samples(tmp_path, condition):
    out = train(gen_config(tmp_path / condition, condition, steps=2), quiet=True)
    task = patchgpt.load(out, precision="fp32")   # the exact path: cache == no cache token for token
    kw = {"class": {"classes": torch.tensor([3, 7])}, "text": {"texts": ["the digit three", "the digit seven"]},
          "none": {}}[condition]
    a = task.sample_images(2, seed=1, **kw)
    assert a.shape == (2, 1, 8, 8) and a.min() >= -1 and a.max() <= 1
    torch.testing.assert_close(a, task.sample_images(2, seed=1, **kw))          # seeded
    with uncached(generate_module):                                               # cache == no cache
        torch.testing.assert_close(a, task.sample_images(2, seed=1, **kw))
    assert (out / "samples.png").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert m["bits_per_dim"] > 0


def test_completion_keeps_the_given_tokens(tmp_path):
    out = train(gen_config(tmp_path / "c", "class", steps=1), quiet=True)
    task = patchgpt.load(out)
    ds = Digits()
    ids = task.input.encode(ds.x[:1]).ids[:, 1:]                            # (1, 64) without bos
    keep = ids[:, :24].expand(3, 24)
    images = task.sample_images(3, classes=torch.tensor([1, 1, 1]), keep=keep, seed=0)
    again = task.input.encode(images).ids[:, 1:]
    assert torch.equal(again[:, :24], keep)


def test_cli_sample_complete_eval(tmp_path, capsys):
    gen, judge = tmp_path / "gen", tmp_path / "judge"
    common = ["--model", "nano", "--steps", "2", "--quiet", "--set", "train.batch_size=16"]
    assert main(["train", "generate", "--out", str(gen), "--set", "generate.condition=class",
                 "--set", "tokenizer.n_colors=4", *common]) == 0
    assert main(["train", "classify", "--out", str(judge), *common]) == 0
    capsys.readouterr()
    assert main(["sample", str(gen), "--class", "7", "--class", "1", "--n", "4", "--cfg", "1.5",
                 "--top-k", "3", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    from patchgpt.report import save_grid

    save_grid(tmp_path / "digit.png", Digits().x[:1], nrow=1)
    assert main(["complete", str(gen), str(tmp_path / "digit.png"), "--class", "3", "--n", "2",
                 "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0
    capsys.readouterr()
    assert main(["eval", str(gen), "--judge", str(judge), "--per-class", "2", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert 0 <= m["judge_accuracy"] <= 1 and m["bits_per_dim"] > 0 and len(m["judge_per_class"]) == 10
    assert main(["sample", str(gen), "--class", "eleven"]) == 2


def test_vq_tokens_for_generation(tmp_path):
    vq = train(tiny_config("vq", tmp_path / "vq", steps=3), quiet=True)
    m = json.loads((vq / "metrics.json").read_text())
    assert {"psnr", "codebook_usage", "perplexity"} <= set(m)
    assert (vq / "reconstructions.png").exists()
    cfg = gen_config(tmp_path / "g", "class", steps=2)
    cfg.tokenizer.kind, cfg.tokenizer.vq = "vq", str(vq)
    out = train(cfg, quiet=True)
    task = patchgpt.load(out)
    assert task.input.length == 1 + 16  # bos + a 4x4 code grid (8x8 digits, downsample 2)
    assert task.sample_images(2, classes=torch.tensor([0, 1])).shape == (2, 1, 8, 8)
    # The generator's VQ weights are those of the VQ run, frozen.
    src = patchgpt.load(vq).vq.state_dict()
    for k, v in task.input.tok.vq.state_dict().items():
        assert torch.equal(v, src[k])
    # A VQ run trained on other images is a one-line error, as is a run that is not a VQ run.
    folder = tmp_path / "rgb" / "a"
    folder.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    other = gen_config(tmp_path / "g2", "none", steps=1)
    other.data.spec, other.data.image_size = f"folder:{tmp_path / 'rgb'}", 8
    other.tokenizer.kind, other.tokenizer.vq = "vq", str(vq)
    with pytest.raises(ConfigError, match=r"trained on 1x\[8, 8\] images, this data is 3x\[8, 8\]"):
        train(other, quiet=True)
    other.tokenizer.vq = str(out)
    with pytest.raises(ConfigError, match="not a `patchgpt train vq` run"):
        train(other, quiet=True)


def test_text_to_image_on_the_users_own_captions(tmp_path, capsys):
    """folder:X with a metadata.jsonl trains a generator conditioned on those captions (even where class folders
    exist too), and `patchgpt sample --prompt` draws from new captions; the caption's bytes are the prefix."""
    from patchgpt.data import collate
    from patchgpt.data.specs import whole_dataset

    data, colours = tmp_path / "mine", {"red": (220, 30, 30), "blue": (30, 30, 220)}
    rows = []
    for k in range(8):
        name = list(colours)[k % 2]
        (data / name).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 12), colours[name]).save(data / name / f"{k}.png")
        rows.append({"file_name": f"{name}/{k}.png", "text": f"a {name} square, número {k}"})
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                                         encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "generate", "--data", f"folder:{data}", "--model", "nano", "--steps", "2", "--quiet",
                 "--out", str(run), "--set", "train.batch_size=4", "--set", "data.image_size=8",
                 "--set", "tokenizer.n_colors=4", "--set", "generate.text_len=20"]) == 0
    assert "exceed generate.text_len=20 bytes" in capsys.readouterr().err     # 23 and 24 bytes
    task = patchgpt.load(run)
    assert task.condition == "text" and task.info.classes == ["blue", "red"]   # captions win over classes
    assert (run / "samples.png").exists()                                          # rows of validation captions

    # The training sequence starts with the item's caption: its UTF-8 bytes, padded (cut) to text_len.
    items = [whole_dataset(task.cfg.data, f"folder:{data}")[i] for i in range(2)]
    batch = collate(items)
    seq = task.sequence(batch)
    assert seq.prefix_len == 20
    for i, t in enumerate(batch["text"]):
        b = t.encode("utf-8")[:20]
        want = [task.text.ids.start + x for x in b] + [task.text.pad] * (20 - len(b))
        assert seq.ids[i, :20].tolist() == want

    # Two different new captions are two different prefixes, and the model's first-token distribution follows them.
    prompt = task.prompt(3, texts=["a green square", "a blue circle", ""])
    assert [bytes(x - task.text.ids.start for x in row if x in task.text.ids).decode() for row in
            prompt.ids[:, :20].tolist()] == ["a green square", "a blue circle", ""]
    with torch.no_grad():
        first = task.backbone.logits(task.backbone(prompt))[:, -1]              # (3, V) after bos
    assert not torch.allclose(first[0], first[1]) and not torch.allclose(first[0], first[2])

    # Sampling from a caption the data never had: the API (seeded) and the CLI.
    a = task.sample_images(2, texts=["a green square"] * 2, seed=3)
    assert a.shape == (2, 3, 8, 8) and torch.equal(a, task.sample_images(2, texts=["a green square"] * 2, seed=3))
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert main(["sample", str(run), "--prompt", "a green square", "--n", "3", "--out", str(one)]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt", "a green square", "--prompt", "un carré rouge et très grand",
                 "--n", "3", "--cfg", "1.5", "--out", str(two)]) == 0
    assert Image.open(two).size[1] > Image.open(one).size[1]                  # a row per caption
    assert "1 of 2 --prompt captions exceed generate.text_len=20" in capsys.readouterr().err
    assert main(["sample", str(run), "--class", "red", "--out", str(one)]) == 2
    assert "text-conditional: give --prompt" in capsys.readouterr().err
