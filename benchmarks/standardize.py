"""Benchmark `histokt standardize` (store format histokt-patches/2) against the cost of only decoding the
same images, and count the files and folders (inodes) it leaves and needs on the way.

    .venv/bin/python benchmarks/standardize.py [--work DIR] [--images 256] [--small 64] [--workers 1 2]

Generates (once, cached under --work) a folder-card dataset of 1024x1024 tissue-like PNGs in 3 class
folders and standardizes it with --mpp 0.5 (scale 0.5 -> 512x512 -> 4 patches of 272 px per image) into a
fresh store, with each worker count, at two dataset sizes. Every measured run is a fresh child process
(so its peak RSS is its own), timed around ``standardize()`` alone (pool start-up, finalize, packing into
shard files and all checksums included; interpreter and import start-up not). The decode baseline is the
same PNGs through PIL open + load + np.asarray in the same number of processes, grouped as standardize
groups them into parts. Each measurement is --repeat (3) pairs of runs, standardize then decode back to
back; the medians are reported, and the ratio is the median of the pairs' ratios, with the load average
(as ``uptime`` prints it) read before each run: the machine may be shared. The CPU ratio (user + system
seconds of the process and its workers) is the figure that holds up best when other jobs share the cores.

Reported: patches/s, the ratio standardize wall / decode wall (goal <= 1.4), peak RSS of the main process
and of the largest worker at both sizes; inodes (files + folders) of the finished dataset folder, and the
peak inodes of the store plus its staging sibling ``.<store>.staging`` while standardizing (counted right
before the final rename, ``finalize._swap_in``: the moment that holds every part's data file and every
packed shard), both per 10,000 patches beyond the fixed count of a tiny dataset (64 images of one patch
each: the 64 parts and 3 non-empty splits any dataset of 64 to 32,768 sources has), and as the growth
between the two sizes; and a per-stage time breakdown of one single-process run (timers wrapped around
histokt's own functions, nested where the functions nest; a "rest" row is a stage's time outside the
stages listed under it).
"""

import argparse
import functools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DEFAULT_WORK,
    N_CLASSES,
    PeakRSS,
    folder_dataset,
    footprint,
    load,
    machine_info,
    markdown_table,
    tissue,
    warm_page_cache,
    write_results,
)

TINY = 64  # small images (one patch each) of the tiny dataset whose inode counts are the fixed part

# -- child processes: one measured run each ----------------------------------------------------------------


def decode_many(paths) -> int:
    """Decode-only baseline: what any standardizer must pay at least once per image."""
    import numpy as np
    from PIL import Image

    n = 0
    for p in paths:
        img = Image.open(p)
        img.load()
        n += np.asarray(img).shape[0]
    return n


def _cpu_seconds() -> float:
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def child_decode(spec: dict) -> dict:
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    files = sorted(str(p) for p in Path(spec["raw"]).rglob("*.png"))
    size = max(1, min(512, math.ceil(len(files) / 64)))  # standardize's part size
    chunks = [files[a : a + size] for a in range(0, len(files), size)]
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    with PeakRSS() as rss:
        if spec["workers"] == 1:
            for c in chunks:
                decode_many(c)
        else:
            with ProcessPoolExecutor(spec["workers"], mp_context=get_context("spawn")) as ex:
                list(ex.map(decode_many, chunks))
    wall = time.perf_counter() - t0
    return {"images": len(files), "wall_s": wall, "cpu_s": _cpu_seconds() - cpu0, "rss_mb": rss.result()}


