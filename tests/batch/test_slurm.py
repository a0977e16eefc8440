"""histokt.batch.slurm in-process, with `squeue` and `scontrol` faked: the queue parsed, the configuration read, the
ledger and which cells are still queued, the task's own key and rank, and the requeue teardown line (run in bash
against a fake `scontrol`). Nothing here reaches a cluster."""

import json
import os
import shutil
import subprocess

import pytest

from histokt.batch import slurm
from histokt.errors import UserError


class FakeRun:
    """Stands in for subprocess.run: records each call, answers (stdout, returncode) or raises ``exc``."""

    def __init__(self, stdout="", returncode=0, exc=None):
        self.stdout, self.returncode, self.exc, self.calls = stdout, returncode, exc, []

    def __call__(self, args, **kwargs):
        self.calls.append((args, kwargs))
        if self.exc is not None:
            raise self.exc
        return subprocess.CompletedProcess(args, self.returncode, stdout=self.stdout, stderr="")


@pytest.fixture
def fake_run(monkeypatch):
    def install(**kw):
        fake = FakeRun(**kw)
        monkeypatch.setattr(slurm.subprocess, "run", fake)
        return fake

    return install


# -- squeue ---------------------------------------------------------------------------------------------------


def test_squeue_asks_for_every_array_task_and_its_long_state(fake_run):
    fake = fake_run(stdout="4242_0 RUNNING\n4242_1 PENDING\n\n   \n4250 COMPLETING\n")
    assert slurm.squeue() == {"4242_0": "RUNNING", "4242_1": "PENDING", "4250": "COMPLETING"}
    # -h no header, -r one line per array task, "%i %T": the task id and the state spelled out
    # -u: this user's jobs only (a shared cluster's queue holds everyone's)
    user = __import__("getpass").getuser()
    assert fake.calls == [
        (["squeue", "-h", "-r", "-u", user, "-o", "%i %T"], {"capture_output": True, "text": True, "timeout": 60})
    ]


def test_squeue_keeps_the_rest_of_the_line_as_the_state():
    assert slurm._two_fields("7_3   RUNNING\n") == ("7_3", "RUNNING\n")
    assert slurm._two_fields("7_3 REQUEUE HOLD") == ("7_3", "REQUEUE HOLD")


def test_squeue_of_an_empty_queue_is_empty_not_none(fake_run):
    fake_run(stdout="")
    assert slurm.squeue() == {}


@pytest.mark.parametrize(
    "kw",
    [
        {"exc": FileNotFoundError(2, "No such file or directory", "squeue")},  # not a SLURM host
        {"exc": subprocess.TimeoutExpired(["squeue"], 60)},  # the controller does not answer
        {"stdout": "4242_0 RUNNING\n", "returncode": 1},  # squeue failed: its output means nothing
    ],
)
def test_squeue_is_none_where_slurm_cannot_be_asked(fake_run, kw):
    """For status (which then says so); a sweep asks own_queue, for which it is an error (next test)."""
    fake_run(**kw)
    assert slurm.squeue() is None
    with pytest.raises(UserError, match=r"squeue.*(not found|did not answer in 60 s|failed \(exit code 1\))"):
        slurm.own_queue()


# -- scontrol show config ---------------------------------------------------------------------------------------

CONFIG = """Configuration data as of 2024-01-01T00:00:00
MailProg                = /bin/mail
  MaxArraySize            = 40001
MaxJobCount             = 10000
"""


# -- node exclusion of a crashed cell's retry -------------------------------------------------------------------


class Answers(FakeRun):
    """sinfo answers the partition's nodes; scontrol answers ok."""

    def __init__(self, nodes):
        super().__init__()
        self.nodes = nodes

    def __call__(self, args, **kwargs):
        self.calls.append((args, kwargs))
        out = "\n".join(self.nodes) + "\n" if args[0] == "sinfo" else ""
        return subprocess.CompletedProcess(args, 0, stdout=out, stderr="")


def test_a_retry_is_kept_off_the_nodes_it_crashed_on_where_others_exist(monkeypatch):
    fake = Answers(["gpu1", "gpu2", "gpu3"])
    monkeypatch.setattr(slurm.subprocess, "run", fake)
    assert slurm.exclude("4300_7", ["gpu1", "gpu3"], "preempt") is True
    assert [args for args, _ in fake.calls] == [
        ["sinfo", "-h", "-N", "-o", "%N", "-p", "preempt"],
        ["scontrol", "update", "JobId=4300_7", "ExcNodeList=gpu1,gpu3"],
    ]
    fake.calls.clear()
    fake.nodes = ["gpu1", "gpu3"]  # every node of the partition: excluding them would leave it pending forever
    assert slurm.exclude("4300_7", ["gpu1", "gpu3"]) is False
    assert [args for args, _ in fake.calls] == [["sinfo", "-h", "-N", "-o", "%N"]]


