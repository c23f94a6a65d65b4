"""Fewer bytes per decoding step: weight-only int8 linear layers for sampling and decoding on the CPU.

Decoding a few rows at a time streams every weight once per token, so on a CPU its speed is bound by memory
traffic, not arithmetic (docs/benchmarks.md). `quantize_int8(model)` returns a copy of a `GPT` whose blocks'
linear layers and LM head keep int8 weights with one fp32 scale per output channel (symmetric, round to
nearest), multiplied by PyTorch's own int8 weight-only kernel (``torch._weight_int8pack_mm``, as gpt-fast
uses) on bf16 activations: a quarter of the weight bytes. The residual stream, norms, embeddings and
attention stay fp32 (the KV cache too, unless `kv_dtype` asks for bf16).
It is opt-in and for inference only; the fp32 model stays the exact reference (cached == uncached).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .model import GPT


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

    def dequantized(self) -> Tensor:
        """The weight the int8 values stand for (out, in), for measuring the rounding."""
        return self.qweight.float() * self.scales[:, None]


def quantize_int8(model: GPT, kv_dtype: torch.dtype | None = None) -> GPT:
    """A copy of `model` in eval mode with int8 weights in every block's linear layers and the LM head;
    `kv_dtype` (e.g. ``torch.bfloat16``): keep its decoding KV cache in that dtype too."""
    q = copy.deepcopy(model).eval()
    q.kv_dtype = kv_dtype
    for block in q.blocks:
        block.attn.qkv, block.attn.proj = Int8Linear(block.attn.qkv), Int8Linear(block.attn.proj)
        block.mlp.fc, block.mlp.proj = Int8Linear(block.mlp.fc), Int8Linear(block.mlp.proj)
    q.lm_head = Int8Linear(q.lm_head)
    return q
