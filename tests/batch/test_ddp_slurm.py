"""DDP cells under a real srun on the multi-node local cluster (HISTOKT_SLURM_NODES=2 slurm/local/start.sh):
a pretrain cell of 2 nodes x 2 tasks (world 4, gloo on CPU) is preempted with USR2, every rank exits 75, the
task is requeued once and resumes to the weights of an uninterrupted world-4 run; four ranks on two nodes
make the update of one process on the same global batch; two cells share both nodes at once (both rank 0 on
the first node) and one rank of one of them is SIGKILLed: the step ends, the task is requeued and the cell
resumes from its last checkpoint."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from histokt.batch.demo import write_collection
from histokt.batch.slurm import cell_jobs, queued_cells
from histokt.store.schema import dataset_attrs
from histokt.train import checkpoint
from tests.conftest import ROOT, histokt_cmd
from tests.slurm_cluster import multinode_cluster, slurm_cluster  # noqa: F401  (fixtures)

SPEC = ROOT / "tests" / "fixtures" / "ddp_study.toml"
CELL = "A-crc-random-s0"
pytestmark = pytest.mark.slurm


def env(**extra: str) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), **extra)


def sweep(cwd: Path, spec: Path) -> Path:
    """Submit the study (no node-local staging: the two nodes of this machine would share one "local" disk);
    the run root."""
    write_collection(cwd / "demo", per_class=4, seed=0)
    r = subprocess.run(
        histokt_cmd("sweep", spec, "--executor", "slurm"),
        cwd=cwd,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return cwd / "demo" / "runs"


def study(tmp_path: Path, *edits: tuple[str, str]) -> Path:
    text = SPEC.read_text()
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def state(cell: Path) -> dict:
    try:
        return json.loads((cell / "state.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def wait_until(predicate, what: str, timeout: float = 600) -> None:
    end = time.time() + timeout
    while not predicate():
        assert time.time() < end, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.5)


def job_record(task: str) -> str:
    return subprocess.run(["scontrol", "show", "job", task], capture_output=True, text=True).stdout


def training(cell: Path) -> bool:
    return (cell / "last.pt").exists() and state(cell).get("status") == "running"


def srun_train(cwd: Path, out: Path, config: dict, *options: str) -> None:
    """`histokt train` of ``config`` as four srun tasks on two nodes (one thread each, as the cells have)."""
    r = subprocess.run(
        ["srun", "-N2", "--ntasks-per-node=2", "-c1", "-t", "10", *histokt_cmd(*train_args(config, out), *options)],
        cwd=cwd, env=env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr


def train_args(config: dict, out: Path) -> list[str]:
    keys = ("store", "dataset", "epochs", "batch_size", "workers", "optimizer", "lr", "eval_batch_size")
    args = [f"--{k.replace('_', '-')}={config[k]}" for k in keys]
    return ["train", *args, f"--out={out}", "--no-progress"]


def exits(log: str) -> dict[int, tuple[str, int]]:
    """{task: (node, exit code)} from srun's lines "srun: error: NODE: task(s) 0-1,3: Exited with exit code N"."""
    found = re.findall(r"srun: error: (\S+): tasks? ([0-9,-]+): Exited with exit code (\d+)", log)
    out = {}
    for node, spec, code in found:
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out.update({t: (node, int(code)) for t in range(int(lo), int(hi or lo) + 1)})
    return out


def weights(path: Path) -> dict:
    return checkpoint.load(path)["model"]


