"""BCSS card: ROI/mask pairing, MPP and code-table checks, institution splits, patch labels by area."""

import pickle

import numpy as np
import pytest

from histokt.errors import UserError
from histokt.ingest.cards import get_card, parse_options
from histokt.ingest.cards.bcss import BCSS, EVA_PLAN
from histokt.ingest.decode import BadImage
from tests.fixtures import raw_bcss as fx

CLASSES = (
    "tumor",
    "stroma",
    "lymphocytic_infiltrate",
    "necrosis_or_debris",
    "glandular_secretions",
    "blood",
    "metaplasia_NOS",
    "fat",
    "plasma_cells",
    "blood_vessel",
)


@pytest.fixture
def raw(tmp_path):
    return fx.make(tmp_path)


def img(stem):
    return f"rgbs_colorNormalized/{stem}.png"


def test_card_attributes():
    card = get_card("bcss")
    assert isinstance(card, BCSS)
    assert card.classes == CLASSES
    assert card.multi_label and card.mpp == 0.25
    assert card.default_stride == 68
    defaults = {"label_threshold": 0.2, "presence": 0.05, "split": "grouped", "mask_resize": "nearest"}
    assert card.option_values == defaults
    assert card.split_plan == {"all": {"train": 0.8, "valid": 0.1, "test": 0.1}}
    assert card.expected_counts == {"all": 151}


def test_index_grouped(raw):
    sources = BCSS().index(raw).sources
    assert [s.path for s in sources] == sorted(img(stem) for stem in fx.STEMS)
    assert all(s.label is None and s.partition == "all" for s in sources)
    groups = {s.path: s.group for s in sources}
    assert groups[img("TCGA-A1-A0SK-DX1_xmin45749_ymin25055_MPP-0.2500")] == "A1"
    assert groups[img("TCGA-OL-A5D7-DX1_xmin114443_ymin22490_MPP-0.2500")] == "OL"
    assert sorted(set(groups.values())) == ["A1", "A2", "AR", "BH", "D8", "EW", "GI", "OL"]


def test_index_eva_split(raw):
    card = BCSS(split="eva")
    found = card.index(raw)
    assert found.split_plan == EVA_PLAN
    assert found.expected_counts == {}
    parts = {s.group: s.partition for s in found.sources}
    assert parts == {
        "A1": "valid", "BH": "valid",
        "OL": "test", "EW": "test",
        "A2": "train", "AR": "train", "D8": "train", "GI": "train",
    }  # fmt: skip
    assert BCSS.split_plan == {"all": {"train": 0.8, "valid": 0.1, "test": 0.1}}  # class default untouched
    assert BCSS().index(raw).split_plan == {"all": {"train": 0.8, "valid": 0.1, "test": 0.1}}


def test_options_parse_and_validate():
    opts = parse_options(BCSS, ["label_threshold=0.5", "presence=0.1", "split=eva"])
    assert opts == {"label_threshold": 0.5, "presence": 0.1, "split": "eva"}
    with pytest.raises(UserError, match="split='random'"):
        BCSS(split="random")
    with pytest.raises(UserError, match="presence=0"):
        BCSS(presence=0.0)
    with pytest.raises(UserError, match="label_threshold=1.5"):
        BCSS(label_threshold=1.5)
    with pytest.raises(UserError, match="unknown option 'stride'"):
        BCSS(stride=136)


def test_read_and_read_mask(raw):
    card = BCSS()
    source = card.index(raw).sources[0]
    assert np.asarray(card.read(raw, source)).shape == (fx.HEIGHT, fx.WIDTH, 3)
    mask = card.read_mask(raw, source)
    assert mask.shape == (fx.HEIGHT, fx.WIDTH)
    assert mask[10, 8] == 1  # tumor (code 1) -> class 0 -> 1
    assert mask[10, 24] == 2  # stroma (code 2) -> class 1 -> 2
    assert mask[0, 0] == 8  # fat (code 9) -> class 7 -> 8
    assert mask[4, 20] == 10  # blood_vessel (code 18) -> class 9 -> 10 (seed 0 row)
    assert mask[-1, 0] == 0  # outside_roi
    # Whole ROI by hand: 768 px; outside 128; fat 16; blood_vessel 1; tumor 20*16-16 = 304; stroma 320-1 = 319.
    counts = np.bincount(mask.ravel(), minlength=11)
    assert counts[[0, 1, 2, 8, 10]].tolist() == [128, 304, 319, 16, 1]
    assert card.mask_label(mask) == (1, 1, 0, 0, 0, 0, 0, 0, 0, 0)


