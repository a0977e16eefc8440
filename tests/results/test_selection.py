"""The collector's choices at unit level: the LR rule and its tie-break, the best single source, and result.json
read through its one schema (histokt.result), malformed files included."""

import json

import pytest

from histokt.result import KEYS, BestValid, CellResult, MalformedResult
from histokt.results.collect import Scores, _lr, _scores, best_single_source, choose_lr, read_result
from histokt.results.matrix import Matrix, Stat


def seeds(*valid):
    """Scores of seeds with the given validation top-1 (test top-1 set far off, so it cannot decide)."""
    return [Scores(v, 1.0 - v) for v in valid]


# ---- learning-rate selection (module docstring, "Learning-rate selection") -------------------------------


def test_highest_mean_validation_wins():
    by_lr = {1e-3: {"a": seeds(0.7), "b": seeds(0.8)}, 1e-4: {"a": seeds(0.76), "b": seeds(0.76)}}
    assert choose_lr(by_lr) == 1e-4  # 0.76 > 0.75


@pytest.mark.parametrize("order", [(1e-4, 1e-3, 5e-4), (1e-3, 5e-4, 1e-4), (5e-4, 1e-4, 1e-3)])
def test_equal_validation_means_go_to_the_smaller_lr_whatever_the_order(order):
    score = {1e-4: 0.8, 5e-4: 0.8, 1e-3: 0.8}
    by_lr = {lr: {"a": seeds(score[lr], score[lr]), "b": seeds(score[lr])} for lr in order}
    assert choose_lr(by_lr) == 1e-4
    by_lr[1e-4] = {"a": seeds(0.79), "b": seeds(0.8)}  # now 1e-4 is below the other two, which still tie
    assert choose_lr(by_lr) == 5e-4


def test_a_tie_built_from_different_seed_values_is_still_a_tie():
    # per-source means 0.75 and 0.85 in both cases (from different seeds): the smaller LR wins
    by_lr = {2e-3: {"a": seeds(0.7, 0.8), "b": seeds(0.85)}, 1e-3: {"a": seeds(0.75), "b": seeds(0.8, 0.9)}}
    assert choose_lr(by_lr) == 1e-3
    assert choose_lr(dict(reversed(list(by_lr.items())))) == 1e-3


def test_each_source_weighs_the_same_whatever_its_seed_count():
    # pooled over seeds 1e-3 would win ((3 * 0.9 + 0.5) / 4 = 0.8); per source it is (0.9 + 0.5) / 2 = 0.7 < 0.75
    by_lr = {1e-3: {"a": seeds(0.9, 0.9, 0.9), "b": seeds(0.5)}, 1e-4: {"a": seeds(0.75), "b": seeds(0.75)}}
    assert choose_lr(by_lr) == 1e-4


def test_the_test_split_never_takes_part():
    by_lr = {1e-3: {"a": [Scores(0.8, 0.1)]}, 1e-4: {"a": [Scores(0.7, 0.99)]}}
    assert choose_lr(by_lr) == 1e-3


def test_an_unknown_lr_comes_last_and_nothing_gives_none():
    assert choose_lr({None: {"a": seeds(0.8)}, 1e-3: {"a": seeds(0.8)}}) == 1e-3
    assert choose_lr({None: {"a": seeds(0.9)}, 1e-3: {"a": seeds(0.8)}}) is None  # strictly better, unknown LR
    assert choose_lr({}) is None
    assert choose_lr({1e-3: {"a": []}, 1e-4: {}}) is None
    assert choose_lr({1e-3: {"a": [], "b": seeds(0.6)}, 1e-4: {"a": seeds(0.5)}}) == 1e-3  # empty groups ignored


def test_lrs_from_plan_meta_or_config_become_floats_and_unknown_stays_none():
    assert _lr("0.001") == 0.001 and isinstance(_lr(1), float) and _lr(None) is None


@pytest.mark.parametrize(
    ("valid", "top1", "expected"),
    [
        (0.875, 0.8, Scores(0.875, 0.8)),
        (1, 0, Scores(1.0, 0.0)),
        (float("nan"), 0.8, None),
        (0.875, float("inf"), None),
        (float("-inf"), float("nan"), None),
    ],
)
def test_a_cell_scores_only_with_finite_valid_and_test_top1(valid, top1, expected):
    result = CellResult.from_json(full(valid={"top1_best": valid, "best_epoch": 2}, test={"top1": top1}))
    scores = _scores(result)
    assert scores == expected
    assert scores is None or all(type(x) is float for x in scores)


