"""The checkpoint and disk policy of a training cell (issue 12, item 6), on real in-process runs of the toy store.

- The training state (last.pt) is written by wall time (--ckpt-every-min), by --ckpt-every-steps where set, and
  on a stop signal; never at an epoch's end. A resume still ends bit for bit as an uninterrupted run, also
  when best.pt and metrics.jsonl were written after the checkpoint it resumes from.
- --keep: what a done cell keeps of best.pt and final.pt; the training state is always dropped.
- A checkpoint that cannot be written (a real full tmpfs) ends the cell with one line naming it, exit 2; the
  previous checkpoint stays, and the same command resumes once space is freed, to the same weights.
"""

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from histokt.errors import UserError
from histokt.train import checkpoint, loop
from histokt.train.config import OPERATIONAL, TrainConfig, kept_weights
from histokt.train.launch import train
from histokt.train.loop import Trainer
from tests.conftest import histokt_cmd
from tests.fixtures.trainstore import make_store

# 38 train patches / batch 8: 5 steps an epoch, so the epochs end at steps 5, 10 and 15
FAST = dict(epochs=3, batch_size=8, workers=0, device="cpu", progress=False, eval_batch_size=16)
DONE = ["best.pt", "config.json", "final.pt", "metrics.jsonl", "result.json"]


class Killed(BaseException):
    """Stands in for SIGKILL inside the test process: nothing of the loop runs after it."""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("policy"))


def cfg(store, out, **kw):
    return TrainConfig(store=store, dataset="toy", out=out, **{**FAST, **kw})


def record_writes(mp: pytest.MonkeyPatch) -> list:
    """Every checkpoint write from now on: ("last", step, epoch, batch) or (file name, epoch)."""
    writes: list = []
    save, save_weights = checkpoint.save, checkpoint.save_weights

    def counted_save(run_dir, state):
        save(run_dir, state)
        writes.append(("last", state["step"], state["epoch"], state["batch"]))

    def counted_weights(path, state):
        save_weights(path, state)
        writes.append((Path(path).name, state["epoch"]))

    mp.setattr(checkpoint, "save", counted_save)
    mp.setattr(checkpoint, "save_weights", counted_weights)
    return writes


def full_saves(writes):
    return [w[1:] for w in writes if w[0] == "last"]


def wrap_step(mp: pytest.MonkeyPatch, before=None, after=None) -> None:
    """Run ``before(trainer)`` and ``after(trainer)`` around every training step (the loop counts it after)."""
    step = Trainer.step

    def wrapped(self, *batch):
        if before:
            before(self)
        loss = step(self, *batch)
        if after:
            after(self)
        return loss

    mp.setattr(Trainer, "step", wrapped)


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory):
    """An uninterrupted run with the default policy (--ckpt-every-min 10, no --ckpt-every-steps), and its writes."""
    out = tmp_path_factory.mktemp("ref") / "run"
    with pytest.MonkeyPatch.context() as mp:
        writes = record_writes(mp)
        result = train(cfg(store, out)).result
    assert result is not None and result.steps == 15
    return out, writes


def weights(path):
    return checkpoint.load(path)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_run(out: Path, ref: Path) -> None:
    """Bitwise the same weights, the same metrics.jsonl and the same result, but for wall time and how it ran."""
    assert_same_weights(weights(out / "final.pt"), weights(ref / "final.pt"))
    assert_same_weights(weights(out / "best.pt"), weights(ref / "best.pt"))
    assert checkpoint.load(out / "best.pt")["epoch"] == checkpoint.load(ref / "best.pt")["epoch"]
    assert (out / "metrics.jsonl").read_text() == (ref / "metrics.jsonl").read_text()
    a, b = (json.loads((d / "result.json").read_text()) for d in (out, ref))
    for r in (a, b):
        r.pop("seconds")
        for key in ("out",) + OPERATIONAL:
            r["config"].pop(key)
    assert a == b


def test_the_default_policy_writes_no_training_state_at_an_epoch_end(reference):
    out, writes = reference
    assert full_saves(writes) == []  # 3 epochs in well under 10 minutes: no last.pt at all
    best_epochs = [w[1] for w in writes if w[0] == "best.pt"]
    assert best_epochs and best_epochs[0] == 0 and best_epochs == sorted(best_epochs)
    assert writes[-1] == ("final.pt", 2)  # the end: final weights (and best.pt on improvement), weights only
    assert sorted(p.name for p in out.iterdir()) == DONE


