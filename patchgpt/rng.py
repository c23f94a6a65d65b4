"""Per-row random draws that do not depend on how a global batch is split over processes.

Under torchrun each rank holds a slice of every (seed, step) batch. A draw made for the whole global batch
from the step's generator, then sliced to this rank's rows, gives every image what a one-process run gives
it, so a run's results do not depend on the number of processes (``DistributedSampler`` does the same for
the batch order). `RowRNG` is that idiom in one place; tasks receive one in ``forward`` and ``augment``.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RowRNG:
    """A step's generator plus where this process's rows sit in the global batch.

    Args:
        gen: the step's generator (seeded by (seed, step, micro-step)); batch-wide draws use it directly.
        first: index of this process's first row in the global batch.
        total: rows in the global batch; None = this process holds the whole batch.
    """

    def __init__(self, gen: torch.Generator, first: int = 0, total: int | None = None) -> None:
        self.gen, self.first, self.total = gen, first, total

    def _span(self, n: int) -> tuple[int, int]:
        total = n if self.total is None else self.total
        if self.first + n > total:
            raise ValueError(f"rows {self.first}..{self.first + n - 1} do not fit a global batch of {total}")
        return total, self.first

    def rand(self, n: int, *shape: int) -> Tensor:
        """Uniform [0, 1) draws (n, *shape) for this process's `n` rows."""
        total, first = self._span(n)
        return torch.rand(total, *shape, generator=self.gen)[first:first + n]

    def randint(self, low: int, high: int, n: int, *shape: int) -> Tensor:
        """Integer draws in [low, high) of shape (n, *shape) for this process's `n` rows."""
        total, first = self._span(n)
        return torch.randint(low, high, (total, *shape), generator=self.gen)[first:first + n]

    def generators(self, n: int) -> list[torch.Generator]:
        """One independent generator per row (seeded from draws for the global batch)."""
        return [torch.Generator().manual_seed(int(s)) for s in self.randint(0, 2**62, n)]

    def batch_randint(self, low: int, high: int) -> int:
        """One integer in [low, high) shared by the whole global batch (e.g. a prefix length)."""
        return int(torch.randint(low, high, (1,), generator=self.gen))
