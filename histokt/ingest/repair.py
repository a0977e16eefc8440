"""`histokt standardize --repair`: re-create exactly the damaged shard files of a finished dataset.

``histokt verify`` names the damaged shards (store.verify.damaged_shards). The patches of a shard are found
by their provenance, which the store keeps beside the images (source_id and box per patch, both sound when
verify passes them): only the parts holding those sources are standardized again, into the dataset's
staging folder, and each damaged shard is packed from them, atomically, in place. Standardizing is
deterministic, so a repaired shard is byte for byte the one that was lost; the rest of the store is not
touched, and readers of other shards go on meanwhile. A killed repair resumes (finished parts are kept).
"""

import bisect
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from histokt.errors import UserError
from histokt.ingest.finalize import (
    DamagedParts,
    ShardJob,
    check_parts,
    pack,
    part_dir,
    part_file,
    read_manifests,
    remove_staging,
    staged_patches,
)
from histokt.ingest.records import StandardizeResult, Worklist
from histokt.lease import Lease, holder
from histokt.store.shards import SHARD_SIZE, shard_path

LOCK_STALE_S = 600


def repair(
    store: Path,
    name: str,
    staging: Path,
    worklist: Worklist,
    attrs: dict,
    run_parts: Callable[[list[int]], None],
    workers: int = 1,
) -> StandardizeResult:
    """Re-create the damaged shard files of ``store/name``; ``run_parts(parts)`` standardizes parts."""
    from histokt.store.verify import damaged_shards

    damage = damaged_shards(store, name)
    if not damage:
        remove_staging(staging)
        return StandardizeResult(name, "repaired", counts=attrs["counts"], repaired=[])
    other = next((d for d in damage if d.shard is None), None)
    if other is not None:
        raise UserError(
            f"{other.path}: {'; '.join(other.problems)}; this is not a shard file, so --repair cannot re-create "
            f"it: standardize the dataset again with --overwrite (and its original options)"
        )
    lock = staging / "finalize.lock"
    lease = Lease.acquire(lock, stale_after=LOCK_STALE_S)
    if lease is None:
        raise UserError(f"{store / name}: {holder(lock)} is finalizing or repairing this dataset; wait for it to end")
    try:
        with lease.beating():
            jobs = _jobs(store, name, staging, worklist, attrs, damage, run_parts)
            pack(jobs, workers, staging)
    finally:
        lease.release()
    remove_staging(staging)
    return StandardizeResult(name, "repaired", counts=attrs["counts"], repaired=[j.path for j in jobs])


def _jobs(
    store: Path,
    name: str,
    staging: Path,
    worklist: Worklist,
    attrs: dict,
    damage: list,
    run_parts: Callable[[list[int]], None],
) -> list[ShardJob]:
    shard_size = int(attrs.get("shard_size", SHARD_SIZE))
    content = (int(attrs["content_size"][0]), int(attrs["content_size"][1]))
    starts = [a for a, _ in worklist.parts]
    wanted: dict[tuple[str, int], list[tuple[int, tuple[int, ...]]]] = {}
    for d in damage:
        assert d.shard is not None
        group = Path(store) / name / d.split
        lo, hi = d.shard * shard_size, min((d.shard + 1) * shard_size, int(attrs["counts"][d.split]))
        sources = np.asarray(zarr.open_array(str(group / "source_id"), mode="r")[lo:hi]).tolist()
        boxes = np.asarray(zarr.open_array(str(group / "box"), mode="r")[lo:hi]).tolist()
        wanted[(d.split, d.shard)] = [(s, tuple(b)) for s, b in zip(sources, boxes)]
    parts = sorted({bisect.bisect_right(starts, s) - 1 for rows in wanted.values() for s, _ in rows})
    where = _staged(staging, parts, run_parts)
    jobs = []
    for (split, shard), rows in sorted(wanted.items()):
        patches = []
        for source, box in rows:
            p = where.get((source, box))
            if p is None:
                raise UserError(
                    f"{store}/{name}: the raw data no longer gives the patch at {box} of "
                    f"{worklist.sources[source].path}: the raw data changed since the dataset was made; "
                    f"standardize it again with --overwrite"
                )
            patches.append((str(part_file(staging, p.part)), p.part, p.offset, *p.content, p.crc))
        images = Path(store) / name / split / "images"
        jobs.append(ShardJob(str(shard_path(images, shard)), patches, content, shard_size))
    return jobs


def _staged(staging: Path, parts: list[int], run_parts: Callable[[list[int]], None]) -> dict:
    """(source, box) -> Staged for the patches of ``parts``, standardized again where not yet done."""
    for attempt in range(2):
        run_parts([k for k in parts if not part_dir(staging, k).with_suffix(".json").is_file()])
        manifests = read_manifests(staging, parts)
        if manifests is None:
            raise UserError(f"{staging}: parts are being written by another process; run the same command again")
        try:
            check_parts(staging, manifests)
        except DamagedParts as exc:
            if attempt:
                raise
            for k in exc.parts:
                part_dir(staging, k).with_suffix(".json").unlink(missing_ok=True)
            continue
        return {(s.row.source, tuple(s.row.box)): s for s in staged_patches(manifests)}
    raise AssertionError("unreachable")
