"""Publishing a standardized dataset: the finished parts become one dataset in the store.

One process publishes a dataset: every shard that finds all parts done may try, and two publishing at
once would write the same files. A lease (histokt.lease: ``staging/finalize.lock``) decides, with a
heartbeat while it publishes; a stale one is taken over: that of a dead process of this host, or, since the
processes of another host cannot be checked, one of another host whose heartbeat is older than LOCK_STALE_S.

Publishing packs the parts' data files into the split arrays' shard files (``store.shards``): the patches
of a split, in worklist order, SHARD_SIZE to a file; every shard file is written whole, atomically, by
exactly one packer (the lock holder's ``workers`` threads share the shards out), with each patch's
checksum verified against the part's manifest on the way. A shard file already present is whole, so an
interrupted finalize resumes where it stopped; the dataset appears in the store by one final rename.

The stored content: where every kept patch of the dataset has the same content size smaller than the
patch (all sources smaller than the patch: PCam, CRC), the shards hold that content and readers pad it;
otherwise every patch is stored mirror-padded to the full patch size (the same pixels as before).

A part found damaged (its data file missing, short, or a patch failing its checksum: a writer that died,
a purge, two writers of an older version) is not a dead end: where the caller passes ``redo`` (standardize
does), its part is reset (manifest removed) and redone at once under the lock, then publishing goes on;
without it, DamagedParts names the parts to redo.
"""

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import google_crc32c
import numpy as np
import zarr

from histokt import __version__, atomic
from histokt.errors import UserError
from histokt.ingest.records import PartManifest, PatchRow, StandardizeResult, Worklist
from histokt.ingest.splits import patch_splits
from histokt.lease import Lease
from histokt.store.schema import FORMAT, SPLITS, small_array, string_array
from histokt.store.shards import SHARD_SIZE, pad_on_read, shard_count, shard_path, write_array_metadata, write_shard

LOCK_STALE_S = 600  # a finalize lock of another host untouched this long belongs to a dead process


class Staged(NamedTuple):
    """A kept patch where it waits: ``content`` (h, w) pixels at byte ``offset`` of part ``part``'s data file."""

    part: int
    offset: int
    content: tuple[int, int]
    crc: int
    row: PatchRow


class ShardJob(NamedTuple):
    """One shard file to pack: its path, the patches in order (part file, part, offset, h, w, crc), and the
    stored content size (a patch with smaller content is padded to it, which is then the patch size)."""

    path: str
    patches: list[tuple[str, int, int, int, int, int]]
    content: tuple[int, int]
    shard_size: int


def part_dir(staging: Path, k: int) -> Path:
    """Part k's base path: ``.bin`` its data file, ``.json`` its manifest, ``.lease`` its lease."""
    return staging / "parts" / f"p{k:06d}"


def part_file(staging: Path, k: int) -> Path:
    return part_dir(staging, k).with_suffix(".bin")


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
    """Finished parts whose data is gone or damaged: those parts must be redone."""

    def __init__(self, message: str, parts: list[int], first: str):
        super().__init__(message)
        self.parts = parts
        self.first = first  # what was found damaged first


def finalize_locked(
    store: Path,
    name: str,
    staging: Path,
    worklist: Worklist,
    redo: Callable[[list[int]], None] | None = None,
    workers: int = 1,
) -> StandardizeResult:
    """Publish the dataset if this process gets the lock; else report who has it (or that it is done).

    ``redo(parts)`` redoes reset parts (writes their manifests again); it is called, under the lock, where
    parts are found damaged, and publishing then resumes. Without it, DamagedParts is raised. ``workers``
    threads pack the shard files."""
    lock = staging / "finalize.lock"
    try:
        lease = Lease.acquire(lock, stale_after=LOCK_STALE_S)
    except FileNotFoundError:  # another shard finalized and removed the staging folder meanwhile
        lease = None
    if lease is None:
        return _finalized_elsewhere(store, name, lock, worklist.fingerprint)
    redone: set[int] = set()
    try:
        with lease.beating():
            while True:
                try:
                    return _finalize(store, name, staging, worklist, workers)
                except DamagedParts as exc:
                    if redo is None:
                        raise
                    if redone & set(exc.parts):
                        raise UserError(
                            f"{exc.first}; it was redone once and is damaged again: another process is changing "
                            f"{staging} (an older histokt?); stop it, then run the same command again"
                        ) from None
                    for k in exc.parts:  # reset: without its manifest the part counts as not done
                        part_dir(staging, k).with_suffix(".json").unlink(missing_ok=True)
                    redo(exc.parts)
                    redone.update(exc.parts)
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


