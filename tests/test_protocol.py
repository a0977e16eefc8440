"""histokt.protocol: what each protocol sets, and the deviations a cell and a study state."""

from histokt import protocol
from histokt.protocol import Deviation, cell_deviations, merged, store_deviations, study_deviations

PAPER_STAGE_A = {
    "mode": "scratch",
    "optimizer": "adas",
    "lr": 0.03,
    "valid_transform": "train",
    "epochs": 250,
    "batch_size": 64,
}
PAPER_STORE = {"split_rule": "patch", "card": {"card": "bach", "options": {}}}


def whats(deviations) -> list[str]:
    return [d.what for d in deviations]


def test_a_cell_run_as_the_paper_has_no_deviation():
    assert cell_deviations("bach", PAPER_STAGE_A, {"precision": "fp32"}, PAPER_STORE) == []
    transfer = {**PAPER_STAGE_A, "mode": "deep", "optimizer": "adamp", "lr": 5e-5}
    assert cell_deviations("bach", transfer, {"precision": "fp32"}, PAPER_STORE) == []


def test_each_cell_option_that_differs_is_named_with_both_values():
    config = {**PAPER_STAGE_A, "optimizer": "sgd", "valid_transform": "clean", "epochs": 2}
    got = cell_deviations("bach", config, {"precision": "bf16"}, {**PAPER_STORE, "split_rule": "grouped"})
    assert got == [
        Deviation("bach split", "grouped (whole sources per split)", "patch-level after tiling"),
        Deviation("stage A optimizer", "sgd", "adas"),
        Deviation("bach validation transform", "clean", "train"),
        Deviation("precision", "bf16", "fp32"),
        Deviation("epochs", "2", "250"),
    ]
    lr = cell_deviations("bach", {**PAPER_STAGE_A, "mode": "deep", "optimizer": "adamp", "lr": 1e-3}, {}, PAPER_STORE)
    assert lr == [Deviation("bach LR", "0.001", "5e-05 (best_lrs)")]


def test_adp_validates_clean_and_unfiltered_in_the_paper():
    adp = {"split_rule": "patch", "card": {"card": "adp", "options": {"level": "L3"}}, "filter": None}
    assert cell_deviations("adp", {**PAPER_STAGE_A, "valid_transform": "clean"}, {}, adp) == []
    assert whats(store_deviations("adp", {**adp, "filter": {"fraction": 0.05}})) == ["adp low-contrast filter"]
    assert whats(store_deviations("adp", {**adp, "card": {"card": "adp", "options": {"level": "L1"}}})) == [
        "adp option level"
    ]
    assert protocol.valid_transform("paper", "adp") == "clean" and protocol.valid_transform("paper", "os") == "train"
    assert protocol.valid_transform("histokt", "os") == "clean"


def test_the_paper_protocol_fills_card_options_the_spec_leaves_out():
    assert protocol.card_options("paper", "crc", {"per_class": 8}) == {"classes": 7, "per_class": 8, "test": "paper"}
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
