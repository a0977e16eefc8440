import pickle
import shutil

import numpy as np
import pytest

from histokt.errors import UserError
from histokt.ingest.cards import get_card
from tests.fixtures import raw_bach
from tests.fixtures.images import save, tissue

CLASSES = ("Benign", "InSitu", "Invasive", "Normal")


@pytest.fixture
def raw(tmp_path):
    return raw_bach.make(tmp_path)


def test_index_lists_photos_by_class_folder(raw):
    card = get_card("bach")
    found = card.index(raw)
    sources = found.sources
    assert found.classes == CLASSES
    assert [s.path for s in sources] == sorted(s.path for s in sources)
    assert [(s.path, s.label) for s in sources] == [
        ("Photos/Benign/b001.tif", 0), ("Photos/Benign/b002.tif", 0),
        ("Photos/InSitu/is001.tif", 1), ("Photos/InSitu/is002.tif", 1),
        ("Photos/Invasive/iv001.tif", 2), ("Photos/Invasive/iv002.tif", 2),
        ("Photos/Normal/n001.tif", 3), ("Photos/Normal/n002.tif", 3),
    ]  # fmt: skip
    assert all(s.partition == "all" and s.group == s.path for s in sources)  # WSI/ and the csv are ignored


def test_card_constants():
    card = get_card("bach")
    assert card.mpp == 0.42 and "0.5" in card.mpp_source
    assert card.split_plan == {"all": {"train": 0.4, "valid": 0.1, "test": 0.5}}
    assert card.expected_counts == {"all": 400}
    assert card.group_rule == "source image"


def test_raw_may_point_at_photos(raw):
    sources = get_card("bach").index(raw / "Photos").sources
    assert sources[0].path == "Benign/b001.tif" and len(sources) == 8


def test_read_decodes_a_photo(raw):
    card = get_card("bach")
    src = card.index(raw).sources[0]
    img = np.asarray(pickle.loads(pickle.dumps(card)).read(raw, src))
    assert img.shape == (48, 64, 3) and img.dtype == "uint8"


def test_missing_class_folder_is_an_error(raw):
    shutil.rmtree(raw / "Photos" / "Normal")
    with pytest.raises(UserError, match=r"Photos: classes missing \['Normal'\].*verify the download"):
        get_card("bach").index(raw)


def test_unexpected_class_folder_is_an_error(raw):
    save(raw / "Photos" / "Unknown" / "u001.tif", tissue(8, 8))
    with pytest.raises(UserError, match=r"unexpected \['Unknown'\]"):
        get_card("bach").index(raw)


def test_empty_class_folder_is_an_error(raw):
    for f in (raw / "Photos" / "InSitu").iterdir():
        f.unlink()
    with pytest.raises(UserError, match=r"InSitu: class folder holds no .tif images"):
        get_card("bach").index(raw)


def test_wrong_layout_is_an_error(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(UserError, match=r"expected a Photos/ folder"):
        get_card("bach").index(tmp_path)
    with pytest.raises(UserError, match=r"nowhere: expected ICIAR2018"):
        get_card("bach").index(tmp_path / "nowhere")


def test_patients_csv_groups_images(raw, tmp_path):
    # By file name, by stem and by path under Photos/; n002 is not listed and keeps its own group.
    rows = [("b001.tif", "P1"), ("b002", "P1"), ("InSitu/is001.tif", "P2"), ("is002.tif", "P2"),
            ("iv001.tif", "P3"), ("iv002.tif", "P4"), ("n001.tif", "P4")]  # fmt: skip
    raw_bach.write_patients(raw / "patients.csv", rows)
    card = get_card("bach", {"patients": "patients.csv"})
    groups = {s.path.split("/")[-1]: s.group for s in card.index(raw).sources}
    assert groups == {
        "b001.tif": "patient:P1", "b002.tif": "patient:P1", "is001.tif": "patient:P2", "is002.tif": "patient:P2",
        "iv001.tif": "patient:P3", "iv002.tif": "patient:P4", "n001.tif": "patient:P4",
        "n002.tif": "Photos/Normal/n002.tif",
    }  # fmt: skip
    assert card.group_rule.startswith("patient")
    # An absolute path works too, with spaces around headers and values.
    ext = raw_bach.write_patients(tmp_path / "p.csv", [(" b001.tif ", " P9 ")], header=" Image , Patient ")
    src = get_card("bach", {"patients": str(ext)}).index(raw).sources
    assert src[0].group == "patient:P9"


def test_patients_csv_unknown_image_is_an_error(raw):
    raw_bach.write_patients(raw / "patients.csv", [("b001.tif", "P1"), ("x999.tif", "P2")])
    with pytest.raises(UserError, match=r"patients.csv: line 3: image 'x999.tif' is not in"):
        get_card("bach", {"patients": "patients.csv"}).index(raw)


def test_patients_csv_errors(raw):
    card = get_card("bach", {"patients": "nope.csv"})
    with pytest.raises(UserError, match=r"patients='nope.csv'.*nope.csv is not a file"):
        card.index(raw)
    raw_bach.write_patients(raw / "p.csv", [("b001.tif", "P1")], header="file,case")
    with pytest.raises(UserError, match=r"p.csv: missing column\(s\) \['image', 'patient'\]; header is"):
        get_card("bach", {"patients": "p.csv"}).index(raw)
    raw_bach.write_patients(raw / "p.csv", [("b001.tif", "P1"), ("b001", "P2")])
    with pytest.raises(UserError, match=r"line 3: image 'b001' is given two patients \('P1' and 'P2'\)"):
        get_card("bach", {"patients": "p.csv"}).index(raw)
    raw_bach.write_patients(raw / "p.csv", [("b001.tif", "")])
    with pytest.raises(UserError, match=r"line 2: empty image or patient"):
        get_card("bach", {"patients": "p.csv"}).index(raw)


def test_patients_csv_ambiguous_name_needs_the_path(raw):
    shutil.copy(raw / "Photos" / "Benign" / "b001.tif", raw / "Photos" / "Normal" / "b001.tif")
    raw_bach.write_patients(raw / "p.csv", [("b001.tif", "P1")])
    with pytest.raises(UserError, match=r"image 'b001.tif' is ambiguous"):
        get_card("bach", {"patients": "p.csv"}).index(raw)
    raw_bach.write_patients(raw / "p.csv", [("Normal/b001.tif", "P1")])
    src = {s.path: s.group for s in get_card("bach", {"patients": "p.csv"}).index(raw).sources}
    assert src["Photos/Normal/b001.tif"] == "patient:P1"
    assert src["Photos/Benign/b001.tif"] == "Photos/Benign/b001.tif"
