"""The Trainer's rules at unit level (no store, no training): best-checkpoint ties, the epoch bookkeeping, resuming
the sampler mid-epoch, the run directory's steps, the stop signal and the Outcome."""

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from histokt.errors import UserError
from histokt.result import CellResult
from histokt.store.sampler import GlobalBatchSampler
from histokt.train import checkpoint, distributed, rundir
from histokt.train.config import TrainConfig
from histokt.train.loop import Trainer, fresh_state, is_new_best, state_of
from histokt.train.outcome import Outcome
from histokt.train.signals import StopRequested

# ---- best checkpoint: strictly improving, as HistoKT -------------------------------------------------------


def test_only_a_strictly_higher_validation_top1_is_a_new_best():
    assert is_new_best(0.0, None)  # the first epoch always is
    assert is_new_best(0.51, {"top1": 0.5, "epoch": 0})
    assert not is_new_best(0.5, {"top1": 0.5, "epoch": 0})  # a tie keeps the earlier epoch
    assert not is_new_best(0.49, {"top1": 0.5, "epoch": 0})


class _Scheduler:
    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


def bare_trainer(run_dir: Path, valid_top1: list[float]) -> Trainer:
    """A Trainer without a store: evaluate returns the given validation top-1 epoch after epoch, save counts."""
    t = Trainer.__new__(Trainer)
    t.cfg = SimpleNamespace(arch="linear")
    t.world = distributed.World()
    t.run_dir = run_dir
    t.classes = ["a", "b"]
    t.model = torch.nn.Linear(2, 2)
    t.scheduler = _Scheduler()
    t.optimizer = SimpleNamespace(param_groups=[{"lr": 0.1}])
    t.state = fresh_state()
    scores = iter(valid_top1)
    t.evaluate = lambda split, model, epoch=0: {"top1": next(scores), "loss": 0.25}
    t.saves = []
    t.save = lambda: t.saves.append(dict(t.state))
    return t


def test_end_epoch_keeps_the_first_of_equal_best_epochs(tmp_path):
    top1 = [0.5, 0.7, 0.7, 0.6, 0.8, 0.8]
    t = bare_trainer(tmp_path, top1)
    best_epochs = []
    for epoch in range(len(top1)):
        t.state["batch"] = 3  # mid-epoch bookkeeping that end_epoch must reset
        t.end_epoch(epoch)
        best_epochs.append(checkpoint.load(tmp_path / "best.pt")["epoch"])
        assert t.state["best"] == {"top1": top1[best_epochs[-1]], "epoch": best_epochs[-1]}
        assert (t.state["epoch"], t.state["batch"]) == (epoch + 1, 0)
    assert best_epochs == [0, 1, 1, 1, 4, 4]
    best = checkpoint.load(tmp_path / "best.pt")
    assert best["valid_top1"] == 0.8 and best["arch"] == "linear" and best["classes"] == ["a", "b"]
    assert t.scheduler.steps == len(top1) and t.saves == []  # an epoch's end writes no checkpoint
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == list(range(len(top1)))
    assert [x["valid"]["top1"] for x in lines] == top1 and lines[0]["lr"] == 0.1


def test_the_checkpointed_state_is_restored_key_by_key():
    state = {"epoch": 2, "batch": 3, "step": 13, "history": [{"epoch": 0}], "best": {"top1": 0.5, "epoch": 1}}
    ckpt = {**state, "seconds": 9.5, "model": {}, "rng": {}}
    assert state_of(ckpt) == {**state, "seconds": 9.5}
    with pytest.raises(KeyError):
        state_of({k: v for k, v in ckpt.items() if k != "batch"})


# ---- the sampler as the Trainer uses it: set_epoch(epoch, checkpointed batch) -------------------------------


