import pytest

from histokt.errors import UserError
from histokt.ingest.cards import get_card
from tests.fixtures import raw_mhist
from tests.fixtures.images import save, tissue


def test_index(tmp_path):
    raw = raw_mhist.make(tmp_path)
    card = get_card("mhist")
    found = card.index(raw)
    sources = found.sources

    assert found.classes == ("HP", "SSA")
    assert card.mpp == 1.25 and "2.0" in card.mpp_source
    assert found.split_plan == {"train": {"train": 0.8, "valid": 0.2}, "test": {"test": 1.0}}
    assert found.expected_counts == {"train": 2175, "test": 977}
    assert [(s.path, s.label, s.partition) for s in sources] == [
        ("images/MHIST_aaa.png", 1, "train"),
        ("images/MHIST_aab.png", 0, "train"),
        ("images/MHIST_aac.png", 0, "train"),
        ("images/MHIST_aad.png", 1, "test"),
        ("images/MHIST_aae.png", 0, "test"),
    ]
    assert len({s.group for s in sources}) == len(sources)


def test_values_with_spaces_are_stripped(tmp_path):
    raw = raw_mhist.make(tmp_path)
    raw_mhist.write_csv(raw / "annotations.csv", [(f" {n}", f" {lab} ", v, f" {p}") for n, lab, v, p in raw_mhist.ROWS])
    assert len(get_card("mhist").index(raw).sources) == len(raw_mhist.ROWS)


def test_missing_csv(tmp_path):
    raw = raw_mhist.make(tmp_path)
    (raw / "annotations.csv").unlink()
    with pytest.raises(UserError, match="annotations.csv: expected .*verify the download"):
        get_card("mhist").index(raw)


def test_images_still_zipped(tmp_path):
    raw = tmp_path / "mhist"
    raw_mhist.write_csv(raw / "annotations.csv", raw_mhist.ROWS)
    (raw / "images.zip").write_bytes(b"PK")
    with pytest.raises(UserError, match="images: expected a folder; unzip images.zip"):
        get_card("mhist").index(raw)


def test_missing_column(tmp_path):
    raw = raw_mhist.make(tmp_path)
    header = ["Image Name", "Label", "votes", "Partition"]
    raw_mhist.write_csv(raw / "annotations.csv", raw_mhist.ROWS, header)
    with pytest.raises(UserError, match=r"missing columns \['Majority Vote Label'\]"):
        get_card("mhist").index(raw)


def test_image_without_row(tmp_path):
    raw = raw_mhist.make(tmp_path)
    save(raw / "images" / "MHIST_zzz.png", tissue(8, 8))
    with pytest.raises(UserError, match="MHIST_zzz.png: has no row in annotations.csv"):
        get_card("mhist").index(raw)


def test_row_without_image(tmp_path):
    raw = raw_mhist.make(tmp_path)
    (raw / "images" / "MHIST_aac.png").unlink()
    with pytest.raises(UserError, match="MHIST_aac.png: named in annotations.csv but not found"):
        get_card("mhist").index(raw)


def test_duplicate_name(tmp_path):
    raw = raw_mhist.make(tmp_path)
    raw_mhist.write_csv(raw / "annotations.csv", raw_mhist.ROWS + [("MHIST_aab.png", "SSA", 4, "test")])
    with pytest.raises(UserError, match="duplicate image name 'MHIST_aab.png' \\(line 7\\)"):
        get_card("mhist").index(raw)


def test_unknown_label(tmp_path):
    raw = raw_mhist.make(tmp_path)
    rows = list(raw_mhist.ROWS)
    rows[2] = ("MHIST_aac.png", "TA", 0, "train")
    raw_mhist.write_csv(raw / "annotations.csv", rows)
    with pytest.raises(UserError, match="annotations.csv line 4: unknown class 'TA'"):
        get_card("mhist").index(raw)


def test_unknown_partition(tmp_path):
    raw = raw_mhist.make(tmp_path)
    rows = list(raw_mhist.ROWS)
    rows[0] = ("MHIST_aaa.png", "SSA", 6, "valid")
    raw_mhist.write_csv(raw / "annotations.csv", rows)
    with pytest.raises(UserError, match="line 2: partition 'valid', expected train or test"):
        get_card("mhist").index(raw)
