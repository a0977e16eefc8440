import numpy as np
import pytest

from histokt.errors import UserError
from histokt.ingest.cards import get_card
from tests.fixtures import raw_csv_list
from tests.fixtures.raw_csv_list import write_csv


@pytest.fixture
def raw(tmp_path):
    return raw_csv_list.make(tmp_path)


def test_index_default_columns(raw):
    card = get_card("csv")
    found = card.index(raw)
    sources = found.sources
    assert card.mpp is None
    assert found.classes == ("normal", "stroma", "tumor")
    assert [(s.path, s.label, s.partition, s.group) for s in sources] == [
        ("e.png", 2, "all", "e.png"),
        ("slides/p1/a.png", 2, "all", "slides/p1/a.png"),
        ("slides/p1/b.png", 0, "all", "slides/p1/b.png"),
        ("slides/p2/c.png", 0, "all", "slides/p2/c.png"),
        ("slides/p3/d.png", 1, "all", "slides/p3/d.png"),
    ]
    assert found.split_plan == {"all": {"train": 0.8, "valid": 0.1, "test": 0.1}}
    assert np.asarray(card.read(raw, sources[0])).shape == (24, 24, 3)


def test_split_and_group_columns(raw):
    card = get_card("csv", {"split_column": "split", "group_column": "patient"})
    found = card.index(raw)
    sources = {s.path: s for s in found.sources}
    assert {p: (s.partition, s.group) for p, s in sources.items()} == {
        "e.png": ("test", "p4"),
        "slides/p1/a.png": ("train", "p1"),
        "slides/p1/b.png": ("train", "p1"),
        "slides/p2/c.png": ("valid", "p2"),
        "slides/p3/d.png": ("test", "p3"),
    }
    assert found.split_plan == {"train": {"train": 1.0}, "valid": {"valid": 1.0}, "test": {"test": 1.0}}
    assert card.group_rule == found.group_rule == "column 'patient'"


def test_other_names_delimiters_and_quirks(tmp_path):
    raw = raw_csv_list.make(tmp_path, name="meta/list.tsv", delimiter="\t")
    card = get_card("csv", {"csv": "meta/list.tsv", "delimiter": "tab", "split_column": "split"})
    assert len(card.index(raw).sources) == 5
    # Absolute csv path, custom column names, BOM, spaces around headers and values, "./" and upper case.
    ext = tmp_path / "ext.csv"
    ext.write_text("\ufeff File ; Class ; Set \n ./e.png ; 10 ; Train \nslides/p1/a.png;2;TEST\n\n")
    opts = {"csv": str(ext), "path_column": "File", "label_column": "Class", "split_column": "Set", "delimiter": ";"}
    card = get_card("csv", opts)
    found = card.index(raw)
    sources = found.sources
    assert found.classes == ("2", "10")  # integer labels sort numerically
    assert [(s.path, s.label, s.partition) for s in sources] == [("e.png", 1, "train"), ("slides/p1/a.png", 0, "test")]


def test_bad_delimiter_option():
    with pytest.raises(UserError, match=r"delimiter=';;' must be one character"):
        get_card("csv", {"delimiter": ";;"})


def test_missing_csv(raw):
    with pytest.raises(UserError, match=r"nope.csv: expected a CSV.*verify the download"):
        get_card("csv", {"csv": "nope.csv"}).index(raw)


def test_missing_columns_name_them_and_the_header(raw):
    card = get_card("csv", {"label_column": "diagnosis", "group_column": "case"})
    header = r"\['path', 'label', 'split', 'patient'\]"
    message = rf"labels.csv: missing column\(s\) \['diagnosis', 'case'\]; the header is {header}"
    with pytest.raises(UserError, match=message):
        card.index(raw)


def test_missing_files_are_named(raw):
    write_csv(raw, "path,label\ne.png,a\nghost.png,b\nslides/none.png,b\n")
    missing = r"labels.csv: 2 listed file\(s\) not found under .*: 'ghost.png', 'slides/none.png'"
    with pytest.raises(UserError, match=missing):
        get_card("csv").index(raw)


def test_duplicate_paths(raw):
    write_csv(raw, "path,label\ne.png,a\nslides/p1/a.png,b\n./e.png,b\n")
    with pytest.raises(UserError, match=r"duplicate path 'e.png' on lines 2 and 4"):
        get_card("csv").index(raw)


def test_empty_label(raw):
    write_csv(raw, "path,label\ne.png,a\nslides/p1/a.png, \n")
    with pytest.raises(UserError, match=r"labels.csv: empty 'label' on line\(s\) 3 \(1 rows\)"):
        get_card("csv").index(raw)


def test_empty_group(raw):
    write_csv(raw, "path,label,patient\ne.png,a,\n")
    with pytest.raises(UserError, match=r"empty 'patient' on line\(s\) 2"):
        get_card("csv", {"group_column": "patient"}).index(raw)


def test_unknown_split_value(raw):
    write_csv(raw, "path,label,split\ne.png,a,train\nslides/p1/a.png,b,val\n")
    expected = r"unknown split value 'val' on line 3, expected one of \['train', 'valid', 'test'\]"
    with pytest.raises(UserError, match=expected):
        get_card("csv", {"split_column": "split"}).index(raw)


def test_path_outside_raw(raw, tmp_path):
    write_csv(raw, "path,label\n../x.png,a\n")
    with pytest.raises(UserError, match=r"line 2: path '../x.png' is outside the raw folder"):
        get_card("csv").index(raw)
    write_csv(raw, f"path,label\n{tmp_path / 'x.png'},a\n")
    with pytest.raises(UserError, match=r"is outside the raw folder"):
        get_card("csv").index(raw)
    write_csv(raw, f"path,label\n{raw / 'e.png'},a\n")  # absolute but inside raw: fine
    assert get_card("csv").index(raw).sources[0].path == "e.png"


def test_no_rows(raw):
    write_csv(raw, "path,label\n")
    with pytest.raises(UserError, match=r"labels.csv: no data rows"):
        get_card("csv").index(raw)