class StageTimer:
    """Timers wrapped around module functions. A stage is keyed by the path of the timed stages it runs
    inside, so nested functions (a CRC inside a shard write inside packing) appear under their callers."""

    def __init__(self):
        self.seconds: dict[tuple, float] = {}
        self.calls: dict[tuple, int] = {}
        self.order: dict[tuple, int] = {}
        self.stack: list[str] = []

    def _enter(self, label: str) -> tuple:
        self.stack.append(label)
        path = tuple(self.stack)
        self.order.setdefault(path, len(self.order))
        return path

    def _leave(self, path: tuple, dt: float, calls: int = 1) -> None:
        self.stack.pop()
        self.seconds[path] = self.seconds.get(path, 0.0) + dt
        self.calls[path] = self.calls.get(path, 0) + calls

    def timed(self, label: str, fn):
        @functools.wraps(fn)  # pickled by name into worker pools, where the original runs untimed
        def timed(*args, **kw):
            path = self._enter(label)
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self._leave(path, time.perf_counter() - t)

        return timed

    def timed_generator(self, label: str, fn):
        """A generator function whose every step (``next``) is timed; one call per item it yields."""

        @functools.wraps(fn)
        def timed(*args, **kw):
            it = fn(*args, **kw)
            while True:
                path = self._enter(label)
                t = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    self._leave(path, time.perf_counter() - t, calls=0)
                    return
                self._leave(path, time.perf_counter() - t)
                yield item

        return timed

    def wrap(self, owner, name: str, label: str, generator: bool = False) -> None:
        fn = getattr(owner, name)
        setattr(owner, name, (self.timed_generator if generator else self.timed)(label, fn))

    def proxy(self, owner, module_name: str, functions: dict[str, str]) -> None:
        """Replace ``owner.<module_name>`` (a module the owner imported) by a stand-in whose ``functions``
        {name: label} are timed; anything else passes through. Other importers of the module are untouched."""
        module = getattr(owner, module_name)
        stand_in = types.SimpleNamespace(**{n: self.timed(label, getattr(module, n)) for n, label in functions.items()})
        for name in dir(module):
            if not name.startswith("__") and name not in functions:
                setattr(stand_in, name, getattr(module, name))
        setattr(owner, module_name, stand_in)

    def install(self) -> None:
        import histokt.atomic as A
        import histokt.ingest.decode as D
        import histokt.ingest.finalize as F
        import histokt.ingest.standardize as S
        import histokt.store.shards as H

        self.wrap(S, "make_worklist", "worklist: index sources, split, fingerprint (make_worklist)")
        self.wrap(S, "_prepare_staging", "worklist: staging folder + worklist.json (_prepare_staging)")
        self.wrap(S, "_run_parts", "parts: _run_parts (worker pool start, every part)")
        self.wrap(S, "process_part", "part (process_part: lease, clear, write)")
        self.wrap(S, "_write_part", "_write_part: data file + manifest")
        self.wrap(S, "_tiles", "_tiles: decode to kept content bytes", generator=True)
        self.wrap(D, "open_image", "open + decode (PIL)")
        self.wrap(D, "rgb_image", "RGB mode conversion")
        self.wrap(S, "rescale", "rescale (PIL bilinear)")
        self.wrap(S, "mirror_pad", "mirror pad")
        self.wrap(S, "is_low_contrast", "low-contrast filter")
        self.proxy(S, "google_crc32c", {"value": "CRC32C of the content"})
        self.wrap(A, "write_json", "atomic JSON write")
        self.proxy(A, "os", {"fsync": "fsync (file or folder)"})
        self.wrap(S, "finalize_locked", "finalize: total (finalize_locked: lock, publish)")
        self.wrap(F, "read_manifests", "read manifests")
        self.wrap(F, "check_parts", "check part sizes (stat)")
        self.wrap(F, "_layout", "groups + images array metadata (_layout)")
        self.wrap(F, "pack", "pack: parts -> shard files (pack; with workers, a pool of its own)")
        self.wrap(F, "write_shard", "write_shard (atomic: write, fsync, rename)")
        self.wrap(F, "_patches", "re-read staged content (pread) + check CRC", generator=True)
        self.proxy(F, "google_crc32c", {"value": "CRC32C check of the staged content"})
        self.proxy(H, "google_crc32c", {"value": "CRC32C of patch and index"})
        self.wrap(F, "pad_on_read", "pad mixed content to the patch size")
        self.wrap(F, "_write_meta", "labels/source_id/box arrays (_write_meta)")
        self.wrap(F, "_write_root", "sources + attrs (_write_root)")
        self.wrap(F, "_swap_in", "swap in + clean staging (_swap_in)")

    def rows(self, wall: float, patches: int):
        """Markdown rows of the stage tree: per stage its calls, seconds, % of wall and ms per patch."""
        rows = []
        n = max(1, patches)

        def row(depth, label, seconds, calls=""):
            label = ("&nbsp;&nbsp;" * depth) + (f"**{label}**" if depth == 0 else label)
            rows.append([label, calls, seconds, f"{100 * seconds / wall:.1f}%", f"{1e3 * seconds / n:.2f}"])

        def walk(prefix: tuple) -> None:
            kids = sorted((p for p in self.seconds if p[:-1] == prefix), key=self.order.__getitem__)
            for p in kids:
                row(len(p) - 1, p[-1], self.seconds[p], self.calls[p])
                grandkids = [q for q in self.seconds if q[:-1] == p]
                walk(p)
                if grandkids:
                    rest = self.seconds[p] - sum(self.seconds[q] for q in grandkids)
                    row(len(p), "rest (its own code: Python, write() calls, ...)", rest)

        walk(())
        top = sum(s for p, s in self.seconds.items() if len(p) == 1)
        row(0, "outside the above (config, summary)", wall - top)
        return ["stage", "calls", "seconds", "% of wall", "ms / patch"], rows

    def to_json(self) -> list:
        return [
            {"stage": list(p), "s": self.seconds[p], "calls": self.calls[p]}
            for p in sorted(self.seconds, key=self.order.__getitem__)
        ]


