"""A mixture of named data sets, one per task of a multi-task model (``train multi``).

Every training step holds rows of every part, in fixed shares of the batch (``multi.weights``), so each
task's loss and head take part in every step (and DDP sees every parameter used on every rank). Each part
keeps its own (seed, step) order, so a run is deterministic and independent of the number of processes, as
every other run is. A batch is a dict of the parts' batches, ``{"caption": {...}, "detect": {...}}``.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from .base import DataError, DataInfo, ImageSet, eval_batches, train_batches


def shares(rows: int, weights: dict[str, float]) -> dict[str, int]:
    """`rows` split by `weights` (largest remainders), at least one row each: ``{name: rows}``."""
    if rows < len(weights):
        raise DataError(f"a batch of {rows} rows per process cannot hold the {len(weights)} tasks "
                        f"({', '.join(weights)}): raise train.batch_size")
    total = sum(weights.values())
    spare = rows - len(weights)   # one row each first, then the rest by weight
    exact = {k: spare * w / total for k, w in weights.items()}
    got = {k: 1 + int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: int(exact[k]) - exact[k])[:rows - sum(got.values())]:
        got[k] += 1
    return got


class Mixture(ImageSet):
    """Named sets read together: `train_batches` gives each step's rows in the parts' shares, `eval_batches`
    passes once over every part (each batch holds the next chunk of every part not yet exhausted)."""

    def __init__(self, parts: dict[str, ImageSet], info: DataInfo, weights: dict[str, float] | None = None) -> None:
        if not parts:
            raise DataError("a mixture needs at least one data set")
        self.parts, self.info = dict(parts), info
        self.weights = dict(weights) if weights else {k: 1.0 for k in parts}

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts.values())

    def __getitem__(self, i: int):
        for part in self.parts.values():
            if i < len(part):
                return part[i]
            i -= len(part)
        raise IndexError(i)

    def images(self, n: int | None = None) -> Tensor:
        """The first part's first `n` images (what a tokenizer fits its palette to)."""
        return next(iter(self.parts.values())).images(n)

    def train_batches(self, batch_size: int, seed: int, start: int, steps: int | None, num_workers: int = 0,
                      rank: int = 0, world: int = 1, shuffle: bool = True,
                      pin_memory: bool = False) -> Iterator[dict]:
        """Micro-batches ``{name: batch}``: of this rank's ``batch_size // world`` rows, each part gets its
        share (`shares`), drawn in that part's own (seed, step) order."""
        rows = shares(batch_size // world, self.weights)
        streams = {name: train_batches(part, rows[name] * world, seed + 1_000 * k, start, steps, num_workers,
                                       rank, world, shuffle, pin_memory)
                   for k, (name, part) in enumerate(self.parts.items())}
        while True:
            try:
                yield {name: next(s) for name, s in streams.items()}
            except StopIteration:
                return

    def eval_batches(self, batch_size: int, num_workers: int = 0) -> Iterator[dict]:
        """One ordered pass over every part: ``{name: batch}`` with the next chunk of each part not yet done."""
        streams = {name: eval_batches(part, batch_size, num_workers) for name, part in self.parts.items()}
        while streams:
            batch = {}
            for name in list(streams):
                try:
                    batch[name] = next(streams[name])
                except StopIteration:
                    del streams[name]
            if batch:
                yield batch
