"""Publishing a standardized dataset: the finished parts become one dataset in the store.

One process publishes a dataset: every shard that finds all parts done may try, and two publishing at
once would rename the same chunk files. A lease (histokt.lease: ``staging/finalize.lock``) decides, with a
heartbeat while it publishes; a stale one is taken over: that of a dead process of this host, or, since the
processes of another host cannot be checked, one of another host whose heartbeat is older than LOCK_STALE_S.

Publishing resumes after a kill: chunk folders are renamed (not copied) into the split arrays, and the
dataset appears in the store by one final rename. A staged patch found neither at its place in the part
nor already moved (a part damaged by a writer that died, or by two writers of an older version) is not a
dead end: where the caller passes ``redo`` (standardize does), its part is reset (manifest removed) and
redone at once under the lock, then publishing goes on; without it, DamagedParts names the part to redo.
"""

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import zarr

from histokt import __version__, atomic
from histokt.errors import UserError
from histokt.ingest.records import PartManifest, PatchRow, StandardizeResult, Worklist
from histokt.ingest.splits import patch_splits
from histokt.lease import Lease
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


class DamagedParts(UserError):
    """Staged patches of finished parts are gone (neither staged nor moved): those parts must be redone."""

    def __init__(self, message: str, parts: list[int], first: Path):
        super().__init__(message)
        self.parts = parts
        self.first = first  # the first staged patch found missing


def finalize_locked(
    store: Path, name: str, staging: Path, worklist: Worklist, redo: Callable[[list[int]], None] | None = None
) -> StandardizeResult:
    """Publish the dataset if this process gets the lock; else report who has it (or that it is done).

    ``redo(parts)`` redoes reset parts (writes their manifests again); it is called, under the lock, where
    staged patches are found missing, and publishing then resumes. Without it, DamagedParts is raised."""
    lock = staging / "finalize.lock"
    try:
        lease = Lease.acquire(lock, stale_after=LOCK_STALE_S)
    except FileNotFoundError:  # another shard finalized and removed the staging folder meanwhile
        lease = None
    if lease is None:
        return _finalized_elsewhere(store, name, lock, worklist.fingerprint)
    try:
        with lease.beating():
            try:
                return _finalize(store, name, staging, worklist)
            except DamagedParts as exc:
                if redo is None:
                    raise
                for k in exc.parts:  # reset: without its manifest the part counts as not done
                    part_dir(staging, k).with_suffix(".json").unlink(missing_ok=True)
                redo(exc.parts)
            try:
                return _finalize(store, name, staging, worklist)
            except DamagedParts as exc:
                raise UserError(
                    f"{exc.first}: staged patch is missing; it was redone once and is missing again: another "
                    f"process is changing {staging} (an older histokt?); stop it, then run the same command again"
                ) from None
    finally:
        lease.release()


def _finalized_elsewhere(store: Path, name: str, lock: Path, fingerprint: str) -> StandardizeResult:
    done = dataset_attrs(store / name)
    if done is not None and done.get("fingerprint") == fingerprint:
        return StandardizeResult(name, "done", counts=done["counts"])
    try:
        holder = lock.read_text().strip()
    except FileNotFoundError:
        holder = "released"
    return StandardizeResult(name, "finalizing elsewhere", lock=holder)


# -- publishing ---------------------------------------------------------------------------------------------


def _finalize(store: Path, name: str, staging: Path, worklist: Worklist) -> StandardizeResult:
    docs = [atomic.read_json(part_dir(staging, k).with_suffix(".json")) for k in range(len(worklist.parts))]
    if any(d is None for d in docs):  # a damaged part was reset by another process and is being redone
        return StandardizeResult(name, "partial", parts_missing=sum(d is None for d in docs))
    manifests = [PartManifest.from_json(d) for d in docs]
    staged = [Staged(k, j, row) for k, m in enumerate(manifests) for j, row in enumerate(m.patches)]
    splits = _splits(staged, worklist.settings)
    out = staging / "final"
    _layout(out, staging / "final.ready", splits, worklist.settings["patch_size"])
    counts = {}
    missing: list[Path] = []
    for split in SPLITS:
        mine = [s for s, sp in zip(staged, splits) if sp == split]
        counts[split] = len(mine)
        missing += _move_chunks(staging, out / split / "images", mine)
        _write_meta(zarr.open_group(str(out / split), mode="a"), mine, worklist.multi_label, len(worklist.classes))
    if missing:
        raise _damaged(staging, missing)
    rejected = [r for m in manifests for r in m.rejected]
    _write_root(out, worklist, counts, rejected)
    _swap_in(store, name, out, staging)
    return StandardizeResult(name, "written", counts=counts, rejected=len(rejected))


def _damaged(staging: Path, missing: list[Path]) -> DamagedParts:
    """The error naming the parts whose staged patches are ``missing`` (…/parts/pNNNNNN/c/<slot>)."""
    parts = sorted({int(p.parent.parent.name[1:]) for p in missing})
    manifest = part_dir(staging, parts[0]).with_suffix(".json")
    return DamagedParts(
        f"{missing[0]}: staged patch is missing; delete {manifest} and run again "
        f"(histokt standardize does this by itself; {len(parts)} parts to redo)",
        parts,
        missing[0],
    )


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


def _move_chunks(staging: Path, images: Path, staged: list[Staged]) -> list[Path]:
    """Rename each patch's chunk folder into place: one rename per patch, no copy. Idempotent, so an
    interrupted finalize resumes: a folder already moved is found at its destination (and a copy staged
    again by a redone part is then left behind). Returns the staged folders found nowhere."""
    (images / "c").mkdir(exist_ok=True)
    missing = []
    for index, s in enumerate(staged):
        src = chunk_dir(part_dir(staging, s.part), s.slot)
        dst = chunk_dir(images, index)
        if dst.exists():
            continue
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            missing.append(src)
    return missing


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
