"""Standardize on a real cluster: the same command started twice, writers that died, a full disk, damage.

Real processes on real stores where it matters; every scenario ends in a store byte-identical to an
undisturbed run, with no manual step and no traceback."""

import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import zarr

import histokt.ingest.finalize as fin
import histokt.ingest.standardize as st
from histokt.errors import UserError
from histokt.ingest.records import StandardizeResult
from histokt.ingest.standardize import standardize
from histokt.store.schema import PatchReader, StoreDamaged, staging_dir
from histokt.store.shards import shard_path
from tests.conftest import histokt_cmd
from tests.fixtures.stores import assert_same_store, folder_dataset
from tests.fixtures.stores import folder_config as cfg

FULL_DISK_LINE = (
    r"^histokt standardize: error: .+: no space left on the device \(ENOSPC\); free space or raise the "
    r"quota, then run the same command again: it resumes\n$"
)


def cli(raw, store, *extra):
    return histokt_cmd(
        "standardize", "--dataset", "folder", "--raw", raw, "--store", store, "--mpp", "1",
        "--patches-per-file", "4", *extra,
    )  # fmt: skip


@pytest.fixture
def live_pid():
    """A live process of this host other than the test's: the holder of leases left by hand."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def leave_lease(path, pid: int, host: str | None = None, age_s: float = 0) -> None:
    then = time.time() - age_s
    path.write_text(f"{host or socket.gethostname()} {pid} {then:.0f} 555_1\n")
    os.utime(path, (then, then))


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr and "Error:" not in stderr, stderr


# -- the same command twice at once -------------------------------------------------------------------------


def test_the_same_standardize_started_twice_at_once(tmp_path, cli_env):
    raw = folder_dataset(tmp_path, per_class=10, size=600)  # 30 sources -> 30 parts of one source
    ref = tmp_path / "ref.zarr"
    standardize(cfg(raw, ref))
    store = tmp_path / "twice.zarr"
    args = cli(raw, store, "--no-progress")
    procs = [
        subprocess.Popen(args, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    for (_, err), code in zip(outs, codes):
        no_traceback(err)
        assert code in (0, 3), err  # 3: everything left to it was being written by the other one
        if code == 3:
            assert "parts are being written by host" in err and err.count("\n") == 1
    assert 0 in codes
    again = subprocess.run(args, env=cli_env, capture_output=True, text=True)  # and once more: a no-op
    assert again.returncode == 0 and "already complete" in again.stdout, again.stderr
    no_traceback(again.stderr)
    assert_same_store(store, ref)
    assert not staging_dir(store, "folder").exists()


def test_a_part_held_by_a_live_process_is_skipped_and_reported(tmp_path, raw, reference, live_pid, cli_env):
    store = tmp_path / "held.zarr"
    _, worklist = st.make_worklist(cfg(raw, store))
    staging = staging_dir(store, "folder")
    (staging / "parts").mkdir(parents=True)
    lease = fin.part_dir(staging, 1).with_suffix(".lease")
    leave_lease(lease, live_pid)
    r = standardize(cfg(raw, store))
    assert r.status == "partial" and r.parts_missing == 1 and r.parts_held == 1
    assert r.held_by is not None and r.held_by[0].startswith(f"host {socket.gethostname()}, pid {live_pid}, job 555_1")
    assert not (store / "folder").exists() and not fin.part_dir(staging, 1).exists()
    # the run that can do nothing at all says so on one line and exits 3 (EXIT_BUSY), without a traceback
    for k in range(len(worklist.parts)):
        leave_lease(fin.part_dir(staging, k).with_suffix(".lease"), live_pid)
    busy = subprocess.run(cli(raw, store), capture_output=True, text=True, env=cli_env)
    assert busy.returncode == 3 and busy.stderr.count("\n") == 1 and "1 parts are being written by host" in busy.stderr
    assert "job 555_1" in busy.stderr and "run the same command again after it ends" in busy.stderr
    # the holder died: its part is redone by the next run, which publishes
    leave_lease(lease, 999_999_999)
    assert standardize(cfg(raw, store)).status == "written"
    assert_same_store(store, reference)


def test_a_dead_writers_part_is_redone_from_scratch(tmp_path, raw, reference):
    store = tmp_path / "dead.zarr"
    assert standardize(cfg(raw, store, shard="0/2")).status == "partial"
    staging = staging_dir(store, "folder")
    part = fin.part_dir(staging, 1)  # shard 1's part, left half-written by a writer that died
    part.with_suffix(".bin").write_bytes(b"half")  # a stale data file (no manifest), and its temporary
    half = part.parent / f".{part.name}.bin.x1y2.tmp"
    half.write_bytes(b"half")
    leave_lease(part.with_suffix(".lease"), 999_999_999)
    other_host = fin.part_dir(staging, 3).with_suffix(".lease")  # another host's writer, silent for 20 min
    leave_lease(other_host, 4242, host="another-node.cluster.example", age_s=1200)
    assert standardize(cfg(raw, store, shard="1/2")).status == "written"
    assert_same_store(store, reference)
    assert not half.exists() and not staging.exists()


# -- finalize after damage ----------------------------------------------------------------------------------


class Crash(Exception):
    pass


def test_finalize_redoes_a_part_whose_staged_data_vanished(tmp_path, raw, reference, monkeypatch):
    """A finalize killed after packing some shards, and a part's data file lost meanwhile (a purge, or two
    writers of an older version): the next run redoes that part by itself and publishes."""
    store = tmp_path / "damaged.zarr"
    real, calls = fin.pack_shard, []

    def crash_at_third(job):
        calls.append(1)
        if len(calls) == 3:
            raise Crash
        return real(job)

    monkeypatch.setattr(fin, "pack_shard", crash_at_third)
    with pytest.raises(Crash):
        standardize(cfg(raw, store))
    monkeypatch.setattr(fin, "pack_shard", real)
    staging = staging_dir(store, "folder")
    packed = sorted((staging / "final").glob("*/images/c.*"))
    assert len(packed) == 2  # the shards packed before the crash stay: they are whole
    lost = sorted((staging / "parts").glob("p*.bin"))[-1]
    lost.unlink()
    r = standardize(cfg(raw, store))
    assert r.status == "written"
    assert_same_store(store, reference)
    assert not staging.exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped"])
def test_finalize_without_redo_names_the_part_to_delete(tmp_path, raw, reference, monkeypatch, damage):
    store = tmp_path / "s.zarr"
    monkeypatch.setattr(st, "finalize_locked", lambda *a, **kw: StandardizeResult("folder", "partial"))
    standardize(cfg(raw, store))
    monkeypatch.undo()
    staging = staging_dir(store, "folder")
    data = fin.part_file(staging, 2)
    blob = data.read_bytes()
    problem = {
        "missing": "staged part is missing",
        "truncated": f"staged part has {len(blob) - 1} bytes, expected {len(blob)}",
        "flipped": "staged patch at byte 0 is damaged",
    }[damage]
    if damage == "missing":
        data.unlink()
    elif damage == "truncated":
        data.write_bytes(blob[:-1])
    else:
        data.write_bytes(bytes([blob[0] ^ 1]) + blob[1:])
    _, worklist = st.make_worklist(cfg(raw, store))
    with pytest.raises(fin.DamagedParts, match=rf"p000002.bin: {problem}.*; delete .*p000002.json") as caught:
        fin.finalize_locked(store, "folder", staging, worklist)
    assert caught.value.parts == [2]
    assert not (store / "folder").exists()
    assert standardize(cfg(raw, store)).status == "written"  # standardize redoes it by itself
    assert_same_store(store, reference)


# -- a full disk --------------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmpfs):
    """A 3 MiB tmpfs; (folder, grow) where grow() remounts it at 64 MiB."""
    return tmpfs.mount(3), lambda: tmpfs.grow(64)


def test_a_full_disk_ends_in_one_clear_line_and_the_same_command_resumes(small_disk, raw, reference, cli_env):
    where, grow = small_disk
    store = where / "s.zarr"  # its staging folder is a sibling: on the small disk too
    args = cli(raw, store, "--workers", "2", "--no-progress")
    full = subprocess.run(args, env=cli_env, capture_output=True, text=True)
    assert full.returncode == 2, full.stderr
    assert re.match(FULL_DISK_LINE, full.stderr), full.stderr
    assert str(where) in full.stderr
    assert not (store / "folder").exists()
    grow()
    again = subprocess.run(args, env=cli_env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    no_traceback(again.stderr)
    assert_same_store(store, reference)


@pytest.mark.parametrize("code,name", [(errno.ENOSPC, "ENOSPC"), (errno.EDQUOT, "EDQUOT")])
def test_a_full_disk_while_publishing_resumes(tmp_path, raw, reference, monkeypatch, code, name):
    store = tmp_path / "pub.zarr"
    real = fin._write_root

    def full(*args, **kw):
        raise OSError(code, os.strerror(code))  # as a failed write() raises it: no file named

    monkeypatch.setattr(fin, "_write_root", full)
    with pytest.raises(
        UserError, match=rf"^{re.escape(str(store))}: .*\({name}\); free space or raise the quota, then"
    ):
        standardize(cfg(raw, store))
    assert not (staging_dir(store, "folder") / "finalize.lock").exists()
    monkeypatch.setattr(fin, "_write_root", real)
    assert standardize(cfg(raw, store)).status == "written"
    assert_same_store(store, reference)


def test_a_full_disk_in_a_part_names_the_file(tmp_path, raw, reference, monkeypatch):
    store = tmp_path / "part.zarr"
    real, calls = st._tiles, []

    def full(task, source):  # the third source's patches meet a full quota as they are written
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.EDQUOT, "Disk quota exceeded", str(task.base.with_suffix(".bin")))
        return real(task, source)

    monkeypatch.setattr(st, "_tiles", full)
    with pytest.raises(UserError, match=r"p000002.bin: disk quota exceeded \(EDQUOT\); free space"):
        standardize(cfg(raw, store))
    monkeypatch.setattr(st, "_tiles", real)
    assert not list(staging_dir(store, "folder").glob("parts/.*.tmp"))  # no temporary left behind
    assert standardize(cfg(raw, store)).status == "written"
    assert_same_store(store, reference)


# -- bad input and damage -----------------------------------------------------------------------------------


@pytest.mark.parametrize("under", [False, True])
def test_a_store_path_that_is_a_file(tmp_path, raw, cli_env, under):
    afile = tmp_path / "store.zarr"
    afile.write_text("not a store")
    store = afile / "x.zarr" if under else afile
    r = subprocess.run(cli(raw, store), env=cli_env, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    no_traceback(r.stderr)
    assert r.stderr.startswith(f"histokt standardize: error: --store {store}: {afile} is a file, not a folder")


def test_a_damaged_dataset_is_named_by_the_reader_and_rebuilt_by_overwrite(tmp_path, raw, reference):
    store = tmp_path / "hurt.zarr"
    shutil.copytree(reference, store)
    n = zarr.open_group(str(store / "folder"), mode="r").attrs["counts"]["train"]
    assert n >= 6
    shard_path(store / "folder" / "train" / "images", 1).unlink()
    reader = PatchReader(store, "folder", "train")
    reader.read(0)  # the other shards read on
    with pytest.raises(
        StoreDamaged,
        match=r"^dataset 'folder', split train, patch 5: .*/train/images/c.1.0.0.0: the shard file is missing; "
        r"the store is damaged: list the damage with 'histokt verify .*hurt.zarr --dataset folder', and "
        r"re-create .* 'histokt standardize --dataset folder --raw RAW --store .*hurt.zarr --name folder --repair'",
    ):
        reader.read(5)
    assert standardize(cfg(raw, store)).status == "done"  # a plain re-run trusts a finished dataset
    r = standardize(cfg(raw, store, overwrite=True))  # a damaged dataset is rebuilt by --overwrite
    assert r.status == "written"
    assert_same_store(store, reference)
    assert standardize(cfg(raw, store, overwrite=True)).status == "done"  # intact: nothing to redo
