import random
import shutil

import pytest

from histokt.errors import UserError
from histokt.ingest.cards import card_class, get_card, parse_options
from tests.fixtures import raw_crc

SEVEN = ("ADI", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
NINE = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


def folder_class(source_or_path):
    path = getattr(source_or_path, "path", source_or_path)
    return path.split("/")[1]


def test_default_histokt_classes_and_7k_test(tmp_path):
    raw = raw_crc.make(tmp_path)
    card = get_card("crc")
    found = card.index(raw)
    sources = found.sources

    assert found.classes == SEVEN
    assert card.mpp == 0.5
    assert found.split_plan == {"100k": {"train": 0.8, "valid": 0.2}, "7k": {"test": 1.0}}
    assert [s.path for s in sources] == sorted(s.path for s in sources)
    assert {folder_class(s) for s in sources} == set(SEVEN)  # BACK and DEB skipped
    assert all(found.classes[s.label] == folder_class(s) for s in sources)
    assert all(s.group == s.path for s in sources)
    train = [s for s in sources if s.partition == "100k"]
    test = [s for s in sources if s.partition == "7k"]
    assert len(train) == 7 * 3 and len(test) == 7 * 2
    assert all(s.path.startswith("NCT-CRC-HE-100K-NONORM/") for s in train)
    assert all(s.path.startswith("CRC-VAL-HE-7K/") for s in test)
    # The 7K per-class counts are not known for 7 classes: no 7K count to warn about.
    assert found.expected_counts == {"100k": 77922}


def test_nine_classes(tmp_path):
    raw = raw_crc.make(tmp_path)
    card = get_card("crc", {"classes": 9})
    found = card.index(raw)
    sources = found.sources
    assert found.classes == NINE
    assert sum(s.partition == "100k" for s in sources) == 9 * 3
    assert all(found.classes[s.label] == folder_class(s) for s in sources)
    assert found.expected_counts == {"100k": 100000, "7k": 7180}


def test_options_parse_from_strings():
    assert parse_options(card_class("crc"), ["classes=9", "per_class=5", "variant=norm"]) == {
        "classes": 9,
        "per_class": 5,
        "variant": "norm",
    }
    assert get_card("crc", {"variant": "norm"}).option_values["variant"] == "NORM"


def test_norm_variant(tmp_path):
    raw = raw_crc.make(tmp_path, variant="NORM")
    sources = get_card("crc", {"variant": "NORM"}).index(raw).sources
    assert all(s.path.startswith(("NCT-CRC-HE-100K/", "CRC-VAL-HE-7K/")) for s in sources)
    with pytest.raises(UserError, match="NCT-CRC-HE-100K-NONORM: .*found NCT-CRC-HE-100K: pass variant=NORM"):
        get_card("crc").index(raw)


def test_holdout_ignores_7k(tmp_path):
    raw = raw_crc.make(tmp_path, test_per_class=0)
    card = get_card("crc", {"test": "holdout"})
    found = card.index(raw)
    sources = found.sources
    assert {s.partition for s in sources} == {"100k"}
    assert found.split_plan == {"100k": {"train": 0.8, "valid": 0.1, "test": 0.1}}
    assert found.expected_counts == {"100k": 77922}


def test_per_class_subset(tmp_path):
    raw = raw_crc.make(tmp_path, per_class=5)
    card = get_card("crc", {"per_class": 2})
    found = card.index(raw)
    sources = found.sources
    train = [s for s in sources if s.partition == "100k"]
    assert sorted(folder_class(s) for s in train) == sorted(SEVEN * 2)
    assert sum(s.partition == "7k" for s in sources) == 7 * 2  # the 7K is never subset
    assert found.expected_counts == {"100k": 14}

    # HistoKT's archive rule: seeded shuffle of the sorted list, then the first k of each class.
    everything = sorted(s.path for s in get_card("crc").index(raw).sources if s.partition == "100k")
    random.Random(42).shuffle(everything)
    want = [p for cls in SEVEN for p in [q for q in everything if folder_class(q) == cls][:2]]
    assert sorted(s.path for s in train) == sorted(want)
    assert get_card("crc", {"per_class": 2}).index(raw).sources == sources  # deterministic


def test_per_class_too_large(tmp_path):
    raw = raw_crc.make(tmp_path)
    with pytest.raises(UserError, match="per_class=4, but class ADI has only 3 images"):
        get_card("crc", {"per_class": 4}).index(raw)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"variant": "MACENKO"}, "variant='MACENKO', expected NONORM or NORM"),
        ({"classes": 8}, "classes=8, expected 7 or 9"),
        ({"test": "val"}, "test='val', expected one of 7k, holdout, paper"),
        ({"per_class": -1}, "per_class=-1, expected an integer >= 0"),
        ({"norm": "x"}, "unknown option 'norm'"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        get_card("crc", options)


# -- layout errors ----------------------------------------------------------------------------------------
def test_missing_class_folder(tmp_path):
    raw = raw_crc.make(tmp_path)
    shutil.rmtree(raw / "CRC-VAL-HE-7K" / "LYM")
    with pytest.raises(UserError, match="CRC-VAL-HE-7K/LYM: missing class folder; verify the download"):
        get_card("crc").index(raw)


def test_skipped_class_folders_may_be_absent_with_7_classes(tmp_path):
    raw = raw_crc.make(tmp_path, classes=SEVEN)
    assert len(get_card("crc").index(raw).sources) == 7 * 5
    with pytest.raises(UserError, match="NCT-CRC-HE-100K-NONORM/BACK: missing class folder"):
        get_card("crc", {"classes": 9}).index(raw)


def test_unexpected_class_folder(tmp_path):
    raw = raw_crc.make(tmp_path)
    (raw / "NCT-CRC-HE-100K-NONORM" / "LYMPHO").mkdir()
    with pytest.raises(UserError, match="LYMPHO: unexpected class folder"):
        get_card("crc").index(raw)


def test_empty_class_folder(tmp_path):
    raw = raw_crc.make(tmp_path)
    for f in (raw / "NCT-CRC-HE-100K-NONORM" / "MUC").iterdir():
        f.unlink()
    with pytest.raises(UserError, match="NCT-CRC-HE-100K-NONORM/MUC: class folder holds no .tif images"):
        get_card("crc").index(raw)


def test_missing_7k(tmp_path):
    raw = raw_crc.make(tmp_path, test_per_class=0)
    with pytest.raises(UserError, match="CRC-VAL-HE-7K: expected the 7K test set .*or pass test=holdout"):
        get_card("crc").index(raw)


def test_missing_100k(tmp_path):
    with pytest.raises(UserError, match="NCT-CRC-HE-100K-NONORM: expected the variant=NONORM training set"):
        get_card("crc").index(tmp_path)
