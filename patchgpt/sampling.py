"""Autoregressive sampling from a `GPT`, kept apart from the model.

One prefill forward over the whole prompt fills a preallocated `KVCache` sized for prompt + generated
tokens; then each step feeds one token per row through `GPT.decode` (one token per row, fused ops) and reads
the next-token logits. The per-step path does no host synchronisation (no ``.item()``): position
embeddings, allowed-token masks and the output buffer are prepared before the loop. On a CUDA device the
step is recorded once as a CUDA graph and replayed (`GraphedDecode`), since there a step is launch-bound.

Per step, in float32: logits / temperature (temperature 0 = greedy argmax), the allowed-range mask
(disallowed ids -> -inf), top-k, top-p (nucleus), then one uniform number per row from the seeded
`torch.Generator`, mapped through the inverse CDF of the probabilities (`draw`): B random numbers per step
instead of the B x V that ``torch.multinomial`` draws. Classifier-free guidance runs the conditional and
unconditional prompts as one doubled batch and mixes the logits as ``cond + cfg_scale * (cond - uncond)``.

What a task adds to plain decoding goes through a `DecodeHook`: positions computed from the sampled values
(detection's box coordinates point at grid cells), input-only tokens fed between sampled ones (a glimpse of
the region a box names), and a stop token.

References (ideas, not code): LlamaGen ``autoregressive/models/generate.py`` (Sun et al. 2024; prefill then
per-token decode with a static cache, classifier-free guidance on a doubled batch, top-k / top-p filters) and
the nanochat engine (karpathy/nanochat; a preallocated KV cache and a lean per-step loop).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import torch
from torch import Tensor

from .decode_graph import GraphedDecode
from .model import GPT, KVCache
from .quantize import int8_copy
from .sequence import Sequence

__all__ = ["SamplingParams", "DecodeHook", "top_k_filter", "top_p_filter", "allowed_mask", "draw", "sample"]

Ranges = SequenceOf[range]
Allowed = Ranges | Callable[[int], Ranges]


@dataclass(frozen=True)
class SamplingParams:
    """How a token is drawn from the logits.

    Attributes:
        temperature: logits are divided by it; 0 = greedy argmax (no randomness used).
        top_k: keep only the k most likely tokens (0 = all).
        top_p: nucleus sampling threshold (1 = off).
        cfg_scale: classifier-free guidance scale, logits = cond + cfg_scale * (cond - uncond); 0 = plain
            conditional (the unconditional prompt, if any, is then not run).
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")


class DecodeHook:
    """What a caller adds to decoding; subclass it and override what you need (the base adds nothing).

    `history` is the (B, t + 1) ids generated so far, including the token of step t (after a row has
    stopped, its stop token). With classifier-free guidance, what the hook returns is fed to both halves.

    Attributes:
        dynamic: True when the fed positions depend on the sampled values: `position` is then called at
            every step. False (default): `position` is never called and the tokens take `sample`'s fixed
            `positions`, so they can be precomputed and, on CUDA, the step replayed as a graph.
        max_injected: the most input-only tokens `inject` adds over a whole call (room in the cache);
            0 (default) = `inject` is never called.
        stop_token: once every row has emitted this id, stop early (checked every `stop_check` steps, one
            host synchronisation each); the remaining columns of the output, and a stopped row's later
            tokens, read as this id. None = always run all steps.
        stop_check: steps between the checks for `stop_token`.
    """

    dynamic: bool = False
    max_injected: int = 0
    stop_token: int | None = None
    stop_check: int = 1

    def position(self, history: Tensor, t: int) -> Tensor | None:
        """(B, 1, 3) grid position of the token generated at step t, or None for its fixed position."""
        return None

    def inject(self, history: Tensor, t: int) -> Sequence | None:
        """A (B, k) `Sequence` to feed after the token of step t (not sampled, not returned), or None."""
        return None


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


def _allowed_table(allowed: Allowed | None, steps: int, vocab_size: int, device: torch.device) -> Tensor | None:
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


def _fixed_positions(positions: Tensor | None, steps: int, device: torch.device) -> Tensor:
    """The (steps, 3) positions of the generated tokens, zeros (non-grid tokens) when None; checked."""
    if positions is None:
        positions = torch.zeros(steps, 3, dtype=torch.long, device=device)
    positions = positions.to(device=device, dtype=torch.long)
    if positions.shape != (steps, 3):
        raise ValueError(f"positions must be (steps, 3) = ({steps}, 3), got {tuple(positions.shape)}")
    return positions


