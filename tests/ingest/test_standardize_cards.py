"""standardize() end to end on every dataset card's fixture, against counts worked out by hand.

Each test builds a card's tiny raw layout, runs the whole pipeline into a fresh store and checks the
result against numbers computed in the comments from the fixture's image sizes and the card's µm/px
(method.md §2): rescaled size = round(W * mpp / 1.0) x round(H * mpp / 1.0); mirror padding up to 272
in a dimension that is smaller; 272-pixel windows at stride 204 (BCSS: 68), full windows only, row-major;
patches with a 5-99 % gray spread below 0.1 are dropped. Splits are checked against the official
partitions, and whole groups (source image, patient, case, institution) must sit in one split.
"""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from histokt.ingest.standardize import StandardizeConfig, standardize
from histokt.store.schema import PatchReader
from tests.fixtures import images as fx_images
from tests.fixtures import (
    raw_adp,
    raw_ajlymph,
    raw_bach,
    raw_bcss,
    raw_crc,
    raw_csv_list,
    raw_glas,
    raw_mhist,
    raw_osteosarcoma,
    raw_pcam,
)

# The fixtures are partial downloads on purpose; the cards record (and warn about) the short counts.
pytestmark = pytest.mark.filterwarnings("ignore:.*a complete download has:UserWarning")

SPLITS = ("train", "valid", "test")
P = 272


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    """fsync only buys crash durability (tested in test_standardize.py) and costs ~1 s per run here."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


ADP_L3 = (
    "E", "E.M", "E.M.S", "E.M.C", "E.T", "E.T.S", "E.T.C", "C", "C.D", "C.D.I", "C.D.R", "C.L",
    "H", "H.E", "H.K", "H.Y", "S", "S.M", "S.C", "S.R", "A", "A.W", "A.M", "M",
    "N", "N.P", "N.R", "N.G", "N.G.M", "G", "G.O", "G.N", "T",
)  # fmt: skip
BCSS_CLASSES = (
    "tumor", "stroma", "lymphocytic_infiltrate", "necrosis_or_debris", "glandular_secretions",
    "blood", "metaplasia_NOS", "fat", "plasma_cells", "blood_vessel",
)  # fmt: skip

# Boxes (x0, y0, x1, y1) in row-major order, by hand.
ONE = [(0, 0, 272, 272)]  # anything padded to (or exactly) 272x272: a single window
TWO_COLS = [(0, 0, 272, 272), (204, 0, 476, 272)]  # width 476..679, height 272..475
FOUR = [(0, 0, 272, 272), (204, 0, 476, 272), (0, 204, 272, 476), (204, 204, 476, 476)]  # 476..679 square
SIX = [(0, 0, 272, 272), (204, 0, 476, 272), (408, 0, 680, 272),
       (0, 204, 272, 476), (204, 204, 476, 476), (408, 204, 680, 476)]  # fmt: skip  # 680+ wide, 476..679 high


class Result:
    """A finished dataset read back: attrs, sources and, per split, labels / source_id / box / images."""

    def __init__(self, store: Path, name: str):
        self.group = zarr.open_group(str(store / name), mode="r")
        self.readers = {split: PatchReader(store, name, split) for split in SPLITS}
        self.attrs = dict(self.group.attrs)
        self.sources = [str(s) for s in self.group["sources"][:]]
        self.split = {}
        for split in SPLITS:
            g = self.group[split]
            self.split[split] = {
                "labels": g["labels"][:],
                "source_id": g["source_id"][:],
                "box": g["box"][:],
                "images": g["images"],
            }

    def count(self, split: str) -> int:
        return len(self.split[split]["source_id"])

    def counts(self) -> dict:
        return {s: self.count(s) for s in SPLITS}

    def patches(self):
        """(split, source path, box tuple, label, index in split) for every stored patch."""
        for split in SPLITS:
            d = self.split[split]
            for k, (sid, box, label) in enumerate(zip(d["source_id"], d["box"], d["labels"])):
                lab = tuple(int(v) for v in label) if np.ndim(label) else int(label)
                yield split, self.sources[int(sid)], tuple(int(v) for v in box), lab, k

    def by_source(self) -> dict:
        """source path -> (split, [boxes], [labels]), in stored order."""
        out = {}
        for split, path, box, label, _ in self.patches():
            entry = out.setdefault(path, (split, [], []))
            assert entry[0] == split, f"{path}: patches in {entry[0]} and {split}"
            entry[1].append(box)
            entry[2].append(label)
        return out

    def split_of(self) -> dict:
        return {path: entry[0] for path, entry in self.by_source().items()}

    def image(self, split: str, k: int) -> np.ndarray:
        """Patch k as a model sees it (content stored unpadded is padded on read)."""
        return self.readers[split].read(k)


def run(dataset: str, raw: Path, tmp_path: Path, **kw) -> Result:
    store = tmp_path / "s.zarr"
    cfg = StandardizeConfig(dataset=dataset, raw=raw, store=store, progress=False, **kw)
    summary = standardize(cfg)
    assert summary.status == "written"
    result = Result(store, dataset)
    assert summary.counts == result.counts()
    return result


def check_common(r: Result, *, classes, multi_label: bool, mpp: float, stride: int, size_of, raw: Path | None):
    """Schema, attrs and geometry shared by every card.

    size_of(path) -> (W, H) of the source after rescaling and padding (worked out by hand per test).
    """
    a = r.attrs
    assert a["classes"] == list(classes)  # index order
    assert a["multi_label"] is multi_label
    assert a["mpp_native"] == pytest.approx(mpp)
    assert a["mpp_target"] == 1.0 and a["patch_size"] == P and a["stride"] == stride
    assert a["split_rule"] == "grouped" and a["format"] == "histokt-patches/2"
    assert a["counts"] == r.counts()
    assert a["rejected"] == []  # only undecodable files are listed there; blank images are not "bad"
    assert len(r.sources) == len(set(r.sources))
    if raw is not None:
        assert all((raw / s).is_file() for s in r.sources), "sources are paths relative to the raw dir"
    for split in SPLITS:
        d, n = r.split[split], r.count(split)
        # the stored content: unpadded where every source is smaller than the patch; read back padded
        h, w = a["content_size"]
        assert d["images"].shape == (n, h, w, 3) and d["images"].dtype == np.uint8 and h <= P and w <= P
        assert r.readers[split].shape == (n, P, P, 3)
        if multi_label:
            assert d["labels"].dtype == np.uint8 and d["labels"].shape == (n, len(classes))
            assert set(np.unique(d["labels"])) <= {0, 1}
        else:
            assert d["labels"].dtype == np.int64 and d["labels"].shape == (n,)
            assert ((d["labels"] >= 0) & (d["labels"] < len(classes))).all()
        assert d["source_id"].dtype == np.int64 and d["source_id"].shape == (n,)
        assert ((d["source_id"] >= 0) & (d["source_id"] < len(r.sources))).all()
        assert d["box"].dtype == np.int64 and d["box"].shape == (n, 4)
        # patches of one source are stored together, sources in their sorted order
        assert (np.diff(d["source_id"]) >= 0).all()
    for _split, path, (x0, y0, x1, y1), _, _k in r.patches():
        w, h = size_of(path)
        assert x1 - x0 == P and y1 - y0 == P
        assert x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h, (path, (x0, y0, x1, y1), (w, h))
        assert x0 % stride == 0 and y0 % stride == 0
    for path, (_, boxes, _) in r.by_source().items():
        assert boxes == sorted(boxes, key=lambda b: (b[1], b[0])), f"{path}: not row-major"
        assert len(set(boxes)) == len(boxes)
    # every stored patch passes the low-contrast filter: 5-99 % spread of the Rec. 709 gray >= 0.1
    for split in SPLITS:
        if r.count(split):
            imgs = r.split[split]["images"][...].astype(np.float64)
            gray = (imgs @ np.array([0.2125, 0.7154, 0.0721])).reshape(len(imgs), -1) / 255.0
            lo, hi = np.percentile(gray, [5, 99], axis=1)
            assert ((hi - lo) / 2 >= 0.05).all()


def check_groups(r: Result, group_of) -> dict:
    """Every group's patches in one split; returns group -> split."""
    seen = {}
    for path, split in r.split_of().items():
        g = group_of(path)
        assert seen.setdefault(g, split) == split, f"group {g!r} in {seen[g]} and {split}"
    return seen


