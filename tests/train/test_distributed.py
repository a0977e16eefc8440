"""Where the world comes from (torchrun, srun, --nproc) and a real 2-process gloo run launched torchrun-style."""

import json
import os
import subprocess

import pytest

from histokt.train.distributed import World, first_host, free_port, from_environment
from tests.conftest import ROOT, histokt_cmd
from tests.fixtures.trainstore import make_store


def test_world_from_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert from_environment() == World(3, 4, 1)


def test_world_from_srun_tasks(monkeypatch):
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert from_environment() == World(5, 8, 1)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a plain one-task job is no world
    assert from_environment() is None


@pytest.mark.parametrize("nodelist,host", [("gpu[03-05,7],cpu1", "gpu03"), ("node12", "node12"), ("a,b", "a")])
def test_first_host_of_a_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_two_ranks_started_like_torchrun(tmp_path):
    store = make_store(tmp_path, per_class=8)
    out = tmp_path / "run"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            PYTHONPATH=str(ROOT),
        )
        procs.append(
            subprocess.Popen(
                histokt_cmd(
                    "train",
                    "--store",
                    store,
                    "--dataset",
                    "toy",
                    "--out",
                    out,
                    "--epochs",
                    "1",
                    "--batch-size",
                    "4",
                    "--workers",
                    "0",
                    "--device",
                    "cpu",
                    "--no-progress",
                ),
                env=env,
            )
        )
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert json.loads((out / "result.json").read_text())["world_size"] == 2
