"""Publishing a standardized dataset: the finished parts become one dataset in the store.

One process publishes a dataset: every shard that finds all parts done may try, and two publishing at
once would rename the same chunk files. A lock file decides. It appears whole, by a hard link of a file
already holding its owner ("host pid time"), so no process ever reads an empty lock and mistakes it for
a stale one. A stale lock is taken over: that of a dead process of this host, or, since the processes of
another host cannot be checked, one of another host older than LOCK_STALE_S.

Publishing resumes after a kill: chunk folders are renamed (not copied) into the split arrays, and the
dataset appears in the store by one final rename.
"""

import contextlib
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zarr

from histokt import __version__, atomic
from histokt.errors import UserError
from histokt.ingest.records import PartManifest, PatchRow, StandardizeResult, Worklist
from histokt.ingest.splits import patch_splits
from histokt.store.schema import FORMAT, SPLITS, chunk_dir, patch_array, small_array, string_array

LOCK_STALE_S = 600  # a finalize lock of another host untouched this long belongs to a dead process


class Staged(NamedTuple):
    """A kept patch where it waits: chunk ``slot`` of part ``part``'s staging array."""

    part: int
    slot: int
    row: PatchRow


def part_dir(staging: Path, k: int) -> Path:
    """Part k's staging array; its manifest is ``part_dir(...).with_suffix(".json")``."""
    return staging / "parts" / f"p{k:06d}"


def dataset_attrs(path: Path) -> dict | None:
    """The attrs of a finished dataset, or None where there is none."""
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {})
    except FileNotFoundError:
        return None


def remove_staging(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):  # the last dataset of this store to finish removes the shared folder
        staging.parent.rmdir()


# -- the lock -----------------------------------------------------------------------------------------------


def finalize_locked(store: Path, name: str, staging: Path, worklist: Worklist) -> StandardizeResult:
    """Publish the dataset if this process gets the lock; else report who has it (or that it is done)."""
    lock = staging / "finalize.lock"
    try:
        acquired = _acquire(lock)
    except FileNotFoundError:  # another shard finalized and removed the staging folder meanwhile
        acquired = False
    if not acquired:
        return _finalized_elsewhere(store, name, lock, worklist.fingerprint)
    try:
        return _finalize(store, name, staging, worklist)
    finally:
        lock.unlink(missing_ok=True)


def _finalized_elsewhere(store: Path, name: str, lock: Path, fingerprint: str) -> StandardizeResult:
    done = dataset_attrs(store / name)
    if done is not None and done.get("fingerprint") == fingerprint:
        return StandardizeResult(name, "done", counts=done["counts"])
    try:
        holder = lock.read_text().strip()
    except FileNotFoundError:
        holder = "released"
    return StandardizeResult(name, "finalizing elsewhere", lock=holder)


def _acquire(lock: Path) -> bool:
    """An exclusive finalize lock; a stale one (see the module docstring) is taken over."""
    me = f"{socket.gethostname()} {os.getpid()} {time.time():.0f}"
    mine = lock.with_name(f"{lock.name}.{socket.gethostname()}.{os.getpid()}")
    mine.write_text(me + "\n")
    try:
        for _ in range(2):
            try:
                os.link(mine, lock)
            except FileExistsError:
                if _stale(lock):
                    lock.unlink(missing_ok=True)
                    continue
                return False
            return True
        return False
    finally:
        mine.unlink(missing_ok=True)


def _stale(lock: Path) -> bool:
    try:
        host, pid, _ = lock.read_text().split()
        age = time.time() - lock.stat().st_mtime
    except (FileNotFoundError, ValueError):
        return True
    if host == socket.gethostname():
        return not _alive(int(pid))
    return age > LOCK_STALE_S


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# -- publishing ---------------------------------------------------------------------------------------------


