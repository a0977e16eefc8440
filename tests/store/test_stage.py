"""Node-local staging (histokt.store.stage), with real files and real processes: two processes staging one
dataset at once share one copy; a copier SIGKILLed mid-copy leaves nothing at the published name and the
next one cleans up after it; the copy goes with its last user, not before; staged reads equal the original;
a new fingerprint is a new copy, and a dataset replaced mid-copy is never published under its old key.

The processes synchronize on files (a copy blocked at a known point by ``stage.on_file_copied``), never on
sleeps: every wait below ends when a file appears, or fails after a generous timeout."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from histokt import lease
from histokt.errors import UserError
from histokt.store import stage
from histokt.store.schema import SPLITS, PatchReader
from tests.conftest import ROOT
from tests.fixtures.stores import write_v2_dataset

# A user of the staged copy in its own process: argv store, dest, sync folder, name, mode. mode "block": a
# copier blocks after its first shard file until SYNC/go exists; "hang": forever (to be killed); "free": no block.
# Inside the copy it writes SYNC/<name>.json (root, inode, digest of every patch), then waits for SYNC/leave.
CHILD = r"""
import hashlib, json, os, sys, time
from pathlib import Path
from histokt.store import stage
from histokt.store.schema import SPLITS, PatchReader

store, dest, sync, name, mode = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], sys.argv[5]

def wait_for(path):
    while not path.exists():
        time.sleep(0.01)

def hook(target):
    if target.parent.name != "images" or not target.name.startswith("c."):
        return  # block after the first shard file
    stage.on_file_copied = None
    (sync / "copying").write_text(name)
    wait_for(sync / ("never" if mode == "hang" else "go"))

if mode != "free":
    stage.on_file_copied = hook
with stage.staged(store, "toy", dest) as root:
    digest = hashlib.sha256()
    for split in SPLITS:
        r = PatchReader(root, "toy", split)
        for i in range(r.shape[0]):
            digest.update(r.read(i).tobytes())
    tmp = sync / f".{name}.json"
    tmp.write_text(json.dumps({"root": str(root), "inode": root.stat().st_ino, "digest": digest.hexdigest()}))
    os.rename(tmp, sync / f"{name}.json")
    wait_for(sync / "leave")