def read_manifests(staging: Path, parts: list[int]) -> dict[int, PartManifest] | None:
    """The manifests of ``parts``; None where one is absent (reset by another process, being redone)."""
    docs = {k: atomic.read_json(part_dir(staging, k).with_suffix(".json")) for k in parts}
    if any(d is None for d in docs.values()):
        return None
    return {k: PartManifest.from_json(d) for k, d in docs.items()}


def check_parts(staging: Path, manifests: dict[int, PartManifest]) -> None:
    """DamagedParts for parts whose manifest is incomplete or whose data file is missing or of the wrong
    size (a stat each; the checksums are verified while packing)."""
    bad: list[tuple[int, str]] = []
    for k, m in manifests.items():
        path = part_file(staging, k)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            size = None
        if not m.complete:
            bad.append((k, f"{path.with_suffix('.json')}: manifest of an older histokt"))
        elif size != m.nbytes:
            what = "is missing" if size is None else f"has {size} bytes, expected {m.nbytes}"
            bad.append((k, f"{path}: staged part {what}"))
    if bad:
        raise damaged_parts(staging, bad)


def damaged_parts(staging: Path, bad: list[tuple[int, str]]) -> DamagedParts:
    parts = sorted({k for k, _ in bad})
    manifest = part_dir(staging, parts[0]).with_suffix(".json")
    return DamagedParts(
        f"{bad[0][1]}; delete {manifest} and run again (histokt standardize does this by itself; "
        f"{len(parts)} parts to redo)",
        parts,
        bad[0][1],
    )


def staged_patches(manifests: dict[int, PartManifest]) -> list[Staged]:
    """Every kept patch of ``manifests``, in part order, with where its bytes are."""
    staged = []
    for k in sorted(manifests):
        m, offset = manifests[k], 0
        for row, (h, w), crc in zip(m.patches, m.content, m.crc32c):
            staged.append(Staged(k, offset, (h, w), crc, row))
            offset += h * w * 3
    return staged


def content_size(staged: list[Staged], patch_size: int) -> tuple[int, int]:
    """The stored content size: the patches' common content where all share one, else the full patch."""
    sizes = {s.content for s in staged}
    return sizes.pop() if len(sizes) == 1 else (patch_size, patch_size)


def _finalize(store: Path, name: str, staging: Path, worklist: Worklist, workers: int = 1) -> StandardizeResult:
    manifests = read_manifests(staging, list(range(len(worklist.parts))))
    if manifests is None:  # a damaged part was reset by another process and is being redone
        missing = sum(not part_dir(staging, k).with_suffix(".json").is_file() for k in range(len(worklist.parts)))
        return StandardizeResult(name, "partial", parts_missing=missing)
    check_parts(staging, manifests)
    staged = staged_patches(manifests)
    splits = _splits(staged, worklist.settings)
    patch_size = worklist.settings["patch_size"]
    content = content_size(staged, patch_size)
    shard_size = worklist.settings.get("shard_size", SHARD_SIZE)
    by_split = {split: [s for s, sp in zip(staged, splits) if sp == split] for split in SPLITS}
    out = staging / "final"
    _layout(out, staging / "final.ready", {k: len(v) for k, v in by_split.items()}, content, shard_size)
    jobs = [
        job
        for split, mine in by_split.items()
        for job in shard_jobs(staging, out / split / "images", mine, content, shard_size)
        if not Path(job.path).exists()  # packed before an interruption: a shard file appears only whole
    ]
    pack(jobs, workers, staging)
    for split, mine in by_split.items():
        _write_meta(zarr.open_group(str(out / split), mode="a"), mine, worklist.multi_label, len(worklist.classes))
    rejected = [r for m in manifests.values() for r in m.rejected]
    counts = {k: len(v) for k, v in by_split.items()}
    _write_root(out, worklist, counts, rejected, content, shard_size)
    for tmp in out.rglob(".*.tmp"):  # a killed packer's temporary file: not part of the dataset
        tmp.unlink()
    _swap_in(store, name, out, staging)
    return StandardizeResult(name, "written", counts=counts, rejected=len(rejected))


