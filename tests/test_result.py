"""result.json's record (histokt.result.CellResult): the JSON it writes, and strict parsing that names each wrong
field once."""

import json

import pytest

from histokt.result import KEYS, BestValid, CellResult, MalformedResult


def _doc(**kw):
    doc = {
        "config": {"seed": 0},
        "classes": ["tumor", "stroma"],
        "valid": {"top1_best": 0.75, "best_epoch": 3},
        "test": {"top1": 0.5, "n": 8},
        "epochs": 4,
        "steps": 20,
        "world_size": 2,
        "seconds": 12.5,
        "histokt_version": "0.1.0",
    }
    return {**doc, **kw}


def test_a_result_round_trips_through_json(tmp_path):
    parsed = CellResult.from_json(_doc(newer_key="ignored"))
    assert parsed.valid == BestValid(0.75, 3)
    # a file written before the runtime was recorded reads as {} and is written back with it
    assert parsed.to_json() == {**_doc(), "runtime": {}, "settings": {}, "protocol": "", "deviations": None}
    assert sorted(parsed.to_json()) == sorted([*KEYS, "runtime", "settings", "protocol", "deviations"])
    where = {"python": "3.11.2", "torch": "2.14.1", "histokt": "0.1.0", "container": None}
    assert CellResult.from_json({**_doc(), "runtime": where}).runtime == where
    path = tmp_path / "result.json"
    path.write_text(json.dumps(parsed.to_json()))
    assert CellResult.read(path) == parsed
    assert CellResult.read(str(path)) == parsed


def test_deviations_round_trip_and_an_unreadable_record_is_none():
    recorded = [{"what": "precision", "ours": "bf16", "paper": "fp32", "fixed": ""}]
    parsed = CellResult.from_json(json.loads(json.dumps(_doc(protocol="paper", deviations=recorded))))
    assert parsed.protocol == "paper" and parsed.deviations == recorded
    assert parsed.to_json()["deviations"] == recorded
    assert CellResult.from_json(_doc(deviations=[{"what": "x"}])).deviations is None  # not a record: none


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"config": []}, "config is not an object"),
        ({"classes": ["a", 1]}, "classes is not a list of names"),
        ({"classes": "ab"}, "classes is not a list of names"),
        ({"valid": [0.5, 1]}, "valid is not an object"),  # its fields are not reported again
        ({"valid": {"top1_best": "0.5", "best_epoch": 1}}, "valid.top1_best is not a number"),
        ({"valid": {"top1_best": True, "best_epoch": 1}}, "valid.top1_best is not a number"),
        ({"valid": {"top1_best": 0.5, "best_epoch": 1.0}}, "valid.best_epoch is not an integer"),
        ({"test": None}, "test is not an object"),
        ({"test": {"top1": None}}, "test.top1 is not a number"),
        ({"epochs": 4.0}, "epochs is not an integer"),
        ({"steps": "20"}, "steps is not an integer"),
        ({"steps": True}, "steps is not an integer"),
        ({"world_size": 2.0}, "world_size is not an integer"),
        ({"seconds": "12"}, "seconds is not a number"),
        ({"histokt_version": 1}, "histokt_version is not a string"),
        ({"steps": 1.5, "world_size": None}, "steps is not an integer; world_size is not an integer"),
    ],
)
def test_each_wrong_field_is_named_once(edit, message):
    with pytest.raises(MalformedResult) as err:
        CellResult.from_json(_doc(**edit))
    assert str(err.value) == message


def test_integers_are_numbers_and_missing_keys_are_listed():
    assert CellResult.from_json(_doc(seconds=12, valid={"top1_best": 1, "best_epoch": 0})).seconds == 12
    doc = _doc()
    del doc["steps"], doc["config"]
    with pytest.raises(MalformedResult) as err:
        CellResult.from_json(doc)
    assert str(err.value) == "no config, steps"
    with pytest.raises(MalformedResult) as err:
        CellResult.from_json([doc])
    assert str(err.value) == "not a JSON object but list"
