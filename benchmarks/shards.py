"""Benchmark the sharded patch array of store format 2 against the one-file-per-patch layout of format 1.

    .venv/bin/python benchmarks/shards.py [--work DIR] [--patches 2560] [--shard-size 512] [--repeat 3]

For content of 272 px (tissue tiled at the patch size) and of 93 px (PCam-like, padded to the 272 px patch),
writes the same --patches patches both ways:

    format 1   one uncompressed chunk file per patch, stored padded (a private copy of the old writer,
               which histokt no longer has: zarr.create_array with chunks (1, P, P, 3) and no compressor,
               each patch's raw C-order bytes at images/c/<i>/0/0/0, read back with np.fromfile)
    format 2   shards.write_shard: --shard-size patches per file, each with its CRC32C, stored as content

then reads every patch once in a random order (a fresh permutation per window, page cache warm), --repeat
windows, the median reported (the machine is shared; the load average is printed): np.fromfile of the
chunk file for format 1 (what its PatchReader.read did), and ``ShardedReader.read`` followed by
``pad_on_read`` for format 2 (its read alone too, and zarr's own read of the sharded array for reference).
Prints reads/s, bytes on disk per patch (apparent and allocated) and the files and directories that
10,000 patches take. Measured, never asserted; the numbers go to benchmarks/results/shards.json.
"""

import argparse
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
from _common import footprint, load, machine_info, markdown_table, write_results  # noqa: E402

from histokt.ingest.tiling import mirror_pad  # noqa: E402
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
    p.add_argument("--repeat", type=int, default=3, help="timed windows, the median kept (3)")
    p.add_argument("--zarr-reads", type=int, default=300, help="random reads timed through zarr itself (300)")
    return p.parse_args(argv)


def content_of(n: int, side: int, seed: int = 0) -> np.ndarray:
    """n patches of content: a pool of 64 random ones, cycled (bytes on disk do not depend on the pixels)."""
    pool = np.random.default_rng(seed).integers(0, 256, (64, side, side, 3), dtype=np.uint8)
    return pool[np.arange(n) % len(pool)]


class Format1:
    """The format-1 images array, written and read as histokt-patches/1 did (kept here so the "before"
    numbers stay measurable): zarr v3 [N, P, P, 3] uint8, chunks (1, P, P, 3), no compressor, default
    chunk keys, each patch's chunk file written directly as its raw bytes (what zarr's bytes codec gives),
    read back with one np.fromfile."""

    def __init__(self, images: Path, n: int, patch: int):
        self.images, self.patch = str(images), patch
        zarr.create_array(
            store=self.images,
            shape=(n, patch, patch, 3),
            chunks=(1, patch, patch, 3),
            dtype="uint8",
            compressors=None,
            fill_value=0,
            dimension_names=("n", "y", "x", "c"),
            zarr_format=3,
            overwrite=True,
        )

    def write(self, i: int, patch: np.ndarray) -> None:
        folder = f"{self.images}/c/{i}/0/0"
        os.makedirs(folder, exist_ok=True)
        with open(f"{folder}/0", "wb") as f:
            f.write(np.ascontiguousarray(patch).tobytes())

    def read(self, i: int) -> np.ndarray:
        return np.fromfile(f"{self.images}/c/{i}/0/0/0", dtype=np.uint8).reshape(self.patch, self.patch, 3)


def write_format1(images: Path, content: np.ndarray) -> Format1:
    one = Format1(images, len(content), PATCH)
    for i, c in enumerate(content):
        one.write(i, mirror_pad(c, PATCH))
    return one


def write_format2(array_dir: Path, content: np.ndarray, shard_size: int) -> ShardedReader:
    n, h, w = content.shape[:3]
    write_array_metadata(array_dir, n, h, w, shard_size)
    for s in range(shard_count(n, shard_size)):
        write_shard(shard_path(array_dir, s), content[s * shard_size : (s + 1) * shard_size], shard_size=shard_size)
    return ShardedReader(array_dir)


