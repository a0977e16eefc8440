"""Global batches: identical whatever the world size, resumable at a batch, epoch-seeded."""

import pytest

from histokt.errors import UserError
from histokt.store.sampler import GlobalBatchSampler, epoch_permutation, eval_rows, eval_shards


def global_batches(n, batch, world, epoch=0, start=0, seed=0):
    samplers = [GlobalBatchSampler(n, batch, world, r, seed) for r in range(world)]
    for s in samplers:
        s.set_epoch(epoch, start)
    per_rank = [list(s) for s in samplers]
    return [[i for r in range(world) for i in per_rank[r][b]] for b in range(len(per_rank[0]))]


def test_same_global_batches_for_any_world_size():
    one = global_batches(50, 8, 1)
    assert global_batches(50, 8, 2) == one == global_batches(50, 8, 4)
    assert len(one) == 7 and all(len(b) == 8 for b in one)
    seen = [i for b in one for _, i in b]
    assert set(seen) == set(range(50))  # every sample; the last batch wraps to fill up


def test_resume_starts_at_the_batch():
    full = global_batches(50, 8, 2, epoch=3)
    assert global_batches(50, 8, 2, epoch=3, start=4) == full[4:]


def test_epochs_and_seeds_differ_and_keys_carry_the_epoch():
    a, b = global_batches(50, 8, 1, epoch=0), global_batches(50, 8, 1, epoch=1)
    assert a != b and all(e == 1 for batch in b for e, _ in batch)
    assert global_batches(50, 8, 1, seed=1) != a


def test_tiny_split_still_fills_a_batch():
    batches = global_batches(3, 8, 2)
    assert len(batches) == 1 and len(batches[0]) == 8


def test_eval_shards_cover_the_split_once():
    got = [i for r in range(3) for b in eval_shards(10, 2, 3, r) for i in b]
    assert got == list(range(10))
    rows = [eval_rows(10, 3, r) for r in range(3)]  # what a rank holds in device memory
    assert [i for r in rows for i in r] == list(range(10)) and [len(r) for r in rows] == [3, 3, 4]
    assert all([i for b in eval_shards(10, 2, 3, r) for i in b] == list(rows[r]) for r in range(3))


def sample_order(epoch, start=0, world=1, seed=0):
    """The sample indices of an epoch in the order they are read (the keys' epoch dropped)."""
    return [i for batch in global_batches(50, 8, world, epoch=epoch, start=start, seed=seed) for _, i in batch]


def test_sample_order_depends_on_the_epoch():
    e0, e1 = sample_order(0), sample_order(1)
    assert e0 != e1  # another epoch, another order of the same samples
    assert set(e0) == set(e1) == set(range(50))
    assert sample_order(0) == e0 and sample_order(1) == e1  # the same epoch twice: the same order
    assert sample_order(1, world=2) == e1  # whatever the world size
    assert sample_order(1, start=3) == e1[3 * 8 :]  # a resume at batch 3 reads the tail of that order
    assert sample_order(0, seed=1) != e0


def test_epoch_permutation_is_seeded_by_seed_and_epoch():
    a = epoch_permutation(100, seed=0, epoch=0)
    assert sorted(a.tolist()) == list(range(100))
    assert a.tolist() == epoch_permutation(100, seed=0, epoch=0).tolist()
    assert a.tolist() != epoch_permutation(100, seed=0, epoch=1).tolist()
    assert a.tolist() != epoch_permutation(100, seed=1, epoch=0).tolist()
    assert epoch_permutation(5, seed=0, epoch=3, shuffle=False).tolist() == [0, 1, 2, 3, 4]


def test_epoch_permutation_is_pinned():
    # checkpoints resume at a batch of this order: a change to the seeding would resume on other samples
    assert epoch_permutation(10, seed=0, epoch=0).tolist() == [2, 9, 7, 0, 4, 8, 6, 5, 3, 1]
    assert epoch_permutation(10, seed=7, epoch=2).tolist() == [0, 3, 5, 1, 4, 2, 8, 7, 9, 6]


def test_a_fresh_sampler_is_one_rank_at_epoch_zero_from_the_first_batch():
    s = GlobalBatchSampler(10, 4)
    got = list(s)
    assert got == list(GlobalBatchSampler(10, 4, world=1, rank=0, seed=0))
    perm = epoch_permutation(10, seed=0, epoch=0).tolist()
    assert got == [[(0, i) for i in (perm + perm)[b * 4 : b * 4 + 4]] for b in range(3)]
    s.set_epoch(2, 1)
    s.set_epoch(2)  # a new epoch starts at its first batch
    batches = list(s)
    assert len(batches) == 3 and batches[0][0][0] == 2


def test_unshuffled_batches_read_in_order_and_wrap():
    batches = list(GlobalBatchSampler(10, 4, shuffle=False))
    assert batches == [
        [(0, 0), (0, 1), (0, 2), (0, 3)],
        [(0, 4), (0, 5), (0, 6), (0, 7)],
        [(0, 8), (0, 9), (0, 0), (0, 1)],
    ]
    rank1 = list(GlobalBatchSampler(10, 4, world=2, rank=1, shuffle=False))
    assert rank1 == [[(0, 2), (0, 3)], [(0, 6), (0, 7)], [(0, 0), (0, 1)]]


def test_a_single_sample_is_enough_and_none_is_an_error():
    assert list(GlobalBatchSampler(1, 2)) == [[(0, 0), (0, 0)]]
    with pytest.raises(UserError, match="^the split to train on is empty$"):
        GlobalBatchSampler(0, 2)
    with pytest.raises(UserError, match="^--batch-size 6 must be a multiple of the world size 4$"):
        GlobalBatchSampler(10, 6, world=4)