"""

TIMEOUT = 60.0


def make_store(path: Path, fingerprint: str = "a" * 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    splits = {
        split: (rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8), rng.integers(0, 2, n))
        for split, n in (("train", 10), ("valid", 3), ("test", 5))
    }
    write_v2_dataset(path, "toy", splits, 16, shard_size=4, fingerprint=fingerprint)
    return path


def digest(store: Path) -> str:
    h = hashlib.sha256()
    for split in SPLITS:
        r = PatchReader(store, "toy", split)
        for i in range(r.shape[0]):
            h.update(r.read(i).tobytes())
    return h.hexdigest()


def wait_for(predicate, what: str, procs=()) -> None:
    end = time.monotonic() + TIMEOUT
    while not predicate():
        for p in procs:
            if p.poll() is not None and p.returncode != 0:
                raise AssertionError(f"a user process failed while waiting for {what}: {p.stderr.read()}")
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def user(store: Path, dest: Path, sync: Path, name: str, mode: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-c", CHILD, str(store), str(dest), str(sync), name, mode]
    return subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)


def registered_pids(users: Path) -> set[int]:
    """Pids of the processes registered as users (a taker's temporary file holds its own pid too)."""
    pids = set()
    for path in users.glob("*") if users.is_dir() else []:
        holder = lease.read(path)
        if holder is not None:
            pids.add(holder.pid)
    return pids


@pytest.fixture
def setup(tmp_path):
    store = make_store(tmp_path / "store.zarr")
    sync = tmp_path / "sync"
    sync.mkdir()
    dest = tmp_path / "node-local"
    return store, dest, sync, dest / stage.STAGE_DIR, stage.stage_key(store, "toy")


def test_two_processes_staging_at_once_share_one_copy(setup):
    store, dest, sync, base, key = setup
    a, b = user(store, dest, sync, "a", "block"), user(store, dest, sync, "b", "block")
    procs = (a, b)
    try:
        # one of them copies and is blocked after its first file; both are registered users by now
        wait_for(lambda: (sync / "copying").exists(), "a copy to start", procs)
        wait_for(lambda: registered_pids(base / f"{key}.users") == {a.pid, b.pid}, "both users", procs)
        assert not (base / key).exists()  # nothing published until the copy is whole
        (sync / "go").touch()
        wait_for(lambda: (sync / "a.json").exists() and (sync / "b.json").exists(), "both to read", procs)
        seen = [json.loads((sync / f"{n}.json").read_text()) for n in "ab"]
        assert seen[0]["root"] == seen[1]["root"] == str(base / key)
        assert seen[0]["inode"] == seen[1]["inode"] == (base / key).stat().st_ino  # one copy, both in it
        assert seen[0]["digest"] == seen[1]["digest"] == digest(store)
        (sync / "leave").touch()
        errs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert [p.returncode for p in procs] == [0, 0], errs
    text = "".join(errs)
    assert text.count(f"histokt: staged toy to {base / key}: ") == 1, text  # copied once
    assert text.count(f"histokt: using the staged copy at {base / key}") == 1, text
    assert sorted(os.listdir(base)) == []  # the copy, its lease and its users' folder are gone


def test_a_copier_killed_mid_copy_leaves_nothing_visible_and_the_next_one_cleans_up(setup, capsys):
    store, dest, sync, base, key = setup
    a = user(store, dest, sync, "a", "hang")
    try:
        wait_for(lambda: (sync / "copying").exists(), "the copy to start", [a])
        a.send_signal(signal.SIGKILL)
        a.wait(timeout=TIMEOUT)
    finally:
        a.kill()
        a.wait()
    leftovers = [p.name for p in base.iterdir() if p.name.startswith(f".{key}.copy-")]
    assert len(leftovers) == 1 and any((base / leftovers[0]).rglob("c.*"))  # half a copy, hidden
    assert not (base / key).exists()
    assert lease.read(base / f"{key}.lease").pid == a.pid  # a dead holder's lease: stale, taken over below
    with stage.staged(store, "toy", dest) as root:
        assert root == base / key
        assert digest(root) == digest(store)
        assert not [p for p in base.iterdir() if p.name.startswith(".")]  # the dead copier's folder is gone
    assert f"histokt: staged toy to {root}: " in capsys.readouterr().err
    assert sorted(os.listdir(base)) == []  # the dead user's file went with the copy


def test_the_copy_goes_with_its_last_user_not_before(setup):
    store, dest, sync, base, key = setup
    a = user(store, dest, sync, "a", "free")
    try:
        wait_for(lambda: (sync / "a.json").exists(), "the other user to be inside", [a])
        with stage.staged(store, "toy", dest, verbose=False) as root:
            assert root.stat().st_ino == json.loads((sync / "a.json").read_text())["inode"]
        assert (base / key).is_dir() and digest(base / key) == digest(store)  # the other one still reads it
        (sync / "leave").touch()
        _, err = a.communicate(timeout=TIMEOUT)
    finally:
        a.kill()
        a.wait()
    assert a.returncode == 0, err
    assert not (base / key).exists() and sorted(os.listdir(base)) == []


def test_the_copy_of_killed_users_is_collected_by_the_next_copier(setup, capsys):
    store, dest, sync, base, key = setup
    a = user(store, dest, sync, "a", "free")
    try:
        wait_for(lambda: (sync / "a.json").exists(), "the user to be inside", [a])
        a.send_signal(signal.SIGKILL)  # killed while using the copy: nobody leaves it
        a.wait(timeout=TIMEOUT)
    finally:
        a.kill()
        a.wait()
    assert (base / key).is_dir()
    make_store(store, fingerprint="d" * 16, seed=3)  # standardized again: the old copy is of no use
    with stage.staged(store, "toy", dest) as root:
        assert root.name == stage.stage_key(store, "toy") != key
        assert sorted(os.listdir(base)) == [root.name, f"{root.name}.users"]  # the dead user's copy is gone
    assert capsys.readouterr().err.count("histokt: staged toy") == 1
    assert sorted(os.listdir(base)) == []


def test_a_new_fingerprint_is_a_new_copy(tmp_path):
    store = make_store(tmp_path / "store.zarr", fingerprint="a" * 16)
    dest = tmp_path / "node"
    with stage.staged(store, "toy", dest) as first:
        assert digest(first) == digest(store)
    make_store(store, fingerprint="b" * 16, seed=1)  # standardized again: other patches, other fingerprint
    with stage.staged(store, "toy", dest) as second:
        assert second != first and second.name.startswith("toy-" + "b" * 16 + "-")
        assert digest(second) == digest(store)
        assert not first.exists()


def test_a_dataset_replaced_mid_copy_is_not_published_under_its_old_key(tmp_path, monkeypatch, capsys):
    store = make_store(tmp_path / "store.zarr", fingerprint="a" * 16)
    dest = tmp_path / "node"
    old_key = stage.stage_key(store, "toy")

    def replace_dataset(target):
        monkeypatch.setattr(stage, "on_file_copied", None)
        make_store(store, fingerprint="c" * 16, seed=2)

    monkeypatch.setattr(stage, "on_file_copied", replace_dataset)
    with stage.staged(store, "toy", dest) as root:
        assert root.name == stage.stage_key(store, "toy") != old_key and "c" * 16 in root.name
        assert digest(root) == digest(store)
        assert not (dest / stage.STAGE_DIR / old_key).exists()
    assert capsys.readouterr().err.count("histokt: staged toy") == 1


def test_a_damaged_copy_is_made_again(tmp_path, capsys):
    store = make_store(tmp_path / "store.zarr")
    dest = tmp_path / "node"
    with stage.staged(store, "toy", dest) as root:
        (root / "toy" / "train" / "images" / "c.1.0.0.0").unlink()  # a tmp cleaner passed by
        with stage.staged(store, "toy", dest) as again:
            assert again == root and digest(again) == digest(store)
    assert capsys.readouterr().err.count("histokt: staged toy") == 2


def test_an_unwritable_folder_is_one_clear_line(tmp_path):
    store = make_store(tmp_path / "store.zarr")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"cannot stage datasets there .*--stage-to off") as info:
        enter_and_leave(store, "toy", blocker / "sub")
    assert "\n" not in str(info.value)