def _finalize(store: Path, name: str, staging: Path, worklist: Worklist) -> StandardizeResult:
    manifests = [_manifest(staging, k) for k in range(len(worklist.parts))]
    staged = [Staged(k, j, row) for k, m in enumerate(manifests) for j, row in enumerate(m.patches)]
    splits = _splits(staged, worklist.settings)
    out = staging / "final"
    _layout(out, staging / "final.ready", splits, worklist.settings["patch_size"])
    counts = {}
    for split in SPLITS:
        mine = [s for s, sp in zip(staged, splits) if sp == split]
        counts[split] = len(mine)
        _move_chunks(staging, out / split / "images", mine)
        _write_meta(zarr.open_group(str(out / split), mode="a"), mine, worklist.multi_label, len(worklist.classes))
    rejected = [r for m in manifests for r in m.rejected]
    _write_root(out, worklist, counts, rejected)
    _swap_in(store, name, out, staging)
    return StandardizeResult(name, "written", counts=counts, rejected=len(rejected))


def _manifest(staging: Path, k: int) -> PartManifest:
    return PartManifest.from_json(atomic.read_json(part_dir(staging, k).with_suffix(".json")))


def _splits(staged: list[Staged], settings: dict) -> list[str | None]:
    """Each patch's split: its source's (grouped rule), or HistoKT's patch-level cut (patch rule)."""
    if settings["split_rule"] == "patch":
        partitions = [s.row.partition for s in staged]
        return list(patch_splits(partitions, settings["split_plan"], settings["split_seed"]))
    return [s.row.split for s in staged]


def _layout(out: Path, ready: Path, splits: list[str | None], patch_size: int) -> None:
    """The empty split arrays, (re)built from scratch until ``ready`` marks them complete: no chunk has
    moved into them before that."""
    if ready.is_file():
        return
    shutil.rmtree(out, ignore_errors=True)
    root = zarr.open_group(str(out), mode="w", zarr_format=3)
    for split in SPLITS:
        root.create_group(split)
        patch_array(out / split / "images", splits.count(split), patch_size)
    atomic.write_bytes(ready, b"")


def _move_chunks(staging: Path, images: Path, staged: list[Staged]) -> None:
    """Rename each patch's chunk folder into place: one rename per patch, no copy. Idempotent, so an
    interrupted finalize resumes: a folder already moved is found at its destination."""
    (images / "c").mkdir(exist_ok=True)
    for index, s in enumerate(staged):
        src = chunk_dir(part_dir(staging, s.part), s.slot)
        dst = chunk_dir(images, index)
        if src.exists():
            os.rename(src, dst)
        elif not dst.exists():
            raise UserError(f"{src}: staged patch is missing; delete {staging} and run again")


def _write_meta(group: zarr.Group, staged: list[Staged], multi_label: bool, n_classes: int) -> None:
    n = len(staged)
    labels = [s.row.label for s in staged]
    lab: np.ndarray
    if multi_label:
        lab = np.array(labels, dtype=np.uint8).reshape(n, n_classes)
    else:
        lab = np.array(labels, dtype=np.int64).reshape(n)
    small_array(group, "labels", lab)
    small_array(group, "source_id", np.array([s.row.source for s in staged], dtype=np.int64).reshape(n))
    small_array(group, "box", np.array([s.row.box for s in staged], dtype=np.int64).reshape(n, 4))


def _write_root(out: Path, worklist: Worklist, counts: dict[str, int], rejected: list[dict[str, str]]) -> None:
    """The dataset's source list and attrs (the keys and their order are the store format)."""
    root = zarr.open_group(str(out), mode="a")
    string_array(root, "sources", [s.path for s in worklist.sources])
    settings = worklist.settings
    root.attrs.update(
        {
            **{k: v for k, v in settings.items() if k not in ("max_pixels", "strict")},
            "format": FORMAT,
            "classes": worklist.classes,
            "multi_label": worklist.multi_label,
            "group_rule": worklist.group_rule,
            "counts": counts,
            "rejected": rejected,
            "warnings": worklist.warnings,
            "fingerprint": worklist.fingerprint,
            "histokt_version": __version__,
        }
    )


def _swap_in(store: Path, name: str, out: Path, staging: Path) -> None:
    """Make the dataset visible with one rename; an older dataset of that name is moved aside first."""
    final = store / name
    if final.exists():
        trash = staging / "replaced"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(final, trash)
    os.replace(out, final)
    atomic.fsync_dir(store)
    remove_staging(staging)
