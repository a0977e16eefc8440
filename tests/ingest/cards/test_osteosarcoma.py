"""Osteosarcoma card: CSV-name resolution, case groups and every layout error."""

import shutil

import pytest

from histokt.errors import UserError
from histokt.ingest.cards import get_card
from histokt.ingest.cards.osteosarcoma import Osteosarcoma, file_name
from tests.fixtures import raw_osteosarcoma as fx

CLASSES = ("Non-Tumor", "Viable", "Non-Viable-Tumor", "viable: non-viable")


@pytest.fixture
def raw(tmp_path):
    return fx.make(tmp_path)


def index(raw):
    return Osteosarcoma().index(raw).sources


def test_card_attributes():
    card = get_card("os")
    assert isinstance(card, Osteosarcoma)
    assert card.classes == CLASSES
    assert card.mpp == 1.0 and not card.multi_label
    assert card.split_plan == {"all": {"train": 0.8, "valid": 0.1, "test": 0.1}}
    assert card.expected_counts == {"all": 1144}


@pytest.mark.parametrize(
    "csv_name, expected",
    [
        ("Case 3 A10-17206-19249", "Case-3-A10-17206-19249.jpg"),
        ("Case 48 - P5 C21-35299-19753", "Case-48-P5-C21-35299-19753.jpg"),
        ("P9 B7-8325-33733", "P9-B7-8325-33733.jpg"),
    ],
)
def test_file_name_rule(csv_name, expected):
    assert file_name(csv_name) == expected


def test_index_sources(raw):
    sources = index(raw)
    assert [s.path for s in sources] == sorted(s.path for s in sources)
    by_path = {s.path: s for s in sources}
    assert len(by_path) == len(fx.ROWS) == 10
    for name, cls, folder in fx.ROWS:
        s = by_path[f"{folder}/{fx.tile_name(name)}"]
        assert s.label == CLASSES.index(cls)
        assert s.partition == "all"
    assert by_path["Training-Set-2/set9/Case-48-P5-C21-35299-19753.jpg"].label == 1
    assert by_path["Training-Set-1/set5/Case-4-C34-34338-25165.jpg"].label == 3
    assert by_path["Training-Set-1/set1/Case-3-A10-17206-19249.jpg"].label == 2


def test_groups_are_cases(raw):
    groups = {s.path: s.group for s in index(raw)}
    assert groups["Training-Set-2/set1/Case-3-A10-10547-25283.jpg"] == "Case-3"
    assert groups["Training-Set-1/set5/Case-4-C34-34338-25165.jpg"] == "Case-4"
    assert groups["Training-Set-1/set8/Case-48-P5-C21-40591-33043.jpg"] == "Case-48"
    assert groups["Training-Set-2/set12/P9-B7-8325-33733.jpg"] == "P9"
    assert set(groups.values()) == {"Case-3", "Case-4", "Case-48", "P9"}


def test_group_falls_back_to_file_path(raw):
    src = raw / "Training-Set-1/set1/Case-3-A10-17206-19249.jpg"
    dst = raw / "extra/tile-0001.jpg"
    dst.parent.mkdir()
    src.rename(dst)
    rows = [(("tile 0001",) + r[1:]) if r[0] == "Case 3 A10-17206-19249" else r for r in fx.ROWS]
    fx.write_csv(raw, rows)
    groups = {s.path: s.group for s in index(raw)}
    assert groups["extra/tile-0001.jpg"] == "extra/tile-0001.jpg"


def test_depth_varies(raw):
    src = raw / "Training-Set-2/set12/P9-B7-8325-33733.jpg"
    dst = raw / "Training-Set-2/set12/more/deeper/P9-B7-8325-33733.jpg"
    dst.parent.mkdir(parents=True)
    src.rename(dst)
    paths = [s.path for s in index(raw)]
    assert "Training-Set-2/set12/more/deeper/P9-B7-8325-33733.jpg" in paths


def test_count_warning(raw):
    found = Osteosarcoma().index(raw)
    with pytest.warns(UserWarning, match="1144"):
        msgs = found.count_warnings()
    assert msgs == ["os: all has 10 sources, a complete download has 1144"]


# -- errors ------------------------------------------------------------------------------------------------
def test_missing_root(tmp_path):
    with pytest.raises(UserError, match="Osteosarcoma-UT"):
        index(tmp_path / "Osteosarcoma-UT")


def test_missing_csv(raw):
    (raw / fx.CSV_NAME).unlink()
    with pytest.raises(UserError, match="ML_Features_1144.csv"):
        index(raw)


def test_missing_column(raw):
    text = (raw / fx.CSV_NAME).read_text().replace("classification", "label", 1)
    (raw / fx.CSV_NAME).write_text(text)
    with pytest.raises(UserError, match="missing column.*classification"):
        index(raw)


def test_empty_csv(raw):
    fx.write_csv(raw, [])
    with pytest.raises(UserError, match="no data rows"):
        index(raw)


def test_row_without_file(raw):
    (raw / "Training-Set-2/set9/Case-48-P5-C22-21419-13624.jpg").unlink()
    with pytest.raises(UserError) as exc:
        index(raw)
    msg = str(exc.value)
    assert "'Case 48 - P5 C22-21419-13624'" in msg and "Case-48-P5-C22-21419-13624.jpg" in msg
    assert "no such .jpg" in msg and "verify the download" in msg


def test_row_with_two_files(raw):
    src = raw / "Training-Set-1/set11/P9-B7-23277-6246.jpg"
    shutil.copy(src, raw / "Training-Set-2/set12/P9-B7-23277-6246.jpg")
    with pytest.raises(UserError) as exc:
        index(raw)
    msg = str(exc.value)
    assert "'P9 B7-23277-6246'" in msg and "matches 2 files" in msg
    assert "Training-Set-1/set11/P9-B7-23277-6246.jpg" in msg
    assert "Training-Set-2/set12/P9-B7-23277-6246.jpg" in msg


def test_files_without_rows(raw):
    for i in range(4):
        fx.save(raw / f"Training-Set-1/set2/Case-3-A15-{i}-1.jpg", fx.tissue(8, 8), quality=90)
    with pytest.raises(UserError) as exc:
        index(raw)
    msg = str(exc.value)
    assert "4 .jpg file(s) have no row" in msg
    assert "Training-Set-1/set2/Case-3-A15-0-1.jpg" in msg and "…" in msg


def test_unknown_class(raw):
    rows = [r if r[0] != "Case 4 C34-28567-20375" else (r[0], "Necrosis", r[2]) for r in fx.ROWS]
    fx.write_csv(raw, rows)
    with pytest.raises(UserError) as exc:
        index(raw)
    assert "'Necrosis'" in str(exc.value) and "Case 4 C34-28567-20375" in str(exc.value)


def test_two_rows_one_file(raw):
    # "Case 3 - A10-…" collapses ("---" -> "-") to the same file as row 2's "Case 3 A10-…".
    rows = list(fx.ROWS) + [("Case 3 - A10-10547-25283", "Non-Tumor", "")]
    fx.write_csv(raw, rows)
    with pytest.raises(UserError, match=r"rows 2 and 12 both name Training-Set-2/set1/Case-3-A10-10547-25283.jpg"):
        index(raw)


def test_empty_name(raw):
    rows = list(fx.ROWS) + [("", "Non-Tumor", "")]
    fx.write_csv(raw, rows)
    with pytest.raises(UserError, match="row 12.*empty image.name"):
        index(raw)
