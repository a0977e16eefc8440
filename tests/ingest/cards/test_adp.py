import numpy as np
import pytest

from histokt.errors import UserError
from histokt.ingest.cards import get_card
from tests.fixtures import raw_adp
from tests.fixtures.images import save, tissue

CSV = "ADP_EncodedLabels_Release1_Flat.csv"


def labels_of(codes, classes):
    return tuple(int(c in codes) for c in classes)


def test_index_l3_official_splits(tmp_path):
    raw = raw_adp.make(tmp_path)
    card = get_card("adp")
    found = card.index(raw)
    sources = found.sources

    assert found.classes == raw_adp.L3 and len(found.classes) == 33
    assert card.multi_label and card.mpp == 1.0
    assert [s.path for s in sources] == sorted(f"img_res_1um_bicubic/{p[0]}" for p in raw_adp.PATCHES)
    by_name = {s.path.split("/")[-1]: s for s in sources}
    for name, codes, split in raw_adp.PATCHES:
        s = by_name[name]
        assert s.label == labels_of(codes, raw_adp.L3)
        assert s.partition == split
    assert by_name["001.png_crop_16.png"].group == "001.png"
    assert by_name["002.png_crop_2.png"].group == "002.png"
    assert found.split_plan == {"train": {"train": 1.0}, "valid": {"valid": 1.0}, "test": {"test": 1.0}}
    assert found.expected_counts == {"train": 14134, "valid": 1767, "test": 1767}


def test_level_l1(tmp_path):
    raw = raw_adp.make(tmp_path)
    card = get_card("adp", {"level": "L1"})
    found = card.index(raw)
    sources = found.sources
    assert found.classes == raw_adp.L1
    label = next(s.label for s in sources if s.path.endswith("001.png_crop_16.png"))
    assert label == (1, 0, 0, 0, 0, 0, 0, 0, 1)  # E and T


def test_unknown_level(tmp_path):
    with pytest.raises(UserError, match="level='L9'"):
        get_card("adp", {"level": "L9"})


def test_split_lists_of_names_match_row_numbers(tmp_path):
    by_rows = get_card("adp").index(raw_adp.make(tmp_path / "a", splits="rows"))
    by_names = get_card("adp").index(raw_adp.make(tmp_path / "b", splits="names"))
    assert by_rows == by_names


def test_raw_may_be_parent_of_release(tmp_path):
    raw = raw_adp.make(tmp_path, nested=True)
    sources = get_card("adp").index(raw).sources
    assert sources[0].path.startswith("ADP V1.0 Release/img_res_1um_bicubic/")


def test_no_splits_folder_cuts_all(tmp_path):
    raw = raw_adp.make(tmp_path, splits=None)
    card = get_card("adp")
    found = card.index(raw)
    sources = found.sources
    assert {s.partition for s in sources} == {"all"}
    assert found.split_plan == {"all": {"train": 0.8, "valid": 0.1, "test": 0.1}}
    assert found.expected_counts == {"all": 17668}


# -- errors -----------------------------------------------------------------------------------------------
def test_missing_csv(tmp_path):
    raw = raw_adp.make(tmp_path)
    (raw / CSV).unlink()
    with pytest.raises(UserError, match=f"{CSV}.*verify the download"):
        get_card("adp").index(raw)


def test_missing_class_column(tmp_path):
    raw = raw_adp.make(tmp_path)
    columns = [c for c in raw_adp.COLUMNS if c != "N.G.M"]
    raw_adp.write_csv(raw / CSV, raw_adp.PATCHES, columns)
    with pytest.raises(UserError, match=r"missing columns \['N.G.M'\].*verify the download"):
        get_card("adp").index(raw)
    # L1 does not need the L3 column.
    assert len(get_card("adp", {"level": "L1"}).index(raw).sources) == len(raw_adp.PATCHES)


def test_row_names_missing_image(tmp_path):
    raw = raw_adp.make(tmp_path)
    (raw / "img_res_1um_bicubic" / "003.png_crop_5.png").unlink()
    with pytest.raises(UserError, match="003.png_crop_5.png: named in .* but not found"):
        get_card("adp").index(raw)


def test_image_without_row(tmp_path):
    raw = raw_adp.make(tmp_path)
    save(raw / "img_res_1um_bicubic" / "009.png_crop_1.png", tissue(8, 8))
    with pytest.raises(UserError, match="009.png_crop_1.png: has no row"):
        get_card("adp").index(raw)


def test_duplicate_patch_name(tmp_path):
    raw = raw_adp.make(tmp_path)
    raw_adp.write_csv(raw / CSV, raw_adp.PATCHES + raw_adp.PATCHES[:1])
    with pytest.raises(UserError, match="duplicate patch name '001.png_crop_16.png'"):
        get_card("adp").index(raw)


def test_label_not_binary(tmp_path):
    raw = raw_adp.make(tmp_path)
    text = (raw / CSV).read_text().splitlines()
    cells = text[2].split(",")
    cells[raw_adp.COLUMNS.index("T")] = "2"
    text[2] = ",".join(cells)
    (raw / CSV).write_text("\n".join(text) + "\n")
    with pytest.raises(UserError, match="line 3, column 'T': '2' is not 0 or 1"):
        get_card("adp").index(raw)


def test_object_split_list_is_refused(tmp_path):
    raw = raw_adp.make(tmp_path)
    np.save(raw / "splits" / "valid.npy", np.array(["003.png_crop_5.png", None], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="valid.npy: is a pickled object array"):
        get_card("adp").index(raw)


def test_split_row_out_of_range(tmp_path):
    raw = raw_adp.make(tmp_path)
    raw_adp.write_list(raw / "splits" / "test.npy", [5, 99])
    with pytest.raises(UserError, match="test.npy: row 99 is outside"):
        get_card("adp").index(raw)


def test_split_name_unknown(tmp_path):
    raw = raw_adp.make(tmp_path, splits="names")
    raw_adp.write_list(raw / "splits" / "test.npy", ["004.png_crop_9.png", "777.png_crop_1.png"])
    with pytest.raises(UserError, match="test.npy: '777.png_crop_1.png' has no row"):
        get_card("adp").index(raw)


def test_patch_in_two_splits(tmp_path):
    raw = raw_adp.make(tmp_path)
    raw_adp.write_list(raw / "splits" / "test.npy", [5, 0])
    with pytest.raises(UserError, match="test.npy: '001.png_crop_16.png' is also in the train list"):
        get_card("adp").index(raw)


def test_patch_in_no_split(tmp_path):
    raw = raw_adp.make(tmp_path)
    raw_adp.write_list(raw / "splits" / "test.npy", np.array([], dtype=np.int64))
    with pytest.raises(UserError, match="'004.png_crop_9.png' is in no split list"):
        get_card("adp").index(raw)


def test_missing_split_file(tmp_path):
    raw = raw_adp.make(tmp_path)
    (raw / "splits" / "valid.npy").unlink()
    with pytest.raises(UserError, match="valid.npy: expected the official valid list"):
        get_card("adp").index(raw)
