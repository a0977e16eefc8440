"""The folder card's flat layout: the class is read from each file name (option class_regex)."""

import pytest

from histokt.errors import UserError
from histokt.ingest.cards import get_card
from tests.fixtures.images import save, tissue


def flat(root, names):
    for name in names:
        save(root / name, tissue(24, 24))
    return root


def test_class_from_the_file_name_prefix(tmp_path):
    # the NCT-CRC-HE samples' naming: <CLASS>-<ID>.tif
    raw = flat(tmp_path / "nct", ["TUM-AACHEHDV.tif", "ADI-AAQEFMRI.tif", "TUM-B.tif", "STR-AACRYYNQ.tif"])
    (raw / "notes.txt").write_text("not an image")
    card = get_card("folder", {"class_regex": "^([A-Z]+)-"})
    found = card.index(raw)
    sources = found.sources
    assert found.classes == ("ADI", "STR", "TUM")
    assert [(s.path, s.label, s.partition, s.group) for s in sources] == [
        ("ADI-AAQEFMRI.tif", 0, "all", "ADI-AAQEFMRI.tif"),
        ("STR-AACRYYNQ.tif", 1, "all", "STR-AACRYYNQ.tif"),
        ("TUM-AACHEHDV.tif", 2, "all", "TUM-AACHEHDV.tif"),
        ("TUM-B.tif", 2, "all", "TUM-B.tif"),
    ]


def test_whole_match_without_a_group_and_the_group_option(tmp_path):
    raw = flat(tmp_path / "raw", ["pt1_benign.png", "pt1_tumor.png", "pt2_tumor.png"])
    card = get_card("folder", {"class_regex": "benign|tumor", "group": r"^(pt\d+)_"})
    found = card.index(raw)
    sources = found.sources
    assert found.classes == ("benign", "tumor")
    assert [(s.label, s.group) for s in sources] == [(0, "pt1"), (1, "pt1"), (1, "pt2")]


def test_a_name_the_regex_misses_is_named(tmp_path):
    raw = flat(tmp_path / "raw", ["TUM-1.tif", "readme.png"])
    with pytest.raises(UserError, match=r"readme.png: file name does not match class_regex '\^\(\[A-Z\]\+\)-'"):
        get_card("folder", {"class_regex": "^([A-Z]+)-"}).index(raw)


def test_no_flat_images_and_a_bad_regex(tmp_path):
    (tmp_path / "raw" / "TUM").mkdir(parents=True)  # class folders, but the option asks for a flat folder
    with pytest.raises(UserError, match="no images directly in the folder"):
        get_card("folder", {"class_regex": "^([A-Z]+)-"}).index(tmp_path / "raw")
    with pytest.raises(UserError, match=r"option class_regex='\(' is not a regex"):
        get_card("folder", {"class_regex": "("})
