"""Benchmark the training reader on store format histokt-patches/2: PatchDataset + make_loader, with a
per-stage breakdown of what a loader worker spends per patch.

    .venv/bin/python benchmarks/reader.py [--work DIR] [--contents 272 93] [--sizes 800 3200] [--workers 2 0]

Builds (once, cached under --work) two kinds of store, each at two sizes (--sizes source images; 80 % of
the patches land in ``train``, the split read):

    272   patch-sized content: the generated 1024x1024 tissue PNGs of benchmarks/standardize.py at
          --mpp 1.0, 16 patches of 272 px per image (--sizes / 16 images)
    93    PCam-like content: generated 96x96 tissue PNGs at --mpp 0.972, one 93x93 content patch each,
          stored unpadded and mirror-padded to 272 px on read (``shards.pad_on_read``)

then reads the train split in random order (shuffle=True) in batches of --batch through ``make_loader``,
with each worker count, in these variants:

    raw        uint8 patches as stored (padded on read)
    aug-u8     augment.Augment() (flips + affine warp, Pillow) in the loader, uint8
    aug-u8-recycled  aug-u8 as `histokt train` reads it: each worker recycles a ring of RING shared-memory
               batch buffers (``PatchDataset(recycle=True)``) instead of allocating one per batch
    aug-dev    Augment(augment_on_device): the loader reads raw patches and draws the per-sample
               parameters; the warp runs on the GPU (not timed here: there is no GPU in this benchmark)
    aug-float  Augment() + Normalize(mean, std) in the loader -> float32

A measurement is one warm-up epoch (which also starts the persistent workers), then --repeat timed
windows of whole epochs (each at least --min-patches patches and --min-seconds), the median window
reported, with the load average read before each window (the machine may be shared). The consumer only
counts batches. Per worker = total / workers (at 0 workers the main process is the one worker); patches
per worker-CPU-second uses the workers' own CPU time from /proc: the rate per busy core, whatever share
of the cores the workers got.

Single-process breakdown (--repeat runs each, median; random order): the read (pread + CRC32C, and the
padding for 93 px content), the augmentation pieces (per-sample rng, Image.fromarray, the affine
transform, np.asarray back), copying into a batch buffer (reused, fresh malloc, fresh shared memory as a
worker allocates it), and ``PatchDataset.__getitems__`` as a worker runs it, with a fresh shared-memory
batch (today), and, as what-ifs, with one recycled buffer and with the fresh buffer pre-faulted in one
``madvise(MADV_POPULATE_WRITE)`` call.
"""

import argparse
import ctypes
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DEFAULT_WORK,
    children,
    cpu_seconds,
    folder_dataset,
    load,
    machine_info,
    markdown_table,
    warm_page_cache,
    write_results,
)

from histokt.store.reader import PatchDataset

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VARIANTS = ("raw", "aug-u8", "aug-u8-recycled", "aug-dev", "aug-float")
KINDS = {272: (1024, 1.0, 16), 93: (96, 0.972, 1)}  # content px: (image side, --mpp, patches per image)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"cache of images and stores ({DEFAULT_WORK})")
    p.add_argument("--contents", type=int, nargs="+", default=[272, 93], choices=sorted(KINDS), help="(272 93)")
    p.add_argument("--sizes", type=int, nargs="+", default=[800, 3200], help="patches per store (800 3200)")
    p.add_argument("--split", default="train", help="split to read (default train)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--workers", type=int, nargs="+", default=[2, 0], help="DataLoader worker counts (2 0)")
    p.add_argument("--variants", nargs="+", default=["raw", "aug-u8", "aug-u8-recycled"], choices=VARIANTS)
    p.add_argument("--min-patches", type=int, default=2000, help="patches per timed window, at least (2000)")
    p.add_argument("--min-seconds", type=float, default=2.0, help="seconds per timed window, at least (2.0)")
    p.add_argument("--repeat", type=int, default=3, help="timed windows per measurement, the median kept (3)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the single-process breakdown")
    p.add_argument("--gen-procs", type=int, default=2, help="processes generating images / standardizing (2)")
    p.add_argument("--out", default="reader", help="results file name: benchmarks/results/OUT.json (reader)")
    return p.parse_args(argv)


