"""histokt.lease: one owner per lease file, whole from the moment it exists, stale only when its holder is gone."""

import os
import socket
import subprocess
import sys
import time

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