def rate(read, n: int, repeat: int, seed: int) -> float:
    """Random-order reads per second over all ``n`` patches, the median of ``repeat`` windows."""
    rng = np.random.default_rng(seed)
    for i in range(n):  # warm the page cache and open whatever the reader keeps open
        read(i)
    times = []
    for _ in range(repeat):
        order = rng.permutation(n).tolist()
        t0 = time.perf_counter()
        for i in order:
            read(i)
        times.append(time.perf_counter() - t0)
    return n / statistics.median(times)


def main(argv=None) -> None:
    args = parse_args(argv)
    n, s = args.patches, args.shard_size
    if args.work.exists():
        shutil.rmtree(args.work)
    info = machine_info()
    rows_speed, rows_disk, loads = [], [], []
    for side in args.content:
        content = content_of(n, side)
        t0 = time.perf_counter()
        one = write_format1(args.work / f"f1-{side}" / "images", content)
        w1 = time.perf_counter() - t0
        t0 = time.perf_counter()
        two = write_format2(args.work / f"f2-{side}" / "images", content, s)
        w2 = time.perf_counter() - t0
        for i in range(n):  # both give the same padded patch
            if not np.array_equal(one.read(i), pad_on_read(two.read(i), PATCH)):
                raise SystemExit(f"patch {i} differs between the formats")

        loads.append(load())
        r1 = rate(one.read, n, args.repeat, 1)
        r2 = rate(lambda i, two=two: pad_on_read(two.read(i), PATCH), n, args.repeat, 1)
        r2_raw = rate(two.read, n, args.repeat, 1)
        za = zarr.open_array(str(args.work / f"f2-{side}" / "images"), mode="r")
        picks = np.random.default_rng(2).integers(0, n, args.zarr_reads).tolist()
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            for i in picks:
                za[i]
            times.append(time.perf_counter() - t0)
        rz = len(picks) / statistics.median(times)
        rows_speed += [
            (f"{side} px content, format 1: np.fromfile of the chunk file", r1, 1e6 / r1),
            (f"{side} px content, format 2: ShardedReader.read + pad_on_read", r2, 1e6 / r2),
            (f"{side} px content, format 2: ShardedReader.read alone", r2_raw, 1e6 / r2_raw),
            (f"{side} px content, format 2: zarr.open_array(...)[i]", rz, 1e6 / rz),
        ]
        f1 = footprint(args.work / f"f1-{side}" / "images")
        f2 = footprint(args.work / f"f2-{side}" / "images")
        # per 10,000 patches: format 1 has a file and 3 folders (c/i, c/i/0, c/i/0/0) per patch and the c folder,
        # format 2 one flat file per shard (c.<s>.0.0.0); both a zarr.json and the images folder itself.
        # Checked against the counts measured here.
        assert (f1["files"], f1["dirs"]) == (n + 1, 3 * n + 2), f1
        assert (f2["files"], f2["dirs"]) == (shard_count(n, s) + 1, 1), f2
        k = shard_count(10_000, s)
        rows_disk += [
            (f"{side} px, format 1", f1["size"] / n, f1["allocated"] / n, 10_001, 30_002, w1),
            (f"{side} px, format 2 (S={s})", f2["size"] / n, f2["allocated"] / n, k + 1, 1, w2),
        ]
        shutil.rmtree(args.work / f"f1-{side}")
        shutil.rmtree(args.work / f"f2-{side}")
    print(
        f"{n} patches, patch {PATCH} px, random order, page cache warm, median of {args.repeat} "
        f"({info['date'][:10]}, load {' / '.join(str(x[0]) for x in loads)})\n"
    )
    speed_headers = ["reader", "reads/s", "µs/read"]
    disk_headers = [
        "images array",
        "bytes/patch",
        "allocated bytes/patch",
        "files per 10k",
        "folders per 10k",
        "write s",
    ]
    print(markdown_table(speed_headers, rows_speed))
    print()
    print(markdown_table(disk_headers, rows_disk))
    path = write_results(
        "shards",
        {
            "benchmark": "shards",
            "machine": info,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "load": loads,
            "speed": [dict(zip(speed_headers, r)) for r in rows_speed],
            "disk": [dict(zip(disk_headers, r)) for r in rows_disk],
        },
    )
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
