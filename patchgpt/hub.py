"""The Hugging Face hub: ``hf:user/repo[@revision]`` wherever a checkpoint is read (``patchgpt push``, in
`patchgpt.push`, uploads one).

Downloads go through `huggingface_hub` (the ``[hf]`` extra) into its ordinary cache, so ``HF_HUB_OFFLINE=1``
and ``HF_HUB_CACHE`` work as they do for every other library; a repository holds one checkpoint directory
(``config.json``, ``model.safetensors``) and a generated model card (``README.md``).
"""

from __future__ import annotations

import os
from pathlib import Path

from .version import __version__


class HubError(ValueError):
    """A hub checkpoint cannot be had (a bad name, not cached offline, no network); the message is one line."""


PREFIX = "hf:"
FILES = ("config.json", "model.safetensors")   # what a pushed checkpoint holds (no optimizer state)


def is_hub(path: str | Path) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def _hub():
    try:
        import huggingface_hub
    except ImportError:
        raise HubError("hf:... checkpoints need huggingface_hub: pip install 'patchgpt[hf]'") from None
    return huggingface_hub


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(spec: str) -> Path:
    """``hf:user/repo[@revision]`` -> the local snapshot directory (fetched into the hub cache, or found there
    when ``HF_HUB_OFFLINE=1``); one-line `HubError`s for a bad name or a checkpoint not available."""
    repo, _, revision = spec[len(PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HubError(f"{spec}: write hf:USER/REPO (or hf:USER/REPO@REVISION)")
    hub = _hub()
    try:
        path = hub.snapshot_download(repo, revision=revision or None, cache_dir=os.environ.get("HF_HUB_CACHE"),
                                     local_files_only=_offline(), allow_patterns=[*FILES, "README.md"],
                                     library_name="patchgpt", library_version=__version__)
    except Exception as e:   # the hub's errors: not cached offline, no such repo, no network, no access
        where = "not in the local hub cache (HF_HUB_OFFLINE is set)" if _offline() else "could not be fetched"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{spec}: {where} ({type(e).__name__}: {first[:160]})") from None
    if not (Path(path) / "config.json").is_file():
        raise HubError(f"{spec}: the repository holds no patchgpt checkpoint (no config.json)")
    return Path(path)
