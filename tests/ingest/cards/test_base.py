from pathlib import Path

import pytest

from histokt.errors import UserError
from histokt.ingest.cards import get_card
from histokt.ingest.cards.base import Card, CardIndex, Source
from tests.fixtures import raw_adp, raw_crc, raw_csv_list


class Toy(Card):
    name = "toy"


def test_match_files():
    card, folder = Toy(), Path("raw")
    card.match_files(folder, {"a.png", "b.png"}, ["b.png", "a.png"], "labels.csv")  # one-to-one: no error
    with pytest.raises(UserError, match=r"raw/c\.png: named in labels\.csv but not found \(2 missing\)"):
        card.match_files(folder, {"a.png"}, ["c.png", "a.png", "b.png"], "labels.csv")  # first in CSV order
    with pytest.raises(UserError, match=r"raw/b\.png: has no row in labels\.csv \(2 unlabelled\)"):
        card.match_files(folder, {"a.png", "c.png", "b.png"}, ["a.png"], "labels.csv")  # first sorted
    # Keyed by stem (GlaS): a missing name gets the suffix, an unlabelled one its real file name.
    with pytest.raises(UserError, match=r"raw/x\.bmp: named in G\.csv but not found \(1 missing\)"):
        card.match_files(folder, {"y": "y.BMP"}, ["x", "y"], "G.csv", suffix=".bmp")
    with pytest.raises(UserError, match=r"raw/z\.BMP: has no row in G\.csv \(1 unlabelled\)"):
        card.match_files(folder, {"y": "y.bmp", "z": "z.BMP"}, ["y"], "G.csv", suffix=".bmp")


def test_make_index_defaults_to_the_card_and_copies_what_it_is_given():
    plan = {"all": {"train": 0.5, "test": 0.5}}
    sources = [Source("b.png", 1, "all", "b.png"), Source("a.png", 0, "all", "a.png")]
    found = Toy().make_index(sources, classes=["x", "y"], split_plan=plan, expected_counts={"all": 3})
    assert found == CardIndex(
        card="toy",
        sources=tuple(sources),  # in the order given
        classes=("x", "y"),
        multi_label=False,
        group_rule="source image",
        split_plan={"all": {"train": 0.5, "test": 0.5}},
        expected_counts={"all": 3},
    )
    assert found.split_plan is not plan and found.split_plan["all"] is not plan["all"]
    default = Toy().make_index(sources)
    assert default.split_plan == {"all": {"train": 0.8, "valid": 0.1, "test": 0.1}} and default.expected_counts == {}
    assert default.split_plan["all"] is not Card.split_plan["all"]  # the class default is never shared


def test_count_warnings_compare_the_sources_given_with_the_expected_counts():
    sources = [Source(f"{i}.png", 0, "train" if i < 3 else "test", f"{i}") for i in range(4)]
    found = Toy().make_index(sources, split_plan={"train": {"train": 1.0}, "test": {"test": 1.0}})
    assert found.count_warnings() == []
    found = Toy().make_index(sources, expected_counts={"train": 3, "test": 2})
    with pytest.warns(UserWarning, match="toy: test has 1 sources, a complete download has 2"):
        assert found.count_warnings() == ["toy: test has 1 sources, a complete download has 2"]
    with pytest.warns(UserWarning):
        assert len(found.count_warnings(sources[:1])) == 2  # a subset: both partitions short


@pytest.mark.parametrize(
    "name, options, make",
    [
        ("adp", {}, lambda root: raw_adp.make(root, splits=None)),
        ("adp", {"level": "L1"}, lambda root: raw_adp.make(root)),
        ("crc", {"test": "holdout", "per_class": 2}, raw_crc.make),
        ("csv", {"split_column": "split"}, raw_csv_list.make),
        ("folder", {}, lambda root: raw_crc.make(root) / raw_crc.TRAIN_DIRS["NONORM"]),
    ],
)
def test_index_returns_what_it_found_and_leaves_the_card_as_it_was(tmp_path, name, options, make):
    card = get_card(name, options)
    before = dict(vars(card))
    found = card.index(make(tmp_path))
    assert vars(card) == before  # nothing set on the card while indexing
    assert all(s.partition in found.split_plan for s in found.sources)
    assert found.classes and all(isinstance(s.label, tuple) or 0 <= s.label < len(found.classes) for s in found.sources)
    assert found.card == name and found.group_rule == card.group_rule and found.multi_label == card.multi_label
