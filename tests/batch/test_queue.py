"""The queue, unit-tested with a faked squeue: a re-run sweep skips exactly the cells still queued (and the done
ones), and `histokt status` puts every cell in the right column."""

import json
import os
import tomllib
from pathlib import Path

import pytest

from histokt.batch import slurm, status, sweep
from histokt.errors import UserError
from histokt.study import plan
from tests.batch import fake_sbatch
from tests.conftest import ROOT

SPEC = ROOT / "tests" / "fixtures" / "small_study.toml"


@pytest.fixture
def study(tmp_path, monkeypatch):
    for d in tomllib.loads(SPEC.read_text())["datasets"].values():  # the spec checks the raw folders exist
        (tmp_path / d["raw"]).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def finish(run_root, cell):
    """Leave the cell's done marker, as its last step does."""
    path = plan.marker(run_root, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")


def test_a_second_sweep_skips_exactly_the_queued_and_the_done_cells(study, monkeypatch):
    fake = fake_sbatch.install(monkeypatch)
    monkeypatch.setattr(slurm, "own_queue", lambda: {})
    first = sweep.sweep(sweep.SweepConfig(spec=SPEC, executor="slurm", progress=False))
    run_root = Path(first["run_root"])
    cells = plan.read(run_root)
    jobs = slurm.cell_jobs(run_root)  # cell id -> its task: <array>_<i>, or the job id of a one-cell submission
    assert len(jobs) == sum(len(c) for c in cells.values()) == 10
    ids = {stage: [c.id for c in cs] for stage, cs in cells.items()}

    running, pending = ids["standardize"][0], ids["pretrain"][1]
    single = ids["merge"][0]  # submitted alone: its task is the plain job id
    assert "_" not in jobs[single]
    queue = {jobs[running]: "RUNNING", jobs[pending]: "PENDING", jobs[single]: "PENDING", "99999_0": "RUNNING"}
    done = [ids["standardize"][2], ids["transfer"][0]]
    done_and_still_listed = ids["standardize"][1]  # finished, its task not yet gone from squeue (COMPLETING)
    queue[jobs[done_and_still_listed]] = "COMPLETING"
    for c in (c for cs in cells.values() for c in cs if c.id in [*done, done_and_still_listed]):
        finish(run_root, c)
    monkeypatch.setattr(slurm, "own_queue", lambda: queue)
    before = len(slurm.submissions(run_root))

    second = sweep.sweep(sweep.SweepConfig(spec=SPEC, executor="slurm", progress=False))

    new = slurm.submissions(run_root)[before:]
    resubmitted = {r["stage"]: r["cells"] for r in new}
    skipped = {running, pending, single, *done, done_and_still_listed}
    expected = {s: [i for i in members if i not in skipped] for s, members in ids.items()}
    assert resubmitted == {s: m for s, m in expected.items() if m}
    assert second["queued"] == 4  # the three queued cells and the one whose task is completing
    assert {s: c["todo"] for s, c in second["stages"].items()} == {s: len(m) for s, m in expected.items()}
    # each cell waits (afterany) for the tasks of the cells it reads from that are still queued, those of
    # earlier submissions and those of this one; the collector for every array of the study
    scripts = dict(fake.scripts)
    by_stage = {r["stage"]: r["job"] for r in new}
    now = slurm.cell_jobs(run_root)
    crc_store = f"{jobs[running]}:{jobs[done_and_still_listed]}"  # the done one's task is still listed
    assert f"#SBATCH --dependency=afterany:{crc_store}\n" in scripts[by_stage["pretrain"]]
    # B-random-mhist-crc: crc's store, and the mhist model of a pretrain task still pending
    assert f"#SBATCH --dependency=afterany:{crc_store}:{jobs[pending]}\n" in scripts[by_stage["transfer"]]
    # the distill cell: its target's store (done: no dependency) and the merge, queued alone as a plain job
    assert f"#SBATCH --dependency=afterany:{jobs[single]}\n" in scripts[by_stage["distill"]]
    still = [jobs[c] for c in (running, pending, single, done_and_still_listed)]
    every = sorted({t.split("_")[0] for t in still} | {r["job"] for r in new if r["stage"] != "collect"})
    assert now[running] == jobs[running] and len(every) == 6
    assert f"#SBATCH --dependency=afterany:{':'.join(every)}\n" in scripts[by_stage["collect"]]
    assert [r["after"] for r in new if r["stage"] == "pretrain"] == [crc_store.split(":")]


@pytest.mark.parametrize(
    "script,message",
    [
        (
            'echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1',
            r"squeue failed \(slurm_load_jobs error: Unable to contact slurm controller\); nothing was submitted",
        ),
        ("sleep 30", r"squeue did not answer in 1 s .*; nothing was submitted"),
    ],
)
def test_a_failing_or_hanging_squeue_submits_nothing(study, monkeypatch, tmp_path, script, message):
    """Never "nothing queued" for an unanswered query: a sweep would submit cells that still run."""
    fake = fake_sbatch.install(monkeypatch)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(slurm, "SQUEUE_TIMEOUT_S", 1)
    with pytest.raises(UserError, match=message):
        sweep.sweep(sweep.SweepConfig(spec=SPEC, executor="slurm", progress=False))
    assert fake.scripts == []
    run_root = sweep.prepare(sweep.SweepConfig(spec=SPEC, dry_run=True))[1]
    assert slurm.submissions(run_root) == []


def test_a_done_cell_is_never_resubmitted_even_with_an_empty_queue(study, monkeypatch):
    fake_sbatch.install(monkeypatch)
    monkeypatch.setattr(slurm, "own_queue", lambda: {})  # an empty queue: done cells are still not resubmitted
    first = sweep.sweep(sweep.SweepConfig(spec=SPEC, executor="slurm", progress=False))
    run_root = Path(first["run_root"])
    cells = plan.read(run_root)
    for stage, cs in cells.items():
        if stage != "collect":
            for c in cs:
                finish(run_root, c)
    before = len(slurm.submissions(run_root))
    second = sweep.sweep(sweep.SweepConfig(spec=SPEC, executor="slurm", progress=False))
    assert [r["stage"] for r in slurm.submissions(run_root)[before:]] == ["collect"]  # it re-reads every time
    assert second["queued"] == 0


# -- histokt status: one test per branch of cell_status ---------------------------------------------------------

CELL = plan.Cell("pretrain", "A-x-random-s0", "train")
TASK = "7_3"


@pytest.mark.parametrize(
    "done,queue,state,expected",
    [
        (True, {TASK: "RUNNING"}, {"status": "running"}, ("done", None)),  # the marker wins over everything
        (True, None, {"status": "failed", "error": "old"}, ("done", None)),
        (False, {TASK: "RUNNING"}, {"status": "failed", "error": "x"}, ("running", None)),  # requeued, running again
        (False, {TASK: "RUNNING"}, {}, ("running", None)),
        (False, {}, {"status": "failed", "error": "input missing: a"}, ("failed", "input missing: a")),
        (False, None, {"status": "failed", "error": "boom"}, ("failed", "boom")),
        (False, {"8_0": "RUNNING"}, {"status": "failed", "error": "boom"}, ("failed", "boom")),  # another task runs
        (False, {TASK: "PENDING"}, {"status": "failed", "error": "x"}, ("pending", None)),  # failed, queued again
        (False, {TASK: "PENDING"}, {"status": "interrupted"}, ("requeued", None)),
        (False, {}, {"status": "interrupted"}, ("requeued", None)),
        (False, None, {"status": "interrupted"}, ("requeued", None)),
        (False, None, {"status": "running"}, ("running", None)),  # no scheduler: the cell's own word
        (False, {TASK: "RUNNING"}, {"status": "blocked", "blocked_by": "pretrain/A"}, ("running", None)),
        (False, {}, {"status": "blocked", "blocked_by": "pretrain/A"}, ("blocked", "blocked by pretrain/A")),
        (False, None, {"status": "blocked"}, ("blocked", "blocked by an input cell")),
        (False, {TASK: "PENDING"}, {"status": "blocked"}, ("pending", None)),  # queued again
        (False, {TASK: "PENDING"}, {"status": "running"}, ("pending", None)),
        (False, {TASK: "PENDING"}, {}, ("pending", None)),
        (False, None, {}, ("pending", None)),
        (False, {TASK: "COMPLETING"}, {"status": "failed", "error": "x"}, ("pending", None)),
    ],
)
def test_cell_status(tmp_path, done, queue, state, expected):
    if done:
        finish(tmp_path, CELL)
    assert status.cell_status(tmp_path, CELL, queue, {CELL.id: TASK}, state) == expected


def test_a_running_cell_whose_task_is_gone_is_lost_with_its_log(tmp_path):
    """It said it was running and its task left the queue without a word: node failure, OOM, time limit."""
    s, why = status.cell_status(tmp_path, CELL, {"8_0": "RUNNING"}, {CELL.id: TASK}, {"status": "running"})
    assert s == "lost"
    assert why == (
        f"job {TASK} ended without a word (node failure, out of memory, time limit?); "
        f"log: {tmp_path}/submitit/{TASK}/{TASK}_0_log.out"
    )
    # never submitted from this run root (a local run's leftover state): nothing to say it is lost
    assert status.cell_status(tmp_path, CELL, {}, {}, {"status": "running"}) == ("pending", None)


def test_cell_status_of_a_cell_never_submitted(tmp_path):
    assert status.cell_status(tmp_path, CELL, {TASK: "RUNNING"}, {}, {"status": "failed", "error": "e"}) == (
        "failed",
        "e",
    )
    assert status.cell_status(tmp_path, CELL, {TASK: "RUNNING"}, {}, {}) == ("pending", None)


def test_status_counts_each_column(study, monkeypatch):
    fake_sbatch.install(monkeypatch)
    monkeypatch.setattr(slurm, "squeue", lambda: {})
    run_root = Path(sweep.sweep(sweep.SweepConfig(spec=SPEC, executor="slurm", progress=False))["run_root"])
    cells = plan.read(run_root)
    jobs = slurm.cell_jobs(run_root)
    std = cells["standardize"]
    finish(run_root, std[0])
    for cell, st in (
        (std[1], {"status": "interrupted", "interrupted_at_steps": [4]}),
        (std[2], {"status": "failed", "error": "bad"}),
    ):
        plan.cell_dir(run_root, cell).mkdir(parents=True, exist_ok=True)
        (plan.cell_dir(run_root, cell) / "state.json").write_text(json.dumps(st))
    pre = cells["pretrain"]
    monkeypatch.setattr(slurm, "squeue", lambda: {jobs[pre[0].id]: "RUNNING", jobs[pre[1].id]: "PENDING"})
    report = status.status(run_root)
    none = {"blocked": 0, "lost": 0}
    assert report["stages"]["standardize"] == {
        "done": 1,
        "running": 0,
        "pending": 0,
        "requeued": 1,
        "failed": 1,
        **none,
    }
    assert report["stages"]["pretrain"] == {"done": 0, "running": 1, "pending": 1, "requeued": 0, "failed": 0, **none}
    assert report["failures"] == [("standardize", std[2].id, "bad", "failed")]
    assert report["preempted"] == {"cells": 1, "times": 1} and report["scheduler"] is True
    text = status.render(report)
    assert f"failed standardize/{std[2].id}: bad" in text and "1/10 cells done" in text


# -- waves under a queue budget ------------------------------------------------------------------------------------


def test_waves_respect_the_budget_the_inputs_and_block_what_reads_a_failed_cell(study, monkeypatch):
    fake = fake_sbatch.install(monkeypatch, max_array_size=3)
    queue: dict[str, str] = {}
    monkeypatch.setattr(slurm, "own_queue", lambda: dict(queue))
    cfg = sweep.SweepConfig(spec=SPEC, executor="slurm", progress=False, max_queued=3)
    first = sweep.sweep(cfg)
    run_root = Path(first["run_root"])
    cells = plan.read(run_root)
    ids = {stage: [c.id for c in cs] for stage, cs in cells.items()}
    # three places: the three standardize cells, and nothing that reads the store they are making
    assert [(r["stage"], r["cells"], r["queued_before"]) for r in first["records"]] == [
        ("standardize", ids["standardize"][:2], 0),
        ("standardize", ids["standardize"][2:], 2),
    ]
    assert (first["left"], first["blocked"]) == (7, 0)
    queue.update({task: "RUNNING" for task in slurm.cell_jobs(run_root).values()})
    second = sweep.sweep(cfg)  # the budget is used up: nothing more, the rest waits
    assert second["status"] == "waiting" and second["left"] == 7 and len(fake.scripts) == 2
    # crc's store is made; mhist's standardize cell failed (and is not retried by this watcher)
    queue.clear()
    for c in cells["standardize"]:
        if c.id.startswith("std-crc"):
            finish(run_root, c)
    failed = next(c for c in cells["standardize"] if c.id.startswith("std-mhist"))
    plan.cell_dir(run_root, failed).mkdir(parents=True, exist_ok=True)
    (plan.cell_dir(run_root, failed) / "state.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    third = sweep.sweep(cfg, skip=frozenset([failed.id]))
    submitted = {r["stage"]: r["cells"] for r in third["records"]}
    # everything that reads mhist's store or a model trained on it is blocked: no GPU, no place in the queue
    assert submitted == {"pretrain": ["A-crc-random-s0"], "collect": ["collect"]}
    assert third["blocked"] == len(ids["pretrain"]) - 1 + len(ids["transfer"]) + len(ids["merge"]) + len(ids["distill"])
    assert third["left"] == 0
    # and recorded so, each naming the cell it reads from that failed or is blocked (status, the report)
    ends = {c.id: json.loads((plan.cell_dir(run_root, c) / "state.json").read_text()) for c in cells["pretrain"][1:]}
    assert ends == {
        "A-mhist-random-s0": {
            "attempts": 0,
            "status": "blocked",
            "blocked_by": f"standardize/{failed.id}",
            "error": f"input cell standardize/{failed.id} failed or is blocked",
        }
    }
    distill = json.loads((plan.cell_dir(run_root, cells["distill"][0]) / "state.json").read_text())
    assert distill["blocked_by"] == f"merge/{ids['merge'][0]}"
    report = status.status(run_root)
    assert report["stages"]["transfer"]["blocked"] == len(ids["transfer"])
    before = {c.id: plan.cell_dir(run_root, c).joinpath("state.json").stat().st_mtime_ns for c in cells["transfer"]}
    sweep.sweep(cfg, skip=frozenset([failed.id]))  # the next pass leaves the records alone
    assert before == {
        c.id: plan.cell_dir(run_root, c).joinpath("state.json").stat().st_mtime_ns for c in cells["transfer"]
    }


def test_the_running_task_cap_holds_for_the_whole_stage_across_its_waves(study, monkeypatch):
    """array_parallelism = 2: never more than 2 of the stage's tasks queued, so never more than 2 running,
    however many arrays (the rest wait for a later wave)."""
    fake = fake_sbatch.install(monkeypatch)
    queue: dict[str, str] = {}
    monkeypatch.setattr(slurm, "own_queue", lambda: dict(queue))
    spec = Path("cap.toml")
    spec.write_text(
        SPEC.read_text().replace(
            "[stages.standardize.resources]\n", "[stages.standardize.resources]\narray_parallelism = 2\n"
        )
    )
    cfg = sweep.SweepConfig(spec=spec, executor="slurm", progress=False, only="standardize")
    first = sweep.sweep(cfg)
    ids = [c.id for c in plan.read(first["run_root"])["standardize"]]
    assert [r["cells"] for r in first["records"]] == [ids[:2]] and first["left"] == 1
    assert "#SBATCH --array=0-1%2\n" in fake.scripts[0][1]
    run_root = Path(first["run_root"])
    jobs = slurm.cell_jobs(run_root)
    queue.update({jobs[ids[0]]: "RUNNING", jobs[ids[1]]: "RUNNING"})
    assert sweep.sweep(cfg)["status"] == "waiting" and len(fake.scripts) == 1  # both places taken
    del queue[jobs[ids[0]]]
    finish(run_root, plan.read(run_root)["standardize"][0])
    third = sweep.sweep(cfg)
    assert [r["cells"] for r in third["records"]] == [ids[2:]] and third["left"] == 0


@pytest.mark.parametrize(
    "cap,sizes,expected",
    [
        (5, [4, 1, 2], [2, 1, 2]),  # the small arrays get what they can use, the big one the rest
        (128, [80, 80], [64, 64]),
        (10, [3, 3, 3], [3, 3, 3]),  # room for every task: each array runs all of its own
        (3, [1, 1, 1], [1, 1, 1]),
    ],
)
def test_the_cap_is_shared_over_the_arrays_of_a_wave(cap, sizes, expected):
    got = sweep.shares(cap, sizes)
    assert got == expected and sum(got) <= cap


def test_a_cell_waits_for_its_input_tasks_only(study, monkeypatch):
    """Per-task dependencies at the size of a stage: each transfer array depends on the one Stage-A task it
    reads from (and its target's store), not on the whole pretrain stage; cells with the same inputs share
    an array."""
    fake = fake_sbatch.install(monkeypatch)
    monkeypatch.setattr(slurm, "own_queue", lambda: {})
    out = sweep.sweep(sweep.SweepConfig(spec=SPEC, executor="slurm", progress=False))
    run_root = Path(out["run_root"])
    cells, jobs = plan.read(run_root), slurm.cell_jobs(run_root)
    by_cells = {tuple(r["cells"]): r for r in out["records"]}
    for cell in cells["transfer"]:
        source, target = cell.meta["source"], cell.meta["target"]
        store = [jobs[c.id] for c in cells["standardize"] if c.args["name"] == target]
        assert by_cells[(cell.id,)]["after"] == sorted([*store, jobs[f"A-{source}-random-s0"]])
    assert by_cells[tuple(c.id for c in cells["standardize"])]["after"] == []
    assert len(fake.scripts) == len(out["records"]) == 8  # std, 2 pretrain, 2 transfer, merge, distill, collect


def test_pending_cells_that_read_a_failed_cell_are_cancelled_and_recorded_blocked(study, monkeypatch):
    fake_sbatch.install(monkeypatch)
    monkeypatch.setattr(slurm, "own_queue", lambda: {})
    run_root = Path(sweep.sweep(sweep.SweepConfig(spec=SPEC, executor="slurm", progress=False))["run_root"])
    cells = plan.read(run_root)
    jobs = slurm.cell_jobs(run_root)
    failed = "std-mhist-0of1"
    cell = next(c for c in cells["standardize"] if c.id == failed)
    plan.cell_dir(run_root, cell).mkdir(parents=True, exist_ok=True)
    (plan.cell_dir(run_root, cell) / "state.json").write_text(json.dumps({"status": "failed", "error": "x"}))
    for c in cells["standardize"]:
        if c.id != failed:
            finish(run_root, c)
    queue = {task: "PENDING" for cid, task in jobs.items() if not cid.startswith("std-")}
    queue[jobs["A-crc-random-s0"]] = "RUNNING"
    monkeypatch.setattr(slurm, "own_queue", lambda: queue)
    cancelled: list[str] = []
    monkeypatch.setattr(slurm, "cancel", cancelled.append)
    blocked = sweep.cancel_blocked(run_root, cells, queue)
    # mhist's Stage A, everything trained on mhist or from its model: never started, never queued again
    expected = [
        c.id for s in ("pretrain", "transfer", "merge", "distill") for c in cells[s] if c.id != "A-crc-random-s0"
    ]
    assert blocked == expected and cancelled == [jobs[c] for c in expected]
    state = json.loads((plan.cell_dir(run_root, cells["pretrain"][1]) / "state.json").read_text())
    assert state["status"] == "blocked" and state["blocked_by"] == f"standardize/{failed}"
    chained = next(c for c in cells["distill"])
    assert json.loads((plan.cell_dir(run_root, chained) / "state.json").read_text())["blocked_by"].startswith("merge/")
    for task in cancelled:  # scancel took them off the queue
        del queue[task]
    assert sweep.cancel_blocked(run_root, cells, queue) == []  # the next look finds nothing more to cancel

    # a watching sweep's pass: one squeue, the same cancellations, and the failed cell not retried by it
    queue.update({jobs[c]: "PENDING" for c in expected})
    asked: list[int] = []
    monkeypatch.setattr(slurm, "own_queue", lambda: asked.append(1) or dict(queue))
    out = sweep.sweep(sweep.SweepConfig(spec=SPEC, executor="slurm", progress=False), skip=frozenset([failed]))
    assert out["cancelled"] == expected and len(asked) == 1
    assert out["blocked"] == len(expected) and out.get("records", []) == [], out.get("records")
