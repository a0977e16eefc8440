"""The run-directory contract (histokt.train.rundir): config.json written once and a different config refused,
result.json written and read back, the training state of a done cell dropped."""

import json
from pathlib import Path

import pytest

from histokt.errors import UserError
from histokt.result import BestValid, CellResult
from histokt.train import rundir
from histokt.train.config import TrainConfig


def _cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(store=Path("store.zarr"), dataset="toy", out=out, **kw)


def _result(**kw) -> CellResult:
    fields = {
        "config": {"seed": 0, "store": "store.zarr"},
        "classes": ["tumor", "stroma"],
        "valid": BestValid(0.75, 3),
        "test": {"top1": 0.5, "n": 8},
        "epochs": 4,
        "steps": 20,
        "world_size": 2,
        "seconds": 12.5,
        "histokt_version": "0.1.0",
    }
    return CellResult(**{**fields, **kw})


def test_prepare_run_dir_creates_missing_parent_folders(tmp_path):
    out = tmp_path / "sweep" / "cell-3" / "run"
    assert rundir.prepare_run_dir(_cfg(out)) == out
    assert sorted(p.name for p in out.iterdir()) == [rundir.CONFIG]  # the write probe is gone
    assert json.loads((out / rundir.CONFIG).read_text())["out"] == str(out)


def test_an_unwritable_out_is_a_user_error_that_says_so(tmp_path):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "run"
    with pytest.raises(UserError) as err:
        rundir.prepare_run_dir(_cfg(out))
    assert str(err.value) == f"--out {out}: cannot write there (Not a directory); choose a writable folder"


@pytest.mark.parametrize("edit", ["extra", "missing"])
def test_a_key_only_one_config_has_is_a_difference(tmp_path, edit):
    out = tmp_path / "run"
    rundir.prepare_run_dir(_cfg(out))
    old = json.loads((out / rundir.CONFIG).read_text())
    if edit == "extra":
        old["label_smoothing"] = 0.1  # written by a histokt that knew a knob this one does not
        shown = "label_smoothing: 0.1 -> None"
    else:
        del old["gamma"]  # written before the knob existed
        shown = "gamma: None -> 0.5"
    (out / rundir.CONFIG).write_text(json.dumps(old))
    with pytest.raises(UserError, match=rf"another config \({shown}\); use a new --out$"):
        rundir.prepare_run_dir(_cfg(out))


def test_a_config_written_before_the_protocol_existed_resumes_as_the_histokt_protocol(tmp_path):
    out = tmp_path / "run"
    rundir.prepare_run_dir(_cfg(out, valid_transform="clean"))
    old = json.loads((out / rundir.CONFIG).read_text())
    del old["protocol"], old["valid_transform"]  # what they meant by their absence: histokt, clean
    (out / rundir.CONFIG).write_text(json.dumps(old))
    rundir.prepare_run_dir(_cfg(out, valid_transform="clean"))
    with pytest.raises(UserError, match=r"protocol: 'histokt' -> 'paper'"):
        rundir.prepare_run_dir(_cfg(out, valid_transform="clean", protocol="paper"))


def test_a_config_differing_in_many_keys_shows_the_first_four_sorted(tmp_path):
    out = tmp_path / "run"
    rundir.prepare_run_dir(_cfg(out))
    with pytest.raises(UserError) as err:
        rundir.prepare_run_dir(_cfg(out, seed=1, epochs=3, arch="resnet50", batch_size=8, lr=0.1))
    assert str(err.value) == (
        f"{out}: holds a run with another config (arch: 'resnet18' -> 'resnet50', batch_size: 64 -> 8, "
        "epochs: 250 -> 3, lr: None -> 0.1); use a new --out"
    )


def test_write_result_then_read_result_round_trips(tmp_path):
    done = _result()
    rundir.write_result(tmp_path, done)
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.RESULT]
    assert rundir.read_result(tmp_path) == done
    on_disk = json.loads((tmp_path / rundir.RESULT).read_text())
    assert on_disk["valid"] == {"top1_best": 0.75, "best_epoch": 3} and on_disk["world_size"] == 2


def test_drop_training_state_when_previous_or_last_is_already_gone(tmp_path):
    (tmp_path / rundir.FINAL).write_bytes(b"x")
    (tmp_path / rundir.LAST).write_bytes(b"x")  # a cell that never rotated: no previous.pt
    rundir.drop_training_state(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.FINAL]
    rundir.drop_training_state(tmp_path)  # a second run of a done cell: nothing left to drop
    assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.FINAL]