def write_blank(path: Path, height: int, width: int) -> Path:
    return fx_images.save(path, fx_images.blank(height, width))


# -- ADP ------------------------------------------------------------------------------------------------------


def test_adp_multilabel_official_splits(tmp_path):
    raw = raw_adp.make(tmp_path, nested=True)  # raw = the folder holding "ADP V1.0 Release"
    r = run("adp", raw, tmp_path)
    prefix = "ADP V1.0 Release/img_res_1um_bicubic/"
    # 1.0 µm/px: no rescale; 8x8 mirror-padded to 272x272 -> 1 window per patch image.
    # Official lists: 001/002 crops (4) train, 003 valid, 004 test.
    check_common(r, classes=ADP_L3, multi_label=True, mpp=1.0, stride=204, size_of=lambda p: (272, 272), raw=raw)
    assert r.counts() == {"train": 4, "valid": 1, "test": 1}
    by = r.by_source()
    assert len(by) == len(r.sources) == 6
    for name, codes, split in raw_adp.PATCHES:
        got_split, boxes, labels = by[prefix + name]
        assert got_split == split and boxes == ONE
        # labels read by column NAME (the CSV's column order is reversed) into L3 index order
        assert labels == [tuple(int(c in codes) for c in ADP_L3)]
    assert by[prefix + "004.png_crop_9.png"][2][0][ADP_L3.index("M")] == 1
    assert by[prefix + "004.png_crop_9.png"][2][0][ADP_L3.index("T")] == 1
    check_groups(r, lambda p: p.rsplit("/", 1)[1].partition("_crop_")[0])
    # the stored pixels are the image, mirror-padded bottom/right without repeating the edge
    split, k = next((s, k) for s, p, _, _, k in r.patches() if p.endswith("003.png_crop_5.png"))
    image = np.asarray(Image.open(raw / (prefix + "003.png_crop_5.png")).convert("RGB"))
    np.testing.assert_array_equal(r.image(split, k), np.pad(image, ((0, 264), (0, 264), (0, 0)), mode="reflect"))


