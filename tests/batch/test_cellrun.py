"""One cell, one writer (the cell's lease: histokt.batch.cellrun) and honest exit codes, from `histokt run-cell`
and from the submitit job function.

Real processes where it matters: two `histokt run-cell` of one cell at once, a stale lease of a dead process,
a `--nproc 2` cell whose ranks share the lease, and the exit status of submitit tasks (LocalExecutor, through
an interpreter stand-in that records it, as srun would see it). The rest runs in-process on cells that
never train. The run root is planned and standardized once per module and copied per test.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

from histokt import atomic, lease
from histokt.batch import cellrun
from histokt.batch.cellrun import LEASE, CellBlocked, CellBusy, CellTask
from histokt.batch.demo import write_collection
from histokt.errors import EXIT_BUSY, EXIT_REQUEUE, UserError
from histokt.study import plan
from tests.conftest import ROOT, histokt_cmd

SPEC = ROOT / "tests" / "fixtures" / "small_study.toml"
PRETRAIN = "A-crc-random-s0"
TRANSFER = "B-random-crc-mhist-deep-lr1e-3-s0"  # reads PRETRAIN's best.pt
OTHER_HOST = "another-node.cluster.example"
JOB_VARIABLES = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_PROCID", "SLURM_NTASKS")
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def clean_env(**extra) -> dict:
    """This process's environment outside any SLURM job or launcher, one intra-op thread (reproducible)."""
    env = {k: v for k, v in os.environ.items() if k not in JOB_VARIABLES + RANK_VARIABLES}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture
def no_job(monkeypatch):
    for name in JOB_VARIABLES + RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A planned run root of the small study, standardized; PRETRAIN trains 1 epoch (2 steps)."""
    from histokt.batch import sweep

    where = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(where)
        for name in JOB_VARIABLES + RANK_VARIABLES:
            mp.delenv(name, raising=False)
        write_collection(where / "demo", per_class=4, seed=0)
        _, run_root, cells, _ = sweep.prepare(sweep.SweepConfig(spec=SPEC))
        with warnings.catch_warnings():  # "crc: 100k has 28 sources, a complete download has 77922"
            warnings.simplefilter("ignore")
            for i in range(len(cells["standardize"])):
                assert cellrun.run_cell(run_root, "standardize", i) == 0
    doc = json.loads((run_root / "plan.json").read_text())
    for cell in doc["stages"]["pretrain"]:
        cell["args"]["epochs"] = 1
    (run_root / "plan.json").write_text(json.dumps(doc))
    return run_root


@pytest.fixture
def runs(base, tmp_path):
    """This test's copy of the run root (the store is shared: cells name it by its absolute path)."""
    return Path(shutil.copytree(base, tmp_path / "runs"))


def index(run_root: Path, stage: str, cell_id: str) -> int:
    return [c.id for c in plan.read(run_root)[stage]].index(cell_id)


def cell_dir(run_root: Path, stage: str, cell_id: str) -> Path:
    return run_root / "cells" / stage / cell_id


def run_cell_cmd(run_root: Path, stage: str, cell_id: str) -> list[str]:
    return histokt_cmd("run-cell", run_root, "--stage", stage, "--index", index(run_root, stage, cell_id))


def leave(path: Path, host: str, pid: int, age_s: float = 0.0, job: str = "") -> None:
    """A lease as another process would have left it, its heartbeat ``age_s`` seconds ago."""
    then = time.time() - age_s
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{host} {pid} {then:.0f}{' ' + job if job else ''}\n")
    os.utime(path, (then, then))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"ended ({proc.returncode}) before {path} appeared: {proc.communicate()}"
        assert time.monotonic() < end, f"{path} did not appear in {timeout} s"
        time.sleep(0.02)


def comparable(result_json: Path) -> dict:
    """result.json less what differs between two runs of one cell: the wall time and the run folder."""
    doc = json.loads(result_json.read_text())
    doc.pop("seconds")
    doc["config"].pop("out")
    return doc


