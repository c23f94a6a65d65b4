"""The int8 decoding path (the CPU default of loaded checkpoints): int8 weights stay close to fp32, the int8
model's own cached decoding equals its uncached reference, the fp32 model is untouched, --precision reaches
the sampler, and bits/dim on validation data moves by less than 1%."""

import json

import pytest
import torch

import patchgpt
from patchgpt.config import ConfigError
from patchgpt.data import eval_batches
from patchgpt.model import GPT, Block, GPTConfig
from patchgpt.quantize import Int8Block, Int8Linear, int8_copy, quantize_int8
from patchgpt.sampling import SamplingParams, sample
from patchgpt.sequence import tokens

from .helpers import run_cli
from .reference_sampling import reference_sample


def test_int8_weights_are_close_and_the_fp32_model_is_untouched():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear(lin)
    assert q.qweight.dtype == torch.int8 and (q.dequantized() - lin.weight).abs().max() <= q.scales.max() / 2 + 1e-7
    x = torch.randn(5, 7, 64)
    assert torch.allclose(q(x), lin(x), atol=0.05)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=40, block_size=80)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    int8 = quantize_int8(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert isinstance(int8.blocks[0].mlp.fc, Int8Linear) and isinstance(int8.lm_head, Int8Linear)
    prompt = tokens(torch.zeros(3, 1, dtype=torch.long))
    params = SamplingParams(temperature=0.8)
    a = sample(int8, prompt, 30, params, generator=torch.Generator().manual_seed(1))
    b = reference_sample(int8, prompt, 30, params, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)                                   # the int8 model's cache is exact, as fp32's is
    model.decode_int8 = True                                   # the opt-in, as --int8 sets it
    c = sample(model, prompt, 30, params, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, c)
    for block in int8.blocks:                                  # the general step on the same int8 layers
        assert type(block) is Int8Block
        block.__class__ = Block
    d = sample(int8, prompt, 30, params, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, d)                                   # Int8Block's fewer operations: the same tokens


def test_the_int8_copy_is_made_once_per_set_of_weights():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=20, block_size=10)).eval()
    first = int8_copy(model)
    assert int8_copy(model) is first and "_int8" not in model.state_dict()
    assert all("_int8" not in vars(m) for m in first.modules())   # the copy does not nest the cache
    with torch.no_grad():
        model.lm_head.weight.mul_(2)                           # an optimizer step would do the same
    again = int8_copy(model)
    assert again is not first and torch.allclose(again.lm_head.dequantized(), model.lm_head.weight, atol=0.05)


def test_int8_keeps_bits_per_dim_within_one_percent_and_the_cli_flag(tmp_path, capsys):
    run = tmp_path / "gen"
    code, _, err = run_cli(capsys, "train", "generate", "--model", "nano", "--steps", "60", "--out", str(run),
                           "--quiet", "--set", "train.eval_every=0", "--set", "train.batch_size=32")
    assert code == 0, err
    task = patchgpt.load(run, precision="fp32")
    assert not task.backbone.decode_int8 and patchgpt.load(run).backbone.decode_int8   # int8: the CPU default
    with pytest.raises(ConfigError, match="precision"):
        patchgpt.load(run, precision="fp16")
    batch = next(eval_batches(task_val(task, run), 256))
    fp32 = task.predict(batch)["nll"].mean()
    task.backbone = quantize_int8(task.backbone)
    int8 = task.predict(batch)["nll"].mean()
    assert abs(float(int8 / fp32) - 1) < 0.01
    pngs = {}
    for flags in [[], ["--int8"], ["--fp32"], ["--precision", "fp32"]]:    # the default on the CPU is int8
        png = tmp_path / f"s{len(pngs)}.png"
        code, out, err = run_cli(capsys, "sample", str(run), "--n", "2", *flags, "--prompt", "the digit seven",
                                 "--out", str(png))
        assert code == 0 and png.exists(), err
        pngs[" ".join(flags)] = png.read_bytes()
    assert pngs[""] == pngs["--int8"] and pngs["--fp32"] == pngs["--precision fp32"]


def task_val(task, run):
    from patchgpt.tasks import task_class

    cfg = patchgpt.tasks.config_from_dict(json.loads((run / "config.json").read_text()))
    return task_class(cfg.task).datasets(cfg)[1]
