"""Benchmark node-local staging (histokt.store.stage): the stage-to-local copy rate, in MB/s.

    .venv/bin/python benchmarks/stage.py [--work DIR] [--dest DIR] [--mb 200] [--repeat 3]

Writes a format-2 dataset of about --mb MB (272 px patches of random content, 512 per shard file, as
`histokt standardize` writes them) under --work, then stages it into --dest with ``staged()`` --repeat
times (each copy is removed when its ``with`` block ends, so every repeat copies everything), and prints
the median copy rate:

    page cache warm   the source files were just read: the rate of the copy itself (write, fsync)
    page cache cold   the source files' pages dropped first (posix_fadvise DONTNEED): read from the disk too
    shutil.copytree   the same tree with the standard library (no fsync, no manifest): a reference

On a cluster the source is on the shared file system, so the cold figure, measured there with --work on
the shared store's file system and --dest on node-local disk, is the one that matters. Measured, never
asserted; nothing is written to benchmarks/results.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import markdown_table  # noqa: E402

from histokt.store import stage  # noqa: E402
from tests.fixtures.stores import write_v2_dataset  # noqa: E402

PATCH = 272
SHARD = 512


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(tempfile.gettempdir()) / "histokt-bench" / "stage"
    p.add_argument("--work", type=Path, default=default, help=f"where the source store is written ({default})")
    p.add_argument("--dest", type=Path, default=None, help="where it is staged (default: WORK/node-local)")
    p.add_argument("--mb", type=float, default=200.0, help="size of the dataset in MB (200)")
    p.add_argument("--repeat", type=int, default=3, help="copies per row, the median reported (3)")
    return p.parse_args(argv)


def make_source(store: Path, mb: float) -> list[Path]:
    """A format-2 dataset "bench" of about ``mb`` MB: 80 % train, 10 % valid, 10 % test; its files."""
    n = max(3, round(mb * 1e6 / (PATCH * PATCH * 3 + 4)))
    pool = np.random.default_rng(0).integers(0, 256, (64, PATCH, PATCH, 3), dtype=np.uint8)
    counts = {"train": n - 2 * (n // 10), "valid": n // 10, "test": n // 10}
    splits, start = {}, 0
    for split, k in counts.items():
        index = np.arange(start, start + k)
        splits[split] = (pool[index % len(pool)], index % 2)
        start += k
    if store.exists():
        shutil.rmtree(store)
    write_v2_dataset(store, "bench", splits, PATCH, shard_size=SHARD, fingerprint="0123456789abcdef")
    return [p for p in sorted(store.rglob("*")) if p.is_file()]


def drop_cache(files: list[Path]) -> None:
    """Drop the files' clean pages from the page cache (no root needed)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb") as f:
            while f.read(1 << 23):
                pass


def time_staged(store: Path, dest: Path) -> float:
    """Seconds from entering ``staged()`` to holding the copy (registration, lease, copy, fsync, rename)."""
    t0 = time.perf_counter()
    with stage.staged(store, "bench", dest, verbose=False) as root:
        seconds = time.perf_counter() - t0
        assert (root / stage.MANIFEST).is_file()
    return seconds


def time_copytree(store: Path, dest: Path) -> float:
    target = dest / "copytree"
    shutil.rmtree(target, ignore_errors=True)
    t0 = time.perf_counter()
    shutil.copytree(store / "bench", target / "bench")
    seconds = time.perf_counter() - t0
    shutil.rmtree(target)
    return seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    store = args.work / "store.zarr"
    dest = args.dest or args.work / "node-local"
    dest.mkdir(parents=True, exist_ok=True)
    print(f"writing a {args.mb:.0f} MB dataset to {store} ...", file=sys.stderr, flush=True)
    files = make_source(store, args.mb)
    size = sum(p.stat().st_size for p in files) / 1e6
    rows = []
    for label, prepare, measure in (
        ("staged(), page cache warm", warm, time_staged),
        ("staged(), page cache cold", drop_cache, time_staged),
        ("shutil.copytree (reference, no fsync)", warm, time_copytree),
    ):
        seconds = []
        for _ in range(args.repeat):
            prepare(files)
            seconds.append(measure(store, dest))
        median = statistics.median(seconds)
        rows.append((label, size, median, size / median))
    print(f"\nstaging {size:.0f} MB ({len(files)} files) from {store} to {dest}, median of {args.repeat}\n")
    print(markdown_table(["copy", "MB", "seconds", "MB/s"], rows))
    shutil.rmtree(args.work / "node-local", ignore_errors=True)
    shutil.rmtree(store)  # regenerated by every run: ~2 s


if __name__ == "__main__":
    main()