def shard_jobs(
    staging: Path, images: Path, staged: list[Staged], content: tuple[int, int], shard_size: int
) -> list[ShardJob]:
    """The shard files of one split's images array, each with its patches in order."""
    jobs = []
    for s in range(shard_count(len(staged), shard_size)):
        members = staged[s * shard_size : (s + 1) * shard_size]
        patches = [(str(part_file(staging, p.part)), p.part, p.offset, *p.content, p.crc) for p in members]
        jobs.append(ShardJob(str(shard_path(images, s)), patches, content, shard_size))
    return jobs


def pack(jobs: list[ShardJob], workers: int, staging: Path) -> None:
    """Write every job's shard file (``workers`` threads); DamagedParts for parts whose bytes fail."""
    if workers > 1 and len(jobs) > 1:
        # threads, not processes: packing is file reads, writes and CRC32C, which release the GIL, and a
        # freshly spawned pool cost more than the packing itself (benchmarks/standardize.py)
        with ThreadPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            results = list(pool.map(pack_shard, jobs))
    else:
        results = [pack_shard(job) for job in jobs]
    bad = [r for r in results if r is not None]
    if bad:
        raise damaged_parts(staging, bad)


def pack_shard(job: ShardJob) -> tuple[int, str] | None:
    """Write one shard file from the parts' data files, each patch's checksum verified; returns None, or
    (part, problem) for a part whose bytes are missing or damaged (nothing is then written)."""
    fds: dict[str, int] = {}
    try:
        write_shard(job.path, _patches(job, fds), shard_size=job.shard_size)
    except _PartDamaged as exc:
        return exc.part, exc.problem
    finally:
        for fd in fds.values():
            os.close(fd)
    return None


class _PartDamaged(Exception):
    def __init__(self, part: int, problem: str):
        self.part, self.problem = part, problem


def _patches(job: ShardJob, fds: dict[str, int]) -> Iterator[np.ndarray]:
    for path, part, offset, h, w, crc in job.patches:
        if path not in fds:
            try:
                fds[path] = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise _PartDamaged(part, f"{path}: staged part is missing") from None
        nbytes = h * w * 3
        data = os.pread(fds[path], nbytes, offset)
        if len(data) != nbytes or google_crc32c.value(data) != crc:
            raise _PartDamaged(part, f"{path}: staged patch at byte {offset} is damaged (checksum mismatch)")
        patch = np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)
        yield patch if (h, w) == job.content else pad_on_read(patch, job.content[0])


def _splits(staged: list[Staged], settings: dict) -> list[str | None]:
    """Each patch's split: its source's (grouped rule), or HistoKT's patch-level cut (patch rule)."""
    if settings["split_rule"] == "patch":
        partitions = [s.row.partition for s in staged]
        return list(patch_splits(partitions, settings["split_plan"], settings["split_seed"]))
    return [s.row.split for s in staged]


def _layout(out: Path, ready: Path, counts: dict[str, int], content: tuple[int, int], shard_size: int) -> None:
    """The groups and the empty split arrays, (re)built from scratch until ``ready`` marks them complete:
    no shard is packed into them before that."""
    if ready.is_file():
        return
    shutil.rmtree(out, ignore_errors=True)
    root = zarr.open_group(str(out), mode="w", zarr_format=3)
    for split in SPLITS:
        root.create_group(split)
        write_array_metadata(out / split / "images", counts[split], *content, shard_size)
    atomic.write_bytes(ready, b"")


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


def _write_root(
    out: Path,
    worklist: Worklist,
    counts: dict[str, int],
    rejected: list[dict[str, str]],
    content: tuple[int, int],
    shard_size: int,
) -> None:
    """The dataset's source list and attrs (the keys and their order are the store format)."""
    root = zarr.open_group(str(out), mode="a")
    string_array(root, "sources", [s.path for s in worklist.sources])
    settings = worklist.settings
    root.attrs.update(
        {
            **{k: v for k, v in settings.items() if k not in ("max_pixels", "strict", "shard_size")},
            "format": FORMAT,
            "content_size": list(content),
            "shard_size": shard_size,
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