def same_weights(a: Path, b: Path) -> bool:
    import torch

    from histokt.train import checkpoint

    x, y = checkpoint.load(a)["model"], checkpoint.load(b)["model"]
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# -- real processes ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def solo(base, tmp_path_factory):
    """PRETRAIN run alone, after a process of this host died holding its lease: (cell folder, the run)."""
    run_root = Path(shutil.copytree(base, tmp_path_factory.mktemp("solo") / "runs"))
    cell = cell_dir(run_root, "pretrain", PRETRAIN)
    leave(cell / LEASE, socket.gethostname(), dead_pid(), age_s=1, job="4100_2")
    r = subprocess.run(run_cell_cmd(run_root, "pretrain", PRETRAIN), env=clean_env(), capture_output=True, text=True)
    return cell, r


def test_a_stale_lease_of_a_dead_process_is_taken_over(solo):
    cell, r = solo
    assert r.returncode == 0, r.stderr
    assert (cell / "result.json").is_file() and not (cell / LEASE).exists()  # trained, then released
    state = json.loads((cell / "state.json").read_text())
    assert state["status"] == "done" and state["attempts"] == 1 and state["job"] is None


def test_two_run_cells_of_one_cell_at_once_one_trains_the_other_names_it(runs, solo):
    cell = cell_dir(runs, "pretrain", PRETRAIN)
    # the first runs inside a SLURM job (as an array task would), the second is typed by hand
    first = subprocess.Popen(
        run_cell_cmd(runs, "pretrain", PRETRAIN),
        env=clean_env(SLURM_JOB_ID="4242"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(cell / LEASE, first)
        started = time.monotonic()
        second = subprocess.run(
            run_cell_cmd(runs, "pretrain", PRETRAIN), env=clean_env(), capture_output=True, text=True, timeout=120
        )
        took = time.monotonic() - started
        assert first.poll() is None, "the first ended before the second was refused: no overlap to test"
    finally:
        _, err = first.communicate(timeout=600)
    assert second.returncode == EXIT_BUSY and second.stdout == "", second
    assert re.fullmatch(
        rf"histokt run-cell: error: {re.escape(str(cell))}: in use by host {re.escape(socket.gethostname())}, "
        rf"pid {first.pid}, job 4242, \d+ s ago\n",
        second.stderr,
    ), second.stderr
    assert took < 30, f"refused after {took:.1f} s"  # at once: its interpreter's start, then one look at the lease
    assert first.returncode == 0, err
    # exactly one trained: one attempt, recorded by the first, whose lease is gone
    state = json.loads((cell / "state.json").read_text())
    assert (state["status"], state["attempts"], state["pid"], state["job"]) == ("done", 1, first.pid, "4242")
    assert not (cell / LEASE).exists()
    alone, _ = solo
    assert comparable(cell / "result.json") == comparable(alone / "result.json")
    assert same_weights(cell / "best.pt", alone / "best.pt")  # a Stage-A cell keeps best.pt (plan.KEEP)


def test_a_ddp_cell_of_nproc_2_shares_one_lease(runs):
    """The process running the cell holds the lease; the ranks it spawns never look at it."""
    doc = json.loads((runs / "plan.json").read_text())
    cell_doc = next(c for c in doc["stages"]["pretrain"] if c["id"] == PRETRAIN)
    cell_doc["args"]["nproc"] = 2
    (runs / "plan.json").write_text(json.dumps(doc))
    cell = cell_dir(runs, "pretrain", PRETRAIN)
    proc = subprocess.Popen(
        run_cell_cmd(runs, "pretrain", PRETRAIN), env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        wait_for(cell / LEASE, proc)
        holder = lease.read(cell / LEASE)
        assert holder is not None and holder.pid == proc.pid
    finally:
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()
    assert json.loads((cell / "result.json").read_text())["world_size"] == 2
    assert [p.name for p in cell.iterdir() if p.name.startswith(LEASE)] == []  # released, no temporary left


STAND_IN = """#!/bin/sh
# the interpreter of a submitit task: runs it, records its exit status (as srun sees it) by job id
"{python}" "$@"
rc=$?
echo $rc > "{codes}/$SUBMITIT_LOCAL_JOB_ID"
exit $rc
"""


def test_submitit_tasks_exit_with_the_cells_code(runs, tmp_path):
    """Each task's process exits with the cell's code, as SLURM would record it: done 0, crash 1, user error 2,
    busy 3, blocked 4 (submitit's LocalExecutor; the interpreter is a stand-in that records the status)."""
    import submitit

    codes = tmp_path / "codes"
    codes.mkdir()
    python = tmp_path / "python"
    python.write_text(STAND_IN.format(python=sys.executable, codes=codes))
    python.chmod(0o755)
    doc = json.loads((runs / "plan.json").read_text())
    crashing = next(c for c in doc["stages"]["standardize"] if c["id"].startswith("std-mhist-"))
    crashing["args"]["no_such_option"] = 1  # a plan the command cannot take: a TypeError, a crash
    (cell_dir(runs, "standardize", crashing["id"]) / "done.json").unlink()  # so that it runs again
    (runs / "plan.json").write_text(json.dumps(doc))
    busy = cell_dir(runs, "merge", plan.read(runs)["merge"][0].id)
    leave(busy / LEASE, OTHER_HOST, 4242, age_s=5, job="4300_1")
    tasks = {
        0: CellTask(str(runs), "standardize", index(runs, "standardize", "std-crc-0of2")),  # done already
        1: CellTask(str(runs), "standardize", index(runs, "standardize", crashing["id"])),
        2: CellTask(str(runs), "no-such-stage", 0),
        3: CellTask(str(runs), "merge", 0),
        4: CellTask(str(runs), "transfer", index(runs, "transfer", TRANSFER)),
    }
    executor = submitit.LocalExecutor(folder=str(tmp_path / "submitit"), python=str(python))
    executor.update_parameters(timeout_min=5)
    env = clean_env()
    with pytest.MonkeyPatch.context() as mp:  # the tasks inherit the executor's environment
        for name in JOB_VARIABLES + RANK_VARIABLES:
            mp.delenv(name, raising=False)
        mp.setenv("OMP_NUM_THREADS", env["OMP_NUM_THREADS"])
        jobs = {code: executor.submit(task) for code, task in tasks.items()}
        end = time.monotonic() + 300
        while not all(j.done() for j in jobs.values()):
            assert time.monotonic() < end, "the tasks did not end in 300 s"
            time.sleep(0.2)
    got = {code: int((codes / job.job_id).read_text()) for code, job in jobs.items()}
    assert got == {code: code for code in tasks}, {c: jobs[c].stderr() for c in tasks}
    assert "in use by host another-node.cluster.example, pid 4242, job 4300_1" in (jobs[3].stderr() or "")
    assert "input missing" in (jobs[4].stderr() or "") and "TypeError" in (jobs[1].stderr() or "")
    failed = json.loads((cell_dir(runs, "standardize", crashing["id"]) / "state.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith("TypeError")


# -- in-process ----------------------------------------------------------------------------------------------------


def test_busy_touches_nothing_and_exits_3(runs, no_job, capsys):
    cell = cell_dir(runs, "pretrain", PRETRAIN)
    leave(cell / LEASE, OTHER_HOST, 4242, age_s=12, job="4300_1")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in cell.iterdir())
    with pytest.raises(SystemExit) as exit_:
        CellTask(str(runs), "pretrain", index(runs, "pretrain", PRETRAIN))()
    assert exit_.value.code == EXIT_BUSY
    assert capsys.readouterr().err == (
        f"histokt run-cell: error: {cell}: in use by host {OTHER_HOST}, pid 4242, job 4300_1, 12 s ago\n"
    )
    assert sorted((p.name, p.stat().st_mtime_ns) for p in cell.iterdir()) == before  # no state.json, no lease taken


def test_this_jobs_own_lease_from_another_host_is_an_earlier_run_and_taken_over(runs, no_job):
    """A job requeued after a node failure finds the lease its earlier run left on that node."""
    cell = cell_dir(runs, "transfer", TRANSFER)
    leave(cell / LEASE, OTHER_HOST, 4242, age_s=5, job="4300_1")
    no_job.setenv("SLURM_ARRAY_JOB_ID", "4300")
    no_job.setenv("SLURM_ARRAY_TASK_ID", "1")
    with pytest.raises(CellBlocked):  # taken, so the cell went on: to its (missing) input
        cellrun.run_cell(runs, "transfer", index(runs, "transfer", TRANSFER))
    assert not (cell / LEASE).exists()  # released


def test_blocked_names_the_input_cell_and_exits_4(runs, no_job, capsys):
    upstream = cell_dir(runs, "pretrain", PRETRAIN)
    cell = cell_dir(runs, "transfer", TRANSFER)
    i = index(runs, "transfer", TRANSFER)
    with pytest.raises(SystemExit) as exit_:
        CellTask(str(runs), "transfer", i)()
    assert exit_.value.code == cellrun.EXIT_BLOCKED == 4
    state = json.loads((cell / "state.json").read_text())
    assert state["status"] == "blocked" and state["blocked_by"] == f"pretrain/{PRETRAIN}"
    assert state["attempts"] == 0  # never ran
    assert state["error"] == f"input missing: {upstream}/best.pt (input cell pretrain/{PRETRAIN} not finished)"
    assert capsys.readouterr().err == f"histokt run-cell: error: {state['error']}\n"
    assert not (cell / LEASE).exists()
    # its input cell failed: said so, with that cell's error
    atomic.write_json(upstream / "state.json", {"status": "failed", "error": "UserError: no dataset crc"})
    with pytest.raises(CellBlocked, match=rf"input cell pretrain/{PRETRAIN} failed: UserError: no dataset crc\)$"):
        cellrun.run_cell(runs, "transfer", i)
    # `histokt run-cell` exits with the same code
    from histokt import cli

    assert cli.main(["run-cell", str(runs), "--stage", "transfer", "--index", str(i)]) == 4


def test_a_blocked_input_cell_is_named_down_the_chain(runs, no_job):
    merge = plan.read(runs)["merge"][0]
    atomic.write_json(cell_dir(runs, "merge", merge.id) / "state.json", {"status": "blocked", "blocked_by": "x/y"})
    i = next(k for k, c in enumerate(plan.read(runs)["distill"]) if any(merge.id in p for p in c.inputs))
    with pytest.raises(CellBlocked, match=rf"input cell merge/{re.escape(merge.id)} blocked by x/y\)$"):
        cellrun.run_cell(runs, "distill", i)


def test_user_error_exits_2(runs, no_job, capsys):
    with pytest.raises(SystemExit) as exit_:
        CellTask(str(runs), "pretrain", 99)()
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("histokt run-cell: error: ")


def test_a_crash_raises_and_releases_the_lease(runs, no_job, monkeypatch):
    cell = cell_dir(runs, "pretrain", PRETRAIN)

    def boom(*args):
        assert lease.read(cell / LEASE).pid == os.getpid()  # held while the cell runs
        raise RuntimeError("boom")

    monkeypatch.setattr(cellrun, "_execute", boom)
    with pytest.raises(RuntimeError, match="boom"):  # submitit saves the traceback and its process exits 1
        CellTask(str(runs), "pretrain", index(runs, "pretrain", PRETRAIN))()
    state = json.loads((cell / "state.json").read_text())
    assert state["status"] == "failed" and state["error"] == "RuntimeError: boom"
    assert not (cell / LEASE).exists()


def test_a_crash_is_recorded_and_requeued_until_max_retries(runs, no_job, monkeypatch, capsys):
    """Each crash appends (node, job, error) to state.json; the task asks its batch script for a requeue
    while the cell crashed at most max_retries times; a user error is no crash and never retried."""
    no_job.setenv("SLURM_ARRAY_JOB_ID", "4240")
    no_job.setenv("SLURM_ARRAY_TASK_ID", "1")
    no_job.setenv("SLURMD_NODENAME", "gpu7")
    monkeypatch.setenv("HISTOKT_MAX_RETRIES", "1")
    cell = cell_dir(runs, "pretrain", PRETRAIN)
    (cell / "state.json").unlink(missing_ok=True)
    monkeypatch.setattr(cellrun, "_execute", lambda *args: (_ for _ in ()).throw(RuntimeError("bad GPU")))
    task = CellTask(str(runs), "pretrain", index(runs, "pretrain", PRETRAIN))
    marker = runs / ".requeue" / "4240_1"
    for n, retried in ((1, True), (2, False)):
        marker.unlink(missing_ok=True)
        with pytest.raises(RuntimeError, match="bad GPU"):
            task()
        state = json.loads((cell / "state.json").read_text())
        assert state["crashed"] is True and len(state["failures"]) == n
        assert state["failures"][-1] | {"time": 0, "log": None} == {
            "node": "gpu7", "job": "4240_1", "error": "RuntimeError: bad GPU", "time": 0, "log": None
        }  # fmt: skip
        assert marker.exists() == retried, n
    assert "crashed 2 time(s), max_retries 1: not retried" in capsys.readouterr().err
    monkeypatch.setattr(cellrun, "_execute", lambda *args: (_ for _ in ()).throw(UserError("fix the spec")))
    with pytest.raises(SystemExit):
        task()
    state = json.loads((cell / "state.json").read_text())
    assert state["crashed"] is False and len(state["failures"]) == 2 and not marker.exists()


def test_interrupted_exits_75_asks_for_the_requeue_and_releases_the_lease(runs, no_job, monkeypatch):
    no_job.setenv("SLURM_JOB_ID", "4250")
    monkeypatch.setattr(cellrun, "_execute", lambda *args: EXIT_REQUEUE)
    cell = cell_dir(runs, "pretrain", PRETRAIN)
    with pytest.raises(SystemExit) as exit_:
        CellTask(str(runs), "pretrain", index(runs, "pretrain", PRETRAIN))()
    assert exit_.value.code == EXIT_REQUEUE
    assert (runs / ".requeue" / "4250_0").exists()  # the teardown's spelling: a plain job is task 0
    state = json.loads((cell / "state.json").read_text())
    assert state["status"] == "interrupted" and state["job"] == "4250"  # as squeue spells it
    assert not (cell / LEASE).exists()


def test_the_requeue_cap_stops_requeueing_but_keeps_the_checkpoint(runs, no_job, monkeypatch, capsys):
    no_job.setenv("SLURM_JOB_ID", "4251")
    no_job.setenv("SLURM_RESTART_COUNT", "3")
    monkeypatch.setenv("HISTOKT_MAX_REQUEUES", "3")
    monkeypatch.setattr(cellrun, "_execute", lambda *args: EXIT_REQUEUE)
    task = CellTask(str(runs), "pretrain", index(runs, "pretrain", PRETRAIN))
    with pytest.raises(SystemExit) as exit_:
        task()
    assert exit_.value.code == EXIT_REQUEUE  # SLURM records it as failed; the sweep resumes it
    assert not (runs / ".requeue" / "4251_0").exists()
    assert "requeued 3 times already (max_requeues 3): not requeued again" in capsys.readouterr().err
    monkeypatch.setenv("HISTOKT_MAX_REQUEUES", "4")  # under the cap: requeued
    with pytest.raises(SystemExit):
        task()
    assert (runs / ".requeue" / "4251_0").exists()


def test_a_stale_requeue_marker_is_cleared_when_the_task_starts(runs, no_job):
    """Left by the task's previous run, which SLURM requeued itself before the teardown ran: one requeue
    too many if it stayed."""
    no_job.setenv("SLURM_ARRAY_JOB_ID", "4260")
    no_job.setenv("SLURM_ARRAY_TASK_ID", "2")
    marker = runs / ".requeue" / "4260_2"
    marker.parent.mkdir(exist_ok=True)
    marker.write_text("")
    other = runs / ".requeue" / "4260_3"  # another task's: not ours to clear
    other.write_text("")
    i = index(runs, "standardize", "std-crc-0of2")
    assert CellTask(str(runs), "standardize", i)() == 0  # done already: returns at once
    assert not marker.exists() and other.exists()


def test_a_done_cell_returns_0_without_a_lease(runs, no_job):
    i = index(runs, "standardize", "std-crc-0of2")
    cell = cell_dir(runs, "standardize", "std-crc-0of2")
    leave(cell / LEASE, OTHER_HOST, 4242, job="4300_1")  # even while another process holds it
    assert CellTask(str(runs), "standardize", i)() == 0


# -- the ranks of one SLURM job step -------------------------------------------------------------------------------


@pytest.fixture
def rank1(no_job):
    """A second task of SLURM job step 4300_1 (the ranks of a DDP cell)."""
    no_job.setenv("SLURM_ARRAY_JOB_ID", "4300")
    no_job.setenv("SLURM_ARRAY_TASK_ID", "1")
    no_job.setenv("SLURM_PROCID", "1")
    return no_job


def test_another_rank_joins_its_jobs_lease(runs, rank1):
    cell = plan.read(runs)["pretrain"][index(runs, "pretrain", PRETRAIN)]
    path = cell_dir(runs, "pretrain", PRETRAIN) / LEASE
    leave(path, OTHER_HOST, 4242, job="4300_1")  # rank 0 of this job, on another node
    assert cellrun._join(path, runs, plan.read(runs), cell) is False


def test_another_rank_waits_for_its_rank_0(runs, rank1):
    cell = plan.read(runs)["pretrain"][index(runs, "pretrain", PRETRAIN)]
    path = cell_dir(runs, "pretrain", PRETRAIN) / LEASE
    path.parent.mkdir(parents=True, exist_ok=True)
    late = threading.Timer(0.5, leave, (path, OTHER_HOST, 4242), {"job": "4300_1"})
    late.start()
    started = time.monotonic()
    try:
        assert cellrun._join(path, runs, plan.read(runs), cell) is False
    finally:
        late.join()
    assert time.monotonic() - started >= 0.4


def test_another_rank_gives_up_where_another_job_holds_the_cell(runs, rank1):
    cell = plan.read(runs)["pretrain"][index(runs, "pretrain", PRETRAIN)]
    path = cell_dir(runs, "pretrain", PRETRAIN) / LEASE
    leave(path, OTHER_HOST, 4242, age_s=3, job="4400_0")
    with pytest.raises(CellBusy, match=rf"in use by host {OTHER_HOST}, pid 4242, job 4400_0, \d+ s ago$"):
        cellrun._join(path, runs, plan.read(runs), cell)


def test_another_rank_whose_rank_0_never_comes(runs, rank1, monkeypatch):
    monkeypatch.setattr(cellrun, "JOIN_TIMEOUT_S", 0.3)
    cell = plan.read(runs)["pretrain"][index(runs, "pretrain", PRETRAIN)]
    path = cell_dir(runs, "pretrain", PRETRAIN) / LEASE
    path.parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(RuntimeError, match="rank 0 of job 4300_1 did not take the cell's lease"):
        cellrun._join(path, runs, plan.read(runs), cell)


def test_another_rank_of_a_blocked_cell_writes_nothing(runs, rank1):
    cell = cell_dir(runs, "transfer", TRANSFER)
    leave(cell / LEASE, OTHER_HOST, 4242, job="4300_1")
    with pytest.raises(CellBlocked):
        cellrun.run_cell(runs, "transfer", index(runs, "transfer", TRANSFER))
    assert not (cell / "state.json").exists()  # rank 0 records the state
    assert lease.read(cell / LEASE).host == OTHER_HOST  # rank 0's, not this rank's to release
    # rank 0 found it blocked and released the lease before this rank looked: blocked too, without waiting
    (cell / LEASE).unlink()
    started = time.monotonic()
    with pytest.raises(CellBlocked):
        cellrun.run_cell(runs, "transfer", index(runs, "transfer", TRANSFER))
    assert time.monotonic() - started < cellrun.JOIN_TIMEOUT_S / 10


@pytest.mark.parametrize("planned", [{}, {"evbmf_search": "grid"}])
def test_a_merge_cell_runs_with_its_planned_evbmf_search(tmp_path, monkeypatch, planned):
    from histokt.distill import merge

    asked = []
    monkeypatch.setattr(merge, "distill", lambda cfg: asked.append(cfg) or {"rule": cfg.rule})
    cell = plan.Cell(
        "merge", "M-x", "merge", {"sources": ["a", "b"], "rule": "kappa-select", "lowrank": False, **planned}
    )
    assert cellrun._execute(tmp_path, cell, tmp_path) == 0
    # a cell planned before the search was named keeps the search it was planned with: the reference's
    assert asked[0].evbmf_search == planned.get("evbmf_search", "reference") and asked[0].rule == "kappa-select"
    assert json.loads((tmp_path / "done.json").read_text()) == {"rule": "kappa-select"}
