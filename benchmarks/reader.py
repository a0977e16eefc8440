"""Benchmark the training reader: PatchDataset + make_loader, against memcpy and a naive zarr read.

    .venv/bin/python benchmarks/reader.py [--work DIR] [--images 200] [--workers 0 2] [--batch 64]

Builds (once, cached under --work) a store from the same generated 1024x1024 tissue PNGs as
benchmarks/standardize.py, standardized at --mpp 1.0 (16 patches of 272 px per image; 200 images ->
3,200 patches, ~2,560 in train), then reads the train split in random order (shuffle=True) in batches of
64 through ``make_loader`` with each worker count, in three variants:

    raw        uint8 patches as stored
    aug-u8     augment.Augment() (flips + affine warp), uint8
    aug-float  Augment() + Normalize(mean, std) -> float32

Each measurement runs one warm-up epoch (which also starts the persistent workers), then times whole
epochs until at least --min-patches patches and --min-seconds have passed, --repeat times, keeping the
fastest window (the machine is shared). The consumer only counts the
batches (no GPU copy, no pixel reads in the main process). Rates per worker are total / workers (the main
process counts as the one worker at 0 workers). Comparisons, single process: copying the same bytes
from a preloaded array into a batch buffer, ``PatchReader.read`` alone, and a naive
``zarr.open_array(...)[i]`` per patch; and a per-stage breakdown of one batch (read, augment rng, warp,
normalize, fresh-buffer page faults) that says where a loader's time goes.
"""

import argparse
import gc
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DEFAULT_WORK,
    children,
    cpu_seconds,
    folder_dataset,
    machine_info,
    markdown_table,
    warm_page_cache,
    write_results,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VARIANTS = ("raw", "aug-u8", "aug-float")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"cache of images and stores ({DEFAULT_WORK})")
    p.add_argument("--images", type=int, default=200, help="source images (x16 patches; default 200 -> 3,200)")
    p.add_argument("--size", type=int, default=1024, help="image side in px (default 1024)")
    p.add_argument("--split", default="train", help="split to read (default train)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts (0 2)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--min-patches", type=int, default=2000, help="patches per timed measurement, at least (2000)")
    p.add_argument("--min-seconds", type=float, default=2.0, help="seconds per timed measurement, at least (2.0)")
    p.add_argument("--repeat", type=int, default=2, help="timed windows per measurement, the fastest kept (2)")
    p.add_argument("--gen-procs", type=int, default=2, help="processes generating images / standardizing (2)")
    p.add_argument("--out", default="reader", help="results file name: benchmarks/results/OUT.json (reader)")
    return p.parse_args(argv)


# -- the store ----------------------------------------------------------------------------------------------


def build_store(args) -> tuple[Path, str]:
    from histokt.ingest.standardize import StandardizeConfig, standardize

    raw = folder_dataset(args.work, args.images, args.size, args.gen_procs)
    store, name = args.work / "reader-store.zarr", f"bench{args.images}"
    t = time.perf_counter()
    s = standardize(
        StandardizeConfig(
            dataset="folder", raw=raw, store=store, name=name, mpp=1.0, workers=args.gen_procs, progress=False
        )
    )
    if s.status == "written":
        print(f"built {store}/{name} in {time.perf_counter() - t:.1f} s: {s.counts}", file=sys.stderr)
    return store, name


# -- DataLoader throughput ----------------------------------------------------------------------------------


def make_dataset(store, name, split, variant):
    from histokt.store.augment import Augment, Normalize
    from histokt.store.reader import PatchDataset

    augment = Augment() if variant != "raw" else None
    normalize = Normalize(MEAN, STD) if variant == "aug-float" else None
    return PatchDataset(store, name, split, augment=augment, normalize=normalize)


def loader_rate(store, name, split, variant, workers, batch, min_patches, min_seconds, repeat) -> dict:
    import torch

    from histokt.store.reader import make_loader

    ds = make_dataset(store, name, split, variant)
    loader = make_loader(ds, batch, shuffle=True, workers=workers, generator=torch.Generator().manual_seed(0))

    def epoch() -> int:
        n = 0
        for images, _ in loader:  # noqa: F821 (loader is deleted only after the last call)
            n += images.shape[0]
        return n

    t = time.perf_counter()
    epoch()  # warm-up: starts the persistent workers, fills caches
    warmup = time.perf_counter() - t
    procs = descendants()  # forkserver + workers: their CPU is the loader side's
    best, rates = None, []
    for _ in range(repeat):  # timed windows on the same warm loader; the fastest is kept
        cpu0 = {p: cpu_seconds(p) for p in procs}
        main0 = _self_cpu()
        patches, epochs, t0 = 0, 0, time.perf_counter()
        while patches < min_patches or time.perf_counter() - t0 < min_seconds:
            patches += epoch()
            epochs += 1
        wall = time.perf_counter() - t0
        main_cpu = _self_cpu() - main0
        worker_cpu = sum((cpu_seconds(p) or cpu0[p]) - cpu0[p] for p in procs if cpu0[p] is not None)
        busy = worker_cpu if workers else main_cpu  # at 0 workers the main process is the worker
        run = {
            "variant": variant,
            "workers": workers,
            "patches": patches,
            "epochs": epochs,
            "wall_s": wall,
            "warmup_s": warmup,
            "rate": patches / wall,
            "per_worker": patches / wall / max(1, workers),
            "main_cpu_s": main_cpu,
            "worker_cpu_s": worker_cpu,
            "per_worker_cpu_s": patches / busy if busy else None,
        }
        if best is None or run["rate"] > best["rate"]:
            best = run
        rates.append(run["rate"])
    best["all_rates"] = rates
    del loader
    gc.collect()  # shut the persistent workers down before the next measurement
    return best


