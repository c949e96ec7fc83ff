"""Length-bucketed batches: rows of similar length share a batch, so a batch pads less.

A batch is padded to its longest row, so a random batch of short and long texts
spends most of its arithmetic on padding (rotten-tomatoes reviews and chat turns
vary several-fold in length). This sampler keeps the randomness that training
needs and removes most of that padding:

1. shuffle all rows with a generator seeded from (seed, epoch);
2. cut the shuffled rows into windows of `window_batches` x `batch_size` rows and
   sort each window by length, so neighbours have similar lengths while a window
   still holds a random sample of the data;
3. cut the sorted rows into batches;
4. shuffle the batches (same generator), so long and short batches alternate
   instead of the epoch running from short to long inside every window.

Every row is used exactly once per epoch, and the batches depend only on
(lengths, batch_size, seed, epoch, window_batches, world): a resumed run replays
them. Under `torchrun` each of the `world` processes takes every world-th batch:
the shares are disjoint, together they cover every row, and every process gets
the same number of batches (DDP steps together). When the rows do not fill
`world x steps` batches exactly, the last few batches are made a little smaller
rather than padded with repeated rows, so no row counts twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

DEFAULT_WINDOW_BATCHES = 50


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                     window_batches: int = DEFAULT_WINDOW_BATCHES) -> list[list[int]]:
    """This process's batches (lists of row indices) for one epoch; see the module docstring."""
    _check(len(lengths), batch_size, rank, world, window_batches)
    n = len(lengths)
    g = torch.Generator().manual_seed(_stream(seed, epoch))
    order = torch.randperm(n, generator=g).tolist()

    # sort within windows: similar lengths side by side, windows still random samples of the data
    window = window_batches * batch_size
    bucketed: list[int] = []
    for start in range(0, n, window):
        bucketed += sorted(order[start: start + window], key=lambda i: lengths[i])  # stable: ties stay shuffled

    batches = _cut(bucketed, batch_size, world)
    shuffled = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return shuffled[rank::world]


def batches_per_process(n: int, batch_size: int, world: int = 1) -> int:
    """How many batches each process gets per epoch (the same for every rank)."""
    return math.ceil(math.ceil(n / batch_size) / world)


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Tokens the model processes when each batch is padded to its longest row (real tokens included)."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches if b)


class BucketBatchSampler(torch.utils.data.Sampler):
    """`bucketed_batches` as a batch sampler for `DataLoader(batch_sampler=...)`; call `set_epoch` each epoch."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 window_batches: int = DEFAULT_WINDOW_BATCHES) -> None:
        _check(len(lengths), batch_size, rank, world, window_batches)
        self.lengths, self.batch_size, self.seed = list(lengths), batch_size, seed
        self.rank, self.world, self.window_batches = rank, world, window_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return batches_per_process(len(self.lengths), self.batch_size, self.world)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(bucketed_batches(self.lengths, self.batch_size, self.seed, self.epoch, self.rank, self.world,
                                     self.window_batches))


# --- pieces ---------------------------------------------------------------------------

def _stream(seed: int, epoch: int) -> int:
    """One generator seed per (seed, epoch), kept apart from the plain shuffle's seed * 1000 + epoch."""
    return (seed * 1000 + epoch) * 2 + 1


def _cut(rows: list[int], batch_size: int, world: int) -> list[list[int]]:
    """Cut into world x batches_per_process batches of at most batch_size rows, each row in one batch.

    As many batches as possible are full; the rows left over are spread evenly over the rest,
    which are then at most one row apart in size.
    """
    n = len(rows)
    total = world * batches_per_process(n, batch_size, world)
    # full batches k, the rest (n - k * batch_size rows) split into total - k non-empty batches
    full = total if batch_size == 1 else min(total, (n - total) // (batch_size - 1))
    batches = [rows[i * batch_size: (i + 1) * batch_size] for i in range(full)]
    rest, parts = rows[full * batch_size:], total - full
    if parts:
        sizes = [len(rest) // parts + (1 if p < len(rest) % parts else 0) for p in range(parts)]
        start = 0
        for size in sizes:
            batches.append(rest[start: start + size])
            start += size
    return batches


def _check(n: int, batch_size: int, rank: int, world: int, window_batches: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size = {batch_size} is not allowed: use 1 or more rows per batch")
    if window_batches < 1:
        raise ValueError(f"window_batches = {window_batches} is not allowed: sort windows of 1 or more batches")
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} of world {world} is not a process: rank must be in 0..world-1")
    total = world * batches_per_process(n, batch_size, world)
    if n < total:
        raise ValueError(f"{n} rows cannot fill {total} batches ({world} process(es) x "
                         f"{total // world} batches of at most {batch_size}) without repeating rows: "
                         f"add rows, use fewer processes or a larger batch size")
