"""Hugging Face ImageGPT in and out: a random ImageGPTForCausalImageModeling saved by transformers imports
with the same logits (<= 1e-4) and the same greedy samples, samples and fine-tunes through the CLI, and
exports back to a directory transformers loads with the same logits."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("transformers")

from transformers import ImageGPTConfig, ImageGPTForCausalImageModeling  # noqa: E402

import patchgpt  # noqa: E402

from .helpers import run_cli  # noqa: E402

K, S = 16, 8


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A small random ImageGPT (norm weights perturbed so they matter) with its colour clusters."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("imagegpt")
    model = ImageGPTForCausalImageModeling(ImageGPTConfig(vocab_size=K + 1, n_positions=S * S, n_embd=32,
                                                          n_layer=2, n_head=2, resid_pdrop=0, embd_pdrop=0,
                                                          attn_pdrop=0)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(d)
    clusters = np.random.default_rng(0).uniform(-1, 1, (K, 3)).round(4).tolist()
    (d / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "ImageGPTImageProcessor",
                                                            "clusters": clusters, "size": {"height": S, "width": S},
                                                            "do_normalize": True, "do_color_quantize": True}))
    return d, model


def hf_logits(model, ids):
    sos = torch.full((ids.shape[0], 1), K)
    with torch.no_grad():
        return model(torch.cat([sos, ids[:, :-1]], 1)).logits                       # (B, S*S, K)


def test_import_gives_the_same_logits_and_greedy_samples(hf_dir, tmp_path, capsys):
    src, model = hf_dir
    code, _, err = run_cli(capsys, "import-hf", str(src), "--out", str(tmp_path / "run"))
    assert code == 0, err
    task = patchgpt.load(tmp_path / "run", precision="fp32")                        # exact, as HF's fp32
    ids = torch.randint(0, K, (3, S * S))
    with torch.no_grad():
        seq = task.sequence({"image": task.input.tok.dequantize(ids)})
        assert torch.equal(seq.ids[:, 1:] - 1, ids)                                 # the same colour tokens
        ours = task.backbone.logits(task.backbone(seq))[:, :S * S, 1:]
    assert (ours - hf_logits(model, ids)).abs().max() <= 1e-4
    with torch.no_grad():
        greedy = model.generate(torch.full((2, 1), K), max_length=S * S + 1, do_sample=False, pad_token_id=0)
    mine = task.input.tok.quantize(task.sample_images(2, temperature=0))
    assert torch.equal(mine, greedy[:, 1:])
    code, _, err = run_cli(capsys, "sample", str(tmp_path / "run"), "--n", "2", "--out", str(tmp_path / "s.png"))
    assert code == 0 and (tmp_path / "s.png").exists(), err


def test_export_loads_back_in_transformers_and_init_fine_tunes(hf_dir, tmp_path, capsys):
    src, model = hf_dir
    assert run_cli(capsys, "import-hf", str(src), "--out", str(tmp_path / "run"))[0] == 0
    code, _, err = run_cli(capsys, "export", str(tmp_path / "run"), "--format", "hf-imagegpt",
                           "--out", str(tmp_path / "back"))
    assert code == 0, err
    again = ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "back").eval()
    ids = torch.randint(0, K, (2, S * S))
    assert (hf_logits(again, ids) - hf_logits(model, ids)).abs().max() <= 1e-5
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    code, _, err = run_cli(capsys, "train", "classify", "--data", f"folder:{tmp_path / 'imgs'}", "--init",
                           f"hf-imagegpt:{src}", "--steps", "1", "--out", str(tmp_path / "cls"), "--quiet",
                           "--set", "train.eval_every=0", "--set", "train.batch_size=4",
                           "--set", "classify.attention=causal")
    assert code == 0, err
    assert patchgpt.load(tmp_path / "cls").cfg.model.norm == "rms"


def test_wrong_directories_and_models_are_one_line(hf_dir, tmp_path, capsys):
    (tmp_path / "x").mkdir()
    code, _, err = run_cli(capsys, "import-hf", str(tmp_path / "x"), "--out", str(tmp_path / "r"))
    assert code == 2 and "config.json: missing" in err
    run = tmp_path / "patch"
    assert run_cli(capsys, "train", "classify", "--model", "nano", "--steps", "1", "--out", str(run), "--quiet",
                   "--set", "train.eval_every=0")[0] == 0
    code, _, err = run_cli(capsys, "export", str(run), "--format", "hf-imagegpt")
    assert code == 2 and "ImageGPT's layout needs a generate task" in err and len(err.strip().splitlines()) == 1


def test_a_classification_directory_imports_its_backbone(tmp_path, capsys):
    from transformers import ImageGPTForImageClassification

    torch.manual_seed(1)
    model = ImageGPTForImageClassification(ImageGPTConfig(vocab_size=K + 1, n_positions=S * S, n_embd=32, n_layer=2,
                                                          n_head=2, num_labels=3, resid_pdrop=0, embd_pdrop=0,
                                                          attn_pdrop=0)).eval()
    model.save_pretrained(tmp_path / "src")
    clusters = np.random.default_rng(1).uniform(-1, 1, (K, 3)).tolist()
    (tmp_path / "src" / "preprocessor_config.json").write_text(json.dumps({"clusters": clusters, "size": S}))
    assert run_cli(capsys, "import-hf", str(tmp_path / "src"), "--out", str(tmp_path / "run"))[0] == 0
    task = patchgpt.load(tmp_path / "run")
    ids = torch.randint(0, K, (2, S * S))
    with torch.no_grad():
        hf = model.transformer(torch.cat([torch.full((2, 1), K), ids[:, :-1]], 1)).last_hidden_state
        ours = task.backbone(task.sequence({"image": task.input.tok.dequantize(ids)}))[:, :S * S]
    assert (hf - ours).abs().max() <= 1e-4                                    # the same features
