"""Training from splits held in device memory (--data-on device; the CPU stands in for the GPU): the same
cell as the loader path bit for bit, exact resume after SIGKILL and SIGUSR2, DDP, the settings recorded."""

import json
import signal
import subprocess

import pytest
import torch

from histokt.errors import EXIT_REQUEUE, UserError
from histokt.train import checkpoint
from histokt.train.launch import train
from tests.fixtures.trainstore import make_store
from tests.train.test_loop import assert_same_weights, cfg, cli_args, finished, same_result, wait_for, weights

DEVICE = dict(data_on="device", ckpt_every_steps=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("resident"))


@pytest.fixture(scope="module")
def env():
    import os

    from tests.conftest import ROOT

    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def reference(store, tmp_path_factory, env):
    """An uninterrupted cell trained from device memory, through the CLI."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert subprocess.run(cli_args(store, out, **DEVICE), env=env).returncode == 0
    return out


def test_the_device_path_trains_the_loader_paths_cell_bit_for_bit(store, reference, tmp_path):
    """Same pixels, labels and draws: the loader with the warp on the device gives the same weights."""
    loader = finished(train(cfg(store, tmp_path / "loader", data_on="loader", augment_on="device", ckpt_every_steps=1)))
    assert_same_weights(weights(tmp_path / "loader" / "final.pt"), weights(reference / "final.pt"))
    assert_same_weights(weights(tmp_path / "loader" / "best.pt"), weights(reference / "best.pt"))
    assert (tmp_path / "loader" / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    device = json.loads((reference / "result.json").read_text())
    assert device["settings"] == loader.settings == {"precision": "fp32", "compile": False, "warp": "device"}
    assert device["config"]["data_on"] == "device" and device["test"] == loader.test


def test_sigkill_and_resume_from_device_memory_is_bitwise_identical(store, reference, tmp_path, env):
    out = tmp_path / "run"
    proc = subprocess.Popen(cli_args(store, out, **DEVICE), env=env)
    wait_for(lambda: (out / "previous.pt").exists() and checkpoint.load_latest(out)[0]["step"] >= 7, proc, "step 7")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists()
    assert checkpoint.load(out / "last.pt")["settings"]["warp"] == "device"
    assert subprocess.run(cli_args(store, out, **DEVICE), env=env).returncode == 0
    assert_same_weights(weights(out / "best.pt"), weights(reference / "best.pt"))
    assert_same_weights(weights(out / "final.pt"), weights(reference / "final.pt"))
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()
    assert same_result(out / "result.json", reference / "result.json")


def test_sigusr2_from_device_memory_checkpoints_and_the_loader_path_resumes_it_exactly(store, reference, tmp_path, env):
    out = tmp_path / "run"
    args = dict(data_on="device", ckpt_every_steps=0)
    proc = subprocess.Popen(cli_args(store, out, **args), env=env, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (out / "metrics.jsonl").exists(), proc, "the first epoch ended")
    proc.send_signal(signal.SIGUSR2)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err
    assert 5 <= checkpoint.load(out / "last.pt")["step"] < 15
    # where batches are made is operational: the loader path (the warp on the device, as the checkpoint keeps)
    resumed = subprocess.run(cli_args(store, out, data_on="auto", ckpt_every_steps=0), env=env)
    assert resumed.returncode == 0
    assert_same_weights(weights(out / "final.pt"), weights(reference / "final.pt"))
    assert same_result(out / "result.json", reference / "result.json")


def test_ddp_ranks_train_from_device_memory_as_one_process(store, tmp_path):
    """As test_loop's DDP test: one step of the whole split, the update within 5 % of one process's."""
    from histokt.train.models import build_model

    kw = dict(epochs=1, batch_size=38, sync_bn=True, augment=False)
    one = finished(train(cfg(store, tmp_path / "one", data_on="loader", **kw)))
    two = finished(train(cfg(store, tmp_path / "two", data_on="device", nproc=2, **kw)))
    # 5 test patches: shards of 2 and 3 (eval_rows); ranks holding the same shard would gather 4 or 6
    assert two.world_size == 2 and one.test["n"] == two.test["n"] == 5
    a, b = weights(tmp_path / "one" / "final.pt"), weights(tmp_path / "two" / "final.pt")
    torch.manual_seed(0)
    init = build_model("resnet18", 2, "random").state_dict()
    for k in a:
        if a[k].dtype.is_floating_point and "running" not in k:
            assert (a[k] - b[k]).norm() < 0.05 * (a[k] - init[k]).norm(), k


def test_a_cell_warped_in_the_loader_is_not_resumed_from_device_memory(store, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match="--data-on device"):
        train(cfg(store, out, data_on="device", augment_on="loader"))
    assert not out.exists()  # refused before anything is written

    class Stop(BaseException):
        pass

    from histokt.train.loop import Trainer

    step = Trainer.step

    def stop_at_step_3(self, *batch):
        if self.state["step"] == 3:
            raise Stop
        return step(self, *batch)

    mp = pytest.MonkeyPatch()
    mp.setattr(Trainer, "step", stop_at_step_3)
    with pytest.raises(Stop):
        train(cfg(store, out, ckpt_every_steps=1))  # auto on the CPU: the loader warps (Pillow)
    mp.undo()
    assert checkpoint.load(out / "last.pt")["settings"]["warp"] == "loader"
    with pytest.raises(UserError, match="started with the augmentation warp in the loader"):
        train(cfg(store, out, ckpt_every_steps=1, data_on="device"))