def test_a_refused_exclusion_is_one_line(fake_run, monkeypatch):
    monkeypatch.setattr(slurm, "partition_nodes", lambda partition: {"a", "b"})
    fake_run(returncode=1)
    with pytest.raises(UserError, match=r"^scontrol update JobId=9_1 ExcNodeList=a failed: no message$"):
        slurm.exclude("9_1", ["a"])


def test_max_array_size_is_read_from_scontrol(fake_run):
    fake = fake_run(stdout=CONFIG)
    assert slurm.max_array_size() == 40001
    assert fake.calls == [(["scontrol", "show", "config"], {"capture_output": True, "text": True, "timeout": 60})]


def test_max_array_size_defaults_to_slurms_own(fake_run):
    fake_run(stdout="MaxJobCount             = 10000\n")
    assert slurm.max_array_size() == slurm.DEFAULT_MAX_ARRAY_SIZE == 1001


@pytest.mark.parametrize(
    "exc",
    [FileNotFoundError(2, "No such file or directory", "scontrol"), subprocess.TimeoutExpired(["scontrol"], 60)],
)
def test_max_array_size_without_slurm_is_a_user_error(fake_run, exc):
    fake_run(exc=exc)
    with pytest.raises(UserError) as info:
        slurm.max_array_size()
    message = str(info.value)
    assert message.startswith("cannot read the SLURM configuration (")
    assert message.endswith("); is this a SLURM login node?")
    assert str(exc) in message and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


# -- the ledger and the queued cells ------------------------------------------------------------------------------


def test_ledger_round_trip_and_latest_task_of_each_cell(tmp_path):
    assert slurm.submissions(tmp_path) == [] and slurm.cell_jobs(tmp_path) == {}
    first = {"stage": "s", "job": "10", "array": True, "cells": ["a", "b"]}
    slurm.record_submission(tmp_path, first)
    slurm.record_submission(tmp_path, {"stage": "s", "job": "11", "array": False, "cells": ["b"]})
    slurm.record_submission(tmp_path, {"stage": "t", "job": "12", "array": True, "cells": ["c", "d", "e"]})
    text = (tmp_path / "submissions.jsonl").read_text()
    assert text.endswith("\n") and json.loads(text.splitlines()[0]) == first
    assert [r["job"] for r in slurm.submissions(tmp_path)] == ["10", "11", "12"]
    assert slurm.cell_jobs(tmp_path) == {"a": "10_0", "b": "11", "c": "12_0", "d": "12_1", "e": "12_2"}


def test_submissions_skip_blank_lines(tmp_path):
    (tmp_path / "submissions.jsonl").write_text('{"job": "1"}\n\n  \n{"job": "2"}\n')
    assert slurm.submissions(tmp_path) == [{"job": "1"}, {"job": "2"}]


def test_queued_cells_are_those_whose_latest_task_is_listed(tmp_path, monkeypatch):
    slurm.record_submission(tmp_path, {"stage": "s", "job": "10", "array": True, "cells": ["a", "b", "c"]})
    slurm.record_submission(tmp_path, {"stage": "s", "job": "11", "array": False, "cells": ["c"]})
    monkeypatch.setattr(slurm, "own_queue", lambda: {"10_1": "PENDING", "10_2": "RUNNING", "11": "RUNNING"})
    # c's old task 10_2 is still listed, but its latest is 11: the id of its latest task
    assert slurm.queued_cells(tmp_path) == {"b": "10_1", "c": "11"}
    assert slurm.queued_cells(tmp_path, {"10_0": "COMPLETING"}) == {"a": "10_0"}  # a queue asked before


def test_nothing_is_queued_in_an_empty_queue_and_an_unanswered_query_is_an_error(tmp_path, monkeypatch, fake_run):
    slurm.record_submission(tmp_path, {"stage": "s", "job": "10", "array": True, "cells": ["a"]})
    monkeypatch.setattr(slurm, "own_queue", lambda: {})
    assert slurm.queued_cells(tmp_path) == {}
    monkeypatch.undo()
    fake_run(returncode=1)
    with pytest.raises(UserError, match="squeue failed"):
        slurm.queued_cells(tmp_path)


# -- the environment of a task ----------------------------------------------------------------------------------

SLURM_VARS = ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "SLURM_ARRAY_TASK_ID", "RANK", "SLURM_PROCID")


