"""Paper-parity options of the ingest: each reproduces one HistoKT quirk (method.md §7) where histokt's default
is the leakage-safe or cleaner choice, and each is recorded in the dataset's attrs.

- ``--split-rule patch``: the kept patches shuffled and cut by the card's HistoKT ratios (quirk 1, 4);
- crc ``test=paper``: per class k / k/8 / k/8 tiles of the 100K (2000 / 250 / 250; quirks 5, 6);
- ``--no-filter``: the low-contrast filter skipped (HistoKT never reprocessed ADP);
- bcss ``mask_resize=bilinear``: the mask codes interpolated and truncated, as HistoKT's image rescale did.
"""

import os
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from argparse_dataclass import ArgumentParser

from histokt.cli import main
from histokt.errors import UserError
from histokt.ingest.cards import get_card
from histokt.ingest.cards.bcss import BCSS
from histokt.ingest.splits import cut_points
from histokt.ingest.standardize import StandardizeConfig, make_worklist, standardize
from histokt.ingest.tiling import FilterParams, rescale, rescale_codes
from tests.fixtures import (
    raw_adp,
    raw_ajlymph,
    raw_bach,
    raw_bcss,
    raw_crc,
    raw_glas,
    raw_mhist,
    raw_osteosarcoma,
    raw_pcam,
)
from tests.fixtures.images import blank, save, tissue
from tests.ingest.test_standardize_cards import Result

# The fixtures are partial downloads on purpose; the cards record (and warn about) the short counts.
pytestmark = pytest.mark.filterwarnings("ignore:.*a complete download has:UserWarning")

