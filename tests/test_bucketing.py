"""Length-bucketed batches: every row once per epoch, reproducible, less padding, shardable."""

from __future__ import annotations

import random

import pytest
import torch

from workbench.loop.bucketing import (BucketBatchSampler, batches_per_process, bucketed_batches,
                                      padded_tokens)


def skewed_lengths(n: int, seed: int = 0) -> list[int]:
    """Mostly short rows and a long tail, like review snippets or chat turns (8..512 tokens)."""
    rng = random.Random(seed)
    return [min(512, max(8, int(rng.lognormvariate(3.5, 0.9)))) for _ in range(n)]


@pytest.mark.parametrize("n,batch_size", [(400, 16), (401, 16), (97, 8), (5, 16), (1, 1), (33, 1)])
def test_every_row_exactly_once_per_epoch(n: int, batch_size: int) -> None:
    lengths = skewed_lengths(n)
    for epoch in range(3):
        batches = bucketed_batches(lengths, batch_size, seed=42, epoch=epoch)
        rows = [i for b in batches for i in b]
        assert sorted(rows) == list(range(n))
        assert len(batches) == batches_per_process(n, batch_size) == -(-n // batch_size)
        assert all(1 <= len(b) <= batch_size for b in batches)


def test_reproducible_from_seed_and_epoch() -> None:
    lengths = skewed_lengths(300)
    first = bucketed_batches(lengths, 16, seed=7, epoch=2)
    assert bucketed_batches(lengths, 16, seed=7, epoch=2) == first
    assert bucketed_batches(lengths, 16, seed=7, epoch=3) != first
    assert bucketed_batches(lengths, 16, seed=8, epoch=2) != first


def test_padding_reduced_on_skewed_lengths() -> None:
    lengths = skewed_lengths(2000, seed=1)
    batch_size = 16
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(lengths), generator=g).tolist()
    plain = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    bucketed = bucketed_batches(lengths, batch_size, seed=0, epoch=0)
    real = sum(lengths)
    plain_pad, bucket_pad = padded_tokens(lengths, plain) - real, padded_tokens(lengths, bucketed) - real
    # random batches pad a lognormal length mix by more than the real tokens; windows of 50 batches cut that ~10x
    assert plain_pad > 0.8 * real
    assert bucket_pad < plain_pad / 5


def test_batches_are_shuffled_not_sorted() -> None:
    """Within a window rows are sorted, but the batch order is random: the epoch does not run short to long."""
    lengths = list(range(1, 801))
    batches = bucketed_batches(lengths, 8, seed=0, epoch=0, window_batches=100)  # one window holds every row
    longest = [max(lengths[i] for i in b) for b in batches]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    assert all(max(lengths[i] for i in b) - min(lengths[i] for i in b) == 7 for b in batches)  # neighbours only


@pytest.mark.parametrize("n,batch_size,world", [(400, 16, 2), (401, 16, 2), (100, 16, 3), (37, 4, 4), (64, 16, 4),
                                                (10, 3, 4)])
def test_sharding_disjoint_complete_equal_counts(n: int, batch_size: int, world: int) -> None:
    lengths = skewed_lengths(n, seed=3)
    shares = [bucketed_batches(lengths, batch_size, seed=5, epoch=1, rank=r, world=world) for r in range(world)]
    rows = [[i for b in share for i in b] for share in shares]
    flat = [i for share in rows for i in share]
    assert len(flat) == len(set(flat)) == n  # disjoint and complete: no row twice, none missing
    assert {len(share) for share in shares} == {batches_per_process(n, batch_size, world)}
    assert all(1 <= len(b) <= batch_size for share in shares for b in share)


def test_sharding_takes_every_world_th_batch_of_one_global_order() -> None:
    lengths = skewed_lengths(256)
    whole = bucketed_batches(lengths, 8, seed=1, epoch=0, world=2, rank=0) + \
        bucketed_batches(lengths, 8, seed=1, epoch=0, world=2, rank=1)
    single = bucketed_batches(lengths, 8, seed=1, epoch=0)  # 256 rows fill 32 batches of 8 exactly
    assert sorted(map(tuple, whole)) == sorted(map(tuple, single))


def test_batch_sampler_in_a_dataloader_follows_set_epoch() -> None:
    lengths = skewed_lengths(50)
    sampler = BucketBatchSampler(lengths, batch_size=8, seed=3)
    loader = torch.utils.data.DataLoader(list(range(50)), batch_sampler=sampler)
    assert len(loader) == 7
    epoch0 = [b.tolist() for b in loader]
    assert epoch0 == bucketed_batches(lengths, 8, seed=3, epoch=0)
    sampler.set_epoch(1)
    assert [b.tolist() for b in loader] == bucketed_batches(lengths, 8, seed=3, epoch=1)


@pytest.mark.parametrize("kwargs,message", [
    ({"batch_size": 0}, r"batch_size = 0 is not allowed"),
    ({"window_batches": 0}, r"window_batches = 0 is not allowed"),
    ({"rank": 2, "world": 2}, r"rank 2 of world 2 is not a process"),
    ({"world": 0}, r"rank 0 of world 0 is not a process"),
])
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    args = {"lengths": [5] * 10, "batch_size": 4, "seed": 0, "epoch": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        bucketed_batches(**args)


def test_too_few_rows_for_the_processes_is_refused() -> None:
    with pytest.raises(ValueError, match=r"3 rows cannot fill 4 batches .*use fewer processes"):
        bucketed_batches([5, 6, 7], 16, seed=0, epoch=0, world=4)
    with pytest.raises(ValueError, match=r"5 rows cannot fill 6 batches"):
        bucketed_batches([1] * 5, 1, seed=0, epoch=0, world=2)