@pytest.fixture
def env(monkeypatch):
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, value)

    return set_env


@pytest.mark.parametrize(
    "values,expected",
    [
        ({}, None),  # not in a SLURM task
        ({"SLURM_JOB_ID": "4250"}, "4250_0"),  # a plain job is task 0
        ({"SLURM_ARRAY_JOB_ID": "4242", "SLURM_JOB_ID": "4245", "SLURM_ARRAY_TASK_ID": "3"}, "4242_3"),
        ({"SLURM_ARRAY_JOB_ID": "4242"}, "4242_0"),
    ],
)
def test_job_key(env, values, expected):
    env(**values)
    assert slurm.job_key() == expected


@pytest.mark.parametrize(
    "values,expected",
    [
        ({}, True),  # a single process is rank 0
        ({"RANK": "0"}, True),
        ({"RANK": "1"}, False),
        ({"SLURM_PROCID": "0"}, True),
        ({"SLURM_PROCID": "2"}, False),
        ({"RANK": "0", "SLURM_PROCID": "3"}, True),  # torchrun's RANK wins over srun's task
        ({"RANK": "1", "SLURM_PROCID": "0"}, False),
    ],
)
def test_is_rank0(env, values, expected):
    env(**values)
    assert slurm.is_rank0() is expected


# -- the teardown line ------------------------------------------------------------------------------------------


def test_teardown_line_text(tmp_path):
    keep, line, end = slurm.teardown_lines(tmp_path)
    marker = f"{tmp_path}/.requeue/${{SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}}_${{SLURM_ARRAY_TASK_ID:-0}}"
    assert (keep, end) == ("histokt_rc=$?", 'exit "$histokt_rc"')
    assert line == (
        f'if [ -f "{marker}" ]; then rm -f "{marker}"; '
        'echo "histokt: requeue ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${SLURM_ARRAY_TASK_ID:-0}"; '
        'scontrol requeue "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}" '
        "&& exit 0; fi"
    )


def test_teardown_line_of_a_relative_run_root_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert f'"{tmp_path}/runs/study/.requeue/' in slurm.teardown_lines("runs/study")[1]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    "task_env,marker_name,requeued",
    [
        ({"SLURM_ARRAY_JOB_ID": "4242", "SLURM_JOB_ID": "4245", "SLURM_ARRAY_TASK_ID": "3"}, "4242_3", "4242_3"),
        ({"SLURM_JOB_ID": "4250"}, "4250_0", "4250"),  # a plain job: its marker says task 0, scontrol the job id
    ],
)
def test_teardown_line_requeues_the_task_that_asked_and_only_once(tmp_path, task_env, marker_name, requeued):
    bin_dir, run_root = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n')
    scontrol.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    environ = {**base, **task_env, "PATH": f"{bin_dir}{os.pathsep}{base.get('PATH', '')}"}
    lines = slurm.teardown_lines(run_root)

    def teardown(rc=75):  # after srun ended with the cell's exit code rc
        script = "\n".join([f"(exit {rc})", *lines])
        return subprocess.run(["bash", "-c", script], env=environ, capture_output=True, text=True, timeout=30)

    first = teardown(rc=2)  # no marker yet: nothing happens, and the job ends with the cell's code
    assert first.returncode == 2 and first.stdout == "" and not log.exists()
    assert teardown(rc=0).returncode == 0
    marker = run_root / slurm.REQUEUE_DIR / marker_name
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    second = teardown()
    assert second.stdout == f"histokt: requeue {marker_name}\n" and second.returncode == 0  # requeued on purpose
    assert log.read_text() == f"requeue {requeued}\n" and not marker.exists()
    third = teardown()  # the marker is gone: requeued once
    assert third.stdout == "" and log.read_text() == f"requeue {requeued}\n"


def test_sbatch_calls_are_paced_after_a_burst(monkeypatch):
    clock = [0.0]
    slept: list[float] = []
    monkeypatch.setattr(slurm.time, "monotonic", lambda: clock[0])

    def sleep(s):
        slept.append(s)
        clock[0] += s

    monkeypatch.setattr(slurm.time, "sleep", sleep)
    pace = slurm.Pace(burst=3, per_s=10.0)
    for _ in range(3):
        pace.wait()
    assert slept == []  # the burst is free
    pace.wait()
    pace.wait()
    assert slept == pytest.approx([0.1, 0.1])  # then 10 a second
    clock[0] += 10.0  # a quiet minute refills the bucket, up to the burst
    for _ in range(3):
        pace.wait()
    assert len(slept) == 2
