"""histokt.batch.pool in-process: which pools a study gets, and a worker taking the cells of a rehearsal's run
root (cells that do no work): order, blocked cells, crashes and nodes, its time limit, a preemption. The pool
on the real cluster is in tests/batch/test_demo.py and tests/batch/test_sweep_slurm.py."""

import json
import os
import tomllib
from pathlib import Path

import pytest

from histokt import atomic
from histokt.batch import pool, retry, sweep
from histokt.errors import EXIT_REQUEUE
from histokt.study import plan
from histokt.study.spec import load
from tests.conftest import ROOT

SPEC = ROOT / "tests" / "fixtures" / "small_study.toml"
PAPER = ROOT / "jobs" / "paper.toml"


def resources_of(spec):
    return lambda stage, dataset: sweep.resources(spec, stage, dataset)


def test_the_paper_study_gets_a_gpu_pool_and_a_cpu_pool():
    spec = load(PAPER)
    cells = plan.expand(spec)
    work = {s: list(range(len(cs))) for s, cs in cells.items()}
    pools, rest = pool.plan_pools(cells, work, 16, None, resources_of(spec))
    assert rest == {}
    got = {p.name: p for p in pools}
    assert sorted(got) == ["cpu", "gpu"]
    assert got["gpu"].stages == ["pretrain", "transfer", "distill"] and got["cpu"].stages == [
        "standardize",
        "merge",
        "collect",
    ]
    gpu = got["gpu"].resources
    assert (gpu.gpus, gpu.cpus, gpu.mem_gb, gpu.array_parallelism) == (1, 8, 32.0, 16)  # the largest of its stages
    assert gpu.time_min == max(1380, pool.DEFAULT_TIME_MIN)  # at least its longest cell's time_min
    assert len(got["gpu"].cells) + len(got["cpu"].cells) == sum(len(cs) for cs in cells.values())
    merge = sweep.resources(spec, "merge")
    assert pool.fits(merge, gpu) and not pool.fits(sweep.resources(spec, "transfer"), got["cpu"].resources)


def test_a_ddp_stage_stays_in_job_arrays(tmp_path):
    text = PAPER.read_text().replace("[stages.pretrain.resources]\ngpus = 1", "[stages.pretrain.resources]\ngpus = 4")
    (tmp_path / "ddp.toml").write_text(text)
    spec = load(tmp_path / "ddp.toml")
    cells = plan.expand(spec)
    work = {s: list(range(len(cs))) for s, cs in cells.items()}
    pools, rest = pool.plan_pools(cells, work, 8, 600, resources_of(spec))
    assert list(rest) == ["pretrain"] and len(rest["pretrain"]) == len(cells["pretrain"])
    assert all("pretrain" not in p.stages for p in pools)
    assert {p.resources.time_min for p in pools} == {660, 600}  # the spec's pool time, or its longest cell's


# -- a worker, in this process, on a rehearsal's run root -------------------------------------------------------


@pytest.fixture
def rehearsal(tmp_path, monkeypatch):
    """A planned rehearsal of the small study (raw folders present) and a worker for all its cells."""
    for d in tomllib.loads(SPEC.read_text())["datasets"].values():
        (tmp_path / d["raw"]).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURMD_NODENAME"):
        monkeypatch.delenv(key, raising=False)

    def plan_it(crash: str = ""):
        cfg = sweep.SweepConfig(spec=SPEC, rehearse=True, rehearse_crash=crash or None, progress=False)
        _, run_root, cells, _ = sweep.prepare(cfg)
        return run_root, cells

    return plan_it


def worker(run_root, cells, **kw) -> pool.Worker:
    ids = [c.id for cs in cells.values() for c in cs]
    args = {
        "minutes": dict.fromkeys(ids, 10.0),
        "cpus": {},
        "max_retries": {},
        "time_min": 600.0,
        "since": 0.0,
        "nodes": [retry.node()],
        "idle_min": 0.02,
        "poll_s": 0.05,
        **kw,
    }
    return pool.Worker(str(run_root), "cpu", ids, [], **args)


def end_times(run_root, cells) -> dict[str, float]:
    return {
        c.id: json.loads((plan.cell_dir(run_root, c) / "state.json").read_text())["time"]
        for cs in cells.values()
        for c in cs
    }


def test_a_worker_runs_every_cell_those_that_unblock_others_first(rehearsal):
    run_root, cells = rehearsal()
    assert worker(run_root, cells)() == 0
    assert all(plan.is_done(run_root, c) for cs in cells.values() for c in cs)
    t = end_times(run_root, cells)
    stage = {c.id: s for s, cs in cells.items() for c in cs}
    order = sorted(t, key=t.__getitem__)
    assert [stage[c] for c in order[:3]] == ["standardize"] * 3  # every later cell reads a store
    assert max(t[c.id] for c in cells["pretrain"]) < min(t[c.id] for c in cells["transfer"])
    assert order[-1] == "collect"
    (status,) = pool.workers(run_root)
    assert status["ended"] is True and status["ran"] == 10 and status["cell"] is None


