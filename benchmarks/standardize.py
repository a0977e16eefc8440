"""Benchmark `histokt standardize` against the cost of only decoding the same images.

    .venv/bin/python benchmarks/standardize.py [--work DIR] [--images 256] [--small 64] [--workers 1 2]

Generates (once, cached under --work) a folder-card dataset of 1024x1024 tissue-like PNGs in 3 class
folders and standardizes it with --mpp 0.5 (scale 0.5 -> 512x512 -> 4 patches of 272 px per image) into a
fresh store, with each worker count, at two dataset sizes. Every measured run is a fresh child process
(so its peak RSS is its own), timed around ``standardize()`` alone (pool start-up included, interpreter
and import start-up not). The decode baseline is the same PNGs through PIL open + load + np.asarray in
the same number of processes, grouped as standardize groups them into parts.

Reported: patches/s, the ratio standardize wall / decode wall (goal <= 1.5), peak RSS of the main process
and of the largest worker at both sizes (flat = memory does not grow with the dataset), and a per-stage
time breakdown of one single-process run (stage timers wrapped around histokt's own functions).
"""

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DEFAULT_WORK,
    PeakRSS,
    folder_dataset,
    machine_info,
    markdown_table,
    warm_page_cache,
    write_results,
)

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
    """Wraps module functions with timers; the phase (part / finalize) labels zarr writes by where they happen."""

    def __init__(self):
        self.seconds, self.calls, self.phase = {}, {}, "worklist"

    def add(self, key, dt):
        self.seconds[key] = self.seconds.get(key, 0.0) + dt
        self.calls[key] = self.calls.get(key, 0) + 1

    def wrap(self, owner, name, key, phase=None):
        original = getattr(owner, name)
        timer = self

        def timed(*args, **kw):
            before = timer.phase
            if phase:
                timer.phase = phase
            label = key(timer.phase) if callable(key) else key
            t = time.perf_counter()
            try:
                return original(*args, **kw)
            finally:
                timer.add(label, time.perf_counter() - t)
                timer.phase = before

        setattr(owner, name, timed)

    def install(self):
        import histokt.atomic
        import histokt.ingest.cards.base
        import histokt.ingest.decode
        import histokt.ingest.finalize as F
        import histokt.ingest.standardize as S

        self.wrap(S, "make_worklist", "worklist: index sources + split")
        self.wrap(S, "_prepare_staging", "worklist: staging folder + worklist.json")
        self.wrap(S, "process_part", "part: total", phase="part")
        self.wrap(histokt.ingest.decode, "open_image", "part: PNG open + decode (PIL)")
        self.wrap(histokt.ingest.decode, "rgb_image", "part: RGB mode conversion")
        self.wrap(S, "rescale", "part: rescale (PIL bilinear)")
        self.wrap(S, "mirror_pad", "part: mirror pad")
        self.wrap(S, "is_low_contrast", "part: low-contrast filter")
        self.wrap(S, "patch_array", lambda ph: f"{ph}: create zarr array(s)")
        self.wrap(F, "patch_array", lambda ph: f"{ph}: create zarr array(s)")
        self.wrap(S, "write_chunk", "part: write chunk files")
        self.wrap(
            histokt.atomic,
            "write_json",
            lambda ph: f"{ph}: atomic JSON write (fsync)" + (" [in staging]" if ph == "worklist" else " [manifest]"),
        )
        self.wrap(S, "finalize_locked", "finalize: total", phase="finalize")
        self.wrap(F, "_move_chunks", "finalize: rename chunk files")
        self.wrap(F, "_write_meta", "finalize: labels/source_id/box arrays")
        self.wrap(F, "_swap_in", "finalize: swap in + clean staging")


