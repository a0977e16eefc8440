"""Benchmark the sharded patch array (format 2 candidate) against today's one-file-per-patch store (format 1).

    .venv/bin/python benchmarks/shards.py [--work DIR] [--patches 2560] [--shard-size 512] [--repeat 3]

For content of 272 px (tissue tiled at the patch size) and of 93 px (PCam-like, padded to the 272 px patch),
writes the same --patches patches both ways:

    format 1   schema.patch_array + write_chunk: one uncompressed chunk file per patch, stored padded
    format 2   shards.write_shard: --shard-size patches per file, each with its CRC32C, stored as content

then reads every patch once in a random order (a fresh permutation per window, page cache warm), --repeat
windows, keeping the fastest (the machine is shared): ``PatchReader.read`` for format 1, and
``ShardedReader.read`` followed by ``pad_on_read`` for format 2 (its read alone too, and zarr's own read
of the sharded array for reference). Prints reads/s, bytes on disk per patch (apparent and allocated) and
the files and directories that 10,000 patches take. Measured, never asserted; nothing is written to
benchmarks/results.
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import markdown_table  # noqa: E402

from histokt.ingest.tiling import mirror_pad  # noqa: E402
from histokt.store.schema import PatchReader, patch_array, write_chunk  # noqa: E402
from histokt.store.shards import (  # noqa: E402
    ShardedReader,
    pad_on_read,
    shard_count,
    shard_path,
    write_array_metadata,
    write_shard,
)

PATCH = 272


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(tempfile.gettempdir()) / "histokt-bench" / "shards"
    p.add_argument("--work", type=Path, default=default, help=f"scratch folder, emptied first ({default})")
    p.add_argument("--patches", type=int, default=2560, help="patches per array (2560)")
    p.add_argument("--shard-size", type=int, default=512, help="patches per shard file (512)")
    p.add_argument("--content", type=int, nargs="+", default=[272, 93], help="content sides in px (272 93)")
    p.add_argument("--repeat", type=int, default=3, help="timed windows, the fastest kept (3)")
    p.add_argument("--zarr-reads", type=int, default=300, help="random reads timed through zarr itself (300)")
    return p.parse_args(argv)


def content_of(n: int, side: int, seed: int = 0) -> np.ndarray:
    """n patches of content: a pool of 64 random ones, cycled (bytes on disk do not depend on the pixels)."""
    pool = np.random.default_rng(seed).integers(0, 256, (64, side, side, 3), dtype=np.uint8)
    return pool[np.arange(n) % len(pool)]


def write_format1(store: Path, content: np.ndarray) -> PatchReader:
    images = store / "d" / "train" / "images"
    zarr.open_group(str(store / "d"), mode="w", zarr_format=3).create_group("train")
    patch_array(images, len(content), PATCH)
    for i, c in enumerate(content):
        write_chunk(images, i, mirror_pad(c, PATCH))
    return PatchReader(store, "d", "train")


def write_format2(array_dir: Path, content: np.ndarray, shard_size: int) -> ShardedReader:
    n, h, w = content.shape[:3]
    write_array_metadata(array_dir, n, h, w, shard_size)
    for s in range(shard_count(n, shard_size)):
        write_shard(shard_path(array_dir, s), content[s * shard_size : (s + 1) * shard_size], shard_size=shard_size)
    return ShardedReader(array_dir)


def footprint(folder: Path) -> tuple[int, int, int, int]:
    """(files, directories, apparent bytes, allocated bytes) under ``folder``."""
    files = dirs = size = blocks = 0
    for root, dnames, fnames in os.walk(folder):
        dirs += len(dnames)
        for f in fnames:
            st = os.stat(os.path.join(root, f))
            files, size, blocks = files + 1, size + st.st_size, blocks + st.st_blocks * 512
    return files, dirs, size, blocks


def rate(read, n: int, repeat: int, seed: int) -> float:
    """Random-order reads per second over all ``n`` patches, the fastest of ``repeat`` windows."""
    rng = np.random.default_rng(seed)
    for i in range(n):  # warm the page cache and open whatever the reader keeps open
        read(i)
    best = math.inf
    for _ in range(repeat):
        order = rng.permutation(n).tolist()
        t0 = time.perf_counter()
        for i in order:
            read(i)
        best = min(best, time.perf_counter() - t0)
    return n / best


def main(argv=None) -> None:
    args = parse_args(argv)
    n, s = args.patches, args.shard_size
    if args.work.exists():
        shutil.rmtree(args.work)
    rows_speed, rows_disk = [], []
    for side in args.content:
        content = content_of(n, side)
        t0 = time.perf_counter()
        one = write_format1(args.work / f"f1-{side}" / "store.zarr", content)
        w1 = time.perf_counter() - t0
        t0 = time.perf_counter()
        two = write_format2(args.work / f"f2-{side}" / "images", content, s)
        w2 = time.perf_counter() - t0
        for i in range(n):  # both give the same padded patch
            if not np.array_equal(one.read(i), pad_on_read(two.read(i), PATCH)):
                raise SystemExit(f"patch {i} differs between the formats")

        r1 = rate(one.read, n, args.repeat, 1)
        r2 = rate(lambda i, two=two: pad_on_read(two.read(i), PATCH), n, args.repeat, 1)
        r2_raw = rate(two.read, n, args.repeat, 1)
        za = zarr.open_array(str(args.work / f"f2-{side}" / "images"), mode="r")
        picks = np.random.default_rng(2).integers(0, n, args.zarr_reads).tolist()
        t0 = time.perf_counter()
        for i in picks:
            za[i]
        rz = len(picks) / (time.perf_counter() - t0)
        rows_speed += [
            (f"{side} px content, format 1 PatchReader.read", r1, 1e6 / r1),
            (f"{side} px content, format 2 ShardedReader.read + pad_on_read", r2, 1e6 / r2),
            (f"{side} px content, format 2 ShardedReader.read alone", r2_raw, 1e6 / r2_raw),
            (f"{side} px content, format 2 via zarr.open_array(...)[i]", rz, 1e6 / rz),
        ]
        f1 = footprint(args.work / f"f1-{side}" / "store.zarr" / "d" / "train" / "images")
        f2 = footprint(args.work / f"f2-{side}" / "images")
        # per 10,000 patches: format 1 has a file and 3 folders (c/i, c/i/0, c/i/0/0) per patch and the c folder,
        # format 2 one flat file per shard (c.<s>.0.0.0); both a zarr.json. Checked against the counts measured here.
        assert (f1[0], f1[1]) == (n + 1, 3 * n + 1), f1
        assert (f2[0], f2[1]) == (shard_count(n, s) + 1, 0), f2
        k = shard_count(10_000, s)
        rows_disk += [
            (f"{side} px, format 1", f1[2] / n, f1[3] / n, 10_001, 30_001, w1),
            (f"{side} px, format 2 (S={s})", f2[2] / n, f2[3] / n, k + 1, 0, w2),
        ]
        shutil.rmtree(args.work / f"f1-{side}")
        shutil.rmtree(args.work / f"f2-{side}")
    print(f"{n} patches, patch {PATCH} px, random order, page cache warm, best of {args.repeat}\n")
    print(markdown_table(["reader", "reads/s", "µs/read"], rows_speed))
    print()
    print(
        markdown_table(
            ["array", "bytes/patch", "allocated bytes/patch", "files per 10k", "folders per 10k", "write s"],
            rows_disk,
        )
    )


if __name__ == "__main__":
    main()