def install_inode_count(store: Path, found: dict) -> None:
    """Count the store and its staging sibling (files + folders) right before the final rename: the peak,
    every part's data file and every packed shard file exist at once. The count's time is recorded."""
    import histokt.ingest.finalize as F

    original = F._swap_in
    staging_root = store.parent / f".{store.name}.staging"

    def counted(store_, name, out, staging):
        t = time.perf_counter()
        parts = footprint(staging / "parts")
        found["peak"] = {
            "store": footprint(store),
            "staging": footprint(staging_root),
            "parts": parts,
            "final": footprint(out),
            "part_files": len(os.listdir(staging / "parts")),
        }
        found["count_s"] = time.perf_counter() - t
        return original(store_, name, out, staging)

    F._swap_in = counted


def child_standardize(spec: dict) -> dict:
    from histokt.ingest.standardize import StandardizeConfig, standardize

    store = Path(spec["store"])
    timer = None
    if spec.get("stages"):
        timer = StageTimer()
        timer.install()
    inodes: dict = {}
    install_inode_count(store, inodes)
    cfg = StandardizeConfig(
        dataset="folder",
        raw=Path(spec["raw"]),
        store=store,
        name="bench",
        mpp=spec["mpp"],
        workers=spec["workers"],
        progress=False,
    )
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    with PeakRSS() as rss:
        summary = standardize(cfg)
    wall = time.perf_counter() - t0 - inodes.get("count_s", 0.0)  # the count is the benchmark's, not histokt's
    cpu = _cpu_seconds() - cpu0
    if profiler:
        import io
        import pstats

        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(30)
        Path(spec["profile"]).write_text(out.getvalue())
    if summary.status != "written" or summary.counts is None:
        raise SystemExit(f"standardize did not write the dataset: {summary}")
    peak = inodes["peak"]
    result = {
        "patches": sum(summary.counts.values()),
        "counts": summary.counts,
        "rejected": summary.rejected,
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_mb": rss.result(),
        "dataset": footprint(store / "bench"),
        "images_shards": footprint(*(store / "bench" / s / "images" for s in summary.counts)),
        "peak": peak,
        "peak_inodes": peak["store"]["inodes"] + peak["staging"]["inodes"],
    }
    if timer:
        result["stages"] = timer.to_json()
        result["stage_table"] = timer.rows(wall, result["patches"])
    return result