@pytest.mark.parametrize("n,batch", [(38, 8), (40, 8), (5, 8)])
def test_a_resumed_epoch_restarts_at_the_checkpointed_batch(n, batch):
    whole = GlobalBatchSampler(n, batch, seed=3)
    whole.set_epoch(2)
    full = list(whole)
    assert len(full) == len(whole) == -(-n // batch) and all(len(b) == batch for b in full)
    for start in range(len(full) + 1):
        resumed = GlobalBatchSampler(n, batch, seed=3)
        resumed.set_epoch(2, start)
        assert list(resumed) == full[start:]
    other = GlobalBatchSampler(n, batch, seed=3)
    other.set_epoch(3)
    assert list(other) != full or n < 2  # every epoch its own order


def test_the_ranks_share_each_global_batch():
    one = GlobalBatchSampler(38, 8, seed=1)
    ranks = [GlobalBatchSampler(38, 8, world=2, rank=r, seed=1) for r in range(2)]
    for s in (one, *ranks):
        s.set_epoch(1, 2)
    for whole, a, b in zip(one, *ranks):
        assert a + b == whole and len(a) == len(b) == 4


# ---- the run directory --------------------------------------------------------------------------------------


def _cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(store=Path("store.zarr"), dataset="toy", out=out, **kw)


def test_prepare_run_dir_accepts_operational_changes_only(tmp_path):
    out = tmp_path / "run"
    assert rundir.prepare_run_dir(_cfg(out, workers=2)) == out
    written = json.loads((out / rundir.CONFIG).read_text())
    assert written["workers"] == 2 and written["store"] == "store.zarr"
    rundir.prepare_run_dir(_cfg(out, workers=5, nproc=2, device="cpu", progress=False))  # how it runs: allowed
    assert json.loads((out / rundir.CONFIG).read_text()) == written  # the first config stays
    with pytest.raises(UserError, match=r"another config \(seed: 0 -> 1\)"):
        rundir.prepare_run_dir(_cfg(out, seed=1))


def test_drop_training_state_only_once_final_weights_exist(tmp_path):
    for name in (rundir.LAST, rundir.PREVIOUS, rundir.BEST):
        (tmp_path / name).write_bytes(b"x")
    rundir.drop_training_state(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt", "previous.pt"]
    (tmp_path / rundir.FINAL).write_bytes(b"x")
    rundir.drop_training_state(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "final.pt"]


def test_read_result_none_while_running_and_a_clear_error_when_damaged(tmp_path):
    assert rundir.read_result(tmp_path) is None
    (tmp_path / rundir.RESULT).write_text('{"valid": {}}')
    with pytest.raises(UserError, match=r"result.json: not a valid result \(MalformedResult: no config, classes"):
        rundir.read_result(tmp_path)
    (tmp_path / rundir.RESULT).write_text('{"valid"')
    with pytest.raises(UserError, match="JSONDecodeError"):
        rundir.read_result(tmp_path)


# ---- signals and the outcome ----------------------------------------------------------------------------------


def test_stop_signals_only_set_a_flag_and_the_handlers_come_back():
    before = {sig: signal.getsignal(sig) for sig in StopRequested.SIGNALS}
    for sig in StopRequested.SIGNALS:
        with StopRequested() as stop:
            assert not stop.flag
            assert signal.getsignal(sig) == stop._handle  # else the kill below would end the test process
            os.kill(os.getpid(), sig)
            assert stop.flag  # the handler ran (signals are handled between bytecodes of the main thread)
        assert {s: signal.getsignal(s) for s in StopRequested.SIGNALS} == before


def test_outcome_of_a_stop_and_of_a_finished_cell():
    stopped = Outcome.stopped(7)
    assert stopped.interrupted and stopped.step == 7 and stopped.result is None
    assert stopped.message == "checkpointed at step 7 on a signal; run the same command again to resume"
    result = CellResult.from_json(
        {
            "config": {},
            "classes": ["a"],
            "valid": {"top1_best": 0.5, "best_epoch": 0},
            "test": {"top1": 0.5},
            "epochs": 1,
            "steps": 5,
            "world_size": 1,
            "seconds": 1.0,
            "histokt_version": "0.1.0",
        }
    )
    done = Outcome.finished(result)
    assert not done.interrupted and done.result is result and done.step == 5
