"""Split cuts: HistoKT's cumulative integer cut, whole groups, and no empty split for few groups."""

from histokt.ingest.cards.base import Source
from histokt.ingest.splits import cut_points, grouped_splits, patch_splits

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
