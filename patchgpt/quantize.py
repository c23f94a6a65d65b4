"""Fewer bytes per decoding step: weight-only int8 linear layers for sampling and decoding on the CPU.

Decoding a few rows at a time streams every weight once per token, so on a CPU its speed is bound by memory
traffic, not arithmetic (docs/benchmarks.md). `quantize_int8(model)` returns a copy of a `GPT` whose blocks'
linear layers and LM head keep int8 weights with one fp32 scale per output channel (symmetric, round to
nearest), multiplied by PyTorch's own int8 weight-only kernel (``torch._weight_int8pack_mm``, as gpt-fast
uses) on bf16 activations: a quarter of the weight bytes. The residual stream, norms, embeddings and
attention stay fp32 (the KV cache too, unless `kv_dtype` asks for bf16).
It is for inference only, the CPU default of loaded checkpoints (`load(precision="auto")`); the fp32 model stays
the exact reference (cached == uncached): `precision="fp32"`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import GPT, Block, KVCache


class Int8Linear(nn.Module):
    """``y = x @ (q * s).T + b`` with int8 `q` (out, in) and per-output-channel fp32 scales `s` (out,)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float()                                        # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0                      # (out,)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale)
        self.register_buffer("scales_bf16", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        # bf16 activations: the CPU kernel's fast path (fp32 inputs take a slow fallback, ~14x slower here)
        a = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()          # (N, in)
        y = torch._weight_int8pack_mm(a, self.qweight, self.scales_bf16).to(x.dtype)  # (N, out)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def mm(self, a: Tensor) -> Tensor:
        """(N, in) bf16 -> (N, out): the kernel's bf16 output, plus the bias in fp32 where there is one."""
        y = torch._weight_int8pack_mm(a, self.qweight, self.scales_bf16)               # (N, out) bf16
        return y if self.bias is None else y.float() + self.bias

    def dequantized(self) -> Tensor:
        """The weight the int8 values stand for (out, in), for measuring the rounding."""
        return self.qweight.float() * self.scales[:, None]


class Int8Block(Block):
    """A `Block` whose linear layers are `Int8Linear`: the same `decode` values in fewer operations.

    `Block.decode` would convert every int8 product back to fp32 and each input to bf16 again. Here each
    sub-layer's input is converted once, and a product stays bf16 until an fp32 operation takes it, where
    type promotion widens it exactly as ``.float()`` would: the tokens equal `Block.decode` on these layers.
    """

    def decode(self, x: Tensor, cache: KVCache, layer: int, at: Tensor | None = None,
               visible: Tensor | None = None) -> Tensor:
        if at is not None or cache.k.dtype != x.dtype:   # CUDA-graph steps, a bf16 cache: the general path
            return super().decode(x, cache, layer, at, visible)
        B, C = x.shape
        attn, mlp, n = self.attn, self.mlp, cache.length
        qkv = attn.qkv.mm(self.ln_1(x).to(torch.bfloat16))                     # (B, 3C)
        q, k, v = qkv.view(B, 3, attn.n_head, 1, C // attn.n_head).unbind(1)   # 3 x (B, H, 1, hd)
        keys, values = cache.layers[layer]                                     # (B, H, max_len, hd)
        keys.narrow(2, n, 1).copy_(k)
        values.narrow(2, n, 1).copy_(v)
        y = F.scaled_dot_product_attention(q.to(x.dtype), keys.narrow(2, 0, n + 1),
                                           values.narrow(2, 0, n + 1))         # (B, H, 1, hd)
        x = x + attn.proj.mm(y.view(B, C).to(torch.bfloat16))                  # (B, H, 1, hd) -> (B, C)
        h = mlp.act(mlp.fc.mm(self.ln_2(x).to(torch.bfloat16)).to(x.dtype))   # (B, 4C)
        return x + mlp.proj.mm(h.to(torch.bfloat16))


def quantize_int8(model: GPT, kv_dtype: torch.dtype | None = None) -> GPT:
    """A copy of `model` in eval mode with int8 weights in every block's linear layers and the LM head;
    `kv_dtype` (e.g. ``torch.bfloat16``): keep its decoding KV cache in that dtype too."""
    cached = model.__dict__.pop("_int8", None)     # not copied along
    try:
        q = copy.deepcopy(model).eval()
    finally:
        if cached is not None:
            model.__dict__["_int8"] = cached
    q.kv_dtype = kv_dtype
    for block in q.blocks:
        block.__class__ = Int8Block   # the same module, with the fewer-operations decoding step
        block.attn.qkv, block.attn.proj = Int8Linear(block.attn.qkv), Int8Linear(block.attn.proj)
        block.mlp.fc, block.mlp.proj = Int8Linear(block.mlp.fc), Int8Linear(block.mlp.proj)
    q.lm_head = Int8Linear(q.lm_head)
    return q


def int8_copy(model: GPT) -> GPT:
    """`quantize_int8(model)`, made once and kept beside the model until one of its weights changes (an
    optimizer step, a load), so that decoding batch after batch does not quantize again each time."""
    key = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cached = model.__dict__.get("_int8")             # a plain attribute: not a submodule, never saved
    if cached is None or cached[0] != key:
        cached = (key, quantize_int8(model))
        model.__dict__["_int8"] = cached
    return cached[1]
