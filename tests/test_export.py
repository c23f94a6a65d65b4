"""ONNX export: a classifier's logits and a backbone's features, run in onnxruntime with two batch sizes,
equal to PyTorch within 1e-4; models that cannot be exported are one line."""

import json

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnxruntime as ort  # noqa: E402

import patchgpt  # noqa: E402
from patchgpt.export import Features  # noqa: E402

from .helpers import run_cli  # noqa: E402


def train(capsys, tmp_path, *args):
    run = tmp_path / args[0]
    code, _, err = run_cli(capsys, "train", *args, "--model", "nano", "--steps", "2", "--out", str(run), "--quiet",
                           "--set", "train.eval_every=0", "--set", "train.batch_size=8")
    assert code == 0, err
    return run


@pytest.mark.parametrize("what", ["logits", "features"])
def test_onnx_matches_pytorch_with_a_dynamic_batch(tmp_path, capsys, what):
    run = train(capsys, tmp_path, "classify")
    code, out, err = run_cli(capsys, "export", str(run), "--what", what, "--out", str(tmp_path / "m.onnx"))
    assert code == 0, err
    info = json.loads(out)
    assert info["output"] == what and info["input"] == ["batch", 1, 8, 8]
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    task = patchgpt.load(run)
    ref = task.logits if what == "logits" else Features(task)
    for b in (1, 7):
        x = np.random.default_rng(b).uniform(-1, 1, (b, 1, 8, 8)).astype(np.float32)
        got = session.run(None, {"images": x})[0]
        with torch.no_grad():
            want = ref(torch.from_numpy(x)).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4


def test_features_of_any_patch_model_and_one_line_refusals(tmp_path, capsys):
    run = train(capsys, tmp_path, "segment", "--data", "digit-scenes", "--set", "data.image_size=32")
    code, out, err = run_cli(capsys, "export", str(run), "--out", str(tmp_path / "seg.onnx"))
    assert code == 0 and json.loads(out)["output"] == "features", err
    x = np.zeros((3, 1, 32, 32), np.float32)
    assert ort.InferenceSession(str(tmp_path / "seg.onnx")).run(None, {"images": x})[0].shape[0] == 3
    code, _, err = run_cli(capsys, "export", str(run), "--what", "logits")
    assert code == 2 and "no class logits" in err and len(err.strip().splitlines()) == 1
    gen = train(capsys, tmp_path, "generate")
    code, _, err = run_cli(capsys, "export", str(gen))
    assert code == 2 and "image patches" in err
