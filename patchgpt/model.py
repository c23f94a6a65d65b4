"""The one backbone: a pre-norm decoder-only GPT over `Sequence`s.

References: GPT-2 (Radford et al. 2019) and karpathy/nanoGPT for the block and the init; AIM
(El-Nouby et al. 2024, apple/ml-aim) for prefix-causal attention over patch inputs; iGPT (Chen et al. 2020)
for pixels as tokens. Attention is `F.scaled_dot_product_attention`; the T x T matrix is never built by
hand. The KV cache is an explicit object passed in, never state hidden on the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sequence import Sequence


@dataclass
class GPTConfig:
    """Backbone hyper-parameters. `vocab_size` and `patch_dim` are filled in by the task."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: float = 4.0
    block_size: int = 1024       # longest sequence (learned 1-D positions)
    max_frames: int = 32         # grid sizes for the factorised (frame, row, col) position embeddings
    max_rows: int = 128
    max_cols: int = 128
    vocab_size: int = 1
    patch_dim: int = 0           # 0: no continuous inputs
    dropout: float = 0.0
    drop_path: float = -1.0      # stochastic depth, rising linearly to this rate at the last block
    bias: bool = False           # (-1: the task's fine-tuning recipe picks it when training from --init)
    # Options other published GPTs over images use (OpenAI's ImageGPT: rms, quick_gelu, bias, no grid positions);
    # patchgpt's own defaults are the fast ones measured here (docs/design.md).
    norm: str = "layer"          # layer (LayerNorm) | rms (RMSNorm: not mean-centred, no bias)
    norm_eps: float = 1e-5
    activation: str = "gelu"     # gelu (exact, erf) | gelu_tanh | quick_gelu (x * sigmoid(1.702 x))
    grid_pos: bool = True        # add the factorised (frame, row, col) embeddings; False: 1-D positions only

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


SIZES: dict[str, dict] = {
    # name: (layers, heads, width) — nano is for tests, micro for laptop CPU runs, the rest for GPUs.
    "nano": dict(n_layer=2, n_head=2, n_embd=32),
    "micro": dict(n_layer=4, n_head=4, n_embd=128),
    "mini": dict(n_layer=6, n_head=8, n_embd=256),
    "small": dict(n_layer=12, n_head=6, n_embd=384),
    "base": dict(n_layer=12, n_head=12, n_embd=768),
    "large": dict(n_layer=24, n_head=16, n_embd=1024),
}


class KVCache:
    """Preallocated keys and values for incremental decoding.

    Shapes: ``k[i], v[i]`` are (B, H, max_len, hd) for layer i; `length` counts filled positions.
    Writing into a preallocated buffer avoids re-allocating by concatenation at every step.
    """

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        max_len = max_len or cfg.block_size
        hd = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_len, hd)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # per-layer (B, H, max_len, hd) views, made once: the decoding step indexes them with one `narrow`
        self.layers = [(self.k[i], self.v[i]) for i in range(cfg.n_layer)]   # `select`: in-place safe
        self.length = 0
        self.max_len = max_len
        self.prefix_len = 0  # the bidirectional prefix set at prefill

    def reset(self) -> None:
        self.length = 0
        self.prefix_len = 0


class Attention(nn.Module):
    """Multi-head self-attention with a fused QKV projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        B, T, C = x.shape
        hd = C // self.n_head
        # (B, T, 3C) -> (3, B, H, T, hd)
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, hd).permute(2, 0, 3, 1, 4)
        if cache is not None:
            start = cache.length
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k = cache.k[layer, :, :, :start + T]   # (B, H, L, hd)
            v = cache.v[layer, :, :, :start + T]
        drop = self.dropout if self.training else 0.0
        if k.dtype != q.dtype:   # a cache kept in another dtype (bf16): attend in it
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=is_causal).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=drop)
        y = y.transpose(1, 2).reshape(B, T, C)     # (B, H, T, hd) -> (B, T, C)
        return self.proj(y)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation of OpenAI's ImageGPT and CLIP."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    """The MLP's non-linearity by name (`GPTConfig.activation`)."""
    if name == "gelu":
        return nn.GELU()  # exact erf GELU: much cheaper on CPU than the written-out tanh form
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"model.activation={name!r}: choose gelu, gelu_tanh or quick_gelu")