def test_adp_without_split_lists_groups_crops_of_one_image(tmp_path):
    raw = raw_adp.make(tmp_path, splits=None)
    r = run("adp", raw, tmp_path)
    # 6 patch images, 1 window each. No splits/: partition "all" cut 80/10/10 by source image:
    # groups 001.png (2 crops), 002.png (2), 003.png, 004.png = 4: HistoKT's cut gives train 3,
    # valid int(3.6)-int(3.2) = 0, test 1; an empty split takes one group from the largest: 2 / 1 / 1.
    check_common(r, classes=ADP_L3, multi_label=True, mpp=1.0, stride=204, size_of=lambda p: (272, 272), raw=raw)
    where = check_groups(r, lambda p: p.rsplit("/", 1)[1].partition("_crop_")[0])
    assert sorted(where.values()) == ["test", "train", "train", "valid"]
    crops = {"001.png": 2, "002.png": 2, "003.png": 1, "004.png": 1}
    test_image = next(g for g, s in where.items() if s == "test")
    valid_image = next(g for g, s in where.items() if s == "valid")
    assert r.counts() == {
        "train": 6 - crops[test_image] - crops[valid_image],
        "valid": crops[valid_image],
        "test": crops[test_image],
    }
    assert r.attrs["split_plan"] == {"all": {"train": 0.8, "valid": 0.1, "test": 0.1}}


# -- MHIST ----------------------------------------------------------------------------------------------------


def test_mhist_official_test_partition_and_blank(tmp_path):
    rows = [*raw_mhist.ROWS, ("MHIST_aaf.png", "SSA", 7, "test")]
    raw = raw_mhist.make(tmp_path, rows=rows, size=(224, 400))
    write_blank(raw / "images" / "MHIST_aaf.png", 224, 400)
    r = run("mhist", raw, tmp_path)
    # 1.25 µm/px: 400x224 -> 500x280 (no padding); x0 in range(0, 500-272+1, 204) = 0, 204; y0 = 0
    # -> 2 windows per image (TWO_COLS). Official train (aaa, aab, aac) -> 80/20 by image:
    # int(0.8*3) = 2 images train (4 patches), 1 valid (2); official test: aad, aae -> 4, aaf blank -> 0.
    check_common(r, classes=("HP", "SSA"), multi_label=False, mpp=1.25, stride=204,
                 size_of=lambda p: (500, 280), raw=raw)  # fmt: skip
    assert r.counts() == {"train": 4, "valid": 2, "test": 4}
    by = r.by_source()
    label = {name: ("HP", "SSA").index(cls) for name, cls, _, _ in rows}
    for path, (_split, boxes, labels) in by.items():
        name = path.removeprefix("images/")
        assert boxes == TWO_COLS and labels == [label[name]] * 2
    assert {p for p, (s, _, _) in by.items() if s == "test"} == {"images/MHIST_aad.png", "images/MHIST_aae.png"}
    assert sorted(
        s
        for p, (s, _, _) in by.items()
        if p in ("images/MHIST_aaa.png", "images/MHIST_aab.png", "images/MHIST_aac.png")
    ) == ["train", "train", "valid"]
    # the blank image is a source (indexed) but never a patch
    assert "images/MHIST_aaf.png" in r.sources and "images/MHIST_aaf.png" not in by
    assert any("mhist: train has 3 sources" in w for w in r.attrs["warnings"])


# -- BACH -----------------------------------------------------------------------------------------------------


def test_bach_six_windows_blank_and_half_blank(tmp_path):
    raw = raw_bach.make(tmp_path, per_class=1, size=(1200, 1700))
    photos = raw / "Photos"
    write_blank(photos / "Normal" / "n002.tif", 1200, 1700)
    half = fx_images.tissue(1200, 1700, seed=77)
    half[:, :1200] = 240  # columns < 1200 blank glass -> rescaled x < 504 blank
    fx_images.save(photos / "Invasive" / "iv002.tif", half)
    r = run("bach", raw, tmp_path)
    # 0.42 µm/px: 1700x1200 -> round(714.0) x round(504.0) = 714x504, no padding;
    # x0 in range(0, 714-272+1, 204) = 0, 204, 408; y0 in range(0, 504-272+1, 204) = 0, 204 -> 6 windows.
    # b001, is001, iv001, n001: 4 x 6 = 24. n002 blank: 0. iv002: windows x0 = 0 ([0, 272)) and 204
    # ([204, 476)) lie in the blank part (< 504) -> dropped; x0 = 408 ([408, 680)) holds tissue -> 2.
    # Total 26.
    check_common(r, classes=("Benign", "InSitu", "Invasive", "Normal"), multi_label=False, mpp=0.42, stride=204,
                 size_of=lambda p: (714, 504), raw=raw)  # fmt: skip
    assert sum(r.counts().values()) == 26
    by = r.by_source()
    for cls, stem in (("Benign", "b001"), ("InSitu", "is001"), ("Invasive", "iv001"), ("Normal", "n001")):
        _split, boxes, labels = by[f"Photos/{cls}/{stem}.tif"]
        assert boxes == SIX and labels == [("Benign", "InSitu", "Invasive", "Normal").index(cls)] * 6
    assert by["Photos/Invasive/iv002.tif"][1:] == ([SIX[2], SIX[5]], [2, 2])
    assert "Photos/Normal/n002.tif" in r.sources and "Photos/Normal/n002.tif" not in by
    assert not any("WSI" in s or s.endswith(".csv") for s in r.sources)
    # 6 sources, one group each, cut 40/10/50: train [0, int(2.4)=2), valid [2, int(3.0)=3), test [3, 6)
    # -> 2 / 1 / 3 sources per split; the blank one is missing from exactly one of them.
    seen = [sum(1 for s in r.split_of().values() if s == split) for split in SPLITS]
    deficit = [want - got for want, got in zip((2, 1, 3), seen)]
    assert sorted(deficit) == [0, 0, 1]