def child_standardize(spec: dict) -> dict:
    from histokt.ingest.standardize import StandardizeConfig, standardize

    timer = None
    if spec.get("stages"):
        timer = StageTimer()
        timer.install()
    cfg = StandardizeConfig(
        dataset="folder",
        raw=Path(spec["raw"]),
        store=Path(spec["store"]),
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
    wall = time.perf_counter() - t0
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
    result = {
        "patches": sum(summary.counts.values()),
        "counts": summary.counts,
        "rejected": summary.rejected,
        "wall_s": wall,
        "cpu_s": cpu,
        "rss_mb": rss.result(),
    }
    if timer:
        result["stages"] = {k: {"s": timer.seconds[k], "calls": timer.calls[k]} for k in sorted(timer.seconds)}
    return result


def run_child(spec: dict) -> dict:
    """Run one measurement in a fresh interpreter; its last stdout line is the JSON result."""
    if spec["kind"] == "standardize":
        shutil.rmtree(spec["store"], ignore_errors=True)  # a fresh store each time
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        sys.exit(f"child run failed ({spec}):\n{proc.stderr[-3000:]}")
    if spec["kind"] == "standardize":
        shutil.rmtree(spec["store"], ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the parent ---------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--work", type=Path, default=DEFAULT_WORK, help=f"cache of images and scratch stores ({DEFAULT_WORK})"
    )
    p.add_argument("--images", type=int, default=256, help="images of the main run (default 256 -> 1024 patches)")
    p.add_argument("--small", type=int, default=64, help="images of the second size, for the RSS comparison (64)")
    p.add_argument("--size", type=int, default=1024, help="image side in px (default 1024)")
    p.add_argument("--mpp", type=float, default=0.5, help="native µm/px passed to standardize (default 0.5)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts to measure (1 2)")
    p.add_argument("--repeat", type=int, default=2, help="runs per measurement; the fastest is kept (2)")
    p.add_argument("--gen-procs", type=int, default=2, help="processes generating missing images (2)")
    p.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown run")
    p.add_argument("--profile", action="store_true", help="also cProfile one single-process run (top 30 by tottime)")
    p.add_argument("--out", default="standardize", help="results file name: benchmarks/results/OUT.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def best(spec: dict, repeat: int) -> dict:
    runs = [run_child(spec) for _ in range(repeat)]
    out = min(runs, key=lambda r: r["wall_s"])
    out["all_wall_s"] = [r["wall_s"] for r in runs]
    return out


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
    warm_page_cache(sorted(raws[max(sizes)].rglob("*.png")))
    store = str(work / "stores" / "standardize-bench.zarr")
    info = machine_info()
    print(
        f"machine: {info['cpu_count']} CPUs ({info['cpu_model']}), python {info['python']}, "
        f"torch {info['torch']}, load average {info['loadavg_at_start']}",
        file=sys.stderr,
    )

    runs = []
    for n in sizes:
        for w in args.workers:
            common = {"raw": str(raws[n]), "workers": w}
            std = best({"kind": "standardize", "store": store, "mpp": args.mpp, **common}, args.repeat)
            dec = best({"kind": "decode", **common}, args.repeat)
            run = {"images": n, "workers": w, "standardize": std, "decode": dec, "ratio": std["wall_s"] / dec["wall_s"]}
            runs.append(run)
            print(
                f"  {n} images, {w} worker(s): standardize {std['wall_s']:.2f} s, decode {dec['wall_s']:.2f} s, "
                f"ratio {run['ratio']:.2f}",
                file=sys.stderr,
                flush=True,
            )

    stages = None
    if not args.no_stages:
        stages = run_child(
            {
                "kind": "standardize",
                "store": store,
                "mpp": args.mpp,
                "raw": str(raws[max(sizes)]),
                "workers": 1,
                "stages": True,
            }
        )
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
        "ratio (goal ≤ 1.5)",
        "CPU s std / dec",
        "peak RSS main MiB",
        "peak RSS worker MiB",
    ]
    rows = []
    for r in runs:
        s, d = r["standardize"], r["decode"]
        rows.append(
            [
                r["images"],
                r["workers"],
                s["patches"],
                s["wall_s"],
                s["patches"] / s["wall_s"],
                d["wall_s"],
                f"{r['ratio']:.2f}x",
                f"{s['cpu_s']:.1f} / {d['cpu_s']:.1f}",
                s["rss_mb"]["self"],
                s["rss_mb"]["children"] if r["workers"] > 1 else "-",
            ]
        )
    per_image = runs[-1]["standardize"]["patches"] / runs[-1]["images"]
    print(
        f"\n### standardize: {args.size}x{args.size} PNG, --mpp {args.mpp} -> {per_image:g} patches/image "
        f"({info['date'][:10]}, {info['cpu_count']} CPUs)\n"
    )
    print(markdown_table(headers, rows))
    if stages:
        print(
            f"\n### where the time goes: 1 worker, {stages['patches']} patches, {stages['wall_s']:.2f} s wall "
            f"(stage timers add ~µs per call)\n"
        )
        print(markdown_table(*stage_rows(stages)))
    if profile:
        print(f"\ncProfile of one single-process run: {profile}")

    path = write_results(
        args.out,
        {
            "benchmark": "standardize",
            "machine": info,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
            "runs": runs,
            "stages": stages,
        },
    )
    print(f"\nresults: {path}")
    return 0


def stage_rows(stages: dict):
    """Rows per stage, grouped by phase; nested stages are indented under their phase's total."""
    st, wall, n = stages["stages"], stages["wall_s"], max(1, stages["patches"])
    rows = []

    def row(label, seconds, calls=""):
        rows.append([label, calls, seconds, f"{100 * seconds / wall:.1f}%", f"{1e3 * seconds / n:.2f}"])

    for phase, total in (("worklist", None), ("part", "part: total"), ("finalize", "finalize: total")):
        keys = sorted(k for k in st if k.startswith(phase + ": ") and k != total)
        if total in st:
            row(f"**{total}**", st[total]["s"], st[total]["calls"])
        for k in keys:
            row(("  " if total else "") + k, st[k]["s"], st[k]["calls"])
        if total == "part: total":
            row("  part: other (tiling, manifest rows, Python)", st[total]["s"] - sum(st[k]["s"] for k in keys))
    top = sum(
        st[k]["s"]
        for k in (
            "worklist: index sources + split",
            "worklist: staging folder + worklist.json",
            "part: total",
            "finalize: total",
        )
        if k in st
    )
    row("outside the above (config, summary)", wall - top)
    return ["stage", "calls", "seconds", "% of wall", "ms / patch"], rows


if __name__ == "__main__":
    sys.exit(main())
