"""Benchmark `histokt verify` (every shard read whole once, both CRC32C levels checked) against reading every
patch through ``PatchReader.read`` in random order, and `histokt store upgrade` (format 1 -> 2).

    .venv/bin/python benchmarks/verify.py [--work DIR] [--patches 10000] [--workers 1 2 4] [--repeat 3]
                                          [--upgrade-patches 2000]

For content of 272 px (tissue tiled at the patch size) and of 93 px (PCam-like, padded on read to 272),
builds a format-2 store of --patches patches in one split (random-ish pixels: a pool of 64 random patches,
cycled; the bytes checked do not depend on them; 512 per shard), warms the page cache, then times, the
median of --repeat runs each:

    verify_store(workers=W)    for each --workers W (threads)
    PatchReader.read           every patch once, in a fresh random order per run (one thread), padded

and, with --upgrade-patches M > 0, ``upgrade`` of a format-1 store of M patches (written by hand in the old
layout, stored padded) into a fresh store per run. MB/s counts the bytes of the format-2 files (verify,
read) or of the format-1 chunk files (upgrade). Measured, never asserted; nothing is written to
benchmarks/results.
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import markdown_table, warm_page_cache  # noqa: E402

from histokt.ingest.tiling import mirror_pad  # noqa: E402
from histokt.store import schema  # noqa: E402
from histokt.store.schema import FORMAT, FORMAT_1, PatchReader  # noqa: E402
from histokt.store.shards import SHARD_SIZE, shard_count, shard_path, write_array_metadata, write_shard  # noqa: E402
from histokt.store.upgrade import upgrade  # noqa: E402
from histokt.store.verify import verify_store  # noqa: E402

PATCH = 272
ROOT_METADATA = json.dumps({"attributes": {}, "zarr_format": 3, "node_type": "group"}, indent=2).encode()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(tempfile.gettempdir()) / "histokt-bench" / "verify"
    p.add_argument("--work", type=Path, default=default, help=f"scratch folder, emptied first ({default})")
    p.add_argument("--patches", type=int, default=10000, help="patches per store (10000)")
    p.add_argument("--content", type=int, nargs="+", default=[272, 93], help="content sides in px (272 93)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="verify threads (1 2 4)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs, the median kept (3)")
    p.add_argument("--upgrade-patches", type=int, default=2000, help="patches of the upgrade runs, 0: none (2000)")
    p.add_argument("--keep", action="store_true", help="keep the stores in --work afterwards")
    return p.parse_args(argv)


def pool(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, side, side, 3), dtype=np.uint8)


def dataset_group(path: Path, counts: dict, content: int, fmt: str, **attrs) -> None:
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    for split in schema.SPLITS:
        n = counts.get(split, 0)
        group = root.create_group(split)
        schema.small_array(group, "labels", np.arange(n, dtype=np.int64) % 3)
        schema.small_array(group, "source_id", np.arange(n, dtype=np.int64))
        schema.small_array(group, "box", np.zeros((n, 4), np.int64))
    schema.string_array(root, "sources", [f"img{i:05d}.png" for i in range(max(counts.values()))])
    root.attrs.update(
        {
            "card": {"card": "folder", "options": {}},
            "patch_size": PATCH,
            **attrs,
            "format": fmt,
            "classes": ["a", "b", "c"],
            "multi_label": False,
            "counts": {s: counts.get(s, 0) for s in schema.SPLITS},
            "fingerprint": f"bench-{content}",
        }
    )


def format2_store(store: Path, n: int, side: int) -> int:
    """A format-2 store of one dataset "d", n patches of side px content in train; returns its shard bytes."""
    store.mkdir(parents=True)
    (store / "zarr.json").write_bytes(ROOT_METADATA)
    dataset_group(store / "d", {"train": n}, side, FORMAT, content_size=[side, side], shard_size=SHARD_SIZE)
    for split in schema.SPLITS:
        write_array_metadata(store / "d" / split / "images", n if split == "train" else 0, side, side)
    images = store / "d" / "train" / "images"
    content = pool(side)
    for s in range(shard_count(n)):
        idx = np.arange(s * SHARD_SIZE, min(n, (s + 1) * SHARD_SIZE))
        write_shard(shard_path(images, s), content[idx % len(content)])
    return sum(p.stat().st_size for p in images.glob("c.*"))


def format1_store(store: Path, n: int, side: int) -> int:
    """A format-1 store (the old layout: one raw chunk file per padded patch); returns its chunk bytes."""
    store.mkdir(parents=True)
    (store / "zarr.json").write_bytes(ROOT_METADATA)
    dataset_group(store / "d", {"train": n}, side, FORMAT_1)
    for split in schema.SPLITS:
        zarr.create_array(
            store=str(store / "d" / split / "images"),
            shape=(n if split == "train" else 0, PATCH, PATCH, 3),
            chunks=(1, PATCH, PATCH, 3),
            dtype="uint8",
            compressors=None,
            fill_value=0,
            dimension_names=("n", "y", "x", "c"),
            zarr_format=3,
        )
    images = store / "d" / "train" / "images"
    padded = [mirror_pad(c, PATCH).tobytes() for c in pool(side)]
    for i in range(n):
        path = images / "c" / str(i) / "0" / "0" / "0"
        path.parent.mkdir(parents=True)
        path.write_bytes(padded[i % len(padded)])
    return n * PATCH * PATCH * 3


def median_seconds(run, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_all(store: Path, n: int, seed: int) -> None:
    reader = PatchReader(store, "d", "train")
    for i in np.random.default_rng(seed).permutation(n).tolist():
        reader.read(i)
    reader.close()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.work.exists():
        shutil.rmtree(args.work)
    rows = []
    n = args.patches
    for side in args.content:
        store = args.work / f"v2-{side}" / "store.zarr"
        t0 = time.perf_counter()
        nbytes = format2_store(store, n, side)
        print(
            f"{side} px: wrote {n} patches, {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", file=sys.stderr
        )
        warm_page_cache(sorted(store.rglob("c.*")))
        case = f"{side} px content, {n:,} patches, {nbytes / 1e9:.2f} GB"
        for w in args.workers:
            report = verify_store(store, workers=w, progress=False)
            assert report.sound and report.patches == n, report.lines()
            sec = median_seconds(lambda w=w, s=store: verify_store(s, workers=w, progress=False), args.repeat)
            rows.append((case, f"verify_store, {w} thread{'s' if w > 1 else ''}", sec, nbytes / 1e6 / sec, n / sec))
        runs = iter(range(args.repeat))
        sec = median_seconds(lambda s=store, r=runs: read_all(s, n, next(r)), args.repeat)
        rows.append((case, "PatchReader.read, random order", sec, nbytes / 1e6 / sec, n / sec))
        if not args.keep:
            shutil.rmtree(store.parent)
    m = args.upgrade_patches
    for side in args.content if m > 0 else []:
        old = args.work / f"v1-{side}" / "store.zarr"
        nbytes = format1_store(old, m, side)
        warm_page_cache(p for p in (old / "d" / "train" / "images" / "c").rglob("*") if p.is_file())
        case = f"{side} px content, {m:,} format-1 patches, {nbytes / 1e9:.2f} GB"
        runs = iter(range(args.repeat))

        def once(old=old, side=side, runs=runs):
            new = old.parent / f"new-{next(runs)}.zarr"
            (done,) = upgrade(old, new, progress=False)
            assert done.content_size == [side, side], done
            shutil.rmtree(new)

        sec = median_seconds(once, args.repeat)
        rows.append((case, "upgrade to format 2", sec, nbytes / 1e6 / sec, m / sec))
        if not args.keep:
            shutil.rmtree(old.parent)
    print(f"\n## verify and upgrade (median of {args.repeat}; page cache warm; {os.cpu_count()} CPUs)\n")
    print(markdown_table(["case", "method", "seconds", "MB/s", "patches/s"], rows))


if __name__ == "__main__":
    main()