def test_the_timer_checkpoints_by_wall_time_and_a_kill_after_an_epoch_end_resumes_exactly(
    store, reference, tmp_path, monkeypatch
):
    """A clock that moves 4 minutes a step: the 10-minute timer saves at steps 3, 6, 9, 12 and 15, not at the
    epoch ends (5, 10). Killed at step 11, after epoch 1's end wrote best.pt and metrics.jsonl past the step-9
    checkpoint, the rerun replays that epoch end and ends as the uninterrupted run."""
    clock = [1e9]
    monkeypatch.setattr(loop, "time", SimpleNamespace(time=lambda: clock[0]))
    writes = record_writes(monkeypatch)

    def tick(trainer):
        clock[0] += 240.0

    armed = [True]

    def kill_at_step_11(trainer):
        if armed[0] and trainer.state["step"] == 10:
            raise Killed

    out = tmp_path / "run"
    wrap_step(monkeypatch, before=kill_at_step_11, after=tick)
    with pytest.raises(Killed):
        train(cfg(store, out))
    assert full_saves(writes) == [(3, 0, 3), (6, 1, 1), (9, 1, 4)]
    assert [json.loads(x)["epoch"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert checkpoint.load(out / "last.pt")["step"] == 9 and not (out / "result.json").exists()

    writes.clear()
    armed[0] = False
    train(cfg(store, out))
    assert full_saves(writes) == [(12, 2, 2), (15, 2, 5)]  # 3 steps of the resumed run each: 12 min > 10
    assert_same_run(out, reference[0])
    assert sorted(p.name for p in out.iterdir()) == DONE


def test_a_stop_signal_checkpoints_once_and_the_rerun_ends_as_an_uninterrupted_run(
    store, reference, tmp_path, monkeypatch
):
    writes = record_writes(monkeypatch)

    def usr2_during_step_7(trainer):
        if trainer.state["step"] == 6:
            os.kill(os.getpid(), signal.SIGUSR2)

    wrap_step(monkeypatch, after=usr2_during_step_7)
    out = tmp_path / "run"
    stopped = train(cfg(store, out))
    assert stopped.interrupted and stopped.step == 7
    assert full_saves(writes) == [(7, 1, 2)]  # the signal's checkpoint, and none at epoch 0's end
    assert checkpoint.load(out / "last.pt")["step"] == 7

    monkeypatch.undo()  # the plain step again, and a new count
    writes = record_writes(monkeypatch)
    assert not train(cfg(store, out)).interrupted
    assert full_saves(writes) == []
    assert_same_run(out, reference[0])
    assert sorted(p.name for p in out.iterdir()) == DONE


def test_checked_every_few_steps_a_stop_waits_for_the_next_check_and_the_cell_ends_the_same(
    store, reference, tmp_path, monkeypatch
):
    """As on a GPU (every 16 steps there): the stop flag, the loss check and the timer are read together at
    steps 4, 8, ... and at each epoch's last step (5, 10, 15); a signal during step 7 stops at step 8."""
    monkeypatch.setattr(loop, "host_sync_every", lambda device: 4)
    writes = record_writes(monkeypatch)

    def usr2_during_step_7(trainer):
        if trainer.state["step"] == 6:
            os.kill(os.getpid(), signal.SIGUSR2)

    wrap_step(monkeypatch, after=usr2_during_step_7)
    out = tmp_path / "run"
    stopped = train(cfg(store, out))
    assert stopped.interrupted and stopped.step == 8
    assert full_saves(writes) == [(8, 1, 3)]
    monkeypatch.undo()
    monkeypatch.setattr(loop, "host_sync_every", lambda device: 4)
    assert not train(cfg(store, out)).interrupted
    assert_same_run(out, reference[0])


def test_a_non_finite_loss_found_at_a_later_check_names_the_steps_and_keeps_no_bad_checkpoint(
    store, tmp_path, monkeypatch
):
    monkeypatch.setattr(loop, "host_sync_every", lambda device: 4)
    out = tmp_path / "nan"
    with pytest.raises(UserError, match=r"loss is not finite at epoch 0 steps 1-4; the last good checkpoint"):
        train(cfg(store, out, lr=1e12, optimizer="sgd"))
    assert not (out / "last.pt").exists() and not (out / "result.json").exists()


@pytest.mark.parametrize(
    "keep,left",
    [
        ("best", ["best.pt", "config.json", "metrics.jsonl", "result.json"]),
        ("none", ["config.json", "metrics.jsonl", "result.json"]),
        ("final", ["config.json", "final.pt", "metrics.jsonl", "result.json"]),
    ],
)
def test_keep_drops_what_it_does_not_name_once_the_cell_is_done(store, tmp_path, keep, left):
    out = tmp_path / keep
    done = train(cfg(store, out, epochs=1, keep=keep, ckpt_every_steps=2)).result  # last.pt and previous.pt too
    assert done is not None and done.config["keep"] == keep
    assert sorted(p.name for p in out.iterdir()) == left
    assert json.loads((out / "result.json").read_text())["test"] == done.test  # tested with best.pt's weights
    # killed after result.json, before the clean-up: the rerun is a no-op that drops by the recorded --keep
    for name in ("last.pt", "previous.pt", "best.pt", "final.pt"):
        torch.save({"model": {}}, out / name)
    again = train(cfg(store, out, epochs=1, keep=keep, ckpt_every_steps=2)).result
    assert again is not None and again.to_json() == done.to_json()
    assert sorted(p.name for p in out.iterdir()) == left


def test_keep_is_checked_before_anything_is_written(store, tmp_path):
    assert kept_weights("best,final") == kept_weights(" final , best") == {"best", "final"}
    assert kept_weights("none") == frozenset() and kept_weights("best") == {"best"}
    for bad in ("bestt", "", "none,best", "last"):
        with pytest.raises(UserError) as caught:
            train(cfg(store, tmp_path / "bad", keep=bad))
        assert str(caught.value) == f"--keep {bad!r}: choose best,final (the default), best, final or none"
    assert not (tmp_path / "bad").exists()


def test_a_full_disk_ends_the_cell_in_one_line_and_the_same_command_resumes(store, reference, tmpfs, cli_env):
    """The run directory on a tmpfs that holds one checkpoint (2 x best.pt: weights and momentum), best.pt and
    half a checkpoint more: the step-3 save and epoch 0's best.pt fit, the step-6 save meets the full disk."""
    best = (reference[0] / "best.pt").stat().st_size
    out = tmpfs.mount(-(-4 * best // 2**20) + 1) / "run"
    args = ["train", "--store", store, "--dataset", "toy", "--out", out, "--ckpt-every-steps", "3"]
    for k, v in FAST.items():
        args += [f"--{k.replace('_', '-')}", v] if v is not False else [f"--no-{k.replace('_', '-')}"]
    full = subprocess.run(histokt_cmd(*args), env=cli_env, capture_output=True, text=True)
    assert full.returncode == 2, full.stderr
    assert "Traceback" not in full.stderr and "enforce fail" not in full.stderr
    assert full.stderr.splitlines()[-1] == (
        f"histokt train: error: {out / 'last.pt'}: no space left on the device (ENOSPC); free space or raise the "
        "quota, then run the same command again: it resumes"
    )
    assert checkpoint.load(out / "last.pt")["step"] == 3  # the previous checkpoint, intact
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.jsonl"]

    tmpfs.grow(-(-8 * best // 2**20))
    assert not train(cfg(store, out, ckpt_every_steps=3)).interrupted
    assert_same_run(out, reference[0])
    assert sorted(p.name for p in out.iterdir()) == DONE


def test_a_cell_done_before_keep_existed_keeps_its_last_pt_unless_final_pt_exists(tmp_path):
    """A cell finished before --keep and final.pt existed: its last.pt holds the final weights and stays."""
    from histokt.train import rundir

    (tmp_path / "result.json").write_text(json.dumps({"config": {"lr": 0.1}}))
    for name in ("last.pt", "best.pt"):
        (tmp_path / name).write_bytes(b"x")
    rundir.drop_training_state(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "result.json"]
    shutil.copy(tmp_path / "last.pt", tmp_path / "final.pt")
    rundir.drop_training_state(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "final.pt", "result.json"]