def norm(cfg: GPTConfig) -> nn.Module:
    """The pre-norm layer (`GPTConfig.norm`): LayerNorm (bias with ``cfg.bias``) or RMSNorm."""
    if cfg.norm == "layer":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
    if cfg.norm == "rms":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    raise ValueError(f"model.norm={cfg.norm!r}: choose layer or rms")


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        hidden = int(cfg.mlp_ratio * cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.act = activation(cfg.activation)
        self.proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth (Huang et al. 2016): zero a residual branch for a random `rate` of the rows of the
    (B, T, C) `x` while training, scaling the kept rows by 1 / (1 - rate)."""
    if rate <= 0 or not training:
        return x
    keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= rate                  # (B, 1, 1)
    return x * keep.to(x.dtype) / (1 - rate)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)) (branches dropped at `drop_path`)."""

    def __init__(self, cfg: GPTConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.drop_path = drop_path
        self.ln_1 = norm(cfg)
        self.attn = Attention(cfg)
        self.ln_2 = norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, mask: Tensor | None, is_causal: bool,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        if self.drop_path > 0 and self.training:
            x = x + drop_path(self.attn(self.ln_1(x), mask, is_causal, cache, layer), self.drop_path, True)
            return x + drop_path(self.mlp(self.ln_2(x)), self.drop_path, True)
        x = x + self.attn(self.ln_1(x), mask, is_causal, cache, layer)
        return x + self.mlp(self.ln_2(x))

    def decode(self, x: Tensor, cache: KVCache, layer: int, at: Tensor | None = None,
               visible: Tensor | None = None) -> Tensor:
        """The same block for one new token per row, (B, C) -> (B, C), attending to everything cached.

        Writes this token's key and value at ``cache.length`` (the caller advances it), or, with `at` (a (1,)
        int64 tensor) and `visible` ((1, max_len) bool), at index `at`, attending over the whole buffer with
        `visible` as the mask: fixed shapes, for CUDA graphs. The same arithmetic as `forward` with fewer,
        fused ops (the residual adds ride on ``addmm``): the per-token sampling path.
        """
        B, C = x.shape
        attn, mlp, n = self.attn, self.mlp, cache.length
        qkv = attn.qkv(self.ln_1(x))                                        # (B, 3C)
        q, k, v = qkv.view(B, 3, attn.n_head, 1, C // attn.n_head).unbind(1)  # 3 x (B, H, 1, hd)
        if at is None:
            keys, values = cache.layers[layer]                                          # (B, H, max_len, hd)
            keys.narrow(2, n, 1).copy_(k)
            values.narrow(2, n, 1).copy_(v)
            keys, values = keys.narrow(2, 0, n + 1), values.narrow(2, 0, n + 1)         # (B, H, n + 1, hd)
        else:
            # (under autocast k and v can be bf16 while the cache keeps the weights' dtype)
            keys = cache.k[layer].index_copy_(2, at, k.to(cache.k.dtype))
            values = cache.v[layer].index_copy_(2, at, v.to(cache.v.dtype))
        if keys.dtype != q.dtype:   # a bf16 cache: attend in bf16, back to the stream's dtype
            y = F.scaled_dot_product_attention(q.to(keys.dtype), keys, values, attn_mask=visible).to(q.dtype)
        else:
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible)      # (B, H, 1, hd)
        x = _add_linear(x, y.view(B, C), attn.proj)      # (B, H, 1, hd) -> (B, C): H-major, as in forward
        return _add_linear(x, mlp.act(mlp.fc(self.ln_2(x))), mlp.proj)


def _add_linear(x: Tensor, h: Tensor, linear: nn.Linear) -> Tensor:
    """``x + linear(h)`` for 2-D inputs in one ``addmm``.

    Under autocast the sum is left to type promotion, as in `forward`: a fused ``addmm`` would round the
    residual stream itself to bf16.
    """
    if torch.is_autocast_enabled(x.device.type) or not isinstance(linear, nn.Linear):   # autocast, or int8
        return x + linear(h)
    return torch.addmm(x if linear.bias is None else x + linear.bias, h, linear.weight.t())


def attention_mask(q_len: int, k_len: int, offset: int, prefix_len: int,
                   device: torch.device) -> tuple[Tensor | None, bool]:
    """Boolean (q_len, k_len) mask (True = may attend) for queries at positions offset..offset+q_len-1.

    Key j is visible to query i when ``j <= i`` (causal) or ``j < prefix_len`` (the bidirectional prefix,
    AIM's prefix attention). Returns ``(None, True)`` when plain causal attention is enough, so SDPA can use
    its fused causal kernel, and ``(None, False)`` when every query sees every key.
    """
    if offset == 0 and prefix_len <= 1:
        return None, q_len > 1
    if q_len == 1 or k_len <= prefix_len:
        # One new query after the cache sees every cached key; a prefix over all keys hides none. Decided
        # from the integers alone (no data-dependent branch), so a compiled forward does not break here.
        return None, False
    qi = torch.arange(offset, offset + q_len, device=device)[:, None]  # (q, 1)
    kj = torch.arange(k_len, device=device)[None, :]                   # (1, k)
    return (kj <= qi) | (kj < prefix_len), False                       # (q, k)


class GPT(nn.Module):
    """Decoder-only transformer over a `Sequence`.

    ``forward(seq, cache=None, upto=None) -> hidden (B, T, C)`` and ``logits(hidden) -> (B, T, V)``.
    Inputs are the sum of a token or patch embedding, a learned 1-D position and factorised
    (frame, row, col) grid positions (index 0 = not a grid token).
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.decode_int8 = False   # sampling and decoding on the CPU with int8 weights (`patchgpt.quantize`)
        C = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.wpe = nn.Embedding(cfg.block_size, C)
        self.frame_emb = nn.Embedding(cfg.max_frames + 1, C)
        self.row_emb = nn.Embedding(cfg.max_rows + 1, C)
        self.col_emb = nn.Embedding(cfg.max_cols + 1, C)
        self.patch_proj = nn.Linear(cfg.patch_dim, C) if cfg.patch_dim > 0 else None
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        L, rate = cfg.n_layer, max(0.0, cfg.drop_path)
        self.blocks = nn.ModuleList([Block(cfg, rate * i / max(1, L - 1)) for i in range(L)])
        self.ln_f = norm(cfg)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                # GPT-2: scale residual projections by depth so the residual stream stays O(1).
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
        for emb in (self.frame_emb, self.row_emb, self.col_emb):
            nn.init.zeros_(emb.weight[0])  # index 0 = "not a grid token" adds nothing

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, seq: Sequence, offset: int = 0) -> Tensor:
        """Input embeddings (B, T, C) for `seq`, whose first token sits at absolute position `offset`."""
        B, T = seq.ids.shape
        if offset + T > self.cfg.block_size:
            raise ValueError(f"sequence of {offset + T} tokens exceeds block_size={self.cfg.block_size}")
        x = self.wte(seq.ids)                                            # (B, T, C)
        if seq.patches is not None:
            if self.patch_proj is None:
                raise ValueError("this model has no patch input (patch_dim=0)")
            px = self.patch_proj(seq.patches.to(x.dtype))                # (B, T, C)
            x = px if seq.is_patch is None else torch.where(seq.is_patch[..., None], px, x)
        t = torch.arange(offset, offset + T, device=x.device)
        return self.drop(x + self.position_embedding(seq.pos, t))

    def position_embedding(self, pos: Tensor, t: Tensor) -> Tensor:
        """The learned 1-D position of absolute index `t` (...) plus the grid embeddings of `pos` (..., 3).

        Returns (..., C); what `embed` adds to a token's own embedding.
        """
        if not self.cfg.grid_pos:   # 1-D positions only; broadcasts against the token embeddings
            return self.wpe(t)
        grid = self.frame_emb(pos[..., 0]) + self.row_emb(pos[..., 1]) + self.col_emb(pos[..., 2])
        return self.wpe(t) + grid

    def forward(self, seq: Sequence, cache: KVCache | None = None, upto: int | None = None) -> Tensor:
        """Hidden states (B, T, C).

        Args:
            seq: the input sequence; ``seq.prefix_len`` leading tokens attend bidirectionally.
            cache: if given, keys/values are appended to it and queries attend to everything cached.
            upto: run only the first `upto` blocks and return their raw residual stream (for probes);
                None runs all blocks and applies the final LayerNorm.
        """
        if cache is not None:   # incremental decoding runs eagerly even in a compiled backbone (see `_cached`)
            return self._cached(seq, cache, upto)
        return self._forward(seq, cache, upto)

    @torch.compiler.disable
    def _cached(self, seq: Sequence, cache: KVCache, upto: int | None) -> Tensor:
        """`forward` with a KV cache, never traced by `torch.compile`: the cache's length changes at every
        call, and each new length would be a recompile (prefill and injected tokens come through here)."""
        return self._forward(seq, cache, upto)

    def _forward(self, seq: Sequence, cache: KVCache | None, upto: int | None) -> Tensor:
        offset = cache.length if cache is not None else 0
        if cache is not None and offset == 0:
            cache.prefix_len = seq.prefix_len
        prefix = cache.prefix_len if cache is not None else seq.prefix_len
        x = self.embed(seq, offset)
        T = x.shape[1]
        mask, is_causal = attention_mask(T, offset + T, offset, prefix, x.device)
        n = self.cfg.n_layer if upto is None else upto
        for i, block in enumerate(self.blocks[:n]):
            x = block(x, mask, is_causal, cache, i)
        if cache is not None:
            cache.length = offset + T
        return self.ln_f(x) if n == self.cfg.n_layer else x

    def decode(self, x: Tensor, cache: KVCache, at: Tensor | None = None) -> Tensor:
        """One new token per row through all blocks with the KV cache (eval only; dropout is not applied).

        Args:
            x: (B, C) input embeddings of the new tokens (token embedding + `position_embedding`).
            cache: filled up to ``cache.length`` by an earlier `forward(..., cache=cache)` (the prefill).
            at: None, or a (1,) int64 tensor: the cache index of this token, which then sees indices
                ``<= at``. ``cache.length`` is then neither read nor advanced (the caller keeps it): every
                shape is fixed, so the step can be captured once as a CUDA graph and replayed.
        Returns the (B, C) final hidden states; equals ``forward`` on the one-token sequence up to float
        rounding, in fewer operations (the sampling loop's hot path).
        """
        if at is not None:
            visible = (torch.arange(cache.max_len, device=x.device) <= at)[None]   # (1, max_len)
            for i, block in enumerate(self.blocks):
                x = block.decode(x, cache, i, at, visible)
            return self.ln_f(x)
        n = cache.length
        if n + 1 > min(cache.max_len, self.cfg.block_size):
            raise ValueError(f"decoding token {n + 1} exceeds the cache ({cache.max_len}) or "
                             f"block_size={self.cfg.block_size}")
        for i, block in enumerate(self.blocks):
            x = block.decode(x, cache, i)
        cache.length = n + 1
        return self.ln_f(x)

    def logits(self, hidden: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, V) next-token logits."""
        return self.lm_head(hidden)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """A preallocated cache in the weights' dtype, or ``self.kv_dtype`` where set (a bf16 cache: half the
        bytes each decoding step reads; `patchgpt.quantize`)."""
        p = next(self.parameters())
        dtype = getattr(self, "kv_dtype", None) or p.dtype
        return KVCache(self.cfg, batch_size, max_len, device=p.device, dtype=dtype)
