"""The uncached reference sampler: `patchgpt.sampling.sample` without the KV cache, for tests and benchmarks.

At every step it runs the full forward over the prompt and everything fed so far (sampled tokens and the
hook's injected tokens) and takes the last position's logits; then it picks the token with the same float32
ops as `sample`, so the two must agree token for token (their logits differ only by float rounding). It takes
`sample`'s arguments (`cuda_graph` is accepted and ignored) so it can stand in for it, see `uncached`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

import torch
from torch import Tensor

from patchgpt.model import GPT
from patchgpt.sampling import DecodeHook, SamplingParams, allowed_mask, draw, top_k_filter, top_p_filter
from patchgpt.sequence import IGNORE, Sequence, concat

__all__ = ["reference_sample", "uncached"]

PLAIN = SamplingParams()


def _stack(a: Sequence, b: Sequence) -> Sequence:
    """Two sequences of the same shape as one batch (a's rows first): a classifier-free-guidance batch."""
    if a.shape != b.shape:
        raise ValueError(f"uncond_prompt has shape {b.shape}, prompt has {a.shape}")
    two = lambda x, y: None if x is None else torch.cat([x, y], dim=0)  # noqa: E731
    return Sequence(ids=two(a.ids, b.ids), labels=two(a.labels, b.labels), pos=two(a.pos, b.pos),
                    patches=two(a.patches, b.patches), is_patch=two(a.is_patch, b.is_patch),
                    weights=two(a.weights, b.weights), prefix_len=a.prefix_len)


def _pick(logits: Tensor, t: int, params: SamplingParams, allowed, generator, vocab_size: int) -> Tensor:
    """(B, V) float32 guided logits of step t -> (B, 1) ids (past the vocabulary when the logits are not finite)."""
    if params.temperature != 0 and 1.0 / float(params.temperature) != 1.0:
        logits = logits * (1.0 / float(params.temperature))
    if allowed is not None:
        ranges = allowed(t) if callable(allowed) else allowed
        mask = allowed_mask(vocab_size, ranges, logits.device)
        if not bool(mask.any()):
            raise ValueError(f"allowed ranges {list(ranges)} contain no id of a {vocab_size}-token vocabulary")
        logits = logits.masked_fill(~mask, float("-inf"))
    if params.temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return draw(torch.softmax(top_p_filter(top_k_filter(logits, params.top_k), params.top_p), dim=-1), generator)


@torch.no_grad()
def reference_sample(model: GPT, prompt: Sequence, steps: int, params: SamplingParams = PLAIN, *,
                     positions: Tensor | None = None, generator: torch.Generator | None = None,
                     allowed=None, uncond_prompt: Sequence | None = None, hook: DecodeHook | None = None,
                     return_logits: bool = False, cuda_graph: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """`sample`, recomputing the full forward at every step (slow: for tests and baselines)."""
    hook = hook or DecodeHook()
    B, dev, V = prompt.shape[0], prompt.ids.device, model.cfg.vocab_size
    out = torch.full((B, steps), hook.stop_token if hook.stop_token is not None else 0, dtype=torch.long, device=dev)
    raw = torch.zeros(B, steps, V, device=dev) if return_logits else None
    done = torch.zeros(B, 1, dtype=torch.bool, device=dev)
    positions = torch.zeros(steps, 3, dtype=torch.long) if positions is None else positions
    positions = positions.to(dev, torch.long)
    if positions.shape != (steps, 3):
        raise ValueError(f"positions must be (steps, 3) = ({steps}, 3), got {tuple(positions.shape)}")
    guided = uncond_prompt is not None and params.cfg_scale != 0.0
    cur = _stack(prompt, uncond_prompt) if guided else prompt                  # (rows, T0)
    for t in range(steps):
        logits = model.logits(model(cur)[:, -1]).float()                       # (rows, V)
        if guided:
            cond, uncond = logits[:B], logits[B:]
            logits = cond + float(params.cfg_scale) * (cond - uncond)
        if raw is not None:
            raw[:, t] = logits
        tok = _pick(logits, t, params, allowed, generator, V)
        if bool((tok >= V).any()):
            raise ValueError("sampling met non-finite probabilities: the model's logits contain NaN or inf")
        out[:, t:t + 1] = torch.where(done, out[:, t:t + 1], tok)
        if hook.stop_token is not None:
            done |= tok == hook.stop_token
            if (t + 1) % hook.stop_check == 0 and bool(done.all()):
                break
        if t + 1 == steps:
            break
        history = out[:, :t + 1]
        pos = hook.position(history, t) if hook.dynamic else None
        pos = positions[t].to(dev).expand(B, 1, 3) if pos is None else pos
        fed = Sequence(ids=tok, labels=torch.full_like(tok, IGNORE), pos=pos)
        extra = hook.inject(history, t) if hook.max_injected else None
        for s in (fed, extra) if extra is not None else (fed,):
            cur = concat(cur, _stack(s, s) if guided else s, prefix_len=prompt.prefix_len)
    return (out, raw) if return_logits else out


@contextmanager
def uncached(*modules: ModuleType) -> Iterator[None]:
    """Within the block, the name `sample` in each of `modules` (which did ``from patchgpt.sampling import
    sample``, e.g. ``patchgpt.tasks.detect``) is `reference_sample`: a task's own decoding, without the cache."""
    saved: list[tuple[ModuleType, Callable]] = [(m, m.sample) for m in modules]
    try:
        for m, _ in saved:
            m.sample = reference_sample
        yield
    finally:
        for m, f in saved:
            m.sample = f
