"""The Hugging Face hub, offline: hf:user/repo loads from the hub's own cache layout (populated here, with
HF_HUB_OFFLINE=1), --init takes it, a missing one is one line, and push stages the checkpoint with a model
card (the upload itself replaced: nothing reaches the network)."""

import hashlib
import json
import shutil

import pytest
import torch

pytest.importorskip("huggingface_hub")

import patchgpt  # noqa: E402
from patchgpt import checkpoint  # noqa: E402
from patchgpt.push import model_card  # noqa: E402

from .helpers import run_cli  # noqa: E402


def cache_repo(cache, repo: str, ckpt) -> str:
    """Put `ckpt`'s files into the hub cache as huggingface_hub lays it out: blobs by hash, a snapshot of
    links to them, and refs/main naming the snapshot's commit."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snap = root / "snapshots" / commit
    (root / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        data = (ckpt / name).read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(blob)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_hf_checkpoints_load_from_the_cache_offline(tmp_path, capsys, offline_hub):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "classify", "--model", "nano", "--steps", "2", "--out", str(run),
                           "--quiet", "--set", "train.eval_every=0")
    assert code == 0, err
    cache_repo(offline_hub, "someone/digits", checkpoint.resolve(run))
    model = patchgpt.load("hf:someone/digits")
    mine = patchgpt.load(run)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in mine.state_dict().items())
    code, _, err = run_cli(capsys, "train", "classify", "--init", "hf:someone/digits", "--steps", "1",
                           "--out", str(tmp_path / "ft"), "--quiet", "--set", "train.eval_every=0")
    assert code == 0, err
    code, _, err = run_cli(capsys, "predict", "hf:someone/missing", str(tmp_path / "x.png"))
    assert code == 2 and "not in the local hub cache" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "eval", "hf:nouser")
    assert code == 2 and "hf:USER/REPO" in err


def test_push_stages_the_checkpoint_and_a_model_card(tmp_path, capsys, monkeypatch):
    import huggingface_hub

    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "classify", "--model", "nano", "--steps", "2", "--out", str(run),
                           "--quiet", "--set", "train.eval_every=0")
    assert code == 0, err
    seen = {}

    def create_repo(self, repo_id, **kw):
        seen["repo"], seen["private"] = repo_id, kw.get("private")
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, **kw):
        seen["files"] = sorted(p.name for p in folder_path.iterdir())
        seen["card"] = (folder_path / "README.md").read_text()
        shutil.copytree(folder_path, tmp_path / "uploaded")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    code, out, err = run_cli(capsys, "push", str(run), "me/digits", "--private")
    assert code == 0, err
    assert out.strip() == "https://huggingface.co/me/digits" and seen["repo"] == "me/digits" and seen["private"]
    assert seen["files"] == ["README.md", "config.json", "model.safetensors"]   # no optimizer state
    top1 = json.loads((run / "metrics.json").read_text())["top1"]
    assert "patchgpt predict hf:me/digits" in seen["card"] and f"{top1:.4g}" in seen["card"]
    assert "library_name: patchgpt" in seen["card"]
    # what was uploaded loads back as a checkpoint
    assert patchgpt.load(tmp_path / "uploaded").name == "classify"
    assert "classify" in model_card(checkpoint.resolve(run), "me/x")