def _self_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def descendants() -> list[int]:
    out, todo = [], children()
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children(pid)
    return out


# -- single-process comparisons -----------------------------------------------------------------------------


def timed_rate(fn, n: int) -> float:
    """Items per second of ``fn()`` processing ``n`` items (the best of 3 runs)."""
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def comparisons(store, name, split, batch, min_patches) -> dict:
    """Rates (patches/s, one process) of the reference copies and of each stage a loader runs."""
    import numpy as np
    import torch
    import zarr

    from histokt.store.augment import Augment, Normalize, warp
    from histokt.store.schema import PatchReader

    reader = PatchReader(store, name, split)
    n_total = len(reader)
    rng = np.random.default_rng(0)
    n = max(min_patches, batch)
    order = rng.integers(0, n_total, size=n)  # random patch order, with repeats past one epoch
    batches = [order[a : a + batch] for a in range(0, n - batch + 1, batch)]
    n_batched = batch * len(batches)
    shape = reader.read(0).shape

    # the bytes themselves: every patch preloaded into one array, then copied into a batch buffer
    pre = np.stack([reader.read(i) for i in range(n_total)])
    buf_u8 = np.empty((batch, *shape), np.uint8)
    buf_f32 = np.empty((batch, *shape), np.float32)

    def memcpy_reused():
        for b in batches:
            for k, i in enumerate(b):
                buf_u8[k] = pre[i]  # noqa: F821 (deleted after the last call)

    def memcpy_fresh():  # a new buffer per batch, as the reader allocates one: first-touch page faults
        for b in batches:
            out = np.empty((batch, *shape), np.uint8)
            for k, i in enumerate(b):
                out[k] = pre[i]  # noqa: F821 (deleted after the last call)

    def memcpy_fresh_shm():  # a new shared-memory tensor per batch, as reader._empty does in a worker
        nbytes = batch * int(np.prod(shape))
        for b in batches:
            st = torch.UntypedStorage._new_shared(nbytes)
            out = torch.tensor([], dtype=torch.uint8).set_(st).view(batch, *shape).numpy()
            for k, i in enumerate(b):
                out[k] = pre[i]  # noqa: F821 (deleted after the last call)

    def read_only():
        for i in order[:n_batched]:
            reader.read(int(i))

    arr = zarr.open_array(str(Path(store) / name / split / "images"), mode="r")
    n_zarr = min(n_batched, 1000)

    def zarr_naive():
        for i in order[:n_zarr]:
            arr[int(i)]

    aug = Augment()
    patches = [pre[int(i)] for i in order[:n_batched]]
    norm = Normalize(MEAN, STD)
    params = []
    for i in order[:n_batched]:
        r = aug.rng(int(i))
        hflip, vflip = r.random(2) < 0.5
        angle = r.uniform(-aug.degrees, aug.degrees)
        tx, ty = round(r.uniform(-0.1 * shape[1], 0.1 * shape[1])), round(r.uniform(-0.1 * shape[0], 0.1 * shape[0]))
        params.append((angle, tx, ty, hflip, vflip))

    def aug_rng_only():  # Augment's per-sample generator and its draws, without the warp
        for i in order[:n_batched]:
            r = aug.rng(int(i))
            r.random(2), r.uniform(-45, 45), r.uniform(-27, 27), r.uniform(-27, 27)

    def aug_warp_only():
        for p, (angle, tx, ty, h, v) in zip(patches, params):
            warp(p, angle, tx, ty, h, v)

    def aug_full():
        for p, i in zip(patches, order[:n_batched]):
            aug(p, int(i))

    def normalize_reused():
        for b in range(len(batches)):
            for k in range(batch):
                norm.into(patches[b * batch + k], buf_f32[k])

    def normalize_fresh():
        for b in range(len(batches)):
            out = torch.empty((batch, *shape), dtype=torch.float32).numpy()
            for k in range(batch):
                norm.into(patches[b * batch + k], out[k])

    def normalize_fresh_shm():
        nbytes = batch * int(np.prod(shape)) * 4
        for b in range(len(batches)):
            st = torch.UntypedStorage._new_shared(nbytes)
            out = torch.tensor([], dtype=torch.float32).set_(st).view(batch, *shape).numpy()
            for k in range(batch):
                norm.into(patches[b * batch + k], out[k])

    rates = {
        "memcpy, reused buffer": timed_rate(memcpy_reused, n_batched),
        "memcpy, fresh buffer per batch": timed_rate(memcpy_fresh, n_batched),
        "memcpy, fresh shared-memory buffer per batch": timed_rate(memcpy_fresh_shm, n_batched),
        "PatchReader.read (np.fromfile), random order": timed_rate(read_only, n_batched),
        "zarr.open_array(...)[i], random order": timed_rate(zarr_naive, n_zarr),
        "Augment: per-sample rng + draws only": timed_rate(aug_rng_only, n_batched),
        "Augment: warp only (PIL affine, nearest)": timed_rate(aug_warp_only, n_batched),
        "Augment: full call": timed_rate(aug_full, n_batched),
        "Normalize.into, reused float buffer": timed_rate(normalize_reused, n_batched),
        "Normalize.into, fresh float buffer per batch": timed_rate(normalize_fresh, n_batched),
        "Normalize.into, fresh shared-memory float buffer": timed_rate(normalize_fresh_shm, n_batched),
    }
    del pre
    return {"patches_in_split": n_total, "patches_timed": n_batched, "rates": rates}


