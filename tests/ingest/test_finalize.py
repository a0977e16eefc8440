"""The finalize step: one process publishes a dataset; the lock of a dead local process, or an old lock of
another host, is taken over; the typed records write the JSON they always wrote."""

import os
import socket
import subprocess
import sys
import time

import pytest

import histokt.ingest.finalize as fin
from histokt.ingest.records import PartManifest, PatchRow, SourceRow, StandardizeResult, Worklist

OTHER_HOST = "another-node.cluster.example"


def write_lock(lock, host: str, pid: int, age_s: float) -> None:
    """A lock as another process would have left it, last touched ``age_s`` seconds ago."""
    then = time.time() - age_s
    lock.write_text(f"{host} {pid} {then:.0f}\n")
    os.utime(lock, (then, then))


def holder(lock) -> list[str]:
    return lock.read_text().split()[:2]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def lock(tmp_path):
    return tmp_path / "finalize.lock"


def test_lock_of_another_host_is_respected_while_younger_than_the_stale_age(lock):
    write_lock(lock, OTHER_HOST, 4242, fin.LOCK_STALE_S - 60)
    assert not fin._stale(lock)
    assert not fin._acquire(lock)
    assert holder(lock) == [OTHER_HOST, "4242"]  # left as it was
    assert sorted(p.name for p in lock.parent.iterdir()) == ["finalize.lock"]


def test_lock_of_another_host_is_taken_over_once_older_than_the_stale_age(lock):
    write_lock(lock, OTHER_HOST, 4242, fin.LOCK_STALE_S + 60)
    assert fin._stale(lock)
    assert fin._acquire(lock)
    assert holder(lock) == [socket.gethostname(), str(os.getpid())]


def test_another_hosts_lock_is_judged_by_age_alone_never_by_a_local_pid(lock):
    # a pid dead here may be alive there: a young lock of another host is kept ...
    write_lock(lock, OTHER_HOST, dead_pid(), 5)
    assert not fin._stale(lock) and not fin._acquire(lock)
    # ... and a pid alive here says nothing about an old lock there
    write_lock(lock, OTHER_HOST, os.getpid(), fin.LOCK_STALE_S + 60)
    assert fin._stale(lock) and fin._acquire(lock)


def test_local_lock_is_respected_while_its_process_lives_however_old(lock):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(lock, socket.gethostname(), live.pid, fin.LOCK_STALE_S + 3600)
        assert not fin._stale(lock)
        assert not fin._acquire(lock)
        assert holder(lock) == [socket.gethostname(), str(live.pid)]
    finally:
        live.kill()
        live.wait()


def test_local_lock_of_a_dead_process_is_taken_over_however_young(lock):
    write_lock(lock, socket.gethostname(), dead_pid(), 0)
    assert fin._stale(lock)
    assert fin._acquire(lock)
    assert holder(lock) == [socket.gethostname(), str(os.getpid())]


@pytest.mark.parametrize("text", ["", "garbage\n", "host 12\n"])
def test_unreadable_lock_is_stale(lock, text):
    lock.write_text(text)
    assert fin._stale(lock)


def worklist(fingerprint="f00d") -> Worklist:
    return Worklist(fingerprint, {}, ["a"], False, "source image", [], [], [])


def test_a_held_lock_reports_its_holder_and_publishes_nothing(tmp_path):
    store, staging = tmp_path / "s.zarr", tmp_path / "s.zarr" / ".staging" / "d"
    staging.mkdir(parents=True)
    write_lock(staging / "finalize.lock", OTHER_HOST, 4242, 1)
    result = fin.finalize_locked(store, "d", staging, worklist())
    assert result.status == "finalizing elsewhere" and result.lock is not None
    assert result.lock.split()[:2] == [OTHER_HOST, "4242"]
    assert result.to_json() == {"dataset": "d", "status": "finalizing elsewhere", "lock": result.lock}
    assert not (store / "d").exists() and (staging / "finalize.lock").exists()


def test_a_vanished_staging_folder_reports_the_lock_released(tmp_path):
    result = fin.finalize_locked(tmp_path, "d", tmp_path / "gone", worklist())
    assert result.to_json() == {"dataset": "d", "status": "finalizing elsewhere", "lock": "released"}


# -- the records' JSON --------------------------------------------------------------------------------------


def test_result_json_is_the_dict_each_status_returned_before():
    counts = {"train": 8, "valid": 1, "test": 1}
    assert StandardizeResult("d", "written", counts=counts, rejected=0).to_json() == {
        "dataset": "d",
        "status": "written",
        "counts": counts,
        "rejected": 0,  # zero rejected is still reported
    }
    assert StandardizeResult("d", "done", counts=counts).to_json() == {
        "dataset": "d",
        "status": "done",
        "counts": counts,
    }
    assert StandardizeResult("d", "partial", parts_missing=3).to_json() == {
        "dataset": "d",
        "status": "partial",
        "parts_missing": 3,
    }


def test_rows_are_written_as_the_positional_lists_of_the_staging_format():
    source = SourceRow("a/x.png", (0, 1, 1), "all", "a/x.png", "train")
    assert source.to_json() == ["a/x.png", [0, 1, 1], "all", "a/x.png", "train"]
    assert SourceRow.from_json(source.to_json()) == source
    patch = PatchRow(7, (0, 204, 272, 476), 2, "all", None)
    assert patch.to_json() == [7, 0, 204, 272, 476, 2, "all", None]
    assert PatchRow.from_json(patch.to_json()) == patch
    manifest = PartManifest([patch], [{"path": "b.png", "reason": "empty file"}])
    assert PartManifest.from_json(manifest.to_json()) == manifest


def test_worklist_json_round_trips():
    w = Worklist(
        "abc",
        {"stride": 204},
        ["a", "b"],
        True,
        "patient",
        ["w"],
        [SourceRow("x", (1, 0), "all", "g", None)],
        [(0, 1)],
    )
    doc = w.to_json()
    assert doc["sources"] == [["x", [1, 0], "all", "g", None]] and doc["parts"] == [[0, 1]]
    assert Worklist.from_json(doc) == w
