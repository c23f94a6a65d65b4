"""Autoregressive sampling from a `GPT`, kept apart from the model.

One prefill forward over the whole prompt fills a preallocated `KVCache` sized for prompt + generated
tokens; then each step feeds one token per row through `GPT.decode` (one token per row, fused ops) and reads
the next-token logits. The per-step path does no host synchronisation (no ``.item()``): position
embeddings, allowed-token masks and the output buffer are prepared before the loop. On a CUDA device the
step is recorded once as a CUDA graph and replayed (`GraphedDecode`), since there a step is launch-bound.

Per step, in float32: logits / temperature (temperature 0 = greedy argmax), the allowed-range mask
(disallowed ids -> -inf), top-k, top-p (nucleus), then one uniform number per row from the seeded
`torch.Generator`, mapped through the inverse CDF of the probabilities (`draw`): the same tokens whether or
not the cache is used, and B random numbers per step instead of the B x V that ``torch.multinomial`` draws.
Classifier-free guidance runs the conditional and unconditional prompts as one doubled batch and mixes the
logits as ``cond + cfg_scale * (cond - uncond)``.

References (ideas, not code): LlamaGen ``autoregressive/models/generate.py`` (Sun et al. 2024; prefill then
per-token decode with a static cache, classifier-free guidance on a doubled batch, top-k / top-p filters) and
the nanochat engine (karpathy/nanochat; a preallocated KV cache and a lean per-step loop).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf

import torch
from torch import Tensor

from .decode_graph import GraphedDecode
from .model import GPT
from .sequence import IGNORE, Sequence, concat

__all__ = ["top_k_filter", "top_p_filter", "allowed_mask", "draw", "sample"]

Ranges = SequenceOf[range]


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the `k` largest logits along the last dim (exactly k, ties broken by `torch.topk`); the rest -inf.

    ``k <= 0`` or ``k >= V`` returns `logits` unchanged.
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    vals, idx = torch.topk(logits, k, dim=-1)
    return torch.full_like(logits, float("-inf")).scatter_(-1, idx, vals)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of top tokens whose cumulative probability is >= `p`.

    The most likely token is always kept; the rest become -inf. ``p >= 1`` returns `logits` unchanged.
    """
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs          # probability mass strictly above each token
    drop = before >= p                                     # the set already reached p without this token
    drop[..., 0] = False
    drop = torch.zeros_like(drop).scatter_(-1, idx, drop)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One id per row from (B, V) probabilities (need not sum to 1; zeros are never drawn) -> (B, 1) int64.

    Inverse-CDF sampling: a float32 uniform ``u`` in [0, 1) per row, scaled by the row's total, lands in
    exactly one token's interval of the float64 cumulative sum. Since ``u <= 1 - 2**-24``, ``u * total`` stays
    below the total by far more than float64 rounding, so the first entry above it has a nonzero interval.
    """
    cdf = probs.double().cumsum(dim=-1)                                         # (B, V)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device).double()
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True)                # (B, 1): first cdf > u * total


def allowed_mask(vocab_size: int, ranges: Ranges, device: torch.device | str | None = None) -> Tensor:
    """Boolean (V,) mask, True on the ids of `ranges` (each clipped to the vocabulary)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    for r in ranges:
        if r.step != 1:
            ids = [i for i in r if 0 <= i < vocab_size]
            mask[torch.tensor(ids, dtype=torch.long, device=device)] = True
        else:
            mask[max(r.start, 0):min(r.stop, vocab_size)] = True
    return mask


def _allowed_bias(vocab_size: int, ranges: Ranges, device: torch.device) -> Tensor:
    """Float (V,) additive bias: 0 where allowed, -inf elsewhere."""
    mask = allowed_mask(vocab_size, ranges, device)
    if not bool(mask.any()):
        raise ValueError(f"allowed ranges {list(ranges)} contain no id of a {vocab_size}-token vocabulary")
    return torch.zeros(vocab_size, device=device).masked_fill_(~mask, float("-inf"))


def _allowed_table(allowed, steps: int, vocab_size: int, device: torch.device) -> Tensor | None:
    """Per-step additive biases (steps, V), or one (V,) bias for all steps, or None (everything allowed)."""
    if allowed is None:
        return None
    if not callable(allowed):
        return _allowed_bias(vocab_size, allowed, device)
    memo: dict[tuple, Tensor] = {}
    rows = []
    for t in range(steps):
        ranges = allowed(t)
        key = tuple((r.start, r.stop, r.step) for r in ranges)
        if key not in memo:
            memo[key] = _allowed_bias(vocab_size, ranges, device)
        rows.append(memo[key])
    return torch.stack(rows) if rows else None


