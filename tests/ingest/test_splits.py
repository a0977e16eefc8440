"""Split cuts: HistoKT's cumulative integer cut, whole groups, and no empty split for few groups."""

import pytest

from histokt.errors import UserError
from histokt.ingest.cards.base import Source
from histokt.ingest.splits import check_split_plan, cut_points, grouped_splits, patch_splits

RATIOS = {"train": 0.8, "valid": 0.1, "test": 0.1}


def test_cut_is_histokts_for_many_items():
    # start = int(cum * n): 100 -> 80 / 10 / 10; 37 -> [0, 29) [29, 33) [33, 37)
    assert cut_points(100, RATIOS) == [("train", 0, 80), ("valid", 80, 90), ("test", 90, 100)]
    assert cut_points(37, RATIOS) == [("train", 0, 29), ("valid", 29, 33), ("test", 33, 37)]


def test_few_groups_leave_no_split_empty():
    # HistoKT's cut of 4 would be 3 / 0 / 1: valid takes one from train
    assert cut_points(4, RATIOS) == [("train", 0, 2), ("valid", 2, 3), ("test", 3, 4)]
    assert cut_points(2, RATIOS) == [("train", 0, 1), ("valid", 1, 1), ("test", 1, 2)]
    assert cut_points(1, RATIOS) == [("train", 0, 1), ("valid", 1, 1), ("test", 1, 1)]
    assert cut_points(3, RATIOS) == [("train", 0, 1), ("valid", 1, 2), ("test", 2, 3)]
    assert cut_points(0, RATIOS) == [("train", 0, 0), ("valid", 0, 0), ("test", 0, 0)]
    assert cut_points(5, {"train": 1.0}) == [("train", 0, 5)]


