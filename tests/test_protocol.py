"""histokt.protocol: what each protocol sets, and the deviations a cell and a study state."""

import pytest

from histokt import protocol
from histokt.protocol import Deviation, cell_deviations, merged, store_deviations, study_deviations

PAPER_STAGE_A = {
    "mode": "scratch",
    "arch": "resnet18",
    "optimizer": "adas",
    "lr": 0.03,
    "momentum": 0.9,
    "step_size": 25,
    "gamma": 0.5,
    "weight_decay": 5e-4,
    "augment": True,
    "crop": 0,
    "valid_transform": "train",
    "epochs": 250,
    "batch_size": 64,
}
PAPER_STAGE_B = {**PAPER_STAGE_A, "mode": "deep", "optimizer": "adamp", "scheduler": "step", "step_size": 20}
PAPER_STORE = {
    "split_rule": "patch",
    "card": {"card": "bach", "options": {}},
    "filter": {"fraction": 0.05},
    "patch_size": 272,
    "mpp_target": 1.0,
    "stride": 204,
    "mpp_native": 0.42,
}


def whats(deviations) -> list[str]:
    return [d.what for d in deviations]


def test_a_cell_run_as_the_paper_has_no_deviation():
    assert cell_deviations("bach", PAPER_STAGE_A, {"precision": "fp32"}, PAPER_STORE) == []
    assert cell_deviations("bach", {**PAPER_STAGE_B, "lr": 5e-5}, {"precision": "fp32"}, PAPER_STORE) == []


def test_each_cell_option_that_differs_is_named_with_both_values():
    config = {**PAPER_STAGE_A, "optimizer": "sgd", "valid_transform": "clean", "epochs": 2, "arch": "resnet50"}
    got = cell_deviations("bach", config, {"precision": "bf16"}, {**PAPER_STORE, "split_rule": "grouped"})
    assert got == [
        Deviation("bach split", "grouped (whole sources per split)", "patch-level after tiling"),
        Deviation("arch", "resnet50", "resnet18"),
        Deviation("epochs", "2", "250"),
        Deviation("stage A optimizer", "sgd", "adas"),
        Deviation("bach validation transform", "clean", "train"),
        Deviation("precision", "bf16", "fp32"),
    ]
    lr = cell_deviations("bach", {**PAPER_STAGE_B, "lr": 1e-3, "step_size": 25}, {}, PAPER_STORE)
    assert lr == [Deviation("stage B step_size", "25", "20"), Deviation("stage B lr", "0.001", "5e-05 (best_lrs)")]
    assert whats(cell_deviations("bach", {**PAPER_STAGE_A, "lr": 0.1, "augment": False}, {}, PAPER_STORE)) == [
        "augment",
        "stage A lr",
    ]


def test_adp_validates_clean_and_unfiltered_in_the_paper():
    adp = {**PAPER_STORE, "card": {"card": "adp", "options": {"level": "L3"}}, "filter": None, "mpp_native": 1.0}
    fixed = [protocol.UNKNOWN["adp"]]  # what the paper leaves open about ADP is stated, as fixed
    assert cell_deviations("adp", {**PAPER_STAGE_A, "valid_transform": "clean"}, {}, adp) == fixed
    assert whats(store_deviations("adp", {**adp, "filter": {"fraction": 0.05}})) == [
        "adp low-contrast filter",
        "adp level",
    ]
    assert whats(store_deviations("adp", {**adp, "card": {"card": "adp", "options": {"level": "L1"}}}))[0] == (
        "adp option level"
    )
    assert whats(store_deviations("bach", {**PAPER_STORE, "filter": None})) == ["bach low-contrast filter"]
    assert protocol.valid_transform("paper", "adp") == "clean" and protocol.valid_transform("paper", "os") == "train"
    assert protocol.valid_transform("histokt", "os") == "clean"


def test_an_option_the_attrs_do_not_record_is_the_cards_default():
    """A CRC store made before test=paper existed ran the 7K test: that is a deviation, not a match."""
    crc = {**PAPER_STORE, "card": {"card": "crc", "options": {"classes": 7, "per_class": 2000}}, "mpp_native": 0.5}
    assert store_deviations("crc", crc) == [Deviation("crc option test", "7k", "paper")]
    bcss = {**PAPER_STORE, "card": {"card": "bcss", "options": {}}, "stride": 68, "mpp_native": 0.25}
    assert whats(store_deviations("bcss", bcss)) == ["bcss option mask_resize", "bcss patch labels"]
    assert whats(
        store_deviations("pcam", {**PAPER_STORE, "card": {"card": "pcam", "options": {}}, "mpp_native": 0.972})
    ) == [
        "pcam option per_class",
        "pcam test split",
    ]


@pytest.mark.parametrize(
    "change, what",
    [
        ({"patch_size": 224, "stride": 168}, "patches"),  # the same 25 % overlap at 224 px
        ({"mpp_target": 0.5}, "patches"),
        ({"stride": 136}, "bach stride"),
        ({"mpp_native": 0.5}, "bach native µm/px"),
        ({"max_per_class": 8}, "bach subset"),
    ],
)
def test_store_geometry_and_subsets_that_differ(change, what):
    assert whats(store_deviations("bach", {**PAPER_STORE, **change})) == [what]


def test_an_official_split_kept_whole_is_the_same_under_either_rule():
    whole = {"train": {"train": 1.0}, "test": {"test": 1.0}}
    assert store_deviations("bach", {**PAPER_STORE, "split_rule": "grouped", "split_plan": whole}) == []
    cut = {"all": {"train": 0.4, "valid": 0.1, "test": 0.5}}
    assert whats(store_deviations("bach", {**PAPER_STORE, "split_rule": "grouped", "split_plan": cut})) == [
        "bach split"
    ]


def test_the_paper_protocol_fills_card_options_the_spec_leaves_out():
    assert protocol.card_options("paper", "crc", {"per_class": 8}) == {
        "variant": "NONORM",
        "classes": 7,
        "per_class": 8,
        "test": "paper",
    }
    assert protocol.card_options("histokt", "crc", {"per_class": 8}) == {"per_class": 8}


def test_study_deviations_and_what_no_protocol_removes():
    parity = study_deviations(lrs_fixed=True, trial_sources="first", merges=False)
    assert parity == list(protocol.FIXED) and all(d.fixed for d in parity)
    ours = study_deviations(lrs_fixed=False, trial_sources="matched", merges=True)
    assert whats(ours) == ["transfer LR", "trials", "split shuffles", "merge rule"]
    assert [bool(d.fixed) for d in ours] == [False, False, True, True]


def test_merged_counts_each_deviation_once_per_cell():
    a, b = Deviation("a", "1", "2"), Deviation("b", "1", "2")
    assert merged([[a, b], [a, a], []]) == [(a, 2), (b, 1)]
    assert Deviation.from_json(a.to_json()) == a


def test_fewer_trials_than_the_papers_three_is_a_study_deviation():
    fewer = study_deviations(lrs_fixed=True, trial_sources="first", merges=False, trials=1)
    assert fewer[0] == Deviation("trials per result", "1", "3")