def _batch_cat(a: Sequence, b: Sequence) -> Sequence:
    """Stack two sequences of the same shape and structure along the batch dimension."""
    if a.shape != b.shape:
        raise ValueError(f"uncond_prompt has shape {b.shape}, prompt has {a.shape}")

    def cat(x: Tensor | None, y: Tensor | None, name: str) -> Tensor | None:
        if (x is None) != (y is None):
            raise ValueError(f"prompt and uncond_prompt disagree on whether `{name}` is set")
        return None if x is None else torch.cat([x, y], dim=0)

    return Sequence(ids=cat(a.ids, b.ids, "ids"), labels=cat(a.labels, b.labels, "labels"),
                    pos=cat(a.pos, b.pos, "pos"), patches=cat(a.patches, b.patches, "patches"),
                    is_patch=cat(a.is_patch, b.is_patch, "is_patch"),
                    weights=cat(a.weights, b.weights, "weights"), prefix_len=a.prefix_len)


@torch.no_grad()
def sample(model: GPT, prompt: Sequence, steps: int, *, positions: Tensor | None = None,
           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None,
           allowed: list[range] | Callable[[int], list[range]] | None = None,
           uncond_prompt: Sequence | None = None, cfg_scale: float = 0.0,
           use_cache: bool = True, token_positions: Callable[[Tensor, int], Tensor] | None = None,
           inject: Callable[[Tensor, int], Sequence | None] | None = None, max_injected: int = 0,
           stop_token: int | None = None, stop_check: int = 1,
           return_logits: bool = False, cuda_graph: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """Sample up to `steps` tokens after `prompt`. Returns generated ids (B, steps), int64.

    Args:
        model: the backbone; put it in eval mode first (dropout is not switched off here).
        prompt: (B, T0) sequence; its `prefix_len` leading tokens attend bidirectionally.
        steps: how many tokens to generate.
        positions: (steps, 3) grid (frame, row, col) + 1 of each generated token, shared by all rows;
            None = zeros (non-grid tokens).
        temperature: logits are divided by it; 0 = greedy argmax (no randomness used).
        top_k: keep only the k most likely tokens (0 = all).
        top_p: nucleus sampling threshold (1 = off).
        generator: random generator (on the model's device) for reproducible draws.
        allowed: id ranges that may be emitted, or a function of the step index returning them.
        uncond_prompt: the unconditional prompt for classifier-free guidance, same shape as `prompt`.
        cfg_scale: guidance scale; logits = cond + cfg_scale * (cond - uncond). 0 = plain conditional.
        use_cache: False recomputes the full forward over prompt + generated tokens at every step
            (same tokens, much slower; for tests and benchmarks).
        token_positions: a function (generated ids so far (B, t + 1), step t) -> (B, 1, 3), the position of
            the token generated at step t from its value and those before it (e.g. box coordinates pointing
            at grid cells); overrides `positions`.
        inject: a function (generated ids so far (B, t + 1), step t) -> a (B, k) `Sequence` to feed after the
            token of step t, or None: input-only tokens that are not sampled and not returned (e.g. a glimpse
            of the image region a generated box names). ``max_injected`` bounds their total length.
        stop_token: once every row has emitted this id, stop early (checked every `stop_check` steps, one
            host synchronisation each); the remaining columns of the output are filled with it.
        return_logits: also return the (B, steps, V) float32 logits each token was drawn from (after guidance,
            before temperature, masks and filters), e.g. to score what was generated.
        cuda_graph: on a CUDA device, with the cache, and when nothing fed depends on the sampled values
            (no `token_positions`, no `inject`), record one step as a CUDA graph and replay it per token
            (`GraphedDecode`); no effect elsewhere. False runs every step eagerly.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    B, T0 = prompt.shape
    device = prompt.ids.device
    out = torch.empty(B, steps, dtype=torch.long, device=device)
    raw = torch.zeros(B, steps, model.cfg.vocab_size, device=device) if return_logits else None
    if stop_token is not None:
        out.fill_(stop_token)
    if steps <= 0:
        return (out, raw) if return_logits else out
    V = model.cfg.vocab_size
    if positions is None:
        positions = torch.zeros(steps, 3, dtype=torch.long, device=device)
    positions = positions.to(device=device, dtype=torch.long)
    if positions.shape != (steps, 3):
        raise ValueError(f"positions must be (steps, 3) = ({steps}, 3), got {tuple(positions.shape)}")

    guided = uncond_prompt is not None and cfg_scale != 0.0
    seq = _batch_cat(prompt, uncond_prompt) if guided else prompt
    rows = 2 * B if guided else B
    prefix_len = prompt.prefix_len

    # Everything the loop needs, ready before it starts.
    step_pos = positions[:, None, None, :].expand(steps, rows, 1, 3)   # step_pos[t]: (rows, 1, 3) view
    labels = torch.full((rows, 1), IGNORE, dtype=torch.long, device=device)
    bias = _allowed_table(allowed, steps, V, device)
    per_step_bias = bias is not None and bias.dim() == 2
    greedy = temperature == 0
    inv_temp = 1.0 if greedy else 1.0 / float(temperature)
    scale = float(cfg_scale)

    def next_token(logits: Tensor, t: int) -> Tensor:
        """(rows, V) logits of the last position -> (B, 1) sampled ids."""
        logits = logits.float()
        if guided:
            cond, uncond = logits[:B], logits[B:]
            logits = cond + scale * (cond - uncond)
        if raw is not None:
            raw[:, t] = logits
        if inv_temp != 1.0:
            logits = logits * inv_temp
        if bias is not None:
            logits = logits + (bias[t] if per_step_bias else bias)
        if greedy:
            return logits.argmax(dim=-1, keepdim=True)
        logits = top_p_filter(top_k_filter(logits, top_k), top_p)
        tok = draw(torch.softmax(logits, dim=-1), generator)
        invalid.logical_or_(tok >= V)       # NaN probabilities (non-finite logits) land past the vocabulary
        return tok.clamp_(max=V - 1)

    invalid = torch.zeros(B, 1, dtype=torch.bool, device=device)      # checked once, after the loop

    def step_ids(tok: Tensor) -> Tensor:
        return torch.cat([tok, tok], dim=0) if guided else tok             # (rows, 1)

    def step_positions(t: int) -> Tensor:
        if token_positions is None:
            return step_pos[t]                                              # (rows, 1, 3)
        pos = token_positions(out[:, :t + 1], t)                            # (B, 1, 3)
        return torch.cat([pos, pos], dim=0) if guided else pos

    def as_step(tok: Tensor, t: int) -> Sequence:
        return Sequence(ids=step_ids(tok), labels=labels, pos=step_positions(t))

    done = torch.zeros(B, 1, dtype=torch.bool, device=device) if stop_token is not None else None

    def finished(tok: Tensor, t: int) -> bool:
        """Record `tok` at step t; True when every row has stopped (checked every `stop_check` steps)."""
        if done is None:
            out[:, t:t + 1] = tok
            return False
        out[:, t:t + 1] = torch.where(done, stop_token, tok)
        done.logical_or_(tok == stop_token)
        return (t + 1) % stop_check == 0 and bool(done.all())

    def injected(t: int) -> Sequence | None:
        extra = inject(out[:, :t + 1], t) if inject is not None else None
        return _batch_cat(extra, extra) if extra is not None and guided else extra

    if use_cache:
        cache = model.new_cache(rows, T0 + steps + max_injected)
        hidden = model(seq, cache=cache)[:, -1]                             # (rows, C)
        table = None  # position embeddings of the fed tokens, when they do not depend on what is sampled
        if token_positions is None and inject is None:
            if T0 + steps - 1 > model.cfg.block_size:
                raise ValueError(f"sequence of {T0 + steps - 1} tokens exceeds block_size={model.cfg.block_size}")
            table = model.position_embedding(positions[:-1], torch.arange(T0, T0 + steps - 1, device=device))

        def embed_step(tok: Tensor, t: int) -> Tensor:
            """(B, 1) ids sampled at step t -> (rows, C) input embeddings at position ``cache.length``."""
            x = model.wte(step_ids(tok)[:, 0])                              # (rows, C)
            if table is not None:
                return x + table[t]
            if cache.length >= model.cfg.block_size:
                raise ValueError(f"sequence of {cache.length + 1} tokens exceeds block_size={model.cfg.block_size}")
            offset = torch.tensor(cache.length, device=device)
            return x + model.position_embedding(step_positions(t)[:, 0], offset)

        graphed = None
        if cuda_graph and table is not None and device.type == "cuda" and steps > 1:
            try:
                graphed = GraphedDecode(model, cache, table, cache.length, rows)
            except RuntimeError as e:  # e.g. an op that cannot be captured: the eager steps give the same tokens
                warnings.warn(f"patchgpt: sampling without a CUDA graph ({e})", stacklevel=2)
        logits = model.logits(hidden)                                       # (rows, V)
        for t in range(steps):
            tok = next_token(logits, t)
            if finished(tok, t):
                break
            if t + 1 < steps:
                if graphed is not None:
                    logits = graphed.step(step_ids(tok)[:, 0], t)
                    continue
                hidden = model.decode(embed_step(tok, t), cache)
                extra = injected(t)
                if extra is not None:
                    hidden = model(extra, cache=cache)[:, -1]
                logits = model.logits(hidden)
    else:
        cur = seq
        for t in range(steps):
            tok = next_token(model.logits(model(cur)[:, -1]), t)
            if finished(tok, t):
                break
            if t + 1 < steps:
                cur = concat(cur, as_step(tok, t), prefix_len=prefix_len)
                extra = injected(t)
                if extra is not None:
                    cur = concat(cur, extra, prefix_len=prefix_len)
    if bool(invalid.any()):
        raise ValueError("sampling met non-finite probabilities: the model's logits contain NaN or inf")
    return (out, raw) if return_logits else out