# ---- the best single source of distill.csv ---------------------------------------------------------------


def _matrix(cells, rows):
    return Matrix("random", "deep", rows, ["t"], {"t": 1e-3}, cells, {"t": Stat(3, 0.9, 0.95, 0.01)})


def test_best_single_source_is_the_highest_test_mean_off_the_diagonal():
    cells = {("a", "t"): Stat(3, 0.9, 0.80, 0.01), ("b", "t"): Stat(3, 0.5, 0.85, 0.01), ("c", "t"): None}
    assert best_single_source(_matrix(cells, ["a", "b", "c", "t"]), "t") == ("b", cells[("b", "t")])
    assert best_single_source(_matrix({("a", "t"): None}, ["a", "t"]), "t") == (None, None)
    assert best_single_source(None, "t") == (None, None)


@pytest.mark.parametrize("rows", [["a", "b", "t"], ["b", "a", "t"]])
def test_best_single_source_ties_go_to_the_first_source_of_the_plan(rows):
    same = Stat(3, 0.9, 0.80, 0.01)
    cells = {(s, "t"): same for s in reversed(rows[:2])}  # dict order opposite to the plan's
    assert best_single_source(_matrix(cells, rows), "t")[0] == rows[0]


# ---- result.json through its schema ----------------------------------------------------------------------


def full(**changes):
    doc = CellResult(
        config={"lr": 0.001, "seed": 0},
        classes=["benign", "tumor"],
        valid=BestValid(0.875, 2),
        test={"top1": 0.8, "balanced_acc": 0.75, "per_class_acc": [1.0, 0.5], "n": 10, "loss": 0.4},
        epochs=3,
        steps=15,
        world_size=2,
        seconds=12.5,
        histokt_version="0.1.0",
    ).to_json()
    doc.update(changes)
    return doc


def test_schema_round_trip_has_exactly_the_keys_of_result_json():
    doc = full()
    # the required keys, then where the cell ran (absent from files written before it was recorded)
    assert tuple(doc) == (*KEYS, "runtime", "settings", "protocol", "deviations")
    assert set(doc["valid"]) == {"top1_best", "best_epoch"}
    parsed = CellResult.from_json(json.loads(json.dumps(doc)))
    assert parsed.to_json() == doc
    assert parsed.valid == BestValid(0.875, 2) and parsed.test["per_class_acc"] == [1.0, 0.5]
    assert (parsed.epochs, parsed.steps, parsed.world_size, parsed.seconds) == (3, 15, 2, 12.5)
    assert CellResult.from_json({**doc, "added_later": 1}) == parsed  # unknown keys are ignored


@pytest.mark.parametrize(
    "doc,message",
    [
        ([1, 2], "not a JSON object but list"),
        ({k: v for k, v in full().items() if k not in ("classes", "steps")}, "no classes, steps"),
        (full(valid={"top1_best": "0.9", "best_epoch": 1}), "valid.top1_best is not a number"),
        (full(valid={"top1_best": True, "best_epoch": 1}), "valid.top1_best is not a number"),
        (full(valid={"top1_best": 0.9, "best_epoch": 1.0}), "valid.best_epoch is not an integer"),
        (full(test={"balanced_acc": 0.5}), "test.top1 is not a number"),
        (full(test=[0.5]), "test is not an object"),
        (full(classes=["a", 1]), "classes is not a list of names"),
        (full(epochs=None, seconds="1"), "epochs is not an integer; seconds is not a number"),
        (full(histokt_version=1), "histokt_version is not a string"),
        (full(config=None), "config is not an object"),
    ],
)
def test_malformed_results_say_what_is_wrong(doc, message):
    with pytest.raises(MalformedResult) as info:
        CellResult.from_json(doc)
    assert str(info.value) == message


def test_the_collector_reads_through_the_schema(tmp_path):
    path = tmp_path / "result.json"
    assert read_result(path) == (None, "missing")
    path.write_text(json.dumps(full()))
    result, problem = read_result(path)
    assert problem is None and result == CellResult.from_json(full())
    path.write_text('{"valid": {"top1_best": 0.5')
    assert read_result(path) == (None, "corrupt result.json (JSONDecodeError)")
    path.write_bytes(b'{"x": "\xc3"}')
    assert read_result(path) == (None, "corrupt result.json (UnicodeDecodeError)")
    path.write_text(json.dumps({k: v for k, v in full().items() if k != "test"}))
    assert read_result(path) == (None, "incomplete result.json (no test)")