def run_child(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter; its last stdout line is the JSON result."""

    def clear() -> None:  # a fresh store each time, and no staging left by an earlier, failed run
        store = Path(spec["store"])
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(store.parent / f".{store.name}.staging", ignore_errors=True)

    if spec["kind"] == "standardize":
        clear()
    before = load()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"child run failed ({spec}):\n{proc.stderr[-3000:]}")
    if spec["kind"] == "standardize":
        clear()
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["load"] = before
    return out


# -- the parent ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help=f"cache of images and scratch stores ({DEFAULT_WORK})"
    )
    p.add_argument("--images", type=int, default=256, help="images of the main run (default 256 -> 1024 patches)")
    p.add_argument("--small", type=int, default=64, help="images of the second size (default 64 -> 256 patches)")
    p.add_argument("--size", type=int, default=1024, help="image side in px (default 1024)")
    p.add_argument("--mpp", type=float, default=0.5, help="native µm/px passed to standardize (default 0.5)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure (1 2)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median is reported (3)")
    p.add_argument("--gen-procs", type=int, default=2, help="processes generating missing images (2)")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown run")
    p.add_argument("--profile", action="store_true", help="also cProfile one single-process run (top 30 by tottime)")
    p.add_argument("--out", default="standardize", help="results file name: benchmarks/results/OUT.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def median_run(runs: list[dict]) -> dict:
    """The run of median wall time among ``runs``, with every run's wall time, CPU time and load."""
    out = dict(sorted(runs, key=lambda r: r["wall_s"])[(len(runs) - 1) // 2])
    out["median_wall_s"] = statistics.median(r["wall_s"] for r in runs)
    out["median_cpu_s"] = statistics.median(r["cpu_s"] for r in runs)
    out["all_wall_s"] = [r["wall_s"] for r in runs]
    out["all_cpu_s"] = [r["cpu_s"] for r in runs]
    out["all_load"] = [r["load"] for r in runs]
    return out


def paired(std_spec: dict, dec_spec: dict, repeat: int) -> dict:
    """``repeat`` pairs of runs, standardize then decode, back to back, so that a change in the load of a
    shared machine hits both sides of a ratio alike; the ratio is the median of the pairs' ratios."""
    pairs = [(run_child(std_spec), run_child(dec_spec)) for _ in range(repeat)]
    std, dec = median_run([p[0] for p in pairs]), median_run([p[1] for p in pairs])
    return {
        "standardize": std,
        "decode": dec,
        "ratio": statistics.median(s["wall_s"] / d["wall_s"] for s, d in pairs),
        "cpu_ratio": statistics.median(s["cpu_s"] / d["cpu_s"] for s, d in pairs),
        "pair_ratios": [s["wall_s"] / d["wall_s"] for s, d in pairs],
    }


def tiny_dataset(work: Path) -> Path:
    """The fixed part's dataset: TINY images of 544 px (one 272 px patch each at --mpp 0.5) in 3 class
    folders, so it has the 64 parts and the 3 non-empty splits any larger dataset has."""
    from PIL import Image

    raw = work / f"raw-tiny-{TINY}"
    for i in range(TINY):
        path = raw / f"class_{i % N_CLASSES}" / f"img_{i:05d}.png"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(tissue(10_000 + i, 544)).save(path)
    return raw


def per_10k(count: int, fixed: int, patches: int) -> float:
    return (count - fixed) / patches * 10_000


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        result = {"standardize": child_standardize, "decode": child_decode}[spec["kind"]](spec)
        print(json.dumps(result))
        return 0

    work = args.work.resolve()
    sizes = sorted({args.small, args.images})
    raws = {n: folder_dataset(work, n, args.size, args.gen_procs) for n in sizes}
    tiny_raw = tiny_dataset(work)
    warm_page_cache(sorted(raws[max(sizes)].rglob("*.png")))
    store = str(work / "stores" / "standardize-bench.zarr")
    info = machine_info()
    print(
        f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), python {info['python']}, "
        f"torch {info['torch']}, load average {info['loadavg_at_start']}",
        file=sys.stderr,
    )

    tiny = run_child({"kind": "standardize", "store": store, "mpp": args.mpp, "raw": str(tiny_raw), "workers": 1})
    fixed, fixed_peak = tiny["dataset"]["inodes"], tiny["peak_inodes"]
    print(f"  tiny dataset ({tiny['patches']} patches): {fixed} inodes, peak {fixed_peak}", file=sys.stderr)

    runs = []
    for n in sizes:
        for w in args.workers:
            common = {"raw": str(raws[n]), "workers": w}
            run = paired(
                {"kind": "standardize", "store": store, "mpp": args.mpp, **common},
                {"kind": "decode", **common},
                args.repeat,
            )
            run.update(images=n, workers=w)
            runs.append(run)
            std, dec = run["standardize"], run["decode"]
            print(
                f"  {n} images, {w} worker(s): standardize {std['all_wall_s']} s, decode {dec['all_wall_s']} s, "
                f"ratios {run['pair_ratios']}, load {std['all_load']}",
                file=sys.stderr,
                flush=True,
            )

    stages = {}
    if not args.no_stages:  # per worker count: the run of median wall time among --repeat
        for w in args.workers:
            spec = {"kind": "standardize", "store": store, "mpp": args.mpp, "raw": str(raws[max(sizes)]), "workers": w}
            stages[w] = median_run([run_child({**spec, "stages": True}) for _ in range(args.repeat)])
    profile = None
    if args.profile:
        profile = str(Path(__file__).resolve().parent / "results" / "standardize_profile.txt")
        Path(profile).parent.mkdir(parents=True, exist_ok=True)
        run_child(
            {
                "kind": "standardize",
                "store": store,
                "mpp": args.mpp,
                "raw": str(raws[max(sizes)]),
                "workers": 1,
                "profile": profile,
            }
        )

    headers = [
        "images",
        "workers",
        "patches",
        "standardize s",
        "patches/s",
        "decode-only s",
        "ratio (goal ≤ 1.4)",
        "CPU s std / dec",
        "CPU ratio",
        "peak RSS main MiB",
        "peak RSS worker MiB",
        "load (1 min)",
    ]
    rows = []
    for r in runs:
        s, d = r["standardize"], r["decode"]
        rows.append(
            [
                r["images"],
                r["workers"],
                s["patches"],
                s["median_wall_s"],
                s["patches"] / s["median_wall_s"],
                d["median_wall_s"],
                f"{r['ratio']:.2f}x",
                f"{s['median_cpu_s']:.1f} / {d['median_cpu_s']:.1f}",
                f"{r['cpu_ratio']:.2f}x",
                s["rss_mb"]["self"],
                s["rss_mb"]["children"] if r["workers"] > 1 else "-",
                " / ".join(f"{x[0]:.1f}" for x in s["all_load"]),
            ]
        )
    per_image = runs[-1]["standardize"]["patches"] / runs[-1]["images"]
    print(
        f"\n### standardize: {args.size}x{args.size} PNG, --mpp {args.mpp} -> {per_image:g} patches/image, "
        f"median of {args.repeat} ({info['date'][:10]}, {info['cpu_count']} CPUs)\n"
    )
    print(markdown_table(headers, rows))

    print(
        f"\n### inodes (files + folders): fixed part = a tiny dataset of {tiny['patches']} patches: "
        f"{fixed} in the dataset folder, {fixed_peak} at the peak (store + staging)\n"
    )
    irows = []
    seen = set()
    for r in runs:
        s = r["standardize"]
        if r["images"] in seen:  # the counts do not depend on the worker count
            continue
        seen.add(r["images"])
        pk = s["peak"]
        irows.append(
            [
                r["images"],
                s["patches"],
                s["dataset"]["inodes"],
                s["images_shards"]["files"] - 3,  # minus the 3 images arrays' zarr.json
                per_10k(s["dataset"]["inodes"], fixed, s["patches"]),
                s["peak_inodes"],
                f"{pk['parts']['files']} / {pk['final']['inodes']}",
                per_10k(s["peak_inodes"], fixed_peak, s["patches"]),
            ]
        )
    print(
        markdown_table(
            [
                "images",
                "patches",
                "dataset inodes",
                "shard files",
                "per 10k beyond fixed (goal ≤ 40)",
                "peak inodes",
                "of which part files / final folder",
                "peak per 10k beyond fixed (goal ≤ 100)",
            ],
            irows,
        )
    )
    if len(irows) >= 2:  # the growth between the two sizes: what each further 10,000 patches add
        a, b = irows[0], irows[-1]
        dp = b[1] - a[1]
        print(
            f"\nmarginal, between {a[1]:,} and {b[1]:,} patches: {(b[2] - a[2]) / dp * 10_000:.0f} dataset inodes "
            f"and {(b[5] - a[5]) / dp * 10_000:.0f} peak inodes per 10,000 patches"
        )
    for w, st in stages.items():
        where = "" if w == 1 else " (the main process only: parts and packing run in the workers)"
        print(
            f"\n### where the time goes: {w} worker(s), {st['patches']} patches, median run of {args.repeat}: "
            f"{st['wall_s']:.2f} s wall (runs {', '.join(f'{x:.2f}' for x in st['all_wall_s'])} s; load "
            f"{st['load'][0]}; stage timers add ~µs per call){where}\n"
        )
        print(markdown_table(*st["stage_table"]))
    if profile:
        print(f"\ncProfile of one single-process run: {profile}")

    path = write_results(
        args.out,
        {
            "benchmark": "standardize",
            "format": "histokt-patches/2",
            "machine": info,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
            "tiny": tiny,
            "runs": runs,
            "stages": stages,
        },
    )
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