class _Output:
    """The (B, steps) ids being generated, the logits they were drawn from, and the stop-token bookkeeping."""

    def __init__(self, B: int, steps: int, V: int, device: torch.device, hook: DecodeHook,
                 return_logits: bool) -> None:
        self.ids = torch.empty(B, steps, dtype=torch.long, device=device)
        self.raw = torch.zeros(B, steps, V, device=device) if return_logits else None
        self.stop, self.check = hook.stop_token, hook.stop_check
        if self.stop is not None:
            self.ids.fill_(self.stop)
        self.done = torch.zeros(B, 1, dtype=torch.bool, device=device) if self.stop is not None else None

    def record(self, tok: Tensor, t: int) -> bool:
        """Record the (B, 1) ids of step t; True when every row has stopped (checked every `check` steps)."""
        if self.done is None:
            self.ids[:, t:t + 1] = tok
            return False
        self.ids[:, t:t + 1] = torch.where(self.done, self.stop, tok)
        self.done.logical_or_(tok == self.stop)
        return (t + 1) % self.check == 0 and bool(self.done.all())

    def result(self) -> Tensor | tuple[Tensor, Tensor]:
        return self.ids if self.raw is None else (self.ids, self.raw)


class _Picker:
    """(rows, V) logits of step t -> (B, 1) ids: guidance, temperature, allowed ids, top-k / top-p, a draw."""

    def __init__(self, params: SamplingParams, bias: Tensor | None, B: int, guided: bool,
                 generator: torch.Generator | None, raw: Tensor | None, device: torch.device) -> None:
        self.p, self.bias, self.B, self.guided, self.generator, self.raw = params, bias, B, guided, generator, raw
        self.greedy = params.temperature == 0
        self.inv_temp = 1.0 if self.greedy else 1.0 / float(params.temperature)
        self.invalid = torch.zeros(B, 1, dtype=torch.bool, device=device)   # checked once, after the loop

    def __call__(self, logits: Tensor, t: int) -> Tensor:
        logits = logits.float()
        if self.guided:
            cond, uncond = logits[:self.B], logits[self.B:]
            logits = cond + float(self.p.cfg_scale) * (cond - uncond)
        if self.raw is not None:
            self.raw[:, t] = logits
        if self.inv_temp != 1.0:
            logits = logits * self.inv_temp
        if self.bias is not None:
            logits = logits + (self.bias[t] if self.bias.dim() == 2 else self.bias)
        if self.greedy:
            return logits.argmax(dim=-1, keepdim=True)
        logits = top_p_filter(top_k_filter(logits, self.p.top_k), self.p.top_p)
        tok = draw(torch.softmax(logits, dim=-1), self.generator)
        V = logits.shape[-1]
        self.invalid.logical_or_(tok >= V)      # NaN probabilities (non-finite logits) land past the vocabulary
        return tok.clamp_(max=V - 1)

    def check(self) -> None:
        if bool(self.invalid.any()):
            raise ValueError("sampling met non-finite probabilities: the model's logits contain NaN or inf")


