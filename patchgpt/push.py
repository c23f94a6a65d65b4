"""``patchgpt push CKPT user/repo``: upload a checkpoint to the Hugging Face hub with a generated model card."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .checkpoint import CheckpointError, resolve
from .hub import FILES, HubError, _hub
from .version import __version__


def model_card(ckpt: Path, repo: str) -> str:
    """A README.md for the hub: what the model does, its data, its validation results and the command that
    trained it (from the checkpoint's config.json, and the run's metrics.json where it is beside it)."""
    meta = json.loads((ckpt / "config.json").read_text())
    cfg, task = meta.get("config", {}), meta.get("task", "?")
    metrics = {}
    for f in (ckpt.parent.parent / "metrics.json", ckpt / "best.json"):
        if f.is_file():
            try:
                metrics = json.loads(f.read_text())
                break
            except ValueError:
                pass
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in scalars.items()) or "| (not evaluated) | |"
    data, size = cfg.get("data", {}).get("spec", "?"), cfg.get("size", "?")
    steps = cfg.get("train", {}).get("steps", "?")
    state = meta.get("state", {})
    shape = f"{state.get('channels', '?')}x{state.get('image_size', ['?'])[0]}"
    return f"""---
library_name: patchgpt
tags: [patchgpt, {task}]
---

# {repo.split('/')[-1]}

A [patchgpt](https://github.com/) `{task}` model: a GPT ({size}) over image patches, trained on `{data}`
({shape} images, {steps} steps, patchgpt {meta.get('patchgpt', __version__)}).

```bash
pip install "patchgpt[hf]"
patchgpt predict hf:{repo} image.png          # or: patchgpt ask hf:{repo} image.png PROMPT
```

```python
import patchgpt
model = patchgpt.load("hf:{repo}")
```

## Validation results

| metric | value |
|---|---|
{rows}

## Training

Retrain with the same settings: download `config.json`, then
`patchgpt train --config config.json --out runs/{task}`.
"""


def push(ckpt_path: str | Path, repo: str, private: bool = False, message: str | None = None) -> str:
    """Upload a checkpoint (a checkpoint or run directory: its newest checkpoint) to the hub repository `repo`
    with a generated model card; creates the repository if needed. Returns the repository's URL."""
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise CheckpointError(f"push: write the repository as USER/REPO, got {repo!r}")
    ckpt = resolve(ckpt_path)
    try:
        hub = _hub()
    except HubError as e:
        raise CheckpointError(str(e)) from None
    api = hub.HfApi()
    staging = Path(tempfile.mkdtemp(prefix="patchgpt-push-"))
    try:
        for name in FILES:
            shutil.copy2(ckpt / name, staging / name)
        (staging / "README.md").write_text(model_card(ckpt, repo), encoding="utf-8")
        try:
            url = api.create_repo(repo, private=private, exist_ok=True)
            api.upload_folder(repo_id=repo, folder_path=staging,
                              commit_message=message or f"patchgpt {__version__}: {ckpt.name}")
        except Exception as e:   # no token, no network, no access: the hub's own message, on one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"push to {repo} failed ({type(e).__name__}: {first[:160]})") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(url)