def stage_model(rates: dict, workers: int) -> dict:
    """µs per patch of each stage a loader variant runs, from the single-process rates.

    In a worker every batch is a fresh shared-memory tensor (reader._empty); in the main process a fresh
    malloc'd one. Both are first touched by the copy/normalize into them, which the rates include.
    """
    us = {k: 1e6 / v for k, v in rates.items()}
    read = us["PatchReader.read (np.fromfile), random order"]
    aug = us["Augment: full call"]
    if workers:
        copy, norm, where = (
            us["memcpy, fresh shared-memory buffer per batch"],
            us["Normalize.into, fresh shared-memory float buffer"],
            "fresh shm batch",
        )
    else:
        copy, norm, where = (
            us["memcpy, fresh buffer per batch"],
            us["Normalize.into, fresh float buffer per batch"],
            "fresh batch",
        )
    return {
        "raw": {"read": read, f"copy into {where}": copy},
        "aug-u8": {"read": read, "augment": aug, f"copy into {where}": copy},
        "aug-float": {"read": read, "augment": aug, f"normalize into {where}": norm},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work = args.work.resolve()
    import torch

    info = machine_info()
    print(
        f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), python {info['python']}, "
        f"torch {info['torch']}, load average {info['loadavg_at_start']}",
        file=sys.stderr,
    )
    store, name = build_store(args)
    warm_page_cache(sorted(p for p in (store / name / args.split / "images" / "c").rglob("*") if p.is_file()))
    torch.set_num_threads(1)  # the loader work is per-sample numpy/PIL; keep torch from spinning threads

    comp = comparisons(store, name, args.split, args.batch, args.min_patches)
    print("comparisons done", file=sys.stderr, flush=True)
    runs = []
    for variant in args.variants:
        for w in args.workers:
            r = loader_rate(
                store, name, args.split, variant, w, args.batch, args.min_patches, args.min_seconds, args.repeat
            )
            runs.append(r)
            print(
                f"  {variant}, {w} workers: {r['rate']:,.0f} patches/s ({r['per_worker']:,.0f} per worker)",
                file=sys.stderr,
                flush=True,
            )

    print(
        f"\n### reader: {comp['patches_in_split']:,} patches of 272x272x3 ({args.split}), random order, "
        f"batch {args.batch} ({info['date'][:10]}, {info['cpu_count']} CPUs)\n"
    )
    rows = []
    for r in runs:
        model = stage_model(comp["rates"], r["workers"])[r["variant"]]
        r["stage_model_us"] = model
        per_cpu = r["per_worker_cpu_s"]
        rows.append(
            [
                r["variant"],
                r["workers"],
                r["patches"],
                r["wall_s"],
                r["rate"],
                r["per_worker"],
                r["worker_cpu_s"] if r["workers"] else "-",
                r["main_cpu_s"],
                per_cpu if per_cpu else "-",
                f"{1e6 / per_cpu:.0f}" if per_cpu else "-",
                f"{sum(model.values()):.0f}",
            ]
        )
    print(
        markdown_table(
            [
                "variant",
                "workers",
                "patches timed",
                "seconds",
                "patches/s",
                "per worker",
                "worker CPU s",
                "main CPU s",
                "patches per worker-CPU-s",
                "µs CPU/patch",
                "sum of stages µs",
            ],
            rows,
        )
    )
    print("\n### single-process comparisons and stages\n")
    print(
        markdown_table(
            ["operation", "patches/s", "µs/patch"], [[k, v, f"{1e6 / v:.1f}"] for k, v in comp["rates"].items()]
        )
    )
    path = write_results(
        args.out,
        {
            "benchmark": "reader",
            "machine": info,
            "env": {k: v for k, v in os.environ.items() if k.startswith(("THP_", "OMP_", "MALLOC_"))},
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "store": str(store / name),
            "runs": runs,
            "comparisons": comp,
        },
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