class _Decoder:
    """Feeds each sampled token through the KV cache and returns the next logits (CUDA graph or eager)."""

    def __init__(self, model: GPT, seq: Sequence, steps: int, positions: Tensor, hook: DecodeHook,
                 guided: bool) -> None:
        self.model, self.hook, self.guided = model, hook, guided
        rows, T0 = seq.shape
        self.step_pos = positions[:, None, None, :].expand(steps, rows, 1, 3)  # [t]: (rows, 1, 3) view
        self.cache: KVCache = model.new_cache(rows, T0 + steps + hook.max_injected)
        self.hidden = model(seq, cache=self.cache)[:, -1]                      # (rows, C): the prefill
        self.table = self.graphed = None   # position embeddings of the fed tokens, when fixed in advance
        if not hook.dynamic and hook.max_injected == 0:
            if T0 + steps - 1 > model.cfg.block_size:
                raise ValueError(f"sequence of {T0 + steps - 1} tokens exceeds block_size={model.cfg.block_size}")
            self.table = model.position_embedding(positions[:-1], torch.arange(T0, T0 + steps - 1,
                                                                               device=positions.device))

    def first_logits(self, cuda_graph: bool) -> Tensor:
        """The prefill's next-token logits (rows, V), after recording the step as a CUDA graph if it can be."""
        steps, rows = self.step_pos.shape[:2]
        if cuda_graph and self.table is not None and self.table.device.type == "cuda" and steps > 1:
            try:
                self.graphed = GraphedDecode(self.model, self.cache, self.table, self.cache.length, rows)
            except RuntimeError as e:  # e.g. an op that cannot be captured: the eager steps give the same tokens
                warnings.warn(f"patchgpt: sampling without a CUDA graph ({e})", stacklevel=4)  # sample's caller
        return self.model.logits(self.hidden)

    def _rows(self, x: Tensor) -> Tensor:
        return torch.cat([x, x], dim=0) if self.guided else x

    def _embed(self, ids: Tensor, history: Tensor, t: int) -> Tensor:
        """(rows,) ids sampled at step t -> (rows, C) input embeddings at position ``cache.length``."""
        x = self.model.wte(ids)
        if self.table is not None:
            return x + self.table[t]
        n, limit = self.cache.length, self.model.cfg.block_size
        if n >= limit:
            raise ValueError(f"sequence of {n + 1} tokens exceeds block_size={limit}")
        pos = self.hook.position(history, t) if self.hook.dynamic else None          # (B, 1, 3)
        pos = self.step_pos[t] if pos is None else self._rows(pos)                    # (rows, 1, 3)
        return x + self.model.position_embedding(pos[:, 0], torch.tensor(n, device=x.device))

    def step(self, tok: Tensor, history: Tensor, t: int) -> Tensor:
        """Feed the (B, 1) ids of step t (and what the hook injects after them) -> (rows, V) next logits."""
        ids = self._rows(tok)[:, 0]
        if self.graphed is not None:
            return self.graphed.step(ids, t)
        hidden = self.model.decode(self._embed(ids, history, t), self.cache)
        extra = self.hook.inject(history, t) if self.hook.max_injected else None
        if extra is not None:
            hidden = self.model(_batch_cat(extra, extra) if self.guided else extra, cache=self.cache)[:, -1]
        return self.model.logits(hidden)


@torch.no_grad()
def sample(model: GPT, prompt: Sequence, steps: int, params: SamplingParams = SamplingParams(), *,
           positions: Tensor | None = None, generator: torch.Generator | None = None,
           allowed: Allowed | None = None, uncond_prompt: Sequence | None = None, hook: DecodeHook | None = None,
           return_logits: bool = False, cuda_graph: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """Sample up to `steps` tokens after `prompt`. Returns generated ids (B, steps), int64.

    Args:
        model: the backbone; put it in eval mode first (dropout is not switched off here).
        prompt: (B, T0) sequence; its `prefix_len` leading tokens attend bidirectionally.
        steps: how many tokens to generate.
        params: temperature, top-k, top-p and guidance scale (`SamplingParams`).
        positions: (steps, 3) grid (frame, row, col) + 1 of each generated token, shared by all rows;
            None = zeros (non-grid tokens).
        generator: random generator (on the model's device) for reproducible draws.
        allowed: id ranges that may be emitted, or a function of the step index returning them.
        uncond_prompt: the unconditional prompt for classifier-free guidance, same shape as `prompt`.
        hook: positions from sampled values, injected input-only tokens, a stop token (`DecodeHook`).
        return_logits: also return the (B, steps, V) float32 logits each token was drawn from (after guidance,
            before temperature, masks and filters), e.g. to score what was generated.
        cuda_graph: on a CUDA device, when the fed positions are fixed in advance and nothing is injected,
            record one step as a CUDA graph and replay it per token (`GraphedDecode`); no effect elsewhere.
            False runs every step eagerly (the same tokens).
    """
    hook = hook or DecodeHook()
    B, device, V = prompt.shape[0], prompt.ids.device, model.cfg.vocab_size
    if getattr(model, "decode_int8", False) and device.type == "cpu":
        model = int8_copy(model)   # loaded checkpoints on the CPU: a quarter of the weight bytes (quantize.py)
    out = _Output(B, steps, V, device, hook, return_logits)
    if steps <= 0:
        return out.result()
    positions = _fixed_positions(positions, steps, device)
    guided = uncond_prompt is not None and params.cfg_scale != 0.0
    seq = _batch_cat(prompt, uncond_prompt) if guided else prompt
    pick = _Picker(params, _allowed_table(allowed, steps, V, device), B, guided, generator, out.raw, device)
    decoder = _Decoder(model, seq, steps, positions, hook, guided)
    logits = decoder.first_logits(cuda_graph)
    for t in range(steps):
        tok = pick(logits, t)
        if out.record(tok, t):
            break
        if t + 1 < steps:
            logits = decoder.step(tok, out.ids[:, :t + 1], t)
    pick.check()
    return out.result()