def test_bach_patient_groups(tmp_path):
    raw = raw_bach.make(tmp_path)  # 2 per class, 64x48
    patients = [("b001.tif", "P1"), ("b002.tif", "P1"), ("is001.tif", "P2"), ("is002.tif", "P2"),
                ("iv001.tif", "P3"), ("iv002.tif", "P4"), ("n001.tif", "P5"), ("n002.tif", "P6")]  # fmt: skip
    raw_bach.write_patients(raw / "patients.csv", patients)
    r = run("bach", raw, tmp_path, option=["patients=patients.csv"])
    # 0.42 µm/px: 64x48 -> round(26.88) x round(20.16) = 27x20 -> padded 272x272 -> 1 window each: 8.
    # 6 patients cut 40/10/50: train [0, int(2.4)=2), valid [2, int(3.0)=3), test [3, 6) -> 2 / 1 / 3 patients.
    check_common(r, classes=("Benign", "InSitu", "Invasive", "Normal"), multi_label=False, mpp=0.42, stride=204,
                 size_of=lambda p: (272, 272), raw=raw)  # fmt: skip
    patient = dict(patients)
    where = check_groups(r, lambda p: patient[Path(p).name])
    assert sorted(where.values()) == ["test", "test", "test", "train", "train", "valid"]
    size = {"P1": 2, "P2": 2, "P3": 1, "P4": 1, "P5": 1, "P6": 1}
    assert r.counts() == {s: sum(n for pt, n in size.items() if where[pt] == s) for s in SPLITS}


# -- AJ-Lymph -------------------------------------------------------------------------------------------------


def test_ajlymph_padding_of_one_dimension_and_blank(tmp_path):
    raw = raw_ajlymph.make(tmp_path, per_class=2, size=(1000, 1920), grain=4)
    write_blank(raw / "MCL" / "sj-05-3165_999.tif", 1000, 1920)
    r = run("ajlymph", raw, tmp_path)
    # 0.25 µm/px: 1920x1000 -> 480x250; height < 272 -> mirror-padded to 480x272 (width kept);
    # x0 in range(0, 480-272+1, 204) = 0, 204; y0 = 0 -> 2 windows. 6 images x 2 = 12; blank -> 0.
    # 7 sources cut 80/10/10: train [0, int(5.6)=5), valid [5, int(6.3)=6), test [6, 7) -> 5/1/1.
    check_common(r, classes=("CLL", "FL", "MCL"), multi_label=False, mpp=0.25, stride=204,
                 size_of=lambda p: (480, 272), raw=raw)  # fmt: skip
    assert sum(r.counts().values()) == 12
    by = r.by_source()
    assert len(by) == 6 and "MCL/sj-05-3165_999.tif" in r.sources and "MCL/sj-05-3165_999.tif" not in by
    for path, (_, boxes, labels) in by.items():
        assert boxes == TWO_COLS and labels == [("CLL", "FL", "MCL").index(path.split("/")[0])] * 2
    seen = [sum(1 for s in r.split_of().values() if s == split) for split in SPLITS]
    assert sorted(want - got for want, got in zip((5, 1, 1), seen)) == [0, 0, 1]
    # rows 250..271 mirror rows 248..227 (reflect: the edge row 249 is not repeated)
    split, k = next((s, k) for s, _, _, _, k in r.patches())
    patch = r.image(split, k)
    np.testing.assert_array_equal(patch[250:272], patch[248:226:-1])
    assert r.attrs["content_size"] == [250, 272]  # only the rows of content are stored


# -- PCam -----------------------------------------------------------------------------------------------------


def test_pcam_h5_gz_rows_official_splits(tmp_path):
    raw = raw_pcam.make(tmp_path, gz=True)
    assert not list(raw.glob("*.h5"))  # shipped form only
    r = run("pcam", raw, tmp_path, option=[f"cache={tmp_path / 'cache'}"])
    per_class_run = run("pcam", raw, tmp_path / "balanced", option=[f"cache={tmp_path / 'cache'}", "per_class=5"])
    # per_class=5 (HistoKT's balanced archive): train 5 per class of 10 rows with 5 / 5 -> 10;
    # valid round(5/5) = 1 per class -> 2; test whole -> 4.
    assert per_class_run.counts() == {"train": 10, "valid": 2, "test": 4}
    assert sorted(lab for s, _, _, lab, _ in per_class_run.patches() if s == "valid") == [0, 1]
    # 0.972 µm/px: 96x96 -> round(93.312) = 93x93 -> padded 272x272 -> 1 window per row.
    # Official partitions kept whole: train 10, valid 4, test 4 rows -> 10 / 4 / 4 patches.
    check_common(r, classes=("non_tumor", "tumor"), multi_label=False, mpp=0.972, stride=204,
                 size_of=lambda p: (272, 272), raw=None)  # fmt: skip
    assert r.counts() == {"train": 10, "valid": 4, "test": 4}
    assert r.attrs["content_size"] == [93, 93]  # PCam's 93 px of content are stored; the padding is not
    row = re.compile(r"camelyonpatch_level_2_split_(train|valid|test)_x\.h5\.gz\[(\d+)\]")
    want_labels = {part: raw_pcam.labels(n, k) for k, (part, n) in enumerate(raw_pcam.SIZES.items())}
    for split, path, box, label, _ in r.patches():
        m = row.fullmatch(path)
        assert m, path
        assert m[1] == split and box == ONE[0] and label == int(want_labels[split][int(m[2])])
    assert len(r.sources) == 18
    assert (tmp_path / "cache" / "camelyonpatch_level_2_split_train_x.h5").is_file()
    assert not list(raw.glob("*.h5"))  # decompressed into the cache, never beside the download