def test_grouped_splits_keep_groups_whole_and_are_seeded():
    sources = [Source(f"img{i}.png", 0, "all", f"patient{i // 3}") for i in range(30)]
    a = grouped_splits(sources, {"all": RATIOS}, seed=0)
    for g in range(10):
        assert len({a[i] for i in range(30) if i // 3 == g}) == 1
    assert [a.count(s) for s in ("train", "valid", "test")] == [24, 3, 3]
    assert a == grouped_splits(sources, {"all": RATIOS}, seed=0)
    assert a != grouped_splits(sources, {"all": RATIOS}, seed=1)


def test_official_partitions_are_respected():
    sources = [Source(f"tr{i}", 0, "train", f"tr{i}") for i in range(10)] + [
        Source(f"te{i}", 0, "test", f"te{i}") for i in range(4)
    ]
    plan = {"train": {"train": 0.8, "valid": 0.2}, "test": {"test": 1.0}}
    out = grouped_splits(sources, plan, seed=0)
    assert out[10:] == ["test"] * 4
    assert sorted(out[:10]) == ["train"] * 8 + ["valid"] * 2


def test_patch_rule_cuts_patches():
    out = patch_splits(["all"] * 50, {"all": RATIOS}, seed=0)
    assert [out.count(s) for s in ("train", "valid", "test")] == [40, 5, 5]


def test_cut_rounds_the_cumulative_ratio_before_truncating():
    # 0.7 + 0.2 is 0.8999999999999999 in floating point: truncated unrounded, valid would end at 89
    assert cut_points(100, {"train": 0.7, "valid": 0.2, "test": 0.1}) == [
        ("train", 0, 70),
        ("valid", 70, 90),
        ("test", 90, 100),
    ]
    assert cut_points(10, {"train": 0.4, "valid": 0.1, "test": 0.5}) == [
        ("train", 0, 4),
        ("valid", 4, 5),
        ("test", 5, 10),
    ]


def test_a_zero_ratio_split_stays_empty():
    assert cut_points(4, {"train": 0.5, "valid": 0.0, "test": 0.5}) == [
        ("train", 0, 2),
        ("valid", 2, 2),
        ("test", 2, 4),
    ]


def test_grouped_split_is_pinned_for_a_seed():
    # every store's split follows from this seeded shuffle: a change to the seeding changes them all
    sources = [Source(f"img{i}.png", 0, "all", f"patient{i // 3}") for i in range(30)]
    a = grouped_splits(sources, {"all": RATIOS}, seed=0)
    assert {s.group: split for s, split in zip(sources, a)} == {
        "patient0": "train", "patient1": "train", "patient2": "train", "patient3": "train",
        "patient4": "train", "patient5": "train", "patient6": "train", "patient7": "test",
        "patient8": "train", "patient9": "valid",
    }  # fmt: skip


def test_grouped_split_does_not_depend_on_the_order_of_the_sources():
    sources = [Source(f"img{i}.png", 0, "all", f"patient{i // 3}") for i in range(30)]
    plan = {"all": RATIOS}
    forward = dict(zip(sources, grouped_splits(sources, plan, seed=4)))
    backward = dict(zip(sources[::-1], grouped_splits(sources[::-1], plan, seed=4)))
    assert forward == backward


def test_each_partition_is_cut_by_its_own_ratios():
    sources = [Source(f"a{i}", 0, "a", f"a{i}") for i in range(10)] + [
        Source(f"b{i}", 0, "b", f"b{i}") for i in range(10)
    ]
    plan = {"a": {"train": 0.8, "valid": 0.2}, "b": {"train": 0.5, "test": 0.5}}
    out = grouped_splits(sources, plan, seed=0)
    assert sorted(out[:10]) == ["train"] * 8 + ["valid"] * 2
    assert sorted(out[10:]) == ["test"] * 5 + ["train"] * 5


def test_patch_rule_is_seeded_and_keeps_official_partitions():
    parts = ["train"] * 10 + ["test"] * 4
    plan = {"train": {"train": 0.8, "valid": 0.2}, "test": {"test": 1.0}}
    out = patch_splits(parts, plan, seed=0)
    assert out[10:] == ["test"] * 4
    assert sorted(out[:10]) == ["train"] * 8 + ["valid"] * 2
    assert out == patch_splits(parts, plan, seed=0)
    assert patch_splits(["all"] * 10, {"all": RATIOS}, seed=0) == [
        "train", "train", "train", "train", "train", "train", "train", "test", "train", "valid",
    ]  # fmt: skip
    assert any(
        patch_splits(["all"] * 10, {"all": RATIOS}, seed=s) != patch_splits(["all"] * 10, {"all": RATIOS}, seed=0)
        for s in (1, 2, 3)
    )


def test_check_split_plan():
    check_split_plan({"all": {"train": 0.7, "valid": 0.2, "test": 0.1}}, {"all"}, "d")  # sums to 1 up to rounding
    with pytest.raises(UserError, match="partition 'extra' has no split rule"):
        check_split_plan({"all": RATIOS}, {"all", "extra"}, "d")
    with pytest.raises(UserError, match="sum to 0.9"):
        check_split_plan({"all": {"train": 0.8, "valid": 0.1}}, {"all"}, "d")
    with pytest.raises(UserError, match="sum to 1.1"):
        check_split_plan({"all": {"train": 0.8, "valid": 0.2, "test": 0.1}}, {"all"}, "d")


def test_the_last_split_takes_every_remaining_item():
    # check_split_plan accepts ratios summing to 1 within 1e-6: the last split still ends at n, no item is lost
    assert cut_points(100, {"train": 0.5, "test": 0.4999999}) == [("train", 0, 50), ("test", 50, 100)]
    assert cut_points(7, {"train": 0.3, "valid": 0.3, "test": 0.3999999}) == [
        ("train", 0, 2),
        ("valid", 2, 4),
        ("test", 4, 7),
    ]


def test_cut_points_round_the_cumulative_ratio_to_nine_decimals():
    # noise below the 9th decimal does not move a cut: 0.4999999996 of 10 cuts at 5, not 4
    assert cut_points(10, {"train": 0.4999999996, "test": 0.5000000004}) == [("train", 0, 5), ("test", 5, 10)]


def test_a_zero_ratio_split_gets_nothing_when_ratios_sum_to_one_only_within_tolerance():
    ratios = {"train": 0.5, "valid": 0.4999999, "test": 0.0}  # accepted: |sum - 1| <= 1e-6
    check_split_plan({"all": ratios}, {"all"}, "toy")
    for n in (2, 3, 10, 1000):
        cuts = {name: end - start for name, start, end in cut_points(n, ratios)}
        assert cuts["test"] == 0 and cuts["train"] + cuts["valid"] == n, (n, cuts)