def test_a_world_of_four_on_two_nodes_is_preempted_once_and_resumes_exactly(multinode_cluster, tmp_path):  # noqa: F811
    runs = sweep(tmp_path, SPEC)
    cell = runs / "cells" / "pretrain" / CELL
    wait_until(lambda: training(cell), f"{CELL} to train")
    task = cell_jobs(runs)[CELL]
    # the time limit's warning: --signal=USR2 reaches every task of the step (the batch shell is not signalled)
    subprocess.run(["scancel", "--signal=USR2", task], check=True)
    wait_until(lambda: state(cell).get("interrupted_at_steps"), "the interruption to be recorded")
    wait_until(lambda: (cell / "result.json").exists() and not queued_cells(runs), "the cell to finish")

    result = json.loads((cell / "result.json").read_text())
    s = state(cell)
    assert result["world_size"] == 4 and s["attempts"] == 2 and s["status"] == "done", s
    assert s["interrupted_at_steps"][0] < result["steps"]
    record = job_record(task)
    assert "NumNodes=2 " in record and "NumTasks=4 " in record and "Restarts=1 " in record, record
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
    first = (runs / "submitit" / task / f"{task}_0_log.out").read_text(errors="replace")
    # every rank stopped at the same step and exited 75; the batch script requeued the task once
    assert exits(first) == {0: (nodes[0], 75), 1: (nodes[0], 75), 2: (nodes[1], 75), 3: (nodes[1], 75)}, first
    assert first.count(f"histokt: requeue {task}_0") == 1
    assert "--kill-on-bad-exit=1" in (runs / "submitit" / task / f"{task}_submission.sh").read_text()
    # the same final weights as an uninterrupted world-4 run of the same cell
    reference = tmp_path / "uninterrupted"
    srun_train(tmp_path, reference, json.loads((cell / "config.json").read_text()))
    a, b = weights(cell / "best.pt"), weights(reference / "best.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_four_ranks_on_two_nodes_make_the_update_of_one_process(multinode_cluster, tmp_path):  # noqa: F811
    """One step on the whole training split, as four srun tasks on two nodes and as one process: the same
    update within the tolerance of the DDP tests (tests/train/test_loop.py: the relative difference of a
    tensor's update; a DDP fault changes it by tens of percent)."""
    from histokt.ingest.standardize import StandardizeConfig, standardize
    from histokt.train.models import build_model

    write_collection(tmp_path / "demo", per_class=4, seed=0)
    store = tmp_path / "demo" / "store.zarr"
    standardize(StandardizeConfig(dataset="crc", raw=tmp_path / "demo" / "raw" / "crc", store=store, patch_size=112,
                                  progress=False))  # fmt: skip
    n = dataset_attrs(store, "crc")["counts"]["train"]
    batch = -(-n // 4) * 4  # the whole split in one step, a multiple of the world (the sampler wraps to fill it)
    # SGD: Adam's first step is lr x the sign of each gradient, which rounding near zero flips
    config = dict(store=store, dataset="crc", epochs=1, batch_size=batch, workers=0, optimizer="sgd", lr=0.03,
                  eval_batch_size=32)  # fmt: skip
    options = ("--sync-bn", "--no-augment")
    srun_train(tmp_path, tmp_path / "four", config, *options)
    r = subprocess.run(
        histokt_cmd(*train_args(config, tmp_path / "one"), *options), env=env(OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    one, four = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "four"))
    assert (one["world_size"], four["world_size"], one["steps"], four["steps"]) == (1, 4, 1, 1)
    a, b = weights(tmp_path / "one" / "final.pt"), weights(tmp_path / "four" / "final.pt")
    torch.manual_seed(0)  # the trainer's seeded random init
    init = build_model("resnet18", len(dataset_attrs(store, "crc")["classes"]), "random").state_dict()
    for k in a:
        if a[k].dtype.is_floating_point and "running" not in k:
            update = (a[k] - init[k]).norm()
            assert update > 0, k
            assert (a[k] - b[k]).norm() < 0.05 * update, k


def rank_pid(task: str, rank: int) -> int:
    """The pid of one rank of a running array task (its python process, found by its SLURM environment)."""
    array, index = task.split("_")
    want = {b"SLURM_ARRAY_JOB_ID=" + array.encode(), b"SLURM_ARRAY_TASK_ID=" + index.encode(),
            b"SLURM_PROCID=" + str(rank).encode()}  # fmt: skip
    for proc in Path("/proc").iterdir():
        try:
            environ = set((proc / "environ").read_bytes().split(b"\0"))
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if want <= environ and b"submitit.core._submit" in cmdline:
            return int(proc.name)
    raise AssertionError(f"no rank {rank} of {task} found")


def test_two_cells_share_both_nodes_and_a_killed_rank_requeues_its_cell(multinode_cluster, tmp_path):  # noqa: F811
    """Two world-2 cells (one task on each node) at once: both rank 0 on the first node, each on a port of its
    own. Rank 1 of one is SIGKILLed (its node lost): the step ends within seconds, the batch script requeues
    the task, the cell resumes from its last checkpoint, and both finish."""
    spec = study(tmp_path, ("seeds = [0]", "seeds = [0, 1]"), ("tasks_per_node = 2", "tasks_per_node = 1"))
    runs = sweep(tmp_path, spec)
    cells = [runs / "cells" / "pretrain" / f"A-crc-random-s{seed}" for seed in (0, 1)]
    wait_until(lambda: all(training(c) for c in cells), "both cells to train at once")
    victim = cells[1]
    task = cell_jobs(runs)[victim.name]
    before = state(victim)
    os.kill(rank_pid(task, 1), signal.SIGKILL)
    killed = time.time()
    wait_until(lambda: state(victim).get("failures"), "the crash to be recorded", timeout=60)
    assert time.time() - killed < 60  # the step ended (srun --kill-on-bad-exit), nobody waited for the dead rank
    wait_until(lambda: all((c / "result.json").exists() for c in cells) and not queued_cells(runs), "both cells")

    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
    for c in cells:
        assert json.loads((c / "result.json").read_text())["world_size"] == 2
        assert state(c)["host"] == nodes[0]  # both rank 0 on the first node: two rendezvous there, no clash
    s = state(victim)
    assert s["attempts"] == before["attempts"] + 1 == 2 and len(s["failures"]) == 1, s
    assert "Restarts=1 " in job_record(task)
    log = (runs / "submitit" / task / f"{task}_0_log.out").read_text(errors="replace")
    assert f"histokt: requeue {task}" in log
    resumed = [line for line in log.splitlines() if f"histokt train: {victim}: resuming at step " in line]
    assert len(resumed) == 1, log
    assert int(resumed[0].split("resuming at step ")[1].split()[0]) >= 1  # from its checkpoint, not from scratch