SPLITS = ("train", "valid", "test")
CUT = {"train": 0.8, "valid": 0.1, "test": 0.1}
WHOLE = {s: {s: 1.0} for s in SPLITS}
CRC7 = ("ADI", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    """fsync only buys crash durability (tested in test_standardize.py)."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def run(dataset: str, raw: Path, store: Path, **kw) -> Result:
    summary = standardize(StandardizeConfig(dataset=dataset, raw=raw, store=store, progress=False, **kw))
    assert summary.status == "written"
    return Result(store, dataset)


def split_of_patch(r: Result) -> dict:
    """(source path, box) -> split, for every stored patch."""
    return {(path, box): split for split, path, box, _, _ in r.patches()}


# -- 1. the patch rule: HistoKT's ratios per card, windows of one image over several splits, seeded ------------


@pytest.mark.parametrize(
    "dataset, make, options, plan",
    [
        # BACH: the overriding call of HistoKT's script, 40/10/50 (method.md §7 quirk 4)
        ("bach", lambda t: raw_bach.make(t, per_class=1), [], {"all": {"train": 0.4, "valid": 0.1, "test": 0.5}}),
        ("os", lambda t: raw_osteosarcoma.make(t), [], {"all": CUT}),
        ("ajlymph", lambda t: raw_ajlymph.make(t, per_class=1), [], {"all": CUT}),
        ("bcss", lambda t: raw_bcss.make(t), [], {"all": CUT}),
        # GlaS: HistoKT's CSV rows 0-59 (testA) -> valid, 60-79 (testB) -> test, the rest (train) -> train
        (
            "glas",
            lambda t: raw_glas.make(t),
            [],
            {"train": {"train": 1.0}, "testA": {"valid": 1.0}, "testB": WHOLE["test"]},
        ),
        ("mhist", lambda t: raw_mhist.make(t), [], {"train": {"train": 0.8, "valid": 0.2}, "test": WHOLE["test"]}),
        ("pcam", lambda t: raw_pcam.make(t), [], WHOLE),
        ("adp", lambda t: raw_adp.make(t), [], WHOLE),
        ("crc", lambda t: raw_crc.make(t, per_class=3, test_per_class=0), ["test=paper", "per_class=1"], WHOLE),
    ],
)
def test_every_card_cuts_by_histokts_ratios(tmp_path, dataset, make, options, plan):
    # the split plan is the same under both rules; the patch rule applies it to patches instead of groups
    raw = make(tmp_path)
    _, worklist = make_worklist(
        StandardizeConfig(dataset=dataset, raw=raw, store=tmp_path / "s.zarr", split_rule="patch", option=options)
    )
    assert worklist.settings["split_plan"] == plan
    assert worklist.settings["split_rule"] == "patch"


def test_patch_rule_spreads_the_windows_of_one_tile_over_the_splits(tmp_path):
    raw = raw_osteosarcoma.make(tmp_path, size=500)  # 1 µm/px: 500x500 -> 4 windows per tile
    r = run("os", raw, tmp_path / "a.zarr", split_rule="patch", split_seed=3)
    # 10 tiles x 4 windows = 40 patches, cut 80/10/10 as HistoKT: [0, 32) [32, 36) [36, 40)
    assert r.counts() == {"train": 32, "valid": 4, "test": 4}
    assert r.attrs["split_rule"] == "patch" and r.attrs["split_seed"] == 3
    assert r.attrs["split_plan"] == {"all": CUT}
    where = split_of_patch(r)
    splits_per_tile = {}
    for (path, _box), split in where.items():
        splits_per_tile.setdefault(path, set()).add(split)
    assert len(splits_per_tile) == 10
    # deliberately leaky: the windows of one tile land in several splits
    assert any(len(v) > 1 for v in splits_per_tile.values())
    # the same seed: the same split of every patch; another seed: another split
    assert split_of_patch(run("os", raw, tmp_path / "b.zarr", split_rule="patch", split_seed=3)) == where
    assert split_of_patch(run("os", raw, tmp_path / "c.zarr", split_rule="patch", split_seed=4)) != where


def test_patch_rule_cuts_bach_patches_40_10_50(tmp_path):
    raw = raw_bach.make(tmp_path, per_class=1, size=(1200, 1700))
    # 0.42 µm/px: 1700x1200 -> 714x504 -> 3 x 2 = 6 windows; 4 photos -> 24 patches; cut 40/10/50 of 24:
    # train [0, int(9.6) = 9), valid [9, int(12.0) = 12), test [12, 24). (Grouped: 4 photos -> 1 / 1 / 2.)
    r = run("bach", raw, tmp_path / "s.zarr", split_rule="patch")
    assert r.counts() == {"train": 9, "valid": 3, "test": 12}
    assert [end - start for _, start, end in cut_points(24, r.attrs["split_plan"]["all"])] == [9, 3, 12]
    assert any(len({s for (p, _), s in split_of_patch(r).items() if p == path}) > 1 for path in r.sources)


# -- 2. CRC test=paper: per class k train, k/8 valid, k/8 test from the 100K -------------------------------------


def test_crc_paper_cuts_exact_counts_per_class_in_seed_42_order(tmp_path):
    raw = raw_crc.make(tmp_path, per_class=12, test_per_class=0)  # no 7K: test=paper does not need it
    card = get_card("crc", {"test": "paper", "per_class": 8})
    found = card.index(raw)
    # per class 8 + 2 x round(8 / 8) = 10 of the 12 tiles: 8 train, 1 valid, 1 test
    assert found.split_plan == WHOLE
    assert found.expected_counts == {"train": 56, "valid": 7, "test": 7}
    everything = sorted(s.path for s in get_card("crc", {"test": "holdout"}).index(raw).sources)
    random.Random(42).shuffle(everything)
    for label, cls in enumerate(CRC7):
        order = [p for p in everything if p.split("/")[1] == cls]
        mine = {s.path: s.partition for s in found.sources if s.label == label}
        assert mine == {**dict.fromkeys(order[:8], "train"), order[8]: "valid", order[9]: "test"}


@pytest.mark.parametrize("split_rule", ["grouped", "patch"])
def test_crc_paper_store_has_exact_counts_per_class_and_split(tmp_path, split_rule):
    raw = raw_crc.make(tmp_path, per_class=11)
    r = run("crc", raw, tmp_path / "s.zarr", split_rule=split_rule, option=["test=paper", "per_class=8"])
    per = {s: [0] * 7 for s in SPLITS}
    for split, path, _, label, _ in r.patches():
        assert path.startswith("NCT-CRC-HE-100K-NONORM/")  # the 7K is never used
        per[split][label] += 1
    assert per == {"train": [8] * 7, "valid": [1] * 7, "test": [1] * 7}
    assert r.attrs["card"]["options"]["test"] == "paper" and r.attrs["card"]["options"]["per_class"] == 8
    assert r.attrs["split_plan"] == WHOLE


def test_crc_paper_at_histokts_size_is_2000_250_250():
    card = get_card("crc", {"test": "paper", "per_class": 2000})
    assert card.holdout_per_class() == 250
    assert card._expected() == {"train": 14000, "valid": 1750, "test": 1750}


def test_crc_paper_needs_enough_tiles(tmp_path):
    raw = raw_crc.make(tmp_path, per_class=9, test_per_class=0)
    with pytest.raises(UserError, match=r"per_class=8 with test=paper needs 8 \+ 2 x 1 = 10 per class.*only 9"):
        get_card("crc", {"test": "paper", "per_class": 8}).index(raw)


# -- 3. --no-filter --------------------------------------------------------------------------------------------


def test_no_filter_keeps_a_blank_patch_and_is_recorded(tmp_path):
    raw = tmp_path / "raw"
    save(raw / "a" / "tissue.png", tissue(300, 300, seed=1))
    save(raw / "a" / "glass.png", blank(300, 300))
    kw = {"dataset": "folder", "raw": raw, "mpp": 1.0, "split_rule": "patch", "progress": False}
    on = StandardizeConfig(store=tmp_path / "on.zarr", **kw)
    off = StandardizeConfig(store=tmp_path / "off.zarr", filter=False, **kw)
    standardize(on)
    standardize(off)
    a, b = Result(on.store, "folder"), Result(off.store, "folder")
    # 300x300 at 1 µm/px: one window each; the blank one is dropped by the filter, kept without it
    assert {p for _, p, _, _, _ in a.patches()} == {"a/tissue.png"}
    assert {p for _, p, _, _, _ in b.patches()} == {"a/tissue.png", "a/glass.png"}
    assert a.attrs["filter"] == asdict(FilterParams()) and b.attrs["filter"] is None
    assert a.attrs["fingerprint"] != b.attrs["fingerprint"]
    # the default leaves the recorded settings as they were before the option existed
    assert make_worklist(on)[1].settings["filter"] == {
        "fraction": 0.05,
        "lower_percentile": 5.0,
        "upper_percentile": 99.0,
    }


def test_no_filter_on_the_command_line():
    parser = ArgumentParser(StandardizeConfig)
    base = ["--dataset", "adp", "--raw", "r", "--store", "s"]
    assert parser.parse_args(base).filter is True
    assert parser.parse_args([*base, "--no-filter"]).filter is False


# -- 4. BCSS mask_resize=bilinear --------------------------------------------------------------------------------


def test_rescale_codes_interpolates_and_truncates():
    # 15 native columns of tumor (1), 17 of fat (9), shrunk 4x: Pillow's area-aware bilinear (triangle of
    # half-width 4 native px) gives output column 3 a fat weight (0.625 + 0.375 + 0.125) / 4 = 0.28125 ->
    # 1 + 8 * 0.28125 = 3.25 -> 3; column 4 a tumor weight 0.125 / 4 -> 9 - 0.25 = 8.75 -> 8 (truncated)
    codes = np.zeros((24, 32), np.uint8)
    codes[:, :15], codes[:, 15:] = 1, 9
    assert rescale_codes(codes, 0.25).tolist() == [[1, 1, 1, 3, 8, 9, 9, 9]] * 6
    assert rescale(codes, 0.25, labels=True).tolist() == [[1, 1, 1, 1, 9, 9, 9, 9]] * 6  # nearest: 4x + 2
    # a region of one code keeps it (no float noise truncated to the code below), at any scale
    for code in range(22):
        flat = np.full((37, 53), code, np.uint8)
        assert (rescale_codes(flat, 0.25) == code).all() and (rescale_codes(flat, 2.5) == code).all()
    assert rescale_codes(codes, 1.0).tolist() == codes.tolist()


def boundary_mask():
    """Tumor (code 1) in native columns 0..14, fat (code 9) in 15..31: the ROI of test_rescale_codes."""
    mask = np.zeros((raw_bcss.HEIGHT, raw_bcss.WIDTH), np.uint8)
    mask[:, :15], mask[:, 15:] = 1, 9
    return mask


def test_bcss_bilinear_mask_labels_differ_from_nearest(tmp_path):
    stem = raw_bcss.STEMS[0]
    raw = raw_bcss.make(tmp_path, stems=(stem,), grain=4)
    save(raw / raw_bcss.MASKS / f"{stem}.png", boundary_mask())
    near = run("bcss", raw, tmp_path / "n.zarr")
    bil = run("bcss", raw, tmp_path / "b.zarr", option=["mask_resize=bilinear"])
    # 32x24 -> 8x6 (codes by column: nearest 1 1 1 1 9 9 9 9; bilinear 1 1 1 3 8 9 9 9), reflect-padded to
    # 272 (columns with period 14: 0..7, 6..1): columns 3 and 4 are 2/14 of the patch each, above presence
    # 0.05. Codes 3 and 8 are lymphocytic_infiltrate (class 2) and metaplasia_NOS (class 6).
    tumor_fat = (1, 0, 0, 0, 0, 0, 0, 1, 0, 0)
    assert [lab for _, _, _, lab, _ in near.patches()] == [tumor_fat]
    assert [lab for _, _, _, lab, _ in bil.patches()] == [(1, 0, 1, 0, 0, 0, 1, 1, 0, 0)]
    assert near.attrs["card"]["options"]["mask_resize"] == "nearest"
    assert bil.attrs["card"]["options"]["mask_resize"] == "bilinear"
    assert near.attrs["fingerprint"] != bil.attrs["fingerprint"]


def test_bcss_bilinear_maps_codes_after_interpolating(tmp_path):
    # outside_roi (0) | stroma (2): bilinear creates code 1 at the boundary, which counts as tumor;
    # a code created between two others that is not in the code table (7, "exclude" removed) counts as none
    stem = raw_bcss.STEMS[0]
    raw = raw_bcss.make(tmp_path, stems=(stem,))
    raw_bcss.write_codes(raw, [(label, code) for label, code in raw_bcss.CODES if code != 7])
    mask = np.zeros((raw_bcss.HEIGHT, raw_bcss.WIDTH), np.uint8)
    mask[:, 15:] = 2
    mask[:8, :] = np.where(mask[:8, :] == 2, 6, 8)  # blood (6) | metaplasia_NOS (8): 7 between
    save(raw / raw_bcss.MASKS / f"{stem}.png", mask)
    card = BCSS(mask_resize="bilinear")
    source = card.index(raw).sources[0]
    codes = rescale_codes(mask, 0.25)
    # row 0: 8 - 2 x 0.28125 = 7.44 -> 7, 6 + 2 x 0.03125 -> 6; last row: 0.56 -> 0, 2 - 0.0625 = 1.94 -> 1
    assert codes[0].tolist() == [8, 8, 8, 7, 6, 6, 6, 6] and codes[-1].tolist() == [0, 0, 0, 0, 1, 2, 2, 2]
    classes = card.rescaled_mask(raw, source, 0.25)
    # class numbers (c + 1): blood 6, metaplasia_NOS 7, tumor 1, stroma 2; code 7 (not in the table) -> 0
    assert classes[0].tolist() == [7, 7, 7, 0, 6, 6, 6, 6] and classes[-1].tolist() == [0, 0, 0, 0, 1, 2, 2, 2]
    nearest = BCSS().rescaled_mask(raw, source, 0.25)
    assert nearest[-1].tolist() == [0, 0, 0, 0, 2, 2, 2, 2]
    assert np.array_equal(nearest, rescale(BCSS().read_mask(raw, source), 0.25, labels=True))


# -- bad values: one line, exit code 2, naming the option and the choices ---------------------------------------


@pytest.mark.parametrize(
    "dataset, option, message",
    [
        ("crc", "test=paperish", "option test='paperish', expected one of 7k, holdout, paper"),
        ("crc", "test=paper", "option test=paper needs per_class=k"),
        ("bcss", "mask_resize=cubic", "option mask_resize='cubic', expected one of nearest, bilinear"),
    ],
)
def test_bad_parity_option_is_one_line_exit_2(tmp_path, capsys, dataset, option, message):
    args = ["standardize", "--dataset", dataset, "--raw", str(tmp_path), "--store", str(tmp_path / "s.zarr")]
    assert main([*args, "--option", option]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "s.zarr").exists()