# -- the stores ---------------------------------------------------------------------------------------------


def build_store(args, content: int, patches: int) -> tuple[Path, str]:
    from histokt.ingest.standardize import StandardizeConfig, standardize

    side, mpp, per_image = KINDS[content]
    images = max(1, patches // per_image)
    raw = folder_dataset(args.work, images, side, args.gen_procs)
    store, name = args.work / "reader-store-v2.zarr", f"c{content}-{images}"
    t = time.perf_counter()
    cfg = StandardizeConfig(
        dataset="folder", raw=raw, store=store, name=name, mpp=mpp, workers=args.gen_procs, progress=False
    )
    s = standardize(cfg)
    if s.status == "written":
        print(f"built {store}/{name} in {time.perf_counter() - t:.1f} s: {s.counts}", file=sys.stderr)
    warm_page_cache(sorted((store / name / args.split / "images").glob("c.*")))
    return store, name


# -- DataLoader throughput ----------------------------------------------------------------------------------


def make_dataset(store, name, split, variant):
    from histokt.store.augment import Augment, Normalize

    augment = Augment() if variant != "raw" else None
    normalize = Normalize(MEAN, STD) if variant == "aug-float" else None
    return PatchDataset(
        store,
        name,
        split,
        augment=augment,
        normalize=normalize,
        augment_on_device=variant == "aug-dev",
        recycle=variant == "aug-u8-recycled",
    )


def loader_rate(store, name, split, variant, workers, args) -> dict:
    import torch

    from histokt.store.reader import make_loader

    ds = make_dataset(store, name, split, variant)
    loader = make_loader(ds, args.batch, shuffle=True, workers=workers, generator=torch.Generator().manual_seed(0))

    def epoch() -> int:
        n = 0
        for batch in loader:  # noqa: F821 (loader is deleted only after the last call)
            n += batch[0].shape[0]
        return n

    t = time.perf_counter()
    epoch()  # warm-up: starts the persistent workers, fills caches
    warmup = time.perf_counter() - t
    procs = descendants()  # forkserver + workers: their CPU is the loader side's
    windows = []
    for _ in range(args.repeat):  # timed windows on the same warm loader; the median is kept
        before = load()
        cpu0 = {p: cpu_seconds(p) for p in procs}
        main0 = _self_cpu()
        patches, epochs, t0 = 0, 0, time.perf_counter()
        while patches < args.min_patches or time.perf_counter() - t0 < args.min_seconds:
            patches += epoch()
            epochs += 1
        wall = time.perf_counter() - t0
        main_cpu = _self_cpu() - main0
        worker_cpu = sum((cpu_seconds(p) or cpu0[p]) - cpu0[p] for p in procs if cpu0[p] is not None)
        busy = worker_cpu if workers else main_cpu  # at 0 workers the main process is the worker
        windows.append(
            {
                "patches": patches,
                "epochs": epochs,
                "wall_s": wall,
                "rate": patches / wall,
                "main_cpu_s": main_cpu,
                "worker_cpu_s": worker_cpu,
                "per_worker_cpu_s": patches / busy if busy else None,
                "load": before,
            }
        )
    del loader
    gc.collect()  # shut the persistent workers down before the next measurement
    windows.sort(key=lambda w: w["rate"])
    mid = windows[(len(windows) - 1) // 2]
    rate = statistics.median(w["rate"] for w in windows)
    per_cpu = [w["per_worker_cpu_s"] for w in windows if w["per_worker_cpu_s"]]
    return {
        "variant": variant,
        "workers": workers,
        "warmup_s": warmup,
        "rate": rate,
        "per_worker": rate / max(1, workers),
        "per_worker_cpu_s": statistics.median(per_cpu) if per_cpu else None,
        "main_cpu_share": mid["main_cpu_s"] / mid["wall_s"],
        "worker_cpu_share": mid["worker_cpu_s"] / mid["wall_s"],
        "windows": windows,
    }


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


# -- single-process breakdown -------------------------------------------------------------------------------


def timed_us(fn, n: int, repeat: int) -> float:
    """µs per item of ``fn()`` processing ``n`` items (the median of ``repeat`` runs)."""
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return 1e6 * statistics.median(runs) / n


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14


def _populate(array) -> None:
    """Fault every page of ``array`` in at once (madvise MADV_POPULATE_WRITE), not one trap per page."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    addr = array.ctypes.data
    start = addr - addr % page
    length = array.nbytes + (addr - start)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_POPULATE_WRITE) != 0:
        raise OSError(ctypes.get_errno(), "madvise(MADV_POPULATE_WRITE)")


def breakdown(store, name, split, batch, n_min, repeat) -> dict:
    """µs per patch, one process, random order: each piece of what a loader worker does per patch."""
    import google_crc32c
    import numpy as np
    import torch
    import zarr
    from PIL import Image

    import histokt.store.reader as R
    from histokt.store.augment import Augment, Normalize, warp
    from histokt.store.schema import PatchReader
    from histokt.store.shards import pad_on_read

    reader = PatchReader(store, name, split)
    n_total, p = len(reader), reader.patch_size
    ch, cw = reader.content_shape
    rng = np.random.default_rng(0)
    n = batch * max(1, math.ceil(n_min / batch))
    order = rng.integers(0, n_total, size=n).tolist()  # random order, with repeats past one epoch
    batches = [order[a : a + batch] for a in range(0, n, batch)]
    shape = (p, p, 3)
    contents = [reader.read_content(i) for i in order]
    pre = [reader.read(i) for i in order]
    buf_u8 = np.empty((batch, *shape), np.uint8)
    buf_f32 = np.empty((batch, *shape), np.float32)
    shards = reader._shards
    aug = Augment()
    norm = Normalize(MEAN, STD)
    params = [aug._draw(aug.rng(i), p, p) for i in order]
    raw = [bytes(c) for c in contents]

    def shm(nbytes: int):
        st = torch.UntypedStorage._new_shared(nbytes)
        return torch.tensor([], dtype=torch.uint8).set_(st)

    def pread_only():
        for i in order:
            s, j = divmod(i, shards.shard_size)
            fd = shards._fd(s, i)
            offset, nbytes = (shards._index.get(s) or shards._shard_index(s, i, fd))[0][j]
            os.pread(fd, nbytes, offset)

    def crc_only():
        for b in raw:
            google_crc32c.value(b)

    def content_read():
        for i in order:
            reader.read_content(i)

    def pad_only():
        for c in contents:
            pad_on_read(c, p)

    def full_read():
        for i in order:
            reader.read(i)

    arr = zarr.open_array(str(Path(store) / name / split / "images"), mode="r")
    n_zarr = min(n, 500)

    def zarr_naive():
        for i in order[:n_zarr]:
            arr[i]

    def rng_only():
        for i in order:
            aug._draw(aug.rng(i), p, p)

    def warp_pieces() -> dict:
        """augment.warp's three steps timed inline on each patch (as hot in the cache as in a worker):
        µs per patch of each, the median of ``repeat`` passes."""
        runs = []
        for _ in range(repeat):
            t = [0.0, 0.0, 0.0]
            for x, (hflip, vflip, angle, tx, ty) in zip(pre, params):
                a = -math.radians(angle)  # the affine map of augment.warp, flips folded in
                cos, sin = math.cos(a), math.sin(a)
                fx, fy = (-1.0 if hflip else 1.0), (-1.0 if vflip else 1.0)
                cx = cy = p * 0.5
                ox, oy = cx + tx, cy + ty
                a11, a12, a21, a22 = fx * cos, fx * sin, -fy * sin, fy * cos
                m = (a11, a12, cx - a11 * ox - a12 * oy, a21, a22, cy - a21 * ox - a22 * oy)
                t0 = time.perf_counter()
                img = Image.fromarray(x)
                t1 = time.perf_counter()
                out = img.transform((p, p), Image.Transform.AFFINE, m, Image.Resampling.NEAREST, fillcolor=(0, 0, 0))
                t2 = time.perf_counter()
                np.asarray(out)
                t3 = time.perf_counter()
                t[0], t[1], t[2] = t[0] + t1 - t0, t[1] + t2 - t1, t[2] + t3 - t2
            runs.append(t)
        return {k: 1e6 * statistics.median(r[j] for r in runs) / n for j, k in enumerate(("from", "transform", "as"))}

    def warp_only():
        for x, (h, v, angle, tx, ty) in zip(pre, params):
            warp(x, angle, tx, ty, h, v)

    def augment_full():
        for x, i in zip(pre, order):
            aug(x, i)

    def copy_into(make):
        def run():
            for a in range(0, n, batch):
                out = make()
                for k in range(batch):
                    out[k] = pre[a + k]

        return run

    nbytes = batch * p * p * 3
    copy_reused = copy_into(lambda: buf_u8)
    copy_fresh = copy_into(lambda: np.empty((batch, *shape), np.uint8))
    copy_fresh_shm = copy_into(lambda: shm(nbytes).view(batch, *shape).numpy())

    def populated():
        out = shm(nbytes).view(batch, *shape).numpy()
        _populate(out)
        return out

    copy_populated_shm = copy_into(populated)

    def alloc_shm_only():
        for _ in batches:
            shm(nbytes)

    def normalize_reused():
        for k, x in enumerate(pre):
            norm.into(x, buf_f32[k % batch])

    # PatchDataset.__getitems__ as a worker runs it (aug-u8), with three kinds of batch buffer
    ds = make_dataset(store, name, split, "aug-u8")
    ds_raw = make_dataset(store, name, split, "raw")
    keys = [[(0, i) for i in b] for b in batches]
    real_empty, real_info = R._empty, R.get_worker_info
    recycled: dict = {}

    def recycled_empty(shape_, dtype):
        key = (tuple(shape_), dtype)
        if key not in recycled:
            recycled[key] = real_empty(shape_, dtype)
        return recycled[key]

    def populated_empty(shape_, dtype):
        t = real_empty(shape_, dtype)
        _populate(t.numpy())
        return t

    def getitems(dataset, empty):
        def run():
            R._empty, R.get_worker_info = empty, lambda: True  # as inside a DataLoader worker
            try:
                for k in keys:
                    dataset.__getitems__(k)
            finally:
                R._empty, R.get_worker_info = real_empty, real_info

        return run

    pieces = {
        "read: os.pread of the content (index cached)": (pread_only, n),
        "read: CRC32C of the content": (crc_only, n),
        "read: ShardedReader.read (pread + CRC32C + checks)": (content_read, n),
        "read: pad_on_read to 272 px": (pad_only, n),
        "read: PatchReader.read (all of the above)": (full_read, n),
        "read: zarr.open_array(...)[i], for reference": (zarr_naive, n_zarr),
        "augment: per-sample rng + draws": (rng_only, n),
        "augment: warp (the three below)": (warp_only, n),
        "augment: Augment() call (rng + warp)": (augment_full, n),
        "batch: copy into a reused buffer": (copy_reused, n),
        "batch: copy into a fresh malloc buffer": (copy_fresh, n),
        "batch: copy into a fresh shared-memory buffer (a worker today)": (copy_fresh_shm, n),
        "batch: of which allocating the shared-memory buffer": (alloc_shm_only, n),
        "batch: copy into fresh shared memory, pre-faulted by madvise": (copy_populated_shm, n),
        "normalize (aug-float only): into a reused float buffer": (normalize_reused, n),
        "worker: __getitems__ raw, fresh shared memory (today)": (getitems(ds_raw, real_empty), n),
        "worker: __getitems__ aug-u8, fresh shared memory (today)": (getitems(ds, real_empty), n),
        "worker: __getitems__ aug-u8, one recycled buffer (what-if)": (getitems(ds, recycled_empty), n),
        "worker: __getitems__ aug-u8, fresh shm pre-faulted (what-if)": (getitems(ds, populated_empty), n),
    }
    us = {}
    for label, (fn, count) in pieces.items():
        try:
            us[label] = timed_us(fn, count, repeat)
        except OSError as exc:  # madvise unsupported (kernel < 5.14): the what-if is left out
            print(f"  {label}: skipped ({exc})", file=sys.stderr)
        if label.startswith("augment: warp"):
            inline = warp_pieces()
            us["augment: - Image.fromarray (RGB -> Pillow's 4-byte pixels)"] = inline["from"]
            us["augment: - Image.transform (affine, nearest)"] = inline["transform"]
            us["augment: - np.asarray back to RGB"] = inline["as"]
    return {"patches_in_split": n_total, "content": [ch, cw], "patch_size": p, "patches_timed": n, "us": us}


def split_count(store, name, split) -> int:
    from histokt.store.schema import dataset_attrs

    return int((dataset_attrs(store, name) or {})["counts"][split])


# -- the parent ---------------------------------------------------------------------------------------------


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
    stores = {(c, n): build_store(args, c, n) for c in args.contents for n in sorted(args.sizes)}
    torch.set_num_threads(1)  # the loader work is per-sample numpy/PIL; keep torch from spinning threads

    parts = {}
    if not args.no_breakdown:
        for c in args.contents:
            store, name = stores[(c, max(args.sizes))]
            parts[c] = breakdown(store, name, args.split, args.batch, args.min_patches, args.repeat)
            print(f"breakdown {c} px done (load {load()[0]})", file=sys.stderr, flush=True)
    runs = []
    for (c, n), (store, name) in stores.items():
        for variant in args.variants:
            for w in args.workers:
                if variant == "aug-u8-recycled" and w == 0:  # no worker, no shared memory: aug-u8 itself
                    continue
                r = loader_rate(store, name, args.split, variant, w, args)
                r.update(content=c, store_patches=n, name=name)
                runs.append(r)
                print(
                    f"  {c} px, {n} patches, {variant}, {w} workers: {r['rate']:,.0f} patches/s "
                    f"({r['per_worker']:,.0f} per worker; windows {[round(x['rate']) for x in r['windows']]}, "
                    f"load {[x['load'][0] for x in r['windows']]})",
                    file=sys.stderr,
                    flush=True,
                )

    n_train = {key: split_count(*stores[key], args.split) for key in stores}
    print(
        f"\n### reader: random order, batch {args.batch}, median of {args.repeat} windows "
        f"({info['date'][:10]}, {info['cpu_count']} CPUs)\n"
    )
    rows = []
    for r in runs:
        per_cpu = r["per_worker_cpu_s"]
        rows.append(
            [
                f"{r['content']}² content" + (" (padded on read)" if r["content"] < 272 else ""),
                n_train[(r["content"], r["store_patches"])],
                r["variant"],
                r["workers"],
                r["rate"],
                r["per_worker"],
                per_cpu if per_cpu else "-",
                f"{r['worker_cpu_share']:.2f} / {r['main_cpu_share']:.2f}" if r["workers"] else "-",
                " / ".join(f"{w['load'][0]:.1f}" for w in r["windows"]),
            ]
        )
    print(
        markdown_table(
            [
                "store",
                "train patches",
                "variant",
                "workers",
                "patches/s",
                "per worker",
                "per worker-CPU-s",
                "cores used: workers / main",
                "load (1 min) per window",
            ],
            rows,
        )
    )
    if parts:
        labels = list(next(iter(parts.values()))["us"])
        print(f"\n### single-process breakdown, µs per patch (median of {args.repeat}; random order)\n")
        print(
            markdown_table(
                ["operation", *(f"{c}² content" for c in parts)],
                [[label, *(f"{parts[c]['us'].get(label, math.nan):.1f}" for c in parts)] for label in labels],
            )
        )
    path = write_results(
        args.out,
        {
            "benchmark": "reader",
            "format": "histokt-patches/2",
            "machine": info,
            "env": {k: v for k, v in os.environ.items() if k.startswith(("THP_", "OMP_", "MALLOC_"))},
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "runs": runs,
            "breakdown": parts,
        },
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
