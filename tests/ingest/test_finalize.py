"""The finalize step: one process publishes a dataset; the lock of a dead local process, or an old lock of
another host, is taken over; the typed records write the JSON they always wrote."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
import zarr

import histokt.ingest.finalize as fin
from histokt import __version__, atomic, lease
from histokt.errors import UserError
from histokt.ingest.records import PartManifest, PatchRow, SourceRow, StandardizeResult, Worklist
from histokt.ingest.splits import patch_splits
from histokt.store.schema import FORMAT

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
    assert not lease.is_stale(lock, fin.LOCK_STALE_S)
    assert not lease.Lease.acquire(lock, stale_after=fin.LOCK_STALE_S)
    assert holder(lock) == [OTHER_HOST, "4242"]  # left as it was
    assert sorted(p.name for p in lock.parent.iterdir()) == ["finalize.lock"]


def test_lock_of_another_host_is_taken_over_once_older_than_the_stale_age(lock):
    write_lock(lock, OTHER_HOST, 4242, fin.LOCK_STALE_S + 60)
    assert lease.is_stale(lock, fin.LOCK_STALE_S)
    assert lease.Lease.acquire(lock, stale_after=fin.LOCK_STALE_S)
    assert holder(lock) == [socket.gethostname(), str(os.getpid())]


def test_another_hosts_lock_is_judged_by_age_alone_never_by_a_local_pid(lock):
    # a pid dead here may be alive there: a young lock of another host is kept ...
    write_lock(lock, OTHER_HOST, dead_pid(), 5)
    assert not lease.is_stale(lock, fin.LOCK_STALE_S) and not lease.Lease.acquire(lock, stale_after=fin.LOCK_STALE_S)
    # ... and a pid alive here says nothing about an old lock there
    write_lock(lock, OTHER_HOST, os.getpid(), fin.LOCK_STALE_S + 60)
    assert lease.is_stale(lock, fin.LOCK_STALE_S) and lease.Lease.acquire(lock, stale_after=fin.LOCK_STALE_S)


def test_local_lock_is_respected_while_its_process_lives_however_old(lock):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        write_lock(lock, socket.gethostname(), live.pid, fin.LOCK_STALE_S + 3600)
        assert not lease.is_stale(lock, fin.LOCK_STALE_S)
        assert not lease.Lease.acquire(lock, stale_after=fin.LOCK_STALE_S)
        assert holder(lock) == [socket.gethostname(), str(live.pid)]
    finally:
        live.kill()
        live.wait()


def test_local_lock_of_a_dead_process_is_taken_over_however_young(lock):
    write_lock(lock, socket.gethostname(), dead_pid(), 0)
    assert lease.is_stale(lock, fin.LOCK_STALE_S)
    assert lease.Lease.acquire(lock, stale_after=fin.LOCK_STALE_S)
    assert holder(lock) == [socket.gethostname(), str(os.getpid())]


@pytest.mark.parametrize("text", ["", "garbage\n", "host 12\n"])
def test_unreadable_lock_is_stale(lock, text):
    lock.write_text(text)
    assert lease.is_stale(lock, fin.LOCK_STALE_S)


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
    manifest = PartManifest([patch], [{"path": "b.png", "reason": "empty file"}], [(93, 272)], [0xDEADBEEF])
    doc = manifest.to_json()
    assert doc["content"] == [[93, 272]] and doc["crc32c"] == [0xDEADBEEF]
    assert PartManifest.from_json(doc) == manifest and manifest.complete and manifest.nbytes == 93 * 272 * 3
    # a manifest of histokt 0.1 (one chunk file per patch) reads as incomplete: its part is redone
    old = PartManifest.from_json({"patches": doc["patches"], "rejected": []})
    assert not old.complete


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


# -- publishing, in process ---------------------------------------------------------------------------------

P = 4  # patch size of the staged test datasets
PLAN = {"all": {"train": 0.5, "valid": 0.25, "test": 0.25}}


def settings(split_rule="grouped", **kw) -> dict:
    return {
        "patch_size": P,
        "stride": P,
        "split_rule": split_rule,
        "split_seed": 3,
        "split_plan": PLAN,
        "max_pixels": 1000,
        "strict": False,
        **kw,
    }


def write_part(staging, k, rows: list[PatchRow], content: list[np.ndarray], rejected=()) -> None:
    """Part k as standardize leaves it: its data file, then its manifest."""
    data = [np.ascontiguousarray(c).tobytes() for c in content]
    atomic.write_bytes(fin.part_file(staging, k), b"".join(data))
    shapes = [c.shape[:2] for c in content]
    manifest = PartManifest(rows, list(rejected), shapes, [google_crc32c.value(d) for d in data])
    atomic.write_json(fin.part_dir(staging, k).with_suffix(".json"), manifest.to_json())


def stage(tmp_path, parts, rejected=(), multi_label=False, split_rule="grouped", fingerprint="f1"):
    """A staging folder of finished parts: ``parts`` lists each part's patches as (source, label, split);
    patch j of part k is filled with 16 * k + j + 1 so it can be told apart after packing."""
    store, staging = tmp_path / "s.zarr", tmp_path / ".s.zarr.staging" / "d"
    store.mkdir()
    for k, rows in enumerate(parts):
        patches = [
            PatchRow(source, (j, k, j + P, k + P), label, "all", split) for j, (source, label, split) in enumerate(rows)
        ]
        content = [np.full((P, P, 3), 16 * k + j + 1, np.uint8) for j in range(len(rows))]
        write_part(staging, k, patches, content, rejected if k == 0 else ())
    sources = [SourceRow(f"img{i}.png", 0, "all", f"img{i}.png", None) for i in range(3)]
    classes = ["a", "b", "c"]
    parts_ = [(k, k + 1) for k in range(len(parts))]
    w = Worklist(fingerprint, settings(split_rule), classes, multi_label, "source image", ["w1"], sources, parts_)
    return store, staging, w


GROUPED = [
    [(0, 1, "train"), (0, 1, "train"), (1, 2, "valid")],
    [(2, 0, "test"), (2, 0, "train")],
]


def read_split(store, split):
    g = zarr.open_group(str(store / "d" / split), mode="r")
    return (
        [int(p[0, 0, 0]) for p in g["images"][...]],
        g["labels"][...].tolist(),
        g["source_id"][...].tolist(),
        g["box"][...].tolist(),
    )


def test_finalize_publishes_every_patch_in_its_split_and_removes_the_staging(tmp_path):
    bad = [{"path": "x.png", "reason": "empty file"}]
    store, staging, w = stage(tmp_path, GROUPED, rejected=bad)
    result = fin.finalize_locked(store, "d", staging, w)
    assert result == StandardizeResult("d", "written", counts={"train": 3, "valid": 1, "test": 1}, rejected=1)
    # staged order (part, then slot) is kept inside each split; pixels, labels, sources and boxes travel together
    assert read_split(store, "train") == ([1, 2, 18], [1, 1, 0], [0, 0, 2], [[0, 0, 4, 4], [1, 0, 5, 4], [1, 1, 5, 5]])
    assert read_split(store, "valid") == ([3], [2], [1], [[2, 0, 6, 4]])
    assert read_split(store, "test") == ([17], [0], [2], [[0, 1, 4, 5]])
    g = zarr.open_group(str(store / "d" / "train"), mode="r")
    assert g["images"].shape == (3, P, P, 3) and g["images"].dtype == np.uint8
    assert g["labels"].dtype == np.int64 and g["source_id"].dtype == np.int64 and g["box"].dtype == np.int64
    attrs = fin.dataset_attrs(store / "d")
    assert list(attrs) == [
        "patch_size", "stride", "split_rule", "split_seed", "split_plan", "format", "content_size", "shard_size",
        "classes", "multi_label",
        "group_rule", "counts", "rejected", "warnings", "fingerprint", "histokt_version",
    ]  # fmt: skip
    assert attrs == {
        **{k: v for k, v in settings().items() if k not in ("max_pixels", "strict")},
        "format": FORMAT,
        "content_size": [P, P],
        "shard_size": 512,
        "classes": ["a", "b", "c"],
        "multi_label": False,
        "group_rule": "source image",
        "counts": {"train": 3, "valid": 1, "test": 1},
        "rejected": bad,
        "warnings": ["w1"],
        "fingerprint": "f1",
        "histokt_version": __version__,
    }
    sources = zarr.open_group(str(store / "d"), mode="r")["sources"][...].tolist()
    assert sources == ["img0.png", "img1.png", "img2.png"]
    assert sorted(p.name for p in store.iterdir()) == ["d"]  # nothing but the dataset
    assert not staging.exists() and not staging.parent.exists()  # the last dataset removes the shared folder
    # a shard arriving now is told it is done, with the counts
    late = fin.finalize_locked(store, "d", staging, w)
    assert late == StandardizeResult("d", "done", counts={"train": 3, "valid": 1, "test": 1})


def test_multi_label_patches_keep_their_multi_hot_rows(tmp_path):
    parts = [[(0, (1, 0, 1), "train"), (1, (0, 1, 0), "test")], [(2, (0, 0, 1), "valid")]]
    store, staging, w = stage(tmp_path, parts, multi_label=True)
    fin.finalize_locked(store, "d", staging, w)
    g = zarr.open_group(str(store / "d" / "train"), mode="r")
    assert g["labels"].dtype == np.uint8 and g["labels"][...].tolist() == [[1, 0, 1]]
    assert zarr.open_group(str(store / "d" / "test"), mode="r")["labels"][...].tolist() == [[0, 1, 0]]
    assert zarr.open_group(str(store / "d" / "valid"), mode="r")["labels"][...].tolist() == [[0, 0, 1]]
    assert fin.dataset_attrs(store / "d")["multi_label"] is True


def test_patch_rule_cuts_the_staged_patches_by_histokts_seeded_rule(tmp_path):
    parts = [[(i % 3, 0, None) for i in range(5)], [(2, 0, None) for _ in range(3)]]
    store, staging, w = stage(tmp_path, parts, split_rule="patch")
    result = fin.finalize_locked(store, "d", staging, w)
    want = patch_splits(["all"] * 8, PLAN, 3)
    assert result.counts == {s: want.count(s) for s in ("train", "valid", "test")}
    assert result.counts == {"train": 4, "valid": 2, "test": 2}
    values = [1, 2, 3, 4, 5, 17, 18, 19]
    for split in ("train", "valid", "test"):
        assert read_split(store, split)[0] == [v for v, s in zip(values, want) if s == split]


def test_an_older_dataset_of_that_name_is_replaced_whole(tmp_path):
    store, staging, w = stage(tmp_path, GROUPED)
    old = store / "d"
    old.mkdir()
    (old / "zarr.json").write_text('{"attributes": {"fingerprint": "old"}}')
    (old / "stale-file").write_text("x")
    assert fin.finalize_locked(store, "d", staging, w).status == "written"
    assert fin.dataset_attrs(store / "d")["fingerprint"] == "f1"
    assert not (old / "stale-file").exists() and sorted(p.name for p in store.iterdir()) == ["d"]
    assert not staging.parent.exists()


def test_staging_of_another_dataset_is_left_in_place(tmp_path):
    store, staging, w = stage(tmp_path, GROUPED)
    other = staging.parent / "other"
    other.mkdir()
    fin.finalize_locked(store, "d", staging, w)
    assert not staging.exists() and other.is_dir()


class Crash(Exception):
    pass


def test_finalize_interrupted_after_moving_chunks_resumes_to_the_same_dataset(tmp_path, monkeypatch):
    store, staging, w = stage(tmp_path, GROUPED)
    real, calls = fin._write_meta, []

    def crash_on_valid(*args, **kw):
        calls.append(1)
        if len(calls) == 2:  # train's chunks and metadata are in place, valid's chunks moved
            raise Crash
        return real(*args, **kw)

    monkeypatch.setattr(fin, "_write_meta", crash_on_valid)
    with pytest.raises(Crash):
        fin.finalize_locked(store, "d", staging, w)
    assert not (staging / "finalize.lock").exists()  # released even though it failed
    assert not (store / "d").exists() and (staging / "final.ready").is_file() and (staging / "final").is_dir()
    monkeypatch.setattr(fin, "_write_meta", real)
    assert fin.finalize_locked(store, "d", staging, w).counts == {"train": 3, "valid": 1, "test": 1}
    assert read_split(store, "train")[0] == [1, 2, 18]
    assert read_split(store, "valid")[0] == [3] and read_split(store, "test")[0] == [17]


def test_a_missing_staged_patch_names_its_part_and_publishes_nothing(tmp_path):
    store, staging, w = stage(tmp_path, GROUPED)
    fin.part_file(staging, 1).unlink()
    with pytest.raises(fin.DamagedParts, match=r"p000001.bin: staged part is missing; delete .*p000001.json ") as e:
        fin.finalize_locked(store, "d", staging, w)
    assert e.value.parts == [1] and "1 parts to redo" in str(e.value)
    assert not (store / "d").exists() and not (staging / "finalize.lock").exists()
    assert fin.part_dir(staging, 1).with_suffix(".json").is_file()  # without redo, nothing is reset


def test_a_damaged_part_is_reset_and_redone_under_the_lock_then_published(tmp_path):
    store, staging, w = stage(tmp_path, GROUPED)
    fin.part_file(staging, 1).unlink()
    asked = []

    def redo(parts):
        asked.append(parts)
        manifest = fin.part_dir(staging, 1).with_suffix(".json")
        assert not manifest.exists() and (staging / "finalize.lock").exists()  # reset, and still ours
        rows = [PatchRow(2, (0, 1, 4, 5), 0, "all", "test"), PatchRow(2, (1, 1, 5, 5), 0, "all", "train")]
        write_part(staging, 1, rows, [np.full((P, P, 3), v, np.uint8) for v in (17, 99)])

    result = fin.finalize_locked(store, "d", staging, w, redo=redo)
    assert asked == [[1]] and result.counts == {"train": 3, "valid": 1, "test": 1}
    assert read_split(store, "train")[0] == [1, 2, 99] and read_split(store, "test")[0] == [17]


def test_a_part_missing_again_after_its_redo_is_an_error(tmp_path):
    store, staging, w = stage(tmp_path, GROUPED)
    fin.part_file(staging, 0).unlink()

    def redo_badly(parts):  # a manifest again, but no data file
        manifest = PartManifest([PatchRow(1, (2, 0, 6, 4), 2, "all", "valid")], [], [(P, P)], [0])
        atomic.write_json(fin.part_dir(staging, 0).with_suffix(".json"), manifest.to_json())

    with pytest.raises(
        UserError, match=r"p000000.bin: staged part is missing; it was redone once and is damaged again"
    ):
        fin.finalize_locked(store, "d", staging, w, redo=redo_badly)
    assert not (store / "d").exists() and not (staging / "finalize.lock").exists()


def test_a_part_without_its_manifest_leaves_the_dataset_partial(tmp_path):
    store, staging, w = stage(tmp_path, GROUPED)
    fin.part_dir(staging, 0).with_suffix(".json").unlink()
    fin.part_dir(staging, 1).with_suffix(".json").unlink()
    result = fin.finalize_locked(store, "d", staging, w)
    assert result == StandardizeResult("d", "partial", parts_missing=2)
    assert not (store / "d").exists() and not (staging / "final").exists()


def test_layout_is_rebuilt_until_marked_ready(tmp_path):
    out, ready = tmp_path / "final", tmp_path / "final.ready"
    out.mkdir()
    (out / "junk").write_text("x")
    fin._layout(out, ready, {"train": 2, "valid": 0, "test": 1}, (P, P - 1), 512)
    assert not (out / "junk").exists() and ready.is_file() and ready.read_bytes() == b""
    shapes = {s: zarr.open_array(str(out / s / "images"), mode="r").shape for s in ("train", "valid", "test")}
    assert shapes == {"train": (2, P, P - 1, 3), "valid": (0, P, P - 1, 3), "test": (1, P, P - 1, 3)}
    (out / "junk").write_text("x")  # once ready, nothing is rebuilt (shards may already be packed)
    fin._layout(out, ready, {"train": 1, "valid": 0, "test": 0}, (P, P), 512)
    assert (out / "junk").exists()
    assert zarr.open_array(str(out / "train" / "images"), mode="r").shape == (2, P, P - 1, 3)


def test_dataset_attrs(tmp_path):
    assert fin.dataset_attrs(tmp_path / "none") is None
    (tmp_path / "zarr.json").write_text('{"zarr_format": 3}')
    assert fin.dataset_attrs(tmp_path) == {}
    (tmp_path / "zarr.json").write_text('{"attributes": {"counts": {"train": 1}}}')
    assert fin.dataset_attrs(tmp_path) == {"counts": {"train": 1}}


def test_a_finished_dataset_of_another_fingerprint_does_not_count_as_done(tmp_path):
    store, staging, w = stage(tmp_path, GROUPED, fingerprint="new")
    (store / "d").mkdir()
    (store / "d" / "zarr.json").write_text('{"attributes": {"fingerprint": "old", "counts": {"train": 1}}}')
    write_lock(staging / "finalize.lock", OTHER_HOST, 4242, 1)
    result = fin.finalize_locked(store, "d", staging, w)
    assert result.status == "finalizing elsewhere" and result.lock.split()[:2] == [OTHER_HOST, "4242"]
    (store / "d" / "zarr.json").write_text('{"attributes": {"fingerprint": "new", "counts": {"train": 1}}}')
    assert fin.finalize_locked(store, "d", staging, w) == StandardizeResult("d", "done", counts={"train": 1})


def test_lock_text_names_this_host_and_process_and_no_temporary_remains(lock, monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):  # outside a job: no 4th word
        monkeypatch.delenv(var, raising=False)
    before = time.time()
    assert lease.Lease.acquire(lock, stale_after=fin.LOCK_STALE_S)
    host, pid, when = lock.read_text().split()
    assert (host, int(pid)) == (socket.gethostname(), os.getpid()) and abs(int(when) - before) <= 2
    assert lock.read_text().endswith("\n")
    assert sorted(p.name for p in lock.parent.iterdir()) == ["finalize.lock"]
    assert not lease.Lease.acquire(lock, stale_after=fin.LOCK_STALE_S)
    assert sorted(p.name for p in lock.parent.iterdir()) == ["finalize.lock"]


def test_a_stale_lock_that_cannot_be_replaced_is_given_up(lock, monkeypatch):
    # a lock judged stale but re-created by another taker each time: two tries, then no lock
    write_lock(lock, OTHER_HOST, 4242, fin.LOCK_STALE_S + 60)
    monkeypatch.setattr(lease, "is_stale", lambda path, stale_after: True)
    real_link, links = os.link, []

    def racing_link(src, dst):
        links.append(dst)
        if not Path(dst).exists():
            write_lock(Path(dst), OTHER_HOST, 4343, 0)
        return real_link(src, dst)

    monkeypatch.setattr(lease.os, "link", racing_link)
    assert not lease.Lease.acquire(lock, stale_after=fin.LOCK_STALE_S)
    assert len(links) == 2  # the first try and one retry, no more


def test_alive(monkeypatch):
    assert lease.alive(os.getpid())
    assert not lease.alive(dead_pid())

    def denied(pid, sig):
        raise PermissionError

    monkeypatch.setattr(lease.os, "kill", denied)
    assert lease.alive(1)  # another user's live process


def test_stale_age_is_measured_from_the_lock_files_mtime(lock):
    # the time written in the lock is informative only: a lock rewritten recently by its holder is not stale
    write_lock(lock, OTHER_HOST, 4242, fin.LOCK_STALE_S + 3600)
    now = time.time()
    os.utime(lock, (now, now))
    assert not lease.is_stale(lock, fin.LOCK_STALE_S)
    assert fin.LOCK_STALE_S == 600


def test_staging_layout_is_pinned():
    # an interrupted run is resumed by a later version: it must find the parts where they were staged
    assert fin.part_dir(Path("st"), 7) == Path("st/parts/p000007")


def test_a_leftover_of_an_interrupted_replacement_does_not_block_the_next(tmp_path):
    store, staging, w = stage(tmp_path, GROUPED)
    (store / "d").mkdir()
    (store / "d" / "zarr.json").write_text('{"attributes": {"fingerprint": "old"}}')
    (staging / "replaced" / "sub").mkdir(parents=True)  # a dataset moved aside by a run killed before cleanup
    (staging / "replaced" / "sub" / "x").write_text("x")
    assert fin.finalize_locked(store, "d", staging, w).status == "written"
    assert fin.dataset_attrs(store / "d")["fingerprint"] == "f1" and not staging.exists()


def test_an_empty_split_has_typed_empty_arrays(tmp_path):
    store, staging, w = stage(tmp_path, [[(0, 1, "train")], [(2, 0, "test")]])
    assert fin.finalize_locked(store, "d", staging, w).counts == {"train": 1, "valid": 0, "test": 1}
    g = zarr.open_group(str(store / "d" / "valid"), mode="r")
    assert g["images"].shape == (0, P, P, 3)
    assert (g["labels"].shape, g["labels"].dtype) == ((0,), np.int64)
    assert (g["source_id"].shape, g["source_id"].dtype) == ((0,), np.int64)
    assert (g["box"].shape, g["box"].dtype) == ((0, 4), np.int64)


def test_finalize_takes_over_a_lock_older_than_its_stale_age(tmp_path, monkeypatch):
    store, staging, w = stage(tmp_path, GROUPED)
    write_lock(staging / "finalize.lock", OTHER_HOST, 4242, 60)
    monkeypatch.setattr(fin, "LOCK_STALE_S", 30)  # finalize judges the lock by its own stale age
    assert fin.finalize_locked(store, "d", staging, w).status == "written"
