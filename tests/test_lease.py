"""histokt.lease: one owner per lease file, whole from the moment it exists, stale only when its holder is gone."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from histokt import lease
from histokt.lease import Lease
from tests.conftest import ROOT

OTHER_HOST = "another-node.cluster.example"


def leave(path, host: str, pid: int, age_s: float, job: str = "") -> None:
    """A lease as another process would have left it, its heartbeat ``age_s`` seconds ago."""
    then = time.time() - age_s
    path.write_text(f"{host} {pid} {then:.0f}{' ' + job if job else ''}\n")
    os.utime(path, (then, then))


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def path(tmp_path):
    return tmp_path / "p000003.lease"


@pytest.fixture
def no_slurm(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)


def test_a_live_holder_is_refused_and_described(path, tmp_path):
    """A real process of this host holds the lease (taken in it, inside a SLURM array task's environment)."""
    code = (
        "import sys, time; from histokt.lease import Lease; "
        f"assert Lease.acquire({str(path)!r}) is not None; print('held', flush=True); time.sleep(120)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "7"}
    holder = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        assert not lease.is_stale(path) and Lease.acquire(path) is None
        text = lease.holder(path)
        assert text.startswith(f"host {socket.gethostname()}, pid {holder.pid}, job 4242_7, ")
        assert text.endswith(" s ago")
        assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporary left behind
    finally:
        holder.kill()
        holder.wait()
    # its process is gone: the lease is taken over at once, however young
    assert lease.is_stale(path)
    assert Lease.acquire(path) is not None
    assert getattr(lease.read(path), "pid", None) == os.getpid()


def test_a_dead_local_pid_is_taken_over(path, no_slurm):
    leave(path, socket.gethostname(), dead_pid(), 0)
    assert lease.is_stale(path)
    mine = Lease.acquire(path)
    assert mine is not None
    host, pid, _ = path.read_text().split()  # outside SLURM: no job field
    assert (host, int(pid)) == (socket.gethostname(), os.getpid())


def test_another_hosts_lease_is_judged_by_its_heartbeat_age(path):
    leave(path, OTHER_HOST, 4242, 30, job="99")
    assert not lease.is_stale(path, stale_after=60) and Lease.acquire(path, stale_after=60) is None
    assert lease.holder(path) == f"host {OTHER_HOST}, pid 4242, job 99, 30 s ago"
    leave(path, OTHER_HOST, 4242, 90, job="99")
    assert lease.is_stale(path, stale_after=60)
    assert Lease.acquire(path, stale_after=60) is not None
    assert getattr(lease.read(path), "host", None) == socket.gethostname()
    # the default stale age is 600 s
    leave(path, OTHER_HOST, 4242, 500)
    assert not lease.is_stale(path)
    leave(path, OTHER_HOST, 4242, 700)
    assert lease.is_stale(path)


@pytest.mark.parametrize("text", ["", "garbage\n", "host 12\n", "host x 1\n", "a b c d e\n"])
def test_an_unreadable_lease_is_stale(path, text):
    path.write_text(text)
    assert lease.read(path) is None and lease.is_stale(path)
    assert lease.holder(path) == "unreadable lease"
    assert Lease.acquire(path) is not None


def test_touch_release_and_a_lease_taken_over_meanwhile(path):
    mine = Lease.acquire(path)
    assert mine is not None
    old = time.time() - 300
    os.utime(path, (old, old))
    assert mine.touch() and time.time() - path.stat().st_mtime < 5  # the heartbeat is the mtime
    mine.release()
    assert not path.exists() and lease.holder(path) == "released"
    # stalled long enough to be taken over by another host: no longer ours to touch or release
    again = Lease.acquire(path)
    assert again is not None
    leave(path, OTHER_HOST, 4242, 0)
    assert not again.touch() and not again.held()
    again.release()
    assert getattr(lease.read(path), "host", None) == OTHER_HOST


def test_beating_refreshes_the_heartbeat_in_the_background(path):
    taken = Lease.acquire(path, stale_after=1.0)
    assert taken is not None
    with taken as mine:
        old = time.time() - 300
        os.utime(path, (old, old))
        with mine.beating(interval=0.05):
            deadline = time.time() + 5
            while time.time() - path.stat().st_mtime > 60 and time.time() < deadline:
                time.sleep(0.02)
        assert time.time() - path.stat().st_mtime < 60
    assert not path.exists()  # released by the with block


def test_current_job(monkeypatch, no_slurm):
    assert lease.current_job() is None
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    assert lease.current_job() == "123"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert lease.current_job() == "120_3"


def test_a_vanished_folder_is_reported_to_the_taker(tmp_path):
    with pytest.raises(FileNotFoundError):
        Lease.acquire(tmp_path / "gone" / "x.lease")


def test_holder_text_without_a_job_and_its_age_from_the_heartbeat():
    h = lease.Holder("node1", 77, 1000.0, None, 5000.0)
    assert h.who() == "host node1, pid 77"
    assert h.describe(now=5012.0) == "host node1, pid 77, 12 s ago"
    assert h.describe(now=5000.0) == "host node1, pid 77, 0 s ago"
    assert h.describe(now=4990.0) == "host node1, pid 77, 0 s ago"  # a clock behind the heartbeat's
    assert (
        lease.Holder("node1", 77, 1000.0, "9_1", 5000.0).describe(now=5003.0) == "host node1, pid 77, job 9_1, 3 s ago"
    )


def test_read_gives_every_field(path):
    path.write_text("node1 77 1234.5 99_3\n")
    os.utime(path, (2000.0, 2000.0))
    assert lease.read(path) == lease.Holder("node1", 77, 1234.5, "99_3", 2000.0)
    path.write_text("node1 77 1234\n")
    os.utime(path, (2000.0, 2000.0))
    assert lease.read(path) == lease.Holder("node1", 77, 1234.0, None, 2000.0)


def test_a_job_id_alone_when_the_array_task_is_missing(monkeypatch, no_slurm):
    monkeypatch.setenv("SLURM_JOB_ID", "500")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")  # no SLURM_ARRAY_TASK_ID: not an array task
    assert lease.current_job() == "500"
    monkeypatch.delenv("SLURM_JOB_ID")
    assert lease.current_job() == "120"  # SLURM sets both; the array's id is still a job


@pytest.mark.parametrize(
    "values,job,marker",
    [
        ({}, None, None),
        ({"SLURM_JOB_ID": "4250"}, "4250", "4250_0"),  # the teardown line's spelling: a plain job is task 0
        ({"SLURM_JOB_ID": "4245", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3"}, "4242_3", "4242_3"),
    ],
)
def test_one_job_identity_and_the_requeue_markers_name(monkeypatch, no_slurm, values, job, marker):
    from histokt.batch import slurm

    for name, value in values.items():
        monkeypatch.setenv(name, value)
    assert lease.current_job() == job and slurm.job_key() == marker


def test_one_per_job_takes_its_own_jobs_lease_from_another_host(path, monkeypatch, no_slurm):
    """A job requeued after its node failed finds the lease its earlier run left there (the only taker of its
    job): stale at once, where any other taker waits for the heartbeat to age."""
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    leave(path, OTHER_HOST, 4242, age_s=5, job="120_3")
    assert Lease.acquire(path) is None  # without the rule: a live holder
    assert lease.left_by_an_earlier_run(path)
    assert Lease.acquire(path, one_per_job=True) is not None
    assert getattr(lease.read(path), "job", None) == "120_3" and getattr(lease.read(path), "pid", None) == os.getpid()


@pytest.mark.parametrize(
    "host,job",
    [
        (OTHER_HOST, "120_4"),  # another task of the array
        (OTHER_HOST, None),  # a process outside SLURM
        ("this host", "120_3"),  # this job on this host, live: another step of it, judged by its pid
    ],
)
def test_one_per_job_leaves_other_holders_alone(path, monkeypatch, no_slurm, host, job):
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "120")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    leave(path, socket.gethostname() if host == "this host" else host, os.getppid(), age_s=5, job=job or "")
    assert not lease.left_by_an_earlier_run(path)
    assert Lease.acquire(path, one_per_job=True) is None


def test_alive_only_probes_with_signal_zero(monkeypatch):
    sent = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    assert lease.alive(4242) and sent == [(4242, 0)]

    def denied(pid, sig):
        raise PermissionError(pid)

    monkeypatch.setattr(os, "kill", denied)
    assert lease.alive(4242)  # another user's live process


def test_alive_leaves_a_live_process_running():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert lease.alive(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.3)
    finally:
        child.kill()
        child.wait()
    assert not lease.alive(child.pid)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="no /proc: zombies cannot be told apart")
def test_a_zombie_holder_is_dead(path):
    """A holder killed with its whole process group stays a zombie until its parent (or init) reaps it: dead."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: a zombie once it ends
    try:
        end = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.monotonic() < end
            time.sleep(0.02)
        leave(path, socket.gethostname(), child.pid, 0)
        assert not lease.alive(child.pid) and lease.is_stale(path) and Lease.acquire(path) is not None
    finally:
        child.wait()


def test_another_hosts_lease_exactly_stale_after_old_is_still_held(path, monkeypatch):
    leave(path, OTHER_HOST, 4242, 0)
    os.utime(path, (10_000.0, 10_000.0))
    monkeypatch.setattr(lease.time, "time", lambda: 10_060.0)
    assert not lease.is_stale(path, stale_after=60)
    monkeypatch.setattr(lease.time, "time", lambda: 10_060.5)
    assert lease.is_stale(path, stale_after=60)


def test_the_lease_keeps_its_stale_age(path):
    mine = Lease.acquire(path, stale_after=2.5)
    assert mine is not None and mine.stale_after == 2.5
    path.unlink()
    leave(path, OTHER_HOST, 4242, 90)
    mine = Lease.acquire(path, stale_after=60)  # taken over
    assert mine is not None and mine.stale_after == 60


def test_one_take_over_at_most(path, monkeypatch):
    """A stale lease that reappears (another taker won the race, and is stale too) is given up, not chased."""
    links = []
    real_link = os.link

    def racing_link(src, dst):
        links.append(dst)
        if len(links) <= 2:
            leave(Path(dst), OTHER_HOST, 4242, 9999)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    assert Lease.acquire(path) is None
    assert len(links) == 2
    assert sorted(p.name for p in path.parent.iterdir()) == []  # no temporary left behind


def test_a_stale_lease_removed_meanwhile_by_another_taker(path, monkeypatch):
    leave(path, OTHER_HOST, 4242, 9999)

    def judged_then_removed(p, stale_after):
        Path(p).unlink()  # another taker removes it between the judgement and the unlink
        return True

    monkeypatch.setattr(lease, "is_stale", judged_then_removed)
    mine = Lease.acquire(path)
    assert mine is not None and mine.held()


def test_the_folders_error_is_reported_alone(tmp_path):
    """Cleaning up the temporary that could not be written raises nothing of its own."""
    with pytest.raises(FileNotFoundError) as raised:
        Lease.acquire(tmp_path / "gone" / "x.lease")
    assert raised.value.__context__ is None


def test_a_released_lease_is_no_longer_held(path, monkeypatch):
    mine = Lease.acquire(path)
    assert mine is not None and mine.held()
    mine.release()
    assert not mine.held() and not mine.touch() and not path.exists()
    mine.release()  # twice: nothing to do
    again = Lease.acquire(path)
    assert again is not None

    def held_then_removed():
        path.unlink()  # removed by someone else between the check and the unlink
        return True

    monkeypatch.setattr(again, "held", held_then_removed)
    again.release()
    assert not path.exists()
