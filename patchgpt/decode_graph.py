"""One sampling step captured as a CUDA graph and replayed for every token.

On a GPU, one decode step of a small model is a hundred or so tiny kernels, and the time goes to launching
them, not to running them (measured: the KV cache then gains little over recomputing everything). A CUDA
graph records the step's kernels once and replays them with one launch. That needs fixed shapes and fixed
memory: the step reads the sampled ids and the step index from static buffers, writes its keys and values at
a tensor index, attends over the whole preallocated cache with a mask (`GPT.decode` with ``at``), and leaves
the next-token logits in a static output.

Reference (ideas, not code): gpt-fast (pytorch-labs) and LlamaGen, which capture the decode step with
``torch.compile(mode="reduce-overhead")``; here the step is captured directly with ``torch.cuda.graph``,
so there is no compile time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import GPT, KVCache

__all__ = ["GraphedDecode"]


class GraphedDecode:
    """``step(ids, t) -> logits``: feed the ids sampled at step t and get the next logits, by graph replay.

    Args:
        model: the backbone (eval mode), on a CUDA device.
        cache: the prefilled cache; the token of step t is written at index ``start + t``.
        table: (steps, C) position embeddings of the fed tokens (row t for step t).
        start: cache length after the prefill.
    """

    def __init__(self, model: GPT, cache: KVCache, table: Tensor, start: int, rows: int) -> None:
        self.device = device = table.device
        self.model, self.cache, self.table, self.start = model, cache, table, start
        self.ids = torch.zeros(rows, dtype=torch.long, device=device)       # (rows,) the fed tokens
        self.t = torch.zeros(1, dtype=torch.long, device=device)            # (1,) the step index
        # Warm up on a side stream (kernels pick their algorithms and workspaces), then record the step.
        # Both write keys and values at index `start` only, which step 0 overwrites. Capture and replay run
        # with the model's GPU as the current device, since a graph records only its current device's work.
        with torch.cuda.device(device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.logits = self._step()                                  # (rows, V), static

    def _step(self) -> Tensor:
        x = self.model.wte(self.ids) + self.table.index_select(0, self.t)   # (rows, C)
        return self.model.logits(self.model.decode(x, self.cache, at=self.t + self.start))

    def step(self, ids: Tensor, t: int) -> Tensor:
        """(rows,) ids sampled at step t -> (rows, V) logits of step t + 1 (valid until the next call)."""
        self.ids.copy_(ids)
        self.t.fill_(t)
        with torch.cuda.device(self.device):
            self.graph.replay()
        self.cache.length = self.start + t + 1
        return self.logits
