import pytest

from histokt.errors import UserError
from histokt.ingest.cards import get_card
from tests.fixtures import raw_glas
from tests.fixtures.images import save, tissue


def test_index(tmp_path):
    raw = raw_glas.make(tmp_path)
    card = get_card("glas")
    found = card.index(raw)
    sources = found.sources

    assert found.classes == ("benign", "malignant")
    assert card.mpp == 0.62005
    assert found.split_plan == {"train": {"train": 1.0}, "testA": {"valid": 1.0}, "testB": {"test": 1.0}}
    assert found.expected_counts == {"train": 85, "testA": 60, "testB": 20}
    # Masks are not sources; labels and patient IDs are stripped of their leading spaces.
    assert [(s.path, s.label, s.partition, s.group) for s in sources] == [
        ("testA_1.bmp", 1, "testA", "4"),
        ("testA_2.bmp", 0, "testA", "2"),
        ("testB_1.bmp", 1, "testB", "9"),
        ("train_1.bmp", 1, "train", "4"),
        ("train_10.bmp", 0, "train", "12"),
        ("train_2.bmp", 0, "train", "12"),
    ]


@pytest.mark.parametrize("nesting", [1, 2])
def test_raw_may_hold_the_release_folder(tmp_path, nesting):
    raw = raw_glas.make(tmp_path, nesting=nesting)
    sources = get_card("glas").index(raw).sources
    assert sources[0].path.endswith("Warwick QU Dataset (Released 2016_07_08)/testA_1.bmp")
    assert len(sources) == len(raw_glas.ROWS)


def test_missing_csv(tmp_path):
    raw = raw_glas.make(tmp_path)
    (raw / "Grade.csv").unlink()
    with pytest.raises(UserError, match="Grade.csv: expected the grade file.*verify the download"):
        get_card("glas").index(raw)


def test_missing_column(tmp_path):
    raw = raw_glas.make(tmp_path)
    raw_glas.write_csv(raw / "Grade.csv", raw_glas.ROWS, "name, patient, grade (GlaS), grade (S)")
    with pytest.raises(UserError, match=r"missing columns \['patient ID'\]"):
        get_card("glas").index(raw)


def test_row_without_image(tmp_path):
    raw = raw_glas.make(tmp_path)
    (raw / "testB_1.bmp").unlink()
    with pytest.raises(UserError, match="testB_1.bmp: named in Grade.csv but not found"):
        get_card("glas").index(raw)


def test_image_without_row(tmp_path):
    raw = raw_glas.make(tmp_path)
    save(raw / "train_99.bmp", tissue(8, 8))
    with pytest.raises(UserError, match="train_99.bmp: has no row in Grade.csv"):
        get_card("glas").index(raw)


def test_unknown_grade(tmp_path):
    raw = raw_glas.make(tmp_path)
    rows = list(raw_glas.ROWS)
    rows[1] = ("testA_2", "2", "healthy", "healthy")
    raw_glas.write_csv(raw / "Grade.csv", rows)
    with pytest.raises(UserError, match="Grade.csv line 3: unknown class 'healthy'"):
        get_card("glas").index(raw)


def test_unknown_name_prefix(tmp_path):
    raw = raw_glas.make(tmp_path)
    raw_glas.write_csv(raw / "Grade.csv", raw_glas.ROWS + [("testC_1", "3", "benign", "healthy")])
    with pytest.raises(UserError, match="line 8: name 'testC_1', expected train_<n>"):
        get_card("glas").index(raw)


def test_duplicate_name(tmp_path):
    raw = raw_glas.make(tmp_path)
    raw_glas.write_csv(raw / "Grade.csv", raw_glas.ROWS + [raw_glas.ROWS[0]])
    with pytest.raises(UserError, match="duplicate image name 'testA_1'"):
        get_card("glas").index(raw)


def test_missing_patient_id(tmp_path):
    raw = raw_glas.make(tmp_path)
    rows = list(raw_glas.ROWS)
    rows[3] = ("train_1", "", "malignant", "adenomatous")
    raw_glas.write_csv(raw / "Grade.csv", rows)
    with pytest.raises(UserError, match="'train_1' has no patient ID"):
        get_card("glas").index(raw)