def test_codes_mapped_by_name(raw):
    # A release that numbers tumor 2 and stroma 1: the mask's code 1 must now read as stroma.
    codes = [("tumor", 2) if n == "tumor" else ("stroma", 1) if n == "stroma" else (n, c) for n, c in fx.CODES]
    fx.write_codes(raw, codes)
    card = BCSS()
    source = card.index(raw).sources[0]
    mask = card.read_mask(raw, source)
    assert mask[10, 8] == 2 and mask[10, 24] == 1


def test_excluded_codes_count_as_none(raw):
    stem = fx.STEMS[0]
    mask = fx.mask_for(0)
    mask[:, :] = 7  # "exclude"
    mask[0, :10] = 13  # normal_acinus_or_duct: not one of the 10
    fx.save(raw / "masks" / f"{stem}.png", mask)
    card = BCSS()
    source = card.index(raw).sources[0]
    assert source.path == img(stem)
    assert not card.read_mask(raw, source).any()


def test_read_mask_lazy_without_index(raw):
    """A card rebuilt in a worker (no index call) still maps codes."""
    indexed = BCSS()
    source = indexed.index(raw).sources[0]
    fresh = pickle.loads(pickle.dumps(BCSS()))
    assert np.array_equal(fresh.read_mask(raw, source), indexed.read_mask(raw, source))
    pickle.dumps(indexed)  # the cached lookup pickles too


def test_mask_size_mismatch(raw):
    stem = fx.STEMS[0]
    fx.save(raw / "masks" / f"{stem}.png", np.zeros((fx.HEIGHT, fx.WIDTH + 1), dtype=np.uint8))
    card = BCSS()
    source = card.index(raw).sources[0]
    with pytest.raises(BadImage, match=r"33x24, the image 32x24"):
        card.read_mask(raw, source)


def test_mask_unknown_code(raw):
    stem = fx.STEMS[0]
    mask = fx.mask_for(0)
    mask[0, 0] = 30
    fx.save(raw / "masks" / f"{stem}.png", mask)
    card = BCSS()
    source = card.index(raw).sources[0]
    with pytest.raises(BadImage, match="outside the code table"):
        card.read_mask(raw, source)


def test_mask_code_missing_from_table(raw):
    fx.write_codes(raw, [(n, c) for n, c in fx.CODES if n != "exclude"])  # code 7 now unknown
    stem = fx.STEMS[0]
    mask = fx.mask_for(0)
    mask[0, 0] = 7
    fx.save(raw / "masks" / f"{stem}.png", mask)
    card = BCSS()
    source = card.index(raw).sources[0]
    with pytest.raises(BadImage, match=r"mask codes \[7\] are not in"):
        card.read_mask(raw, source)


def test_rgb_mask_is_bad_image(raw):
    stem = fx.STEMS[0]
    fx.save(raw / "masks" / f"{stem}.png", fx.tissue(fx.HEIGHT, fx.WIDTH))
    card = BCSS()
    source = card.index(raw).sources[0]
    with pytest.raises(BadImage, match="single-channel"):
        card.read_mask(raw, source)


# -- mask_label, computed by hand (mapped masks: 0 = none, c + 1 = classes[c]) -----------------------------
def patch(pixels):
    """A 10x10 mapped mask tile: {class number: pixel count}, the rest 0 (so count = percent)."""
    values = [number for number, n in pixels.items() for _ in range(n)]
    return np.array(values + [0] * (100 - len(values)), dtype=np.int32).reshape(10, 10)


def onehot(*indices):
    return tuple(int(i in indices) for i in range(10))


@pytest.mark.parametrize(
    "pixels, expected",
    [
        ({}, None),  # all outside: sum 0 < 0.2
        ({1: 19}, None),  # tumor 0.19: sum below 0.2
        ({1: 20}, onehot(0)),  # sum exactly 0.2 is kept
        ({1: 20, 2: 4, 8: 5}, onehot(0, 7)),  # stroma 0.04 < 0.05; fat 0.05 >= 0.05
        ({k: 10 for k in range(1, 11)}, onehot(*range(10))),  # 0.1 each
        ({3: 5, 4: 5, 5: 5, 6: 5}, onehot(2, 3, 4, 5)),  # sum 0.2, each 0.05
        ({7: 4, 9: 4, 10: 4, 1: 4, 2: 4}, onehot()),  # sum 0.2 kept, every class 0.04
    ],
)
def test_mask_label_defaults(pixels, expected):
    assert BCSS().mask_label(patch(pixels)) == expected