# -- CRC ------------------------------------------------------------------------------------------------------

CRC7 = ("ADI", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
CRC9 = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


@pytest.mark.parametrize(
    "n_classes, classes, want, options",
    [
        # 100K: 3 per kept class -> 21 (7 classes) cut 80/20: int(16.8) = 16 train, 5 valid;
        # 7K: 2 per kept class = 14, plus one blank (dropped) -> 14 test patches.
        (7, CRC7, {"train": 16, "valid": 5, "test": 14}, []),
        # 9 classes: 27 -> int(21.6) = 21 train, 6 valid; 7K: 18 (+ blank) -> 18 test.
        (9, CRC9, {"train": 21, "valid": 6, "test": 18}, []),
        # per_class=2: 2 of the 3 per class of the 100K -> 14, int(11.2) = 11 train, 3 valid; 7K whole: 14.
        (7, CRC7, {"train": 11, "valid": 3, "test": 14}, ["per_class=2"]),
    ],
)
def test_crc_7_or_9_classes_and_7k_test(tmp_path, n_classes, classes, want, options):
    raw = raw_crc.make(tmp_path)
    write_blank(raw / raw_crc.TEST_DIR / "TUM" / "TUM-TCGA-BLANKBLA.tif", 8, 8)
    r = run("crc", raw, tmp_path, option=[f"classes={n_classes}", *options])
    # 0.5 µm/px: 8x8 -> 4x4 -> padded 272x272 -> 1 window per tile.
    check_common(r, classes=classes, multi_label=False, mpp=0.5, stride=204, size_of=lambda p: (272, 272), raw=raw)
    assert r.counts() == want
    assert r.attrs["content_size"] == [4, 4]
    for split, path, box, label, _ in r.patches():
        top, cls = path.split("/")[:2]
        assert box == ONE[0] and label == classes.index(cls)
        # CRC-VAL-HE-7K only in test, the 100K only in train/valid
        assert (split == "test") == (top == raw_crc.TEST_DIR)
        assert top in (raw_crc.TEST_DIR, raw_crc.TRAIN_DIRS["NONORM"])
    folders = {p.split("/")[1] for p in r.sources}
    assert folders == set(classes)  # BACK and DEB not even indexed with 7 classes
    blank = f"{raw_crc.TEST_DIR}/TUM/TUM-TCGA-BLANKBLA.tif"
    assert blank in r.sources and blank not in r.by_source()
    # the same tissue class gets a different index in the two class sets
    lym = {label for _, path, _, label, _ in r.patches() if "/LYM/" in path}
    assert lym == {1 if n_classes == 7 else 3}
    if options:  # the subset keeps exactly 2 per class of the 100K
        train_dir = raw_crc.TRAIN_DIRS["NONORM"]
        per_class = [sum(1 for p in r.sources if p.startswith(f"{train_dir}/{c}/")) for c in classes]
        assert per_class == [2] * len(classes)


# -- GlaS -----------------------------------------------------------------------------------------------------


def test_glas_spaces_official_partitions_and_sizes(tmp_path):
    # sizes alternate: rows 0, 2, 4 (testA_1, testB_1, train_2) 522x775; rows 1, 3, 5 (testA_2, train_1,
    # train_10) 430x567, as the real set's two sizes
    raw = raw_glas.make(tmp_path, nesting=2, sizes=((522, 775), (430, 567)))
    r = run("glas", raw, tmp_path)
    prefix = f"{raw_glas.ZIP_FOLDER}/{raw_glas.RELEASE}/"
    # 0.62005 µm/px: 775x522 -> round(480.54) x round(323.67) = 481x324 -> x0 = 0, 204; y0 = 0 -> 2 windows;
    # 567x430 -> round(351.57) x round(266.62) = 352x267 -> padded 352x272 -> x0 = 0 only -> 1 window.
    # testA -> valid: testA_1 (2) + testA_2 (1) = 3; testB -> test: testB_1 (2) = 2;
    # train: train_1 (1) + train_2 (2) + train_10 (1) = 4. Total 9.
    big = {"testA_1", "testB_1", "train_2"}
    check_common(r, classes=("benign", "malignant"), multi_label=False, mpp=0.62005, stride=204,
                 size_of=lambda p: (481, 324) if Path(p).stem in big else (352, 272), raw=raw)  # fmt: skip
    assert r.attrs["classes"] == ["benign", "malignant"]  # " benign" with its leading space stripped
    assert r.counts() == {"train": 4, "valid": 3, "test": 2}
    want_split = {"testA": "valid", "testB": "test", "train": "train"}
    grade = {name: ("benign", "malignant").index(g) for name, _, g, _ in raw_glas.ROWS}
    by = r.by_source()
    assert len(by) == 6
    for path, (split, boxes, labels) in by.items():
        assert path.startswith(prefix) and not path.endswith("_anno.bmp")
        stem = Path(path).stem
        assert split == want_split[stem.split("_")[0]]
        assert boxes == (TWO_COLS if stem in big else ONE)
        assert labels == [grade[stem]] * len(boxes)
    # Patient 4 is in testA and train: the official partitions win over patient grouping (the split plan keeps
    # each partition whole; grouping only acts inside a partition that is cut).
    assert r.attrs["split_plan"] == {"train": {"train": 1.0}, "testA": {"valid": 1.0}, "testB": {"test": 1.0}}


# -- Osteosarcoma ---------------------------------------------------------------------------------------------

# file (the CSV name, spaces as hyphens) -> class index:
# Non-Tumor 0, Viable 1, Non-Viable-Tumor 2, 'viable: non-viable' 3 (HistoKT's index order, method.md §1)
OS_LABELS = {
    "Training-Set-2/set1/Case-3-A10-10547-25283.jpg": 0,
    "Training-Set-1/set1/Case-3-A10-17206-19249.jpg": 2,
    "Training-Set-2/set1/Case-3-A12-12706-7126.jpg": 2,
    "Training-Set-2/set6/Case-4-C34-28567-20375.jpg": 1,
    "Training-Set-1/set5/Case-4-C34-34338-25165.jpg": 3,
    "Training-Set-2/set9/Case-48-P5-C21-35299-19753.jpg": 1,  # CSV: "Case 48 - P5 C21-35299-19753"
    "Training-Set-1/set8/Case-48-P5-C21-40591-33043.jpg": 0,
    "Training-Set-2/set9/Case-48-P5-C22-21419-13624.jpg": 3,
    "Training-Set-1/set11/P9-B7-23277-6246.jpg": 0,
    "Training-Set-2/set12/P9-B7-8325-33733.jpg": 0,  # overwritten blank below
}


def test_osteosarcoma_names_cases_and_blank(tmp_path):
    raw = raw_osteosarcoma.make(tmp_path, size=500)
    blank = "Training-Set-2/set12/P9-B7-8325-33733.jpg"
    fx_images.save(raw / blank, fx_images.blank(500, 500), quality=90)
    r = run("os", raw, tmp_path)
    # 1.0 µm/px: 500x500 kept; x0, y0 in range(0, 500-272+1, 204) = 0, 204 -> 4 windows (FOUR).
    # 10 tiles, one blank -> 9 x 4 = 36 patches.
    classes = ("Non-Tumor", "Viable", "Non-Viable-Tumor", "viable: non-viable")
    check_common(r, classes=classes, multi_label=False, mpp=1.0, stride=204, size_of=lambda p: (500, 500), raw=raw)
    assert sum(r.counts().values()) == 36
    assert sorted(r.sources) == sorted(OS_LABELS)  # every space-named CSV row resolved to its hyphenated file
    by = r.by_source()
    assert blank not in by and len(by) == 9
    for path, (_, boxes, labels) in by.items():
        assert boxes == FOUR and labels == [OS_LABELS[path]] * 4
    # groups = cases Case-3 (3 tiles), Case-4 (2), Case-48 (3), P9 (2): 4 groups cut 80/10/10:
    # HistoKT's cut gives 3 / 0 / 1; the empty valid takes one case from train -> 2 / 1 / 1 cases.
    case = lambda p: re.match(r"(Case-\d+|P\d+)-", Path(p).name)[1]
    where = check_groups(r, case)
    assert sorted(where.values()) == ["test", "train", "train", "valid"]
    tiles_with_patches = {"Case-3": 3, "Case-4": 2, "Case-48": 3, "P9": 1}  # P9's second tile is blank
    test_case = next(c for c, s in where.items() if s == "test")
    assert r.count("test") == 4 * tiles_with_patches[test_case]
    # scale 1: each patch is exactly its box of the decoded tile
    split, path, (x0, y0, x1, y1), _, k = next(p for p in r.patches() if p[2] == FOUR[3])
    tile = np.asarray(Image.open(raw / path).convert("RGB"))
    np.testing.assert_array_equal(r.image(split, k), tile[y0:y1, x0:x1])


# -- BCSS -----------------------------------------------------------------------------------------------------


def test_bcss_stride_68_mask_labels_threshold_and_blank(tmp_path):
    # ROIs of 2176x1088 native px (0.25 µm/px) -> 544x272 at 1 µm/px, no padding.
    raw = raw_bcss.make(tmp_path, size=(1088, 2176), grain=4)
    stems = raw_bcss.STEMS
    out_roi = stems[4]  # TCGA-D8-…: its right half (the stroma) becomes outside_roi (code 0)
    mask = raw_bcss.mask_for(4, 1088, 2176)
    mask[:, 1088:] = 0
    raw_bcss.save(raw / raw_bcss.MASKS / f"{out_roi}.png", mask)
    blank_roi = stems[6]  # TCGA-GI-…: blank glass -> every window fails the contrast filter
    write_blank(raw / raw_bcss.IMAGES / f"{blank_roi}.png", 1088, 2176)
    r = run("bcss", raw, tmp_path)
    check_common(r, classes=BCSS_CLASSES, multi_label=True, mpp=0.25, stride=68,
                 size_of=lambda p: (544, 272), raw=raw)  # fmt: skip
    # Windows: x0 in range(0, 544-272+1, 68) = 0, 68, 136, 204, 272; y0 = 0 -> 5 per ROI.
    # Mask (nearest, 4x): rescaled col x samples native col 4x+2, so cols 0..271 are tumor (4x+2 < 1088),
    # 272..543 stroma; row 271 samples native row 1086 >= 1084 -> outside ROI; the 4x4 fat block becomes
    # 1 pixel (fraction 1/73984 < presence 0.05); the blood_vessel pixel (native col 20) is never sampled.
    # tumor fraction per window = tumor cols * 271 / 272^2: x0=0: 272 cols; 68: 204; 136: 136; 204: 68 (0.249);
    # 272: 0. Stroma is the complement. Presence 0.05 -> positive when >= 14 columns.
    T, S, TS = (1,) + (0,) * 9, (0, 1) + (0,) * 8, (1, 1) + (0,) * 8
    normal = [T, TS, TS, TS, S]
    # D8 (no stroma): fractions sum to the tumor fraction; x0=204: 0.249 >= label_threshold 0.2 -> kept,
    # x0=272: 0 < 0.2 -> dropped. Labels: tumor only.
    # Total: 7 normal ROIs x 5 + D8 4 + GI 0 = 39.
    assert sum(r.counts().values()) == 39
    boxes5 = [(x, 0, x + 272, 272) for x in (0, 68, 136, 204, 272)]
    by = r.by_source()
    for stem in stems:
        path = f"{raw_bcss.IMAGES}/{stem}.png"
        if stem == blank_roi:
            assert path in r.sources and path not in by
        elif stem == out_roi:
            assert by[path][1:] == (boxes5[:4], [T] * 4)
        else:
            assert by[path][1:] == (boxes5, normal)
    assert r.split["train"]["labels"].dtype == np.uint8
    # groups = institution (TSS): A1, A2, AR, BH, D8, EW, GI, OL (OL holds two ROIs) = 8,
    # cut 80/10/10: train [0, int(6.4)=6), valid [6, int(7.2)=7), test [7, 8) -> 6 / 1 / 1 institutions.
    # GI has no patches, so only 7 institutions are seen.
    where = check_groups(r, lambda p: p.split("/")[1].split("-")[1])
    n_by_split = {s: sum(1 for v in where.values() if v == s) for s in SPLITS}
    assert sum(n_by_split.values()) == 7
    assert n_by_split["valid"] <= 1 and n_by_split["test"] <= 1 and n_by_split["train"] in (5, 6)
    # counts follow from which institution landed where: 5 patches per ROI (D8: 4, GI: 0, OL: 2 ROIs)
    per_tss = {"A1": 5, "A2": 5, "AR": 5, "BH": 5, "D8": 4, "EW": 5, "OL": 10}
    assert r.counts() == {s: sum(n for t, n in per_tss.items() if where[t] == s) for s in SPLITS}


def test_bcss_eva_institution_split(tmp_path):
    raw = raw_bcss.make(tmp_path, grain=4)  # 9 ROIs of 32x24; 4-px noise blocks survive the 4x shrink
    r = run("bcss", raw, tmp_path, option=["split=eva"])
    # 0.25 µm/px: 32x24 -> 8x6 -> padded 272x272 (image and mask alike) -> range(0, 1, 68): 1 window per ROI.
    # Mask 8x6 (nearest samples native 4x+2): cols 0..3 tumor, 4..7 stroma, row 5 (native 22) outside, the
    # fat pixel at (0, 0). Reflect padding repeats cols with period 14 (0..7, 6..1): tumor and stroma ~50 %
    # each; fat ~1/140 < 0.05; the blood_vessel pixel (native col 20) is never sampled. -> tumor + stroma.
    check_common(r, classes=BCSS_CLASSES, multi_label=True, mpp=0.25, stride=68,
                 size_of=lambda p: (272, 272), raw=raw)  # fmt: skip
    # eva lists: A1, BH valid; EW, OL (2 ROIs) test; A2, AR, D8, GI train.
    assert r.counts() == {"train": 4, "valid": 2, "test": 3}
    for split, path, _, label, _ in r.patches():
        tss = path.split("/")[1].split("-")[1]
        assert split == ("valid" if tss in ("A1", "BH") else "test" if tss in ("EW", "OL") else "train")
        assert label == (1, 1) + (0,) * 8


# -- generic: csv ---------------------------------------------------------------------------------------------


def test_csv_official_split_column_and_blank(tmp_path):
    rows = [*raw_csv_list.ROWS, ("slides/p5/blank.png", "stroma", "test", "p5")]
    raw = raw_csv_list.make(tmp_path, rows=rows, size=(600, 1000))
    write_blank(raw / "slides/p5/blank.png", 600, 1000)
    r = run("csv", raw, tmp_path, mpp=0.5, option=["split_column=split", "group_column=patient"])
    # --mpp 0.5: 1000x600 -> 500x300, no padding; x0 = 0, 204; y0 in range(0, 29, 204) = 0 -> 2 windows.
    # split column: train a, b -> 4; valid c -> 2; test d, e -> 4 (blank -> 0). Total 10.
    classes = ("normal", "stroma", "tumor")  # distinct labels, sorted
    check_common(r, classes=classes, multi_label=False, mpp=0.5, stride=204, size_of=lambda p: (500, 300), raw=raw)
    assert r.attrs["mpp_source"] == "--mpp"
    assert r.counts() == {"train": 4, "valid": 2, "test": 4}
    by = r.by_source()
    for path, label, split, _ in raw_csv_list.ROWS:
        assert by[path] == (split, TWO_COLS, [classes.index(label)] * 2)
    assert "slides/p5/blank.png" in r.sources and "slides/p5/blank.png" not in by


def test_csv_without_split_column_groups_by_patient(tmp_path):
    raw = raw_csv_list.make(tmp_path)  # 24x24 images
    r = run("csv", raw, tmp_path, mpp=1.0, option=["group_column=patient"])
    # 1.0 µm/px: 24x24 -> padded 272x272 -> 1 window each: 5 patches.
    # Groups p1 (a, b), p2, p3, p4 = 4, cut 80/10/10: HistoKT's cut 3 / 0 / 1, the empty valid takes one
    # group from train -> 2 / 1 / 1 groups.
    check_common(r, classes=("normal", "stroma", "tumor"), multi_label=False, mpp=1.0, stride=204,
                 size_of=lambda p: (272, 272), raw=raw)  # fmt: skip
    patient = {path: pat for path, _, _, pat in raw_csv_list.ROWS}
    where = check_groups(r, patient.__getitem__)  # p1's two images share a split
    assert sorted(where.values()) == ["test", "train", "train", "valid"]
    assert sum(r.counts().values()) == 5
    assert r.count("test") == (2 if where["p1"] == "test" else 1)
    assert r.count("valid") == (2 if where["p1"] == "valid" else 1)


# -- generic: folder ------------------------------------------------------------------------------------------
# No tests/fixtures/raw_folder.py exists, so the ImageFolder tree is written here.

FOLDER_IMAGES = {  # path -> (height, width); 'pt<n>_' is the patient, found by option group
    "benign/pt1_a.png": (600, 1000),
    "benign/pt2_a.png": (300, 300),
    "benign/pt5_a.png": (300, 300),
    "tumor/pt1_b.png": (1400, 1400),
    "tumor/pt3_a.png": (600, 1000),
    "tumor/pt6_a.png": (300, 300),
}
FOLDER_BLANK = "tumor/pt4_blank.png"


def test_folder_classes_patient_regex_and_blank(tmp_path):
    raw = tmp_path / "raw"
    for k, (path, (h, w)) in enumerate(FOLDER_IMAGES.items()):
        fx_images.save(raw / path, fx_images.tissue(h, w, seed=k))
    write_blank(raw / FOLDER_BLANK, 600, 1000)
    (raw / "tumor" / "readme.txt").write_text("not an image")
    fx_images.save(raw / ".thumbs" / "x.png", fx_images.tissue(300, 300))  # hidden folder: not a class
    r = run("folder", raw, tmp_path, mpp=0.5, option=[r"group=^(pt\d+)_"])
    # --mpp 0.5: 1000x600 -> 500x300 -> TWO_COLS (2); 300x300 -> 150x150 -> padded 272x272 -> 1;
    # 1400x1400 -> 700x700 -> x0, y0 in range(0, 700-272+1, 204) = 0, 204, 408 -> 9 windows; blank -> 0.
    # Total: 2 + 1 + 1 + 9 + 2 + 1 = 16.
    size = {p: (max(272, round(w * 0.5)), max(272, round(h * 0.5))) for p, (h, w) in FOLDER_IMAGES.items()}
    size[FOLDER_BLANK] = (500, 300)
    check_common(r, classes=("benign", "tumor"), multi_label=False, mpp=0.5, stride=204,
                 size_of=size.__getitem__, raw=raw)  # fmt: skip
    assert r.attrs["mpp_source"] == "--mpp"
    assert sorted(r.sources) == sorted([*FOLDER_IMAGES, FOLDER_BLANK])  # .txt and hidden folder ignored
    assert sum(r.counts().values()) == 16
    nine = [(x, y, x + 272, y + 272) for y in (0, 204, 408) for x in (0, 204, 408)]
    want_boxes = {(600, 1000): TWO_COLS, (300, 300): ONE, (1400, 1400): nine}
    by = r.by_source()
    assert FOLDER_BLANK not in by
    for path, (_, boxes, labels) in by.items():
        assert boxes == want_boxes[FOLDER_IMAGES[path]]
        assert labels == [("benign", "tumor").index(path.split("/")[0])] * len(boxes)
    # groups pt1 (benign AND tumor), pt2, pt3, pt4 (blank), pt5, pt6 = 6, cut 80/10/10:
    # train [0, int(4.8)=4), valid [4, int(5.4)=5), test [5, 6) -> 4 / 1 / 1; pt4 is seen nowhere.
    where = check_groups(r, lambda p: re.match(r"pt\d+", Path(p).name)[0])
    assert set(where) == {"pt1", "pt2", "pt3", "pt5", "pt6"}
    seen = [sum(1 for s in where.values() if s == split) for split in SPLITS]
    assert sorted(want - got for want, got in zip((4, 1, 1), seen)) == [0, 0, 1]
    patches = {"pt1": 2 + 9, "pt2": 1, "pt3": 2, "pt5": 1, "pt6": 1}
    assert r.counts() == {s: sum(n for g, n in patches.items() if where[g] == s) for s in SPLITS}
