"""Where the world comes from (torchrun, srun, --nproc) and a real 2-process gloo run launched torchrun-style."""

import json
import os
import subprocess

import pytest

from histokt.train.distributed import World, any_rank, first_host, free_port, from_environment
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


# ---- any_rank: the one collective a step, over two real gloo processes -----------------------------------------

# (rank 0's flags, rank 1's flags) -> what both must see: an element-wise OR
AGREEMENTS = [
    (([False, False, False], [True, False, True]), [True, False, True]),  # only rank 1 stops / saves
    (([False, True, False], [False, False, False]), [False, True, False]),  # only rank 0's loss is NaN
    (([False, False, False], [False, False, False]), [False, False, False]),
    (([True, True, True], [True, True, True]), [True, True, True]),
]


def _agree(rank: int, port: int, queue) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        queue.put((rank, [any_rank(flags[rank], torch.device("cpu")) for flags, _ in AGREEMENTS]))
    finally:
        dist.destroy_process_group()


def test_any_rank_is_an_or_over_two_gloo_processes():
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_agree, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    seen = dict(queue.get() for _ in procs)
    expected = [want for _, want in AGREEMENTS]
    assert seen[0] == expected and seen[1] == expected


def test_any_rank_alone_returns_the_flags():
    import torch

    assert any_rank([True, False], torch.device("cpu")) == [True, False]