def test_a_full_disk_is_one_clear_line_and_leaves_nothing(tmp_path, monkeypatch):
    store = make_store(tmp_path / "store.zarr")
    dest = tmp_path / "node"
    base = dest / stage.STAGE_DIR
    real = stage._copy_file
    calls = []

    def fill_up(src, dst):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)

    monkeypatch.setattr(stage, "_copy_file", fill_up)
    with pytest.raises(UserError, match=r"no space left on the device \(ENOSPC\)"):
        enter_and_leave(store, "toy", dest)
    assert sorted(os.listdir(base)) == []  # no half copy, no lease, no user left behind

    monkeypatch.setattr(stage.shutil, "disk_usage", lambda path: _Usage(free=1000))  # 1 kB left
    with pytest.raises(UserError, match=r"not enough space to stage toy \(0\.0\d MB needed, 0\.00 MB free\)"):
        enter_and_leave(store, "toy", dest)
    assert sorted(os.listdir(base)) == []


def enter_and_leave(store, dataset, dest) -> None:
    with stage.staged(store, dataset, dest):
        pass


class _Usage:
    def __init__(self, free):
        self.free = free


def test_a_missing_dataset_names_the_source_store(tmp_path):
    store = make_store(tmp_path / "store.zarr")
    with pytest.raises(UserError, match=r"no dataset 'crc' \(datasets in this store: toy\)"):
        enter_and_leave(store, "crc", tmp_path / "node")