def test_the_cells_read_by_most_others_come_first(rehearsal):
    run_root, cells = rehearsal()
    mine = pool._State(run_root, worker(run_root, cells)).mine
    # mhist's store is read by A-mhist, the transfer to mhist and the distillation onto it: 3 readers; each
    # crc shard by 2 (A-crc, the transfer to crc): mhist first, though planned last of the three
    assert mine[:3] == ["std-mhist-0of1", "std-crc-0of2", "std-crc-1of2"]
    assert max(mine.index(c.id) for c in cells["pretrain"]) < min(mine.index(c.id) for c in cells["transfer"])


def test_a_cell_that_crashed_here_is_left_to_another_node_then_blocks_its_readers(rehearsal):
    run_root, cells = rehearsal(crash="A-mhist-*")
    others = worker(run_root, cells, nodes=[retry.node(), "gpu2"])  # another node could retry it
    assert others() == 0  # it waited for A-mhist's retry, idle, then left it to others
    mhist = plan.cell_dir(run_root, cells["pretrain"][1])
    state = json.loads((mhist / "state.json").read_text())
    assert state["status"] == "failed" and state["retry"] is True and len(state["failures"]) == 1
    reader = next(c for c in cells["transfer"] if c.id.startswith("B-random-mhist"))
    assert not (plan.cell_dir(run_root, reader) / "state.json").exists()  # not blocked: a retry will come
    alone = worker(run_root, cells)  # the only node there is: retried here, up to max_retries (2)
    assert alone() == 0
    state = json.loads((mhist / "state.json").read_text())
    assert len(state["failures"]) == 3 and state["retry"] is False
    blocked = json.loads((plan.cell_dir(run_root, reader) / "state.json").read_text())
    assert blocked["status"] == "blocked" and blocked["blocked_by"] == "pretrain/A-mhist-random-s0"
    assert plan.is_done(run_root, cells["collect"][0])  # once every other cell is done or dead


def test_no_time_left_for_a_cell_asks_for_a_requeue(rehearsal, monkeypatch):
    run_root, cells = rehearsal()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4400")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    w = worker(run_root, cells, time_min=12.0)  # 12 min less the margin: no room for a 10-minute cell
    assert w() == EXIT_REQUEUE
    assert (run_root / ".requeue" / "4400_1").exists()
    assert not any(plan.is_done(run_root, c) for cs in cells.values() for c in cs)
    assert pool.workers(run_root)[0]["worker"] == "4400_1"


def test_an_interrupted_cell_ends_the_worker_with_a_requeue(rehearsal, monkeypatch):
    run_root, cells = rehearsal()
    monkeypatch.setenv("SLURM_JOB_ID", "4410")
    real = pool.run_cell

    def preempted_at_pretrain(root, stage, index, cells):
        return EXIT_REQUEUE if stage == "pretrain" else real(root, stage, index, cells)

    monkeypatch.setattr(pool, "run_cell", preempted_at_pretrain)
    assert worker(run_root, cells)() == EXIT_REQUEUE
    assert (run_root / ".requeue" / "4410_0").exists()
    assert all(plan.is_done(run_root, c) for c in cells["standardize"])
    assert not any(plan.is_done(run_root, c) for c in cells["transfer"])


def test_a_failure_recorded_before_the_pool_is_tried_again(rehearsal):
    """A rerun of the sweep tries failed cells again: a cell that failed before its pool was submitted."""
    run_root, cells = rehearsal()
    first = cells["pretrain"][0]
    directory = plan.cell_dir(run_root, first)
    directory.mkdir(parents=True)
    atomic.write_json(directory / "state.json", {"status": "failed", "error": "old", "time": 1.0, "attempts": 1})
    assert worker(run_root, cells, since=2.0)() == 0
    assert plan.is_done(run_root, first)


def test_threads_of_a_cell_are_its_own(monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "9")
    try:
        pool.threads(1)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        pool.threads(None)  # unknown: left alone
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_status_file_is_written_atomically_per_worker(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    s = pool.Status(Path(tmp_path), "gpu")
    s.write("A-x")
    s.write("B-y")
    assert pool.workers(tmp_path)[0] | {"time": 0, "pid": 0, "host": ""} == {
        "worker": "77_3", "pool": "gpu", "host": "", "pid": 0, "ran": 1, "cell": "B-y", "time": 0, "ended": False
    }  # fmt: skip
    s.end()
    assert pool.workers(tmp_path)[0]["ended"] is True and pool.workers(tmp_path)[0]["ran"] == 2


def test_a_crash_before_the_cell_could_record_it_is_bounded_too(rehearsal, monkeypatch):
    run_root, cells = rehearsal()
    calls = []

    def broken(root, stage, index, cells):
        calls.append(stage)
        raise OSError("stale file handle")

    monkeypatch.setattr(pool, "run_cell", broken)
    assert worker(run_root, cells, max_retries={"standardize": 1})() == 0  # ends: never a loop
    assert calls.count("standardize") == 3 * 2  # each of the 3 cells: a try and one retry
    assert calls[6:] == ["collect"] * 3  # nothing read from a store that was never made; the report says so
    mhist = json.loads((plan.cell_dir(run_root, cells["pretrain"][1]) / "state.json").read_text())
    assert mhist["status"] == "blocked" and mhist["blocked_by"] == "standardize/std-mhist-0of1"