@pytest.mark.parametrize(
    "pixels, expected",
    [
        ({1: 30, 2: 25}, onehot(0, 1)),  # sum 0.55 >= 0.5; 0.30 and 0.25 >= 0.25
        ({1: 30, 2: 15}, None),  # sum 0.45 < 0.5
        ({1: 26, 10: 24, 4: 1}, onehot(0)),  # 0.51 kept; blood_vessel 0.24 < 0.25
    ],
)
def test_mask_label_options(pixels, expected):
    card = BCSS(label_threshold=0.5, presence=0.25)
    assert card.mask_label(patch(pixels)) == expected


def test_mask_label_non_square_and_uint8():
    tile = np.zeros((4, 5), dtype=np.uint8)  # 20 px
    tile[0, :] = 3  # lymphocytic_infiltrate 5/20 = 0.25
    tile[1, 0] = 6  # blood 1/20 = 0.05
    assert BCSS().mask_label(tile) == onehot(2, 5)


# -- layout errors ----------------------------------------------------------------------------------------
def test_missing_root(tmp_path):
    with pytest.raises(UserError, match="0_Public-data-Amgad2019_0.25MPP"):
        BCSS().index(tmp_path / fx.ROOT)


def test_image_without_mask(raw):
    stem = fx.STEMS[3]
    (raw / "masks" / f"{stem}.png").unlink()
    with pytest.raises(UserError, match=rf"{stem}.png: no mask masks/{stem}.png"):
        BCSS().index(raw)


def test_mask_without_image(raw):
    stem = fx.STEMS[5]
    (raw / "rgbs_colorNormalized" / f"{stem}.png").unlink()
    with pytest.raises(UserError, match=rf"masks/{stem}.png: no image rgbs_colorNormalized/{stem}.png"):
        BCSS().index(raw)


def test_missing_masks_folder(raw):
    for p in (raw / "masks").iterdir():
        p.unlink()
    (raw / "masks").rmdir()
    with pytest.raises(UserError, match="masks: expected the ROI masks"):
        BCSS().index(raw)


def test_wrong_mpp_in_name(tmp_path):
    stem = "TCGA-A2-A0CM-DX1_xmin18562_ymin56852_MPP-0.5000"
    raw = fx.make(tmp_path, stems=fx.STEMS[:2] + (stem,))
    with pytest.raises(UserError, match=rf"{stem}.png: MPP 0.5000 in the file name, the card expects 0.25"):
        BCSS().index(raw)


def test_unparsable_name(tmp_path):
    raw = fx.make(tmp_path, stems=("TCGA-A2-A0CM-DX1_MPP-0.2500",))
    with pytest.raises(UserError, match="TCGA-A2-A0CM-DX1_MPP-0.2500.png: name does not match"):
        BCSS().index(raw)


def test_codes_missing(raw):
    (raw / "meta" / "gtruth_codes.tsv").unlink()
    with pytest.raises(UserError, match="gtruth_codes.tsv"):
        BCSS().index(raw)


def test_codes_missing_class(raw):
    fx.write_codes(raw, [(n, c) for n, c in fx.CODES if n != "plasma_cells"])
    with pytest.raises(UserError, match=r"gtruth_codes.tsv: class\(es\) \['plasma_cells'\] missing"):
        BCSS().index(raw)


def test_codes_bad_header(raw):
    fx.write_codes(raw, header=("name", "code"))
    with pytest.raises(UserError, match="columns label and GT_code"):
        BCSS().index(raw)


def test_codes_bad_value(raw):
    fx.write_codes(raw, list(fx.CODES) + [("mystery", "x")])
    with pytest.raises(UserError, match="GT_code 'x' of 'mystery'"):
        BCSS().index(raw)


def test_codes_duplicate(raw):
    fx.write_codes(raw, list(fx.CODES) + [("tumor_again", 1)])
    with pytest.raises(UserError, match="GT_code 1 appears twice"):
        BCSS().index(raw)
