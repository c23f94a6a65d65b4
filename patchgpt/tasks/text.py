"""What tasks that answer in words share: writing bytes after a prompt with the KV cache, and reading them.

Captioning and question answering both end their sequence with UTF-8 bytes and an end token (ByT5-style);
decoding is `patchgpt.sampling.sample` constrained to the byte ids and the end token, stopping once every
row has ended.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import RunConfig
from ..model import GPT
from ..sampling import DecodeHook, SamplingParams, sample
from ..sequence import Sequence
from .base import scene_recipe


def text_recipe(cfg: RunConfig) -> None:
    """The recipe of tasks that answer an image in words: `scene_recipe` (digit-scenes, 8x8 patches, batches of
    32, evaluations every 500 steps)."""
    scene_recipe(cfg)


@torch.no_grad()
def write_bytes(backbone: GPT, prompt: Sequence, steps: int, byte_ids: range, end: int,
                params: SamplingParams | None = None, seed: int = 0) -> Tensor:
    """Up to `steps` byte tokens (then end tokens) after `prompt` -> (B, steps) ids; greedy by default."""
    stop = DecodeHook()
    stop.stop_token = end
    gen = torch.Generator(device=prompt.ids.device).manual_seed(seed)
    params = params or SamplingParams(temperature=0.0)
    return sample(backbone, prompt, steps, params, generator=gen, allowed=[byte_ids, range(end, end + 1)],
                  hook=stop)


def read_bytes(ids: list[int], byte_ids: range, end: int) -> str:
    """Generated ids -> text: the bytes up to the first end token, as UTF-8 (invalid bytes replaced)."""
    out = bytearray()
    for i in ids:
        if i == end:
            break
        if i in byte_ids:
            out.append(i - byte_ids.start)
    return out.decode("utf-8", errors="replace")
